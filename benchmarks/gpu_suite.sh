#!/usr/bin/env bash
# GPU suite: build the extension on a CUDA machine, run the GPU-marked tests and the GPU
# benchmarks, and write everything under $OUT (default: ./gpu_results). About 8 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
#
# Each step has its own time limit (seconds, overridable) so one slow step cannot eat the rest:
#   ICHIBAN_SUITE_BUILD_S (240)
#   ICHIBAN_SUITE_TEST_S (150: with a cold Triton cache every kernel variant compiles first)
#   ICHIBAN_SUITE_TOTAL_S (480): the benchmark gets what is left of it (at least 120)
# A Liger-Kernel wheel placed in .whl/ (pure Python) is installed first, so the benchmark can
# compare against it on a machine without network access.
# Exit status: 0 when every step passed, else the number of failed steps.

set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
START=$(date +%s)
FAILED=0

log() { echo "[gpu_suite +$(($(date +%s) - START))s] $*" | tee -a "$OUT/suite.log"; }

# step NAME LIMIT_S LOGFILE CMD...: run with a hard time limit, record the outcome
step() {
    local name=$1 limit=$2 logfile=$3
    shift 3
    log "start $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$logfile" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        log "ok    $name"
    else
        [ $rc -eq 124 ] && log "FAIL  $name: timed out after ${limit}s" || log "FAIL  $name: exit $rc"
        tail -n 20 "$OUT/$logfile" | sed 's/^/    /' | tee -a "$OUT/suite.log"
        FAILED=$((FAILED + 1))
    fi
    return $rc
}

{
    nvidia-smi || echo "nvidia-smi not found"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
    python -c "import triton; print('triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA GPU visible to torch: nothing to run (see $OUT/machine.txt)"
    exit 1
fi

for whl in .whl/liger_kernel-*.whl; do
    [ -e "$whl" ] && step "install $(basename "$whl")" 60 liger_install.log \
        pip install --no-deps --no-index "$whl"
done

step build "${ICHIBAN_SUITE_BUILD_S:-240}" build.log \
    env MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip install --no-build-isolation --no-deps -e .

step "gpu tests" "${ICHIBAN_SUITE_TEST_S:-150}" gpu_tests.log \
    env ICHIBAN_TEST_GPU=1 python -m pytest -q -m gpu tests --junitxml="$OUT/gpu_tests.xml"

# The benchmark gets the rest of the total and stops starting new ops 40 s before its limit
# (one op with its torch.compile baseline takes up to ~30 s), so its table is always written.
BENCH_S=$(( ${ICHIBAN_SUITE_TOTAL_S:-480} - ($(date +%s) - START) ))
[ "$BENCH_S" -lt 120 ] && BENCH_S=120
step "kernel benchmark" "$BENCH_S" kernels.txt \
    python benchmarks/kernels.py --json "$OUT/kernels.json" --budget $((BENCH_S - 40))

log "done: $FAILED failed step(s); results in $OUT"
exit "$FAILED"
