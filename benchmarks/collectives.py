"""Collectives benchmark: the "ichiban" backend and Gloo side by side (and MPI
through mpi4py when it is installed), nccl-tests style, with the machine's
memcpy bandwidth measured in the same run as the ceiling.

    python benchmarks/collectives.py                       # world sizes 2 and 4, 8 B .. 256 MiB
    python benchmarks/collectives.py --world-sizes 2 --max-bytes 16M --ops all_reduce
    python benchmarks/collectives.py --json results.json   # machine-readable rows
    python benchmarks/collectives.py --direct --ops all_reduce --max-bytes 64K
                                                           # also the backend called without
                                                           # torch.distributed's layers (latency)
    python benchmarks/collectives.py --shared --ops all_reduce --min-bytes 1M
                                                           # also ichiban on host-shared tensors
                                                           # (ICHIBAN_SHARED_TENSORS=1)
    python benchmarks/collectives.py --floor --max-bytes 64K
                                                           # also torch.distributed's own cost per
                                                           # call (a backend that does nothing)
    python benchmarks/collectives.py --tune                # measure the one-shot/two-shot crossover
                                                           # and write the table the backend loads

Columns: time per op (median, min-max over repetitions, slowest rank), algbw =
bytes / time, busbw = algbw x the nccl-tests factor (all_reduce 2(n-1)/n;
all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast 1). For ichiban's
all_reduce it also prints the memory traffic the chosen algorithm needs per
rank (one-shot (n+2)S, two-shot (5-2/n)S, in place on host-shared tensors 2S)
and the fraction of the measured
memcpy bandwidth (bytes read + written, min(n, cores) threads) it achieves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import time

import torch

DIRECT = "ichiban-direct"  # column of --direct
SHARED = "ichiban-shared"  # column of --shared: tensors in host-shared memory, in their own processes
FLOOR = "torch-floor"  # column of --floor: the same calls on torch's fake process group, which does nothing
OPS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"]
BUSBW = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
         "reduce_scatter": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0,
         "all_to_all": lambda n: (n - 1) / n}


def parse_bytes(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def human(n: int) -> str:
    for unit, k in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k}{unit}"
    return str(n)


def sizes(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 4
    return out


def memcpy_gbps(threads: int, nbytes: int = 256 << 20) -> float:
    """Copy bandwidth counting bytes read + written (GB/s), best of 5."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * nbytes / best / 1e9


def traffic_per_rank(algo: str, nbytes: int, n: int) -> float:
    from ichiban_comm.distributed import cost

    try:
        return cost.traffic_per_rank(algo, nbytes, n)
    except ValueError:
        return 0.0


# ----------------------------------------------------------------------------- workers


def _make_op(op: str, nbytes: int, n: int, rank: int, group, direct: bool = False):
    import torch.distributed as dist

    elems = max(nbytes // 4, 1) if nbytes else 0
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        elems = elems // n * n  # total size divisible by n
    big = torch.randn(elems)
    if direct:
        # The backend object itself, as an MPI binding is called: without
        # torch.distributed's Python wrapper and op dispatcher (--direct).
        be = group._get_backend(torch.device("cpu"))
        opts = dist.AllreduceOptions()
        opts.asyncOp = False
        return lambda: be.allreduce([big], opts).wait()
    if op == "all_reduce":
        return lambda: dist.all_reduce(big, group=group)
    if op == "broadcast":
        return lambda: dist.broadcast(big, src=0, group=group)
    if op == "all_gather":
        part = big[: elems // n].clone()
        # torch 2.14 renamed all_gather_into_tensor and reduce_scatter_tensor (the old names warn)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather(big, part, group=group)
    if op == "reduce_scatter":
        part = torch.empty(elems // n)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(part, big, group=group)
    out = torch.empty_like(big)
    return lambda: dist.all_to_all_single(out, big, group=group)


_CALIBRATE = 5  # ops timed to choose the iterations per repetition


def _row(op: str, nbytes: int, backend: str, n: int, times: list[float]) -> dict:
    return {"op": op, "bytes": nbytes, "backend": backend, "world_size": n,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _time_op(fn, timer_group, reps: int, budget_s: float) -> list[float]:
    """Seconds per op for each repetition, the slowest rank's (timer_group
    None: one process, nobody to agree with).

    The repetitions run back to back, with no barrier between them: ranks
    leave a Gloo op up to milliseconds apart, and with more ranks than cores
    the scheduler takes a while to settle after one, so a barrier per
    repetition would charge that to the op measured. One untimed window first
    absorbs the skew of the calibration's all-reduce.
    """
    import torch.distributed as dist

    def slowest(t: torch.Tensor) -> torch.Tensor:
        if timer_group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=timer_group)
        return t

    for _ in range(3):  # first touch of buffers and shared slots
        fn()
    if timer_group is not None:
        dist.barrier(group=timer_group)
    fn()
    t0 = time.perf_counter()
    for _ in range(_CALIBRATE):
        fn()
    one = slowest(torch.tensor([(time.perf_counter() - t0) / _CALIBRATE], dtype=torch.float64))
    iters = int(min(max(budget_s / max(float(one), 1e-7), 1), 2000))
    for _ in range(iters):
        fn()
    local = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        local.append((time.perf_counter() - t0) / iters)
    return slowest(torch.tensor(local, dtype=torch.float64)).tolist()


def _worker(rank, n, port, cfg, out):
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(n),
                       "GROUP_RANK": "0"})
    torch.set_num_threads(1)
    import ichiban_comm.distributed

    if cfg.get("shared"):  # before any tensor or group exists
        ichiban_comm.distributed.enable_shared_tensors()

    dist.init_process_group("gloo", rank=rank, world_size=n, timeout=datetime.timedelta(seconds=600))
    timer = dist.new_group(backend="gloo")
    groups = {}
    for b in cfg["backends"]:
        if b == "gloo":
            groups["gloo"] = dist.group.WORLD
        elif b.startswith("ichiban"):
            from ichiban_comm.distributed import IchibanOptions

            algo = b.split(":", 1)[1] if ":" in b else "auto"
            groups[b] = dist.new_group(backend="ichiban", pg_options=IchibanOptions(algo=algo))
        elif b == DIRECT:
            groups[b] = groups["ichiban"]  # the same group, called directly ("ichiban" comes first)
    # Every column is warmed before the first timed row: in fresh processes
    # the first op timed runs markedly slower than the same op timed later,
    # which would charge the start-up to whichever size came first.
    for b, g in groups.items():
        if b == DIRECT and cfg["ops"][0] != "all_reduce":
            continue
        fn = _make_op(cfg["ops"][0], cfg["sizes"][0], n, rank, g, direct=b == DIRECT)
        _time_op(fn, timer, 1, cfg["budget_s"])
        del fn
    rows = []
    for op in cfg["ops"]:
        for nbytes in cfg["sizes"]:
            for b, g in groups.items():
                if b == DIRECT and op != "all_reduce":
                    continue
                fn = _make_op(op, nbytes, n, rank, g, direct=b == DIRECT)
                be = g._get_backend(torch.device("cpu")) if b.startswith("ichiban") else None
                shared_before = be.shared_bytes if be is not None else 0
                times = _time_op(fn, timer, cfg["reps"], cfg["budget_s"])
                row = _row(op, nbytes, b, n, times)
                if b != DIRECT and be is not None and op == "all_reduce":
                    row["algo"] = be.choose_allreduce(nbytes)
                    if be.shared_bytes > shared_before:
                        row["algo"] = "inplace"
                rows.append(row)
                del fn
    if rank == 0:
        out.put(rows)
    dist.barrier(group=timer)
    dist.destroy_process_group()


def _floor_worker(n, cfg, out):
    """The benchmark's calls through torch.distributed on torch's fake process
    group (world size n, this process rank 0): every op returns at once, so
    the time is torch's own per call, the least any backend can take through
    dist.*."""
    import torch.distributed as dist

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise RuntimeError(f"--floor needs torch's fake process group "
                           f"(torch.testing._internal.distributed.fake_pg): {e}") from e
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=n)
    g = dist.group.WORLD
    _time_op(_make_op(cfg["ops"][0], cfg["sizes"][0], n, 0, g), None, 1, cfg["budget_s"])  # warm-up
    rows = []
    for op in cfg["ops"]:
        for nbytes in cfg["sizes"]:
            times = _time_op(_make_op(op, nbytes, n, 0, g), None, cfg["reps"], cfg["budget_s"])
            rows.append(_row(op, nbytes, FLOOR, n, times))
    out.put(rows)
    dist.destroy_process_group()


def run_world(n: int, cfg: dict, floor: bool = False) -> list[dict]:
    """The rows of n ranks (floor: of one process on torch's fake group of n)."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctx.Queue()
    if floor:
        procs = [ctx.Process(target=_floor_worker, args=(n, cfg, out))]
    else:
        procs = [ctx.Process(target=_worker, args=(r, n, port, cfg, out)) for r in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + cfg["timeout_s"]
    rows = None
    try:
        while True:  # a worker that dies (an import error, a crash) ends the run, never hangs it
            try:
                rows = out.get(timeout=1.0)
                break
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"world size {n}: worker(s) died (rank, exit code): {dead}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world size {n}: no result in {cfg['timeout_s']} s")
    finally:
        for p in procs:
            p.join(60 if rows is not None else 0.1)  # after a failure, kill the rest at once
            if p.is_alive():
                p.kill()
    return rows


def run_mpi(n: int, cfg: dict) -> list[dict]:
    """MPI all_reduce etc. through mpi4py, when installed (an optional extra)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return []
    # The mpich wheel puts mpiexec beside this interpreter; look there first so a
    # venv's MPI is used even when the venv is not on PATH.
    here = os.path.dirname(sys.executable)
    mpiexec = next((p for p in (os.path.join(here, "mpiexec"), os.path.join(here, "mpirun"))
                    if os.access(p, os.X_OK)), None) or shutil.which("mpiexec") or shutil.which("mpirun")
    if not mpiexec:
        print("mpi4py is importable but no mpiexec/mpirun was found; skipping the MPI column",
              file=sys.stderr)
        return []
    cmd = [mpiexec, "-n", str(n), sys.executable, os.path.abspath(__file__), "--_mpi-worker",
           json.dumps(cfg)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg["timeout_s"])
    for line in res.stdout.splitlines():
        if line.startswith("MPIROWS "):
            return json.loads(line[8:])
    print(f"mpi run failed: {res.stderr[-2000:]}", file=sys.stderr)
    return []


def _mpi_worker(cfg: dict) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()

    def measure(op: str, nbytes: int) -> list[float]:
        elems = max(nbytes // 4, 1) if nbytes else 0
        if op in ("all_gather", "reduce_scatter", "all_to_all"):
            elems = elems // n * n  # total size divisible by n (as in _make_op)
        a = np.random.rand(elems).astype(np.float32)
        b = np.empty_like(a)
        part = np.empty(elems // n, dtype=np.float32)
        fn = {"all_reduce": lambda: comm.Allreduce(a, b),
              "broadcast": lambda: comm.Bcast(a, root=0),
              "all_gather": lambda: comm.Allgather(part, a),
              "reduce_scatter": lambda: comm.Reduce_scatter_block(a, part),
              "all_to_all": lambda: comm.Alltoall(a, b)}[op]
        fn()  # the same protocol as _time_op
        comm.Barrier()
        fn()
        t0 = time.perf_counter()
        for _ in range(_CALIBRATE):
            fn()
        one = comm.allreduce((time.perf_counter() - t0) / _CALIBRATE, op=MPI.MAX)
        iters = int(min(max(cfg["budget_s"] / max(one, 1e-7), 1), 2000))
        for _ in range(iters):
            fn()
        local = []
        for _ in range(cfg["reps"]):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            local.append((time.perf_counter() - t0) / iters)
        slowest = np.empty(len(local))
        comm.Allreduce(np.array(local), slowest, op=MPI.MAX)
        return slowest.tolist()

    measure(cfg["ops"][0], cfg["sizes"][0])  # warm-up, as in _worker
    rows = []
    for op in cfg["ops"]:
        for nbytes in cfg["sizes"]:
            times = measure(op, nbytes)
            rows.append(_row(op, nbytes, "mpi", n, times))
    if rank == 0:
        print("MPIROWS " + json.dumps(rows), flush=True)


# ----------------------------------------------------------------------------- report


def annotate(rows: list[dict], memcpy: dict) -> None:
    cores = os.cpu_count() or 1
    for r in rows:
        n, t = r["world_size"], r["median_s"]
        r["algbw_gbps"] = r["bytes"] / t / 1e9 if t > 0 else 0.0
        r["busbw_gbps"] = r["algbw_gbps"] * BUSBW[r["op"]](n)
        if "algo" in r:
            tr = traffic_per_rank(r["algo"], r["bytes"], n)
            r["traffic_per_rank_bytes"] = tr
            ceiling = memcpy[min(n, cores)]
            r["memcpy_fraction"] = (tr * n / t / 1e9) / ceiling if t > 0 and tr else 0.0


def _algo_columns(cols: dict) -> list[str]:
    """The columns whose algorithm and memory traffic are printed: the first
    ichiban one that has them, and the shared one."""
    first = next((b for b, c in cols.items() if b != SHARED and "algo" in c), None)
    return [b for b in (first, SHARED) if b is not None and "algo" in cols.get(b, {})]


def print_table(rows: list[dict], backends: list[str]) -> None:
    by = {}
    for r in rows:
        by.setdefault((r["world_size"], r["op"], r["bytes"]), {})[r["backend"]] = r
    last = None
    for (n, op, nbytes), cols in sorted(by.items(), key=lambda kv: (kv[0][0], OPS.index(kv[0][1]), kv[0][2])):
        if (n, op) != last:
            last = (n, op)
            print(f"\n# {op}, world size {n}")
            head = f"{'bytes':>8}"
            for b in backends:
                if b in cols:
                    head += f" | {b + ' time us (min-max)':>30} {'algbw':>7} {'busbw':>7}"
            for b in _algo_columns(cols):
                head += f" | {'algo' if b != SHARED else 'shared':>8} {'traffic/rank':>12} {'of memcpy':>9}"
            head += " | speedup vs gloo" + (" | shared vs gloo" if SHARED in cols else "")
            print(head)
        line = f"{human(nbytes):>8}"
        for b in backends:
            c = cols.get(b)
            if c:
                tm = f"{c['median_s'] * 1e6:.1f} ({c['min_s'] * 1e6:.1f}-{c['max_s'] * 1e6:.1f})"
                line += f" | {tm:>30} {c['algbw_gbps']:7.2f} {c['busbw_gbps']:7.2f}"
        for b in _algo_columns(cols):
            ich = cols[b]
            line += (f" | {ich['algo']:>8} {human(int(ich['traffic_per_rank_bytes'])):>12} "
                     f"{100 * ich['memcpy_fraction']:8.0f}%")
        g = cols.get("gloo")
        for b in ("ichiban", SHARED):
            if g and cols.get(b):
                line += f" | {g['median_s'] / cols[b]['median_s']:.1f}x"
        print(line)


def tune(world_sizes: list[int], args) -> None:
    """Measure one-shot vs two-shot all_reduce and store the crossover per world size."""
    from ichiban_comm.distributed import cost

    for n in world_sizes:
        cfg = {"ops": ["all_reduce"], "sizes": sizes(4096, min(parse_bytes(args.max_bytes), 64 << 20)),
               "backends": ["ichiban:oneshot", "ichiban:twoshot"], "reps": 3, "budget_s": 0.05,
               "timeout_s": 1800}
        rows = run_world(n, cfg)
        t = {(r["backend"].split(":")[1], r["bytes"]): r["median_s"] for r in rows}
        # Crossover: the first size from which two-shot wins by more than 5%
        # at that size and the next one (single noisy rows do not count).
        wins = [t[("twoshot", s)] < 0.95 * t[("oneshot", s)] for s in cfg["sizes"]]
        threshold = cost.ALWAYS
        for i, s in enumerate(cfg["sizes"]):
            if wins[i] and (i + 1 == len(wins) or wins[i + 1]):
                threshold = cfg["sizes"][i - 1] if i > 0 else s // 2
                break
        path = cost.save_tuned(n, {"oneshot_max_bytes": threshold, "measured": time.strftime("%Y-%m-%d"),
                                   "times_s": {f"{a}/{s}": v for (a, s), v in t.items()}})
        print(f"world size {n}: one-shot up to {human(threshold)} bytes -> {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--min-bytes", default="8")
    ap.add_argument("--max-bytes", default="256M")
    ap.add_argument("--sizes", default="",
                    help="comma-separated message sizes (e.g. 4K,1M,16M,128M); overrides --min/--max-bytes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-ms", type=float, default=30.0, help="time per repetition")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--no-mpi", action="store_true", help="leave out the MPI column even when "
                    "mpi4py is installed")
    ap.add_argument("--algos", default="",
                    help="also run ichiban with these forced algorithms as extra columns (e.g. oneshot,twoshot)")
    ap.add_argument("--direct", action="store_true",
                    help=f"add a column '{DIRECT}' (all_reduce only): the backend object called from "
                    "Python without torch.distributed's wrapper and dispatcher, the way mpi4py calls MPI")
    ap.add_argument("--shared", action="store_true",
                    help=f"add a column '{SHARED}': ichiban with host-shared tensors "
                    "(ichiban_comm.distributed.enable_shared_tensors), run in processes of its own")
    ap.add_argument("--floor", action="store_true",
                    help=f"add a column '{FLOOR}': the same torch.distributed calls on torch's fake "
                    "process group, which communicates nothing (one process): what torch's own layers "
                    "cost per call, under every backend's time (for all_gather, reduce_scatter and "
                    "all_to_all the fake group also copies its input into the output, which counts "
                    "at large sizes)")
    ap.add_argument("--json", help="write rows and machine facts here")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--_mpi-worker", dest="mpi_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mpi_worker:
        return _mpi_worker(json.loads(args.mpi_worker))
    if args.tune:
        return tune(args.world_sizes, args)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"--ops: unknown {bad}; expected some of {OPS}")
    backends = ["ichiban"] + [f"ichiban:{a.strip()}" for a in args.algos.split(",") if a.strip()]
    backends += [DIRECT] if args.direct else []
    backends += [SHARED] if args.shared else []
    backends += [] if args.no_gloo else ["gloo"]
    backends += [FLOOR] if args.floor else []
    if args.sizes:
        size_list = [parse_bytes(x.strip()) for x in args.sizes.split(",") if x.strip()]
    else:
        size_list = sizes(parse_bytes(args.min_bytes), parse_bytes(args.max_bytes))
    cfg = {"ops": ops, "sizes": size_list,
           "backends": backends, "reps": args.reps, "budget_s": args.budget_ms / 1e3, "timeout_s": 7200}
    cores = os.cpu_count() or 1
    memcpy = {k: memcpy_gbps(k) for k in range(1, cores + 1)}
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {cores} cores, "
          f"torch {torch.__version__}")
    print("# memcpy (read+write): " + ", ".join(f"{k} thread(s) {v:.1f} GB/s" for k, v in memcpy.items()))
    rows = []
    for n in args.world_sizes:
        rows += run_world(n, {**cfg, "backends": [b for b in backends if b not in (SHARED, FLOOR)]})
        if args.shared:  # the allocator is per process: a world of its own
            rows += run_world(n, {**cfg, "backends": [SHARED], "shared": True})
        if args.floor:
            try:  # torch's fake group is internal to torch: its absence costs the column only
                rows += run_world(n, cfg, floor=True)
            except (RuntimeError, TimeoutError) as e:
                print(f"world size {n}: no {FLOOR} column: {e}", file=sys.stderr)
        mpi_rows = [] if args.no_mpi else run_mpi(n, cfg)
        if mpi_rows and "mpi" not in backends:
            backends.append("mpi")
        rows += mpi_rows
    annotate(rows, memcpy)
    print_table(rows, backends)
    if args.json:
        facts = {"host": platform.node(), "cores": cores, "torch": torch.__version__,
                 "python": platform.python_version(), "memcpy_gbps": memcpy,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "rows": rows}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
