#!/usr/bin/env bash
# One entry point for a fresh machine. Each command first sets up .venv
# (idempotently: it installs only what is missing and rebuilds the extension
# only when the C++/CUDA sources or setup.py changed), then:
#
#   ./run.sh train [ichiban-train flags]   runs the main job on its built-in data
#   ./run.sh test  [pytest flags]          runs the whole test suite
#   ./run.sh setup                         only sets up .venv
#
# Knobs: ICHIBAN_PYTHON (interpreter for the venv, default python3.11 or python3),
# ICHIBAN_VENV (default .venv), ICHIBAN_FORCE_CPU=1 (skip the CUDA sources),
# MAX_JOBS (parallel compile jobs; default sized to the machine's memory).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${ICHIBAN_VENV:-.venv}"
PY="${ICHIBAN_PYTHON:-$(command -v python3.11 || command -v python3)}"

log() { echo "[run.sh] $*" >&2; }

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

setup_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
  fi
  local req_hash; req_hash="$(hash_of requirements-dev.txt)"
  if [ "$(cat "$VENV/.req-stamp" 2>/dev/null)" != "$req_hash" ]; then
    log "installing requirements-dev.txt into $VENV (torch 2.14.1 comes from local disk where it lies there)"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$VENV/bin/python" -m pip install -q -r requirements-dev.txt > "$VENV/pip.log" 2>&1; then
      grep -v "^WARNING: Location" "$VENV/pip.log" | tail -30 >&2
      log "installing requirements failed; the full log is $VENV/pip.log"
      exit 1
    fi
    echo "$req_hash" > "$VENV/.req-stamp"
  fi
  local src_hash
  src_hash="$(find setup.py csrc -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sort | xargs cat | sha256sum | cut -c1-16)-${ICHIBAN_FORCE_CPU:-0}-${ICHIBAN_DEBUG_INFO:-0}"
  if [ "$(cat "$VENV/.build-stamp" 2>/dev/null)" != "$src_hash" ] \
     || ! "$VENV/bin/python" -c "import ichiban_comm" >/dev/null 2>&1; then
    log "building and installing ichiban_comm (editable; compiles C++ and, with nvcc, CUDA: a few minutes)"
    local t0=$SECONDS
    if ! "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps -e . > "$VENV/build.log" 2>&1; then
      grep -E "error|Error" "$VENV/build.log" | head -40 >&2 || true
      log "build failed; the full log is $VENV/build.log"
      exit 1
    fi
    grep -E "^ *\[ichiban_comm setup\]" "$VENV/build.log" | sed "s/^ *//" >&2 || true
    "$VENV/bin/python" -c "import ichiban_comm" || { log "the build finished but ichiban_comm does not import"; exit 1; }
    echo "$src_hash" > "$VENV/.build-stamp"
    log "built in $((SECONDS - t0)) s: $("$VENV/bin/python" -m ichiban_comm --version | sed -n 3p | xargs)"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup_venv ;;
  train) setup_venv; exec "$VENV/bin/ichiban-train" "$@" ;;
  # Tests run in ICHIBAN_TEST_WORKERS pytest-xdist workers (default: one per core): most of the
  # suite's multi-process tests wait on each other, not on a core. `-n 0` runs them in one process.
  test)  setup_venv; exec "$VENV/bin/python" -m pytest -n "${ICHIBAN_TEST_WORKERS:-auto}" "$@" ;;
  *) echo "usage: ./run.sh train|test|setup [args...]" >&2; exit 2 ;;
esac
