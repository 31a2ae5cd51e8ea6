"""Does an op that fails inside the "ichiban" backend raise, or crash the process?

Each case runs in a process of its own, so one that dies (a signal) cannot hide
the others; the case's rank 0 is that process's main thread, where a debugger
started on it stops:

    torch-error    torch's own error from a Python call (torch.empty(-1)): the baseline
    arg-error      the backend refuses an argument (BAND on float32) on the caller's thread
    timeout-async  a peer never joins; the op runs on the backend's progress thread
    timeout-sync   the same op run on the caller's thread (dist.all_reduce, the default)
    timeout-sync-cpptrace  the same with TORCH_SHOW_CPP_STACKTRACES=1 (torch's own unwinder
                   takes the error's stack instead of glibc's backtrace())
    mismatch-sync  ranks disagree on the size: raised after the ranks met, not from a wait
    dead-peer      a peer exits during the group's life; the op runs on the caller's thread

    python scripts/diag_failing_op.py all [--gdb]   # every case; exit status = cases that failed
    python scripts/diag_failing_op.py timeout-sync  # one case

With --gdb, a case killed by a signal is run again under gdb (or cuda-gdb, which
also debugs programs without GPU code) to print the native stack of the fault.
The toolchain facts that decide how exceptions unwind (compilers, the C++
runtime each library loads) are printed first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

# case -> environment it runs with
CASES = {"torch-error": {}, "arg-error": {}, "timeout-async": {}, "timeout-sync": {},
         "timeout-sync-cpptrace": {"TORCH_SHOW_CPP_STACKTRACES": "1"}, "mismatch-sync": {}, "dead-peer": {}}
PG_TIMEOUT_S = 6.0  # also what the peer has to start torch and join


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, size: int, port: int) -> None:
    import torch.distributed as dist

    import ichiban_comm  # noqa: F401  (registers the backend)

    dist.init_process_group("ichiban", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))


def _peer(port: int, exit_after_s: float, first_op_elems: int) -> None:
    """Rank 1: joins the group, maybe one all_reduce, then never another (or exits)."""
    import torch
    import torch.distributed as dist

    _init(1, 2, port)
    if first_op_elems:
        try:
            dist.all_reduce(torch.ones(first_op_elems))
        except Exception:  # noqa: BLE001  (mismatch-sync: fails here too)
            pass
    time.sleep(exit_after_s)
    os._exit(0)  # no destroy_process_group: as a crashed peer would


def _expect_error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    raise SystemExit("FAIL: no error was raised")


def run_case(case: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    peer = None
    t0 = time.monotonic()
    if case == "torch-error":
        msg = _expect_error(lambda: torch.empty(-1))
    elif case == "arg-error":
        _init(0, 1, _port())
        msg = _expect_error(lambda: dist.all_reduce(torch.ones(4), op=dist.ReduceOp.BAND))
    else:
        port = _port()
        dead = case == "dead-peer"
        first = {"dead-peer": 1000, "mismatch-sync": 999}.get(case, 0)
        peer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_peer", str(port),
                                 "0.5" if dead else str(3 * PG_TIMEOUT_S), str(first)])
        _init(0, 2, port)
        x = torch.randn(1000)
        if case == "timeout-async":
            msg = _expect_error(lambda: dist.all_reduce(x, async_op=True).wait())
        elif case in ("timeout-sync", "timeout-sync-cpptrace", "mismatch-sync"):
            msg = _expect_error(lambda: dist.all_reduce(x))
        else:
            dist.all_reduce(x)  # the group works while the peer lives
            msg = _expect_error(lambda: [dist.all_reduce(x) for _ in range(20)])
        # A collective that fails is torch's DistBackendError, as with NCCL and Gloo.
        if not msg.startswith("DistBackendError: "):
            raise SystemExit(f"FAIL {case}: raised {msg}, expected DistBackendError")
    print(f"PASS {case} ({time.monotonic() - t0:.1f} s): raised {msg}", flush=True)
    if peer is not None:
        peer.kill()
        peer.wait()
    os._exit(0)  # the group is broken on purpose: skip its teardown


def toolchain_facts() -> None:
    import torch

    try:
        from ichiban_comm._build_info import BUILD_INFO
    except ImportError as e:
        BUILD_INFO = {"error": str(e)}
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"torch {torch.__version__}, cxx11 abi {torch._C._GLIBCXX_USE_CXX11_ABI}")
    for line in torch.__config__.show().splitlines():
        if "GCC" in line or "CXX_COMPILER" in line or "clang" in line.lower():
            print("torch built with:", line.strip()[:200])
    print(f"ichiban_comm build: compiler={BUILD_INFO.get('compiler')} python={BUILD_INFO.get('python')}")
    for cxx in ("c++", "g++", "/usr/bin/g++", "/usr/bin/c++"):
        path = shutil.which(cxx)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()
            print(f"{cxx} -> {os.path.realpath(path)}: {out[0] if out else '?'}")
    import ichiban_comm

    so = [os.path.join(os.path.dirname(ichiban_comm.__file__), f)
          for f in os.listdir(os.path.dirname(ichiban_comm.__file__)) if f.startswith("_C") and f.endswith(".so")]
    for path in so:
        ldd = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in ldd.splitlines():
            if any(k in line for k in ("libstdc++", "libgcc_s", "libc.so", "libtorch_cpu", "libc10.so")):
                print(f"ldd {os.path.basename(path)}: {line.strip()}")
    with open("/proc/self/maps") as f:  # what this process loaded, after the rpaths
        loaded = sorted({line.split()[-1] for line in f if any(
            k in line for k in ("libstdc++", "libgcc_s", "libc10.so", "libtorch_cpu", "_C."))})
    for path in loaded:
        print(f"loaded: {path}")
    print(f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}", flush=True)


def run_all(gdb: bool) -> int:
    toolchain_facts()
    failed = 0
    for case in CASES:
        cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), case]
        env = {**os.environ, **CASES[case]}
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=8 * PG_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            print(f"FAIL {case}: still running after {8 * PG_TIMEOUT_S:.0f} s (a hang)", flush=True)
            failed += 1
            continue
        out = (res.stdout + res.stderr).strip()
        if res.returncode == 0:
            passed = [line for line in res.stdout.splitlines() if line.startswith("PASS")]
            print(passed[-1] if passed else f"PASS {case}", flush=True)
            continue
        failed += 1
        why = (f"killed by {signal.Signals(-res.returncode).name}" if res.returncode < 0
               else f"exit status {res.returncode}")
        print(f"FAIL {case}: {why}\n" + "\n".join("    " + line for line in out.splitlines()[-30:]), flush=True)
        debugger = shutil.which("gdb") or shutil.which("cuda-gdb")
        if gdb and res.returncode < 0 and debugger:
            print(f"--- {case} again under {debugger}", flush=True)
            g = subprocess.run([debugger, "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
                                "-ex", "info sharedlibrary", "--args", *cmd],
                               capture_output=True, text=True, timeout=20 * PG_TIMEOUT_S, env=env)
            keep = [line for line in (g.stdout + g.stderr).splitlines()
                    if line.startswith("#") or "SIG" in line or "PASS" in line
                    or any(k in line for k in ("libstdc++", "libgcc_s", "libc10.so", "libtorch_cpu", "ichiban"))]
            print("\n".join("    " + line for line in keep[-120:]), flush=True)
        elif gdb and res.returncode < 0:
            print("    (no gdb or cuda-gdb on the PATH: no native stack)", flush=True)
    print(f"{len(CASES) - failed} of {len(CASES)} cases raised as they should", flush=True)
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?", choices=[*CASES, "all"], default="all")
    ap.add_argument("--gdb", action="store_true", help="rerun a case that dies of a signal under gdb")
    ap.add_argument("--_peer", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._peer:
        port, after, first = args._peer
        return _peer(int(port), float(after), int(first))
    if args.case == "all":
        sys.exit(run_all(args.gdb))
    run_case(args.case)


if __name__ == "__main__":
    main()
