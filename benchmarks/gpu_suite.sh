#!/usr/bin/env bash
# GPU suite: build the extension on a CUDA machine, run the GPU-marked tests (Triton kernels,
# the CUDA checkpoint path, CUDA tensors through the "ichiban" backend's NCCL group), the kernel
# benchmark and a short CPU collectives benchmark on that machine's cores, and write everything
# under $OUT (default: ./gpu_results). About 10 minutes with every step (the kernel benchmark
# takes what ICHIBAN_SUITE_TOTAL_S leaves, at least 2): close to a 600 s device call, so lower
# ICHIBAN_SUITE_TOTAL_S or pick steps with ICHIBAN_SUITE_STEPS there.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
#
# Each step has its own time limit (seconds, overridable) so one slow step cannot eat the rest:
#   ICHIBAN_SUITE_BUILD_S (240)
#   ICHIBAN_SUITE_DIAG_S (120): failing ops must raise, not crash (and, if one crashes, the same
#     cases against a build with the system g++, ICHIBAN_SUITE_ALT_S (240) with its build)
#   ICHIBAN_SUITE_TEST_S (180: with a cold Triton cache every kernel variant compiles first;
#     includes the launch-cache, CUDA-graph capture and Inductor triton_op kernel tests)
#   ICHIBAN_SUITE_SHARED_S (150): the host-shared tensor tests (CPU, on this machine's torch)
#   ICHIBAN_SUITE_COLL_S (120): the collectives benchmark (all_reduce, 2/4/8 ranks, vs gloo,
#     with and without host-shared tensors); ICHIBAN_SUITE_SPIN_S (90): its ichiban rows again
#     with a long spin before waiters sleep; ICHIBAN_SUITE_TUNE_S (90): the one-shot/two-shot
#     crossovers (--tune, into $OUT/tune.json)
#   ICHIBAN_SUITE_TOTAL_S (480): the kernel benchmark gets what is left of it (at least 120);
#     ICHIBAN_SUITE_KERNEL_OPS picks its ops (default: all, the losses first)
# ICHIBAN_SUITE_PARALLEL_S (300): opt-in step "parallel" (add it to ICHIBAN_SUITE_STEPS): the
#   tensor-parallel training step (ours vs DTensor, benchmarks/parallel.py) on this machine's
#   cores, a core per rank; needs transformers
# ICHIBAN_SUITE_STEPS (default "diag,gpu,shared,coll,kernels") picks the steps after the build,
#   e.g. ICHIBAN_SUITE_STEPS=diag for the failing-op diagnosis alone (build + about 1-6 minutes):
#   with every step, and a crash to diagnose, the suite can outlast one 600 s device call.
# PYTHON (default python3) is the interpreter that holds torch.
# A Liger-Kernel wheel placed in .whl/ (pure Python) is installed first, so the benchmark can
# compare against it on a machine without network access.
# Exit status: 0 when every step passed, else the number of failed steps.

set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
FAILED=0

log() { echo "[gpu_suite +$(($(date +%s) - START))s] $*" | tee -a "$OUT/suite.log"; }

# The steps after the build that run (ICHIBAN_SUITE_STEPS).
STEPS=",${ICHIBAN_SUITE_STEPS:-diag,gpu,shared,coll,kernels},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
for s in ${STEPS//,/ }; do
    case $s in diag | gpu | shared | coll | kernels | parallel) ;;
    *) echo "ICHIBAN_SUITE_STEPS: unknown step '$s' (expected some of diag,gpu,shared,coll,kernels,parallel)" >&2; exit 2 ;;
    esac
done

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
    nproc; free -g | head -2
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
    $PY -c "import triton; print('triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA GPU visible to torch: nothing to run (see $OUT/machine.txt)"
    exit 1
fi

for whl in .whl/liger_kernel-*.whl; do
    [ -e "$whl" ] && step "install $(basename "$whl")" 60 liger_install.log \
        $PY -m pip install --no-deps --no-index "$whl"
done

# Built in place and put on PYTHONPATH rather than pip-installed: an offline machine's pip may
# try to fetch build dependencies, and the interpreter's site-packages stays untouched.
step build "${ICHIBAN_SUITE_BUILD_S:-240}" build.log \
    env MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY setup.py build_ext --inplace
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e ichiban_comm/triton_kernels ] || ln -s ../triton_kernels ichiban_comm/triton_kernels  # as setup.py maps it
$PY -m ichiban_comm --version >>"$OUT/machine.txt" 2>&1

# An op that fails inside the backend (a timeout, a dead peer) must raise; on one lent machine
# it killed the process with SIGSEGV instead. Each case runs in a process of its own, and one
# that dies is run again under gdb/cuda-gdb for its native stack (scripts/diag_failing_op.py).
if want diag && ! step "failing-op diagnosis" "${ICHIBAN_SUITE_DIAG_S:-120}" failing_ops.log \
        $PY scripts/diag_failing_op.py all --gdb; then
    # Was it this build's compiler? Build the C++ part again with the system g++, if that is
    # another compiler, in a copy of the tree, and run the cases against that build.
    ALT_CXX=/usr/bin/g++
    if [ -x "$ALT_CXX" ] && [ "$(readlink -f "$ALT_CXX")" != "$(readlink -f "$(command -v "${CXX:-c++}")")" ]; then
        ALT=$(mktemp -d)
        scripts/copy_tree.sh "$ALT"
        step "failing-op diagnosis, built with $ALT_CXX" "${ICHIBAN_SUITE_ALT_S:-240}" failing_ops_alt.log \
            bash -c "cd '$ALT' && CXX='$ALT_CXX' ICHIBAN_FORCE_CPU=1 MAX_JOBS=\$(nproc) $PY setup.py build_ext --inplace \
                     >'$OUT/build_alt.log' 2>&1 || { tail -20 '$OUT/build_alt.log'; exit 1; }; \
                     PYTHONPATH='$ALT' $PY scripts/diag_failing_op.py all --gdb"
        rm -rf "$ALT"
    else
        log "no other system compiler than ${CXX:-c++} to compare builds with"
    fi
fi

want gpu && step "gpu tests" "${ICHIBAN_SUITE_TEST_S:-180}" gpu_tests.log \
    env ICHIBAN_TEST_GPU=1 $PY -m pytest -q -m gpu tests --junitxml="$OUT/gpu_tests.xml"

# The CPU allocator swap and peers mapping each other's arenas, on this machine's torch and kernel.
want shared && step "shared tensor tests" "${ICHIBAN_SUITE_SHARED_S:-150}" shared_tests.log \
    $PY -m pytest -q tests/distributed/test_ichiban_shared.py --junitxml="$OUT/shared_tests.xml"

# Collectives on this machine's cores (ranks <= cores, unlike the 2-core development VM).
want coll && step "collectives benchmark" "${ICHIBAN_SUITE_COLL_S:-120}" collectives.txt \
    $PY benchmarks/collectives.py --world-sizes 2 4 8 --ops all_reduce --sizes 8,4K,1M,16M,128M \
    --reps 3 --budget-ms 20 --no-mpi --shared --floor --json "$OUT/collectives.json"

# The same all_reduce rows with waiters that spin about 100x longer before they sleep
# (ICHIBAN_SPIN="polls,yields"; the default policy is tuned on a 2-core VM, where a long spin
# holds the core a peer needs). With a core per rank, a futex wake-up may cost more than the
# spin: compare the ichiban column of this table with the one above, on the same machine.
want coll && step "collectives benchmark, long spin" "${ICHIBAN_SUITE_SPIN_S:-90}" collectives_spin.txt \
    env ICHIBAN_SPIN=20000,20 $PY benchmarks/collectives.py --world-sizes 4 8 --ops all_reduce \
    --sizes 8,4K,1M,16M --reps 3 --budget-ms 20 --no-mpi --no-gloo --json "$OUT/collectives_spin.json"

# One-shot vs two-shot crossovers on this host (the model's choice is checked on the 2-core VM
# only); written to $OUT/tune.json, not to the cache the backend would load.
want coll && step "collectives tune" "${ICHIBAN_SUITE_TUNE_S:-90}" collectives_tune.txt \
    env ICHIBAN_TUNE_FILE="$OUT/tune.json" $PY benchmarks/collectives.py --tune --world-sizes 2 4 8 \
    --max-bytes 4M

# Tensor-parallel step, ours against DTensor, on CPU ranks with a core each (opt-in).
want parallel && step "tensor-parallel benchmark" "${ICHIBAN_SUITE_PARALLEL_S:-300}" parallel.txt \
    $PY benchmarks/parallel.py --rounds 3 --json "$OUT/parallel.json"

# The kernel benchmark gets the rest of the total and stops starting new ops 60 s before its limit
# (one op with its two torch.compile baselines, max-autotune included, takes up to ~50 s), so its
# table is always written. Ops in order of interest: the losses first, then the norms.
# GPU time (CUDA-graph replay or profiler kernel times) is the primary column; 100 interleaved
# rounds per op.
BENCH_S=$(( ${ICHIBAN_SUITE_TOTAL_S:-480} - ($(date +%s) - START) ))
[ "$BENCH_S" -lt 120 ] && BENCH_S=120
KERNEL_OPS=cross_entropy,fused_linear_cross_entropy,rms_norm,rms_norm_residual,swiglu,rope
KERNEL_OPS=$KERNEL_OPS,layer_norm,layer_norm_residual,geglu,bias_gelu,bias_dropout_add
KERNEL_OPS=$KERNEL_OPS,cross_entropy_tp2,fused_linear_cross_entropy_tp2
# host time per launch, cached compiled kernels vs Triton's launch path (seconds, host only)
KERNEL_OPS=$KERNEL_OPS,launch_overhead
want kernels && step "kernel benchmark" "$BENCH_S" kernels.txt \
    $PY benchmarks/kernels.py --ops "${ICHIBAN_SUITE_KERNEL_OPS:-$KERNEL_OPS}" --reps 100 \
    --json "$OUT/kernels.json" --budget $((BENCH_S - 60))

log "done: $FAILED failed step(s); results in $OUT"
exit "$FAILED"
