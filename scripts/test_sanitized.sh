#!/usr/bin/env bash
# Build the C++ part with AddressSanitizer and UndefinedBehaviorSanitizer in a copy of the tree,
# then run tests against that build: a memory error or undefined behaviour in the backend, the
# checkpoint writer or the data pipeline is reported with its stack instead of passing silently.
#
#   scripts/test_sanitized.sh [pytest args]      # default: the backend's failure, op, shared and
#                                                # single-copy tests (about 6 min, after a ~8 min
#                                                # build on 2 cores)
#
# Uses the project's venv ($ICHIBAN_VENV, default .venv, made by run.sh) and the compiler's own
# sanitizer runtimes, preloaded into Python (which is not instrumented). Only the CPU sources are
# built. Exit status: pytest's, or 3 when a sanitizer reported anything (its logs are printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${ICHIBAN_VENV:-.venv}
[ -x "$VENV/bin/python" ] || { echo "no venv at $VENV: run 'bash run.sh test' once first" >&2; exit 2; }
PY=$ROOT/$VENV/bin/python
CXX=${CXX:-c++}
ASAN=$($CXX -print-file-name=libasan.so)
UBSAN=$($CXX -print-file-name=libubsan.so)
[ -e "$ASAN" ] && [ -e "$UBSAN" ] || { echo "$CXX has no libasan/libubsan runtime" >&2; exit 2; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
scripts/copy_tree.sh "$WORK"
echo "[sanitized] building in $WORK (log: $WORK/build.log)"
(cd "$WORK" && CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer" \
    LDFLAGS="-fsanitize=address,undefined" ICHIBAN_FORCE_CPU=1 "$PY" setup.py build_ext --inplace \
    >build.log 2>&1) || { tail -30 "$WORK/build.log"; exit 1; }

if [ $# -eq 0 ]; then
    set -- -q tests/distributed/test_ichiban_failures.py tests/distributed/test_ichiban_faults.py tests/distributed/test_ichiban_ops.py \
        tests/distributed/test_ichiban_shared.py tests/distributed/test_ichiban_direct.py
fi
echo "[sanitized] pytest $*"
rc=0
(cd "$WORK" && env LD_PRELOAD="$ASAN $UBSAN" PYTHONPATH="$WORK" \
    ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:detect_odr_violation=0:log_path=$WORK/asan" \
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$WORK/ubsan" \
    "$PY" -m pytest -p no:cacheprovider "$@") || rc=$?
reports=$(ls "$WORK"/asan.* "$WORK"/ubsan.* 2>/dev/null || true)
if [ -n "$reports" ]; then
    echo "[sanitized] sanitizer reports:"
    for f in $reports; do echo "--- $f"; head -60 "$f"; done
    exit 3
fi
echo "[sanitized] no sanitizer reports; pytest exit status $rc"
exit "$rc"
