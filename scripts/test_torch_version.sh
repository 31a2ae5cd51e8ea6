#!/usr/bin/env bash
# Builds ichiban_comm against another torch and runs the whole test suite with it,
# in a throwaway venv, without touching .venv or the build in this tree.
#
#   scripts/test_torch_version.sh TORCH [pytest args...]
#
# TORCH is anything pip accepts for torch: a wheel file
# (/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl) or a spec
# ("torch==2.13.0"). The other packages come from requirements-dev.txt (its torch
# line left out), so the list lives in one place.
#
# Everything goes under $ICHIBAN_TV_DIR (default ${TMPDIR:-/tmp}/ichiban_torch_<TORCH>):
#   venv/     the venv (reused while TORCH and requirements-dev.txt are unchanged)
#   src/      a copy of this tree's tracked and untracked-but-not-ignored files: an
#             editable build writes ichiban_comm/_C*.so and _build_info.py into the
#             source tree, which would clobber the build that .venv uses here
#   test.log  the build and pytest output of the last run
# Re-running is cheap: the extension is rebuilt only when csrc/ or setup.py changed.
#
# Triton: the CUDA torch wheels bring it; CPU wheels do not, and without it every fused
# kernel test fails (they check that the Triton interpreter really ran). When the torch
# under test leaves Triton out, ICHIBAN_TV_TRITON is installed (default "triton"; give
# the release that torch pairs with, e.g. "triton~=3.7.0" for torch 2.13, or "none").
#
# Knobs: ICHIBAN_PYTHON (default python3.11 or python3), ICHIBAN_FORCE_CPU (default 1:
# most torch wheels one tests this way are CPU builds), MAX_JOBS (default 1).
# Prints the pytest summary line; exits with pytest's status.
set -euo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -lt 1 ]; then usage >&2; exit 2; fi
if [ "$1" = "-h" ] || [ "$1" = "--help" ]; then usage; exit 0; fi
TORCH_SPEC="$1"
shift

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SLUG="$(basename "$TORCH_SPEC" .whl | tr -c 'A-Za-z0-9._\n-' '_')"
DIR="${ICHIBAN_TV_DIR:-${TMPDIR:-/tmp}/ichiban_torch_${SLUG}}"
PY="${ICHIBAN_PYTHON:-$(command -v python3.11 || command -v python3)}"
export ICHIBAN_FORCE_CPU="${ICHIBAN_FORCE_CPU:-1}" MAX_JOBS="${MAX_JOBS:-1}"

mkdir -p "$DIR"
LOG="$DIR/test.log"
: > "$LOG"
say() { echo "[test_torch_version] $*" | tee -a "$LOG" >&2; }
fail() { say "$*; the full log is $LOG"; exit 1; }

say "torch: $TORCH_SPEC; work dir: $DIR"

# 1. The venv: the torch under test plus requirements-dev.txt without its torch pin.
VENV="$DIR/venv"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >> "$LOG" 2>&1 || fail "creating $VENV failed"
TRITON_SPEC="${ICHIBAN_TV_TRITON:-triton}"
req_stamp="$(printf '%s\n%s\n' "$TORCH_SPEC" "$TRITON_SPEC" | cat - "$ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.req-stamp" 2>/dev/null)" != "$req_stamp" ]; then
  say "installing torch and requirements-dev.txt (without its torch line) into $VENV"
  # A current pip builds the editable install through PEP 660; the pip that venv ships
  # falls back to `setup.py develop`, which recent setuptools turn into an isolated
  # build that cannot see torch.
  "$VENV/bin/python" -m pip install -q --upgrade pip >> "$LOG" 2>&1 || fail "upgrading pip failed"
  grep -v -E '^[[:space:]]*torch([^A-Za-z0-9_-]|$)' "$ROOT/requirements-dev.txt" > "$DIR/requirements.txt"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" -r "$DIR/requirements.txt" >> "$LOG" 2>&1 \
    || fail "pip install failed"
  if [ "$TRITON_SPEC" != "none" ] && ! "$VENV/bin/python" -c "import triton" >/dev/null 2>&1; then
    say "this torch brings no Triton: installing $TRITON_SPEC"
    "$VENV/bin/python" -m pip install -q "$TRITON_SPEC" >> "$LOG" 2>&1 || fail "pip install $TRITON_SPEC failed"
  fi
  echo "$req_stamp" > "$VENV/.req-stamp"
  rm -f "$VENV/.build-stamp"
fi
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
TRITON_VERSION="$("$VENV/bin/python" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo none)"
say "torch $TORCH_VERSION, triton $TRITON_VERSION in $VENV"

# 2. A fresh copy of the tree, keeping only the previous build's outputs (tar restores
#    modification times, so an unchanged file looks unchanged).
mkdir -p "$DIR/src"
find "$DIR/src" -mindepth 1 -type f ! -path '*/ichiban_comm/_C*.so' ! -path '*/ichiban_comm/_build_info.py' \
  ! -path '*.egg-info/*' -delete
"$ROOT/scripts/copy_tree.sh" "$DIR/src"
src_stamp="$(cd "$DIR/src" && find setup.py csrc -type f | sort | xargs cat | sha256sum | cut -c1-16)-$ICHIBAN_FORCE_CPU"
if [ "$(cat "$VENV/.build-stamp" 2>/dev/null)" != "$src_stamp" ] \
   || ! (cd "$DIR" && "$VENV/bin/python" -c "import ichiban_comm._native as n; n.load()") >> "$LOG" 2>&1; then
  say "building ichiban_comm against torch $TORCH_VERSION (ICHIBAN_FORCE_CPU=$ICHIBAN_FORCE_CPU MAX_JOBS=$MAX_JOBS)"
  t0=$SECONDS
  (cd "$DIR/src" && "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps -e .) >> "$LOG" 2>&1 \
    || { grep -E "error" "$LOG" | grep -v "^WARNING: Location" | head -40 >&2; fail "build failed"; }
  echo "$src_stamp" > "$VENV/.build-stamp"
  say "built in $((SECONDS - t0)) s"
fi

# 3. The whole suite (extra arguments go to pytest, e.g. a test path or -x).
say "running pytest (a few minutes)"
set +e
(cd "$DIR/src" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout 600 "${@:-tests}") >> "$LOG" 2>&1
rc=$?
set -e
# (no match, e.g. under -qq, must not end the script before it reports pytest's status)
summary="$({ grep -E '^(=+ )?[0-9]+ (passed|failed|error)|^(=+ )?no tests ran' "$LOG" || true; } | tail -1 | sed 's/^=* *//; s/ *=*$//')"
say "torch $TORCH_VERSION: ${summary:-no pytest summary line (see the log)} (exit $rc)"
exit $rc
