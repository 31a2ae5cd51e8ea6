"""Memory-tier benchmark: restore from this host's keeper, from another host's replica, from disk.

One run, one state (the transformer-shaped state of benchmarks/checkpoint.py), two keepers on
this machine standing in for two hosts (the peer is reached over TCP on 127.0.0.1, the token
checked like across hosts):

    python benchmarks/checkpoint_memory.py                    # 0.25 GiB state, a minute or two
    python benchmarks/checkpoint_memory.py --size 2 --json out.json

Rows: save (blocking, to commit) with and without the memory tier; restore (median of --repeat)
from the keeper, from the peer's replica, from disk with the page cache dropped (when the
machine allows it: said in the output) and from disk with a warm cache; replication throughput
(unthrottled and at --bandwidth); training step time while a throttled replica streams; zstd on
the replica stream: ratio and encode rate, against the link rate at which it would pay.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine  # noqa: E402
from checkpoint import memcpy_bandwidth, mlp_step, nbytes, transformer_state  # noqa: E402


MSTEP = 4   # the step the memory-tier rows restore


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def drop_caches() -> str | None:
    """Drop the page cache; returns why not when the machine refuses."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def same(a, b) -> bool:
    return all(torch.equal(a["model"][k].view(torch.uint8), b["model"][k].view(torch.uint8)) for k in a["model"]) \
        and all(torch.equal(a["optim"][g][k], b["optim"][g][k]) for g in a["optim"] for k in a["optim"][g])


def main(argv=None) -> int:
    from ichiban_comm.checkpoint import AsyncCheckpointer
    from ichiban_comm.checkpoint import keeper as kp
    from ichiban_comm.checkpoint.memory import KeeperClient, ensure_keeper, stop_keepers
    from ichiban_comm import _C

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=0.25, help="state size in GiB (default 0.25)")
    p.add_argument("--dir", default="runs/bench_checkpoint_memory", help="scratch directory (removed afterwards)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=200e6, help="replica_bandwidth for the throttled rows, bytes/s")
    p.add_argument("--json", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    root = os.path.abspath(os.path.join(args.dir, "ckpt"))
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(root)
    print(f"building a ~{args.size:g} GiB state ...", file=sys.stderr)
    state = transformer_state(int(args.size * 2**30))
    n = nbytes(state)
    res = {"machine": machine(), "state_bytes": n, "repeat": args.repeat}
    mc = memcpy_bandwidth(min(n, 512 << 20))
    res["memcpy_GB_per_s"] = mc["GBps"]
    res["state_copy_bound_s"] = n / mc["GBps"] / 1e9
    try:
        # ---- save, with and without the memory tier (steady state: second save)
        # steps 1, 2 without the memory tier, then 3, 4 (MSTEP) with it: one root, commit order
        for label, mem, first in (("disk_only", False, 1), ("memory", True, MSTEP - 1)):
            ck = AsyncCheckpointer(root, keep_last=2, memory=mem, memory_keep=1)
            ck.save(first, state).wait()
            h = ck.save(first + 1, state)
            h.wait()
            res[f"save_{label}"] = {"blocking_s": h.blocking_s, "commit_s": h.total_s}
            if mem:
                tier = ck
            else:
                ck.close()
        print("restore from the keeper ...", file=sys.stderr)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            got = tier.load()
            times.append(time.perf_counter() - t0)
            assert tier.last_load["tiers"] == ["memory"], tier.last_load
        res["restore_memory_s"] = median(times)
        res["restore_memory_exact"] = same(got, state)
        del got

        # ---- a second keeper standing in for another host: the replica and its restore
        mt = tier.memory_tier
        peer, pinfo, ptoken = ensure_keeper(root, "peer-host", keep=1, budget_bytes=4 * n + (1 << 30),
                                            idle_timeout=120, tcp="127.0.0.1")
        peer.close()
        with mt.local_lock:
            meta, fds = mt.local.get(0, MSTEP)
        size = os.fstat(fds[0]).st_size
        rows = {}
        for label, rate in (("unthrottled", None), ("throttled", args.bandwidth)):
            c = KeeperClient(tuple(pinfo["tcp"]), ptoken)
            t0 = time.perf_counter()
            c.put(0, MSTEP, meta, fds, [size], origin="replica", rate=rate)
            dt = time.perf_counter() - t0
            c.close()
            rows[label] = {"s": dt, "GB_per_s": size / dt / 1e9, "cap_GB_per_s": rate / 1e9 if rate else None}
        res["replicate"] = rows
        mt.keepers["peer-host"] = {"host": "peer-host", "tcp": pinfo["tcp"], "token": ptoken}
        print("restore from the peer's replica ...", file=sys.stderr)
        times = []
        for _ in range(args.repeat):
            opened = []
            t0 = time.perf_counter()
            got, where = mt._load_step(MSTEP, None, {(0, MSTEP): ["peer-host"]}, opened)
            times.append(time.perf_counter() - t0)
            for fd in opened:
                os.close(fd)
            assert where == "peer"
        res["restore_peer_s"] = median(times)
        res["restore_peer_exact"] = same(got, state)
        del got

        # ---- zstd on the replica stream: does it pay, and below which link rate?
        paths_fd = kp.new_memfd("bench-zstd", 0)
        src = torch.empty(size, dtype=torch.uint8)
        with open(f"/proc/self/fd/{fds[0]}", "rb") as f:
            f.readinto(memoryview(src.numpy()))
        t0 = time.perf_counter()
        job = _C.checkpoint.WriteJob(src, [(0, size, 4)], [f"/proc/self/fd/{paths_fd}"], 4 << 20, 1, 1)
        job.wait()
        enc_s = time.perf_counter() - t0
        stored = job.bytes_stored()
        os.close(paths_fd)
        del src
        for fd in fds:
            os.close(fd)
        ratio = stored / size
        enc_rate = size / enc_s
        # Streamed in pieces, encode and send overlap: compressed time = max(encode, ratio * bytes / link).
        # It pays when that is below bytes / link, i.e. when the link is slower than the encoder.
        res["replica_zstd"] = {"ratio": ratio, "encode_GB_per_s_one_thread": enc_rate / 1e9,
                               "pays_below_link_GB_per_s": enc_rate / 1e9 if ratio < 1 else 0.0,
                               "at_bandwidth_saves": max(0.0, 1 - max(enc_s, ratio * size / args.bandwidth)
                                                         / (size / args.bandwidth))}

        # ---- disk restore: cold (page cache dropped) when allowed, and warm
        tier.close()
        disk = AsyncCheckpointer(root, keep_last=2)
        why = drop_caches()
        res["drop_caches"] = "ok" if why is None else f"not allowed ({why})"
        cold = []
        for _ in range(args.repeat if why is None else 0):
            drop_caches()
            t0 = time.perf_counter()
            got = disk.load()
            cold.append(time.perf_counter() - t0)
        res["restore_disk_cold_s"] = median(cold) if cold else None
        res["disk_read_GB_per_s"] = disk_read_rate(root, cold=why is None)
        res["pread_GB_per_s"] = pread_rates(min(n, 256 << 20), args.dir)
        warm = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            got = disk.load()
            warm.append(time.perf_counter() - t0)
        res["restore_disk_warm_s"] = median(warm)
        res["restore_disk_exact"] = same(got, state)
        del got
        disk.close()
        base = res["restore_disk_cold_s"] or res["restore_disk_warm_s"]
        res["memory_speedup_vs_disk"] = base / res["restore_memory_s"]
        res["peer_speedup_vs_disk"] = base / res["restore_peer_s"]

        # ---- training step time while a throttled replica streams
        res["training"] = bench_training(meta, size, root, mt.host, pinfo, ptoken, args.bandwidth)
    finally:
        stop_keepers(root)
        shutil.rmtree(args.dir, ignore_errors=True)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def disk_read_rate(root: str, cold: bool) -> float:
    """The disk's own sequential read rate over the newest step's files (the bound of a disk
    restore): page cache dropped first when allowed."""
    step = sorted(d for d in os.listdir(root) if d.startswith("step_") and "." not in d)[-1]
    files = [os.path.join(root, step, f) for f in os.listdir(os.path.join(root, step))]
    if cold:
        drop_caches()
    buf = bytearray(8 << 20)
    total = 0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                total += k
    return total / (time.perf_counter() - t0) / 1e9


def pread_rates(n: int, directory: str) -> dict:
    """One thread's pread rate from a memfd (the keeper's memory) and from a regular file in
    the page cache, same bytes, best of 3."""
    import mmap

    from ichiban_comm.checkpoint import keeper as kp

    data = os.urandom(1 << 20) * (n >> 20)
    fd = kp.new_memfd("bench-pread", len(data))
    with mmap.mmap(fd, len(data)) as m:
        m[:] = data
    path = os.path.join(directory, "pread.bin")
    with open(path, "wb") as f:
        f.write(data)
    buf = bytearray(4 << 20)

    def rate(p):
        best = float("inf")
        for _ in range(3):
            f = os.open(p, os.O_RDONLY)
            t0 = time.perf_counter()
            off = 0
            while off < len(data):
                off += os.preadv(f, [buf], off)
            best = min(best, time.perf_counter() - t0)
            os.close(f)
        return len(data) / best / 1e9

    out = {"memfd": rate(f"/proc/self/fd/{fd}"), "page_cache_file": rate(path)}
    os.close(fd)
    os.unlink(path)
    return out


def bench_training(meta, size, root, host, pinfo, ptoken, rate, steps: int = 15):
    """A small MLP's step time alone and while a replica of the snapshot streams at `rate`."""
    from ichiban_comm.checkpoint.memory import KeeperClient, ensure_keeper

    step = mlp_step()
    local, _, _ = ensure_keeper(root, host, keep=1, budget_bytes=None, idle_timeout=60, tcp=None)
    _, fds = local.get(0, MSTEP)
    for _ in range(3):
        step()
    before = [step() for _ in range(steps)]
    done = threading.Event()
    sent = {}

    def stream():
        c = KeeperClient(tuple(pinfo["tcp"]), ptoken)
        t0 = time.perf_counter()
        c.put(0, MSTEP + 1, meta, fds, [size], origin="replica", rate=rate)
        sent["s"] = time.perf_counter() - t0
        c.close()
        done.set()

    th = threading.Thread(target=stream)
    th.start()
    during = []
    while not done.is_set():
        during.append(step())
    th.join()
    after = [step() for _ in range(steps)]
    for fd in fds:
        os.close(fd)
    local.close()
    base = sorted(before + after)[steps]
    med = median(during) if during else float("nan")
    return {"step_s": base, "step_during_replica_s": med, "steps_during_replica": len(during),
            "ratio": med / base, "replica_s": sent["s"], "replica_GB_per_s": size / sent["s"] / 1e9}


def print_table(r) -> None:
    def row(name, value):
        print(f"{name:<52}{value:>24}")

    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['mem_GiB']} GiB, torch {m['torch']}")
    row("state", f"{r['state_bytes'] / 2**30:.2f} GiB")
    for label in ("disk_only", "memory"):
        s = r[f"save_{label}"]
        row(f"save ({label.replace('_', ' ')}) blocking / to commit",
            f"{s['blocking_s'] * 1e3:.0f} ms / {s['commit_s']:.2f} s")
    row("memcpy of the state (bound of any restore)", f"{r['state_copy_bound_s']:.3f} s  {r['memcpy_GB_per_s']:.2f} GB/s")
    row("restore from this host's keeper", f"{r['restore_memory_s']:.3f} s")
    row("restore from the peer's replica (TCP)", f"{r['restore_peer_s']:.3f} s")
    cold = r["restore_disk_cold_s"]
    row("restore from disk, page cache dropped", f"{cold:.3f} s" if cold is not None else "n/a")
    row("restore from disk, warm page cache", f"{r['restore_disk_warm_s']:.3f} s")
    row("disk sequential read (cold when dropped)", f"{r['disk_read_GB_per_s']:.2f} GB/s")
    row("pread, 1 thread: memfd / page-cached file", f"{r['pread_GB_per_s']['memfd']:.2f} / "
        f"{r['pread_GB_per_s']['page_cache_file']:.2f} GB/s")
    print(f"  drop_caches: {r['drop_caches']}")
    row("memory / peer speed-up against disk", f"{r['memory_speedup_vs_disk']:.1f} x / {r['peer_speedup_vs_disk']:.1f} x")
    row("bit-exact (memory, peer, disk)",
        f"{r['restore_memory_exact']}, {r['restore_peer_exact']}, {r['restore_disk_exact']}")
    for label, v in r["replicate"].items():
        cap = f" (cap {v['cap_GB_per_s']:.2f})" if v["cap_GB_per_s"] else ""
        row(f"replication {label}{cap}", f"{v['GB_per_s']:.2f} GB/s")
    z = r["replica_zstd"]
    row("replica zstd: size / encode rate (1 thread)",
        f"{z['ratio'] * 100:.1f}% / {z['encode_GB_per_s_one_thread']:.2f} GB/s")
    row("replica zstd pays below a link of", f"{z['pays_below_link_GB_per_s']:.2f} GB/s")
    t = r["training"]
    row("training step alone / while replicating",
        f"{t['step_s'] * 1e3:.1f} / {t['step_during_replica_s'] * 1e3:.1f} ms")
    row("step-time ratio while replicating", f"{t['ratio']:.2f} x ({t['steps_during_replica']} steps)")


if __name__ == "__main__":
    raise SystemExit(main())
