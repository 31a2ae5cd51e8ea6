"""Checkpoint benchmark: ichiban_comm.checkpoint against torch.save and torch.distributed.checkpoint.

One run, one state (transformer-shaped bf16 weights + fp32 optimizer moments,
random normal), every contender and the machine's own limits measured side by side:

    python benchmarks/checkpoint.py                 # ~1 GiB state, table
    python benchmarks/checkpoint.py --size 0.25 --json out.json

Rows: memcpy bandwidth and `dd conv=fsync` write bandwidth (the bounds);
ichiban save blocking time: the first save without a hint (stages into fresh
pages, the pool is pinned behind it), the first save after `reserve()`, steady
state, and a save after the state grew by 10 % (the pool grows in place); time
to commit; zstd ratio; torch.save; dcp.save; dcp.async_save blocking (its first
call) and total, and with ichiban's StorageWriter (first call and steady); load
times; training step time while a save persists in the background vs with no
save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import torch

from _machine import machine  # noqa: E402  (benchmarks/ is the script's directory)

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def transformer_state(total_bytes: int, d: int = 1024, seed: int = 0):
    """bf16 weights + two fp32 Adam moments per weight, shaped like a GPT's layers."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc": (4 * d, d), "mlp.proj": (d, 4 * d),
              "ln1": (d,), "ln2": (d,)}
    per_layer = sum(torch.Size(s).numel() for s in shapes.values()) * (2 + 4 + 4)
    layers = max(1, round(total_bytes / per_layer))
    model, m1, m2 = {}, {}, {}
    for i in range(layers):
        for k, s in shapes.items():
            name = f"layers.{i}.{k}"
            model[name] = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            m1[name] = torch.randn(s, generator=g) * 1e-3
            m2[name] = torch.rand(s, generator=g) * 1e-6
    return {"model": model, "optim": {"exp_avg": m1, "exp_avg_sq": m2}, "step": 1000}


def nbytes(state) -> int:
    n = 0
    for v in state["model"].values():
        n += v.numel() * v.element_size()
    for group in state["optim"].values():
        for v in group.values():
            n += v.numel() * v.element_size()
    return n


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def memcpy_bandwidth(n: int) -> dict:
    from ichiban_comm import _C

    src = torch.empty(n, dtype=torch.uint8).fill_(7)
    dst = torch.empty(n, dtype=torch.uint8).fill_(0)   # prefaulted: measure the copy, not page faults
    best_torch = best_ours = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best_torch = min(best_torch, time.perf_counter() - t0)
        t0 = time.perf_counter()
        _C.checkpoint.copy_bytes(dst, src)
        best_ours = min(best_ours, time.perf_counter() - t0)
    del src, dst
    return {"torch_copy_s": best_torch, "pool_copy_s": best_ours, "GBps": n / min(best_torch, best_ours) / 1e9}


def dd_bandwidth(directory: str, n: int) -> float:
    path = os.path.join(directory, "dd.bin")
    count = max(1, n // (4 << 20))
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "conv=fsync"],
                   check=True, capture_output=True)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return count * (4 << 20) / dt / 1e9


def stored_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def grown(state, fraction: float = 0.10):
    """state plus about `fraction` more bytes (new layers' optimizer moments appearing)."""
    extra = int(nbytes(state) * fraction) // 4
    out = dict(state, optim=dict(state["optim"]))
    out["optim"]["extra"] = {"grown": torch.randn(extra)}
    return out


def bench_ichiban(state, directory, compression=None):
    from ichiban_comm.checkpoint import AsyncCheckpointer

    ck = AsyncCheckpointer(directory, keep_last=1, compression=compression)
    out = {}
    for label, step in (("first", 1), ("steady", 2)):
        t0 = time.perf_counter()
        h = ck.save(step, state)
        blocking = time.perf_counter() - t0
        h.wait()
        ck._pool.wait_ready()   # the pinning behind the first save, outside the next measurement
        out[label] = {"blocking_s": blocking, "total_s": time.perf_counter() - t0,
                      "staged_fresh": h.staged_fresh}
    out["stats"] = ck.stats()
    out["stored_bytes"] = stored_bytes(os.path.join(directory, sorted(os.listdir(directory))[-1])) \
        if compression else None
    t0 = time.perf_counter()
    loaded = ck.load()
    out["load_s"] = time.perf_counter() - t0
    if compression:
        from ichiban_comm.checkpoint import _layout as layout

        m = layout.read_manifest(directory, 2)
        raw = st = 0
        for e in m["tensors"]:
            if e["dtype"] == "bfloat16":
                for s in e["shards"]:
                    raw += sum(c[3] for c in s["chunks"])
                    st += sum(c[2] for c in s["chunks"])
        out["bf16_ratio"] = st / raw
    del loaded
    ck.close()
    return out


def bench_first_save(state, directory):
    """First-save blocking with the reserve() hint, and a save after the state grew by 10 %."""
    from ichiban_comm.checkpoint import AsyncCheckpointer

    out = {}
    ck = AsyncCheckpointer(directory, keep_last=1)
    t0 = time.perf_counter()
    ck.reserve(state)
    out["reserve_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = ck.save(1, state)
    out["hinted_blocking_s"] = time.perf_counter() - t0
    out["hinted_fresh"] = h.staged_fresh
    h.wait()
    steady = []
    for step in (2, 3):
        t0 = time.perf_counter()
        h = ck.save(step, state)
        steady.append(time.perf_counter() - t0)
        h.wait()
    out["steady_blocking_s"] = sorted(steady)[0]
    before = ck.stats()
    big = grown(state)
    out["grown_bytes"] = nbytes(big)
    t0 = time.perf_counter()
    h = ck.save(4, big)
    out["grown_blocking_s"] = time.perf_counter() - t0
    out["grown_fresh"] = h.staged_fresh
    h.wait()
    ck._pool.wait_ready()
    after = ck.stats()
    out["pool_before"], out["pool_after"] = before, after
    t0 = time.perf_counter()
    h = ck.save(5, big)
    out["grown_steady_blocking_s"] = time.perf_counter() - t0
    h.wait()
    ck.close()
    return out


def _fresh_huge_pages(n: int) -> torch.Tensor:
    """n bytes of fresh anonymous memory advised MADV_HUGEPAGE (unmapped with the tensor)."""
    import ctypes
    import mmap

    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(getattr(mmap, "MADV_HUGEPAGE", 14))
    return torch.frombuffer(m, dtype=torch.uint8)


def fresh_copy_modes(state) -> dict:
    """Ways to stage a state into memory nobody has touched yet (what a first save must do), best
    of two: torch's per-tensor clone (what dcp.async_save's default stager does on CPU); the
    old first save (allocate and prefault the pool on the thread pool, then copy into it); the
    C++ copy into fresh pages advised MADV_HUGEPAGE (what the first save does now: the pool
    advises huge pages on each grown range and the copier threads take the faults); and the same
    copy into fresh base pages."""
    from ichiban_comm import _C

    tensors = list(state["model"].values()) + [v for g in state["optim"].values() for v in g.values()]
    offsets, n = [], 0
    for t in tensors:
        offsets.append(n)
        n += -(-t.numel() * t.element_size() // 64) * 64
    out = {}
    for name in ("clone", "prefault_then_copy", "copy_into_fresh_huge_pages", "copy_into_fresh_pages"):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            if name == "clone":
                keep = [t.clone() for t in tensors]
            elif name == "prefault_then_copy":
                keep = _C.checkpoint.alloc_staging(n)
                _C.checkpoint.stage_copy(tensors, keep, offsets)
            elif name == "copy_into_fresh_huge_pages":
                keep = _fresh_huge_pages(n)
                _C.checkpoint.stage_copy(tensors, keep, offsets)
            else:
                arena = _C.checkpoint.StagingArena(2 * n)
                arena.grow(n)
                keep = arena.tensor()
                _C.checkpoint.stage_copy(tensors, keep, offsets)
            best = min(best, time.perf_counter() - t0)
            del keep
        out[name + "_s"] = best
    return out


def bench_torch_save(state, directory):
    path = os.path.join(directory, "state.pt")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.load(path, weights_only=True)
    return {"save_s": save_s, "load_s": time.perf_counter() - t0}


def bench_dcp(state, directory):
    import torch.distributed.checkpoint as dcp

    out = {}
    d1 = os.path.join(directory, "dcp_sync")
    t0 = time.perf_counter()
    dcp.save(state, checkpoint_id=d1)
    out["save_s"] = time.perf_counter() - t0
    d2 = os.path.join(directory, "dcp_async")
    t0 = time.perf_counter()
    fut = dcp.async_save(state, checkpoint_id=d2)
    out["async_blocking_s"] = time.perf_counter() - t0
    fut.result()
    out["async_total_s"] = time.perf_counter() - t0
    from ichiban_comm.checkpoint import StorageReader, StorageWriter

    d3 = os.path.join(directory, "dcp_ichiban")
    t0 = time.perf_counter()
    dcp.save(state, storage_writer=StorageWriter(d3))
    out["ichiban_writer_save_s"] = time.perf_counter() - t0
    shutil.rmtree(d2)
    writer = StorageWriter(os.path.join(directory, "dcp_ichiban_async"))
    for label in ("first", "steady"):  # the writer keeps its staging pool between saves
        t0 = time.perf_counter()
        fut = dcp.async_save(state, storage_writer=writer)
        out[f"ichiban_writer_async_{label}_blocking_s"] = time.perf_counter() - t0
        (fut.result() if hasattr(fut, "result") else fut.upload_completion.result())
        out[f"ichiban_writer_async_{label}_total_s"] = time.perf_counter() - t0
    writer.close()
    shutil.rmtree(os.path.join(directory, "dcp_ichiban_async"))
    target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()},
              "optim": {g: {k: torch.empty_like(v) for k, v in grp.items()} for g, grp in state["optim"].items()},
              "step": 0}
    t0 = time.perf_counter()
    dcp.load(target, checkpoint_id=d1)
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=StorageReader(d3))
    out["ichiban_reader_load_s"] = time.perf_counter() - t0
    return out


def mlp_step():
    """A small MLP's training step as a function returning its seconds: ~10-50 ms on a small
    CPU, so several steps fit inside one background persist or replica stream."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(128, 512)

    def step():
        t0 = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def bench_training(state, directory, steps: int = 12):
    """Step time of a small MLP with no save vs while an ichiban save persists."""
    from ichiban_comm.checkpoint import AsyncCheckpointer

    step = mlp_step()
    for _ in range(3):
        step()
    ck = AsyncCheckpointer(directory, keep_last=1)
    ck.save(1, state).wait()  # allocate the pool outside the measurement
    before = [step() for _ in range(steps)]
    h = ck.save(2, state)
    during = []
    while not h.done():
        during.append(step())
    persist_s = h.wait() and h.total_s
    after = [step() for _ in range(steps)]
    ck.close()
    # Baseline from steps on both sides of the persist: other load on the machine drifts.
    base = sorted(before + after)[steps]
    med = sorted(during)[len(during) // 2] if during else float("nan")
    return {"step_s": base, "step_during_persist_s": med, "steps_during_persist": len(during),
            "slowdown": med / base, "persist_s": persist_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=1.0, help="state size in GiB (default 1)")
    p.add_argument("--dir", default="runs/bench_checkpoint", help="scratch directory (removed afterwards)")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--skip-dcp", action="store_true", help="skip the torch.distributed.checkpoint rows")
    p.add_argument("--skip-training", action="store_true", help="skip the training-loop rows")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    target = int(args.size * 2**30)
    print(f"building a ~{args.size:g} GiB transformer-shaped state ...", file=sys.stderr)
    state = transformer_state(target)
    n = nbytes(state)
    res = {"machine": machine(), "state_bytes": n}

    def scratch(name):
        d = os.path.join(args.dir, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    print("memcpy / dd ...", file=sys.stderr)
    res["memcpy"] = memcpy_bandwidth(n)
    res["dd_GBps"] = dd_bandwidth(scratch("dd"), n)
    print("ichiban ...", file=sys.stderr)
    res["ichiban"] = bench_ichiban(state, scratch("ichiban"))
    shutil.rmtree(os.path.join(args.dir, "ichiban"))
    res["fresh"] = fresh_copy_modes(state)
    res["first_save"] = bench_first_save(state, scratch("first"))
    shutil.rmtree(os.path.join(args.dir, "first"))
    res["ichiban_zstd"] = bench_ichiban(state, scratch("ichiban_zstd"), compression="zstd")
    shutil.rmtree(os.path.join(args.dir, "ichiban_zstd"))
    print("torch.save ...", file=sys.stderr)
    res["torch_save"] = bench_torch_save(state, scratch("torch_save"))
    shutil.rmtree(os.path.join(args.dir, "torch_save"))
    if not args.skip_dcp:
        print("dcp ...", file=sys.stderr)
        res["dcp"] = bench_dcp(state, scratch("dcp"))
        shutil.rmtree(os.path.join(args.dir, "dcp"))
    if not args.skip_training:
        print("training loop ...", file=sys.stderr)
        res["training"] = bench_training(state, scratch("train"))
        shutil.rmtree(os.path.join(args.dir, "train"))
    shutil.rmtree(args.dir, ignore_errors=True)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def print_table(r) -> None:
    n = r["state_bytes"]
    gb = n / 1e9
    mc = n / (r["memcpy"]["GBps"] * 1e9)
    ib, iz, fs = r["ichiban"], r["ichiban_zstd"], r["first_save"]
    rows = [
        ("state", f"{n / 2**30:.2f} GiB", ""),
        ("memcpy bandwidth", f"{r['memcpy']['GBps']:.2f} GB/s", f"state copy bound {mc * 1e3:.0f} ms"),
        ("dd conv=fsync write", f"{r['dd_GBps']:.2f} GB/s", f"state bound {gb / r['dd_GBps']:.2f} s"),
        ("fresh memory: torch clone per tensor", f"{r['fresh']['clone_s'] * 1e3:.0f} ms", ""),
        ("fresh memory: prefault pool, then copy", f"{r['fresh']['prefault_then_copy_s'] * 1e3:.0f} ms", ""),
        ("fresh memory: copy into fresh huge pages", f"{r['fresh']['copy_into_fresh_huge_pages_s'] * 1e3:.0f} ms",
         "MADV_HUGEPAGE"),
        ("fresh memory: copy into fresh base pages", f"{r['fresh']['copy_into_fresh_pages_s'] * 1e3:.0f} ms",
         f"{r['fresh']['copy_into_fresh_pages_s'] / mc:.2f} x memcpy bound"),
        ("ichiban save blocking (first, no hint)", f"{ib['first']['blocking_s'] * 1e3:.0f} ms",
         f"{ib['first']['blocking_s'] / mc:.2f} x memcpy bound" + (
             f"; {ib['first']['blocking_s'] / r['dcp']['async_blocking_s']:.2f} x dcp.async_save"
             if "dcp" in r else "")),
        ("ichiban save blocking (first, after reserve())", f"{fs['hinted_blocking_s'] * 1e3:.0f} ms",
         f"{fs['hinted_blocking_s'] / mc:.2f} x memcpy bound; reserve() took {fs['reserve_s'] * 1e3:.0f} ms"),
        ("ichiban save blocking (steady)", f"{ib['steady']['blocking_s'] * 1e3:.0f} ms",
         f"{ib['steady']['blocking_s'] / mc:.2f} x memcpy bound"),
        ("ichiban save blocking (state grew 10 %)", f"{fs['grown_blocking_s'] * 1e3:.0f} ms",
         f"{fs['grown_blocking_s'] / fs['steady_blocking_s']:.2f} x steady ({fs['steady_blocking_s'] * 1e3:.0f} ms"
         f" same run); pool {fs['pool_before']['pool_bytes'] / 2**20:.0f} -> "
         f"{fs['pool_after']['pool_bytes'] / 2**20:.0f} MiB in place, {fs['pool_after']['allocations']} allocation"),
        ("ichiban save blocking (grown, next save)", f"{fs['grown_steady_blocking_s'] * 1e3:.0f} ms", ""),
        ("ichiban save to commit (steady)", f"{ib['steady']['total_s']:.2f} s",
         f"{gb / ib['steady']['total_s']:.2f} GB/s = {gb / ib['steady']['total_s'] / r['dd_GBps']:.0%} of dd"),
        ("ichiban load", f"{ib['load_s']:.2f} s", ""),
        ("ichiban zstd save to commit", f"{iz['steady']['total_s']:.2f} s",
         f"blocking {iz['steady']['blocking_s'] * 1e3:.0f} ms"),
        ("ichiban zstd size", f"{iz['stored_bytes'] / n:.1%} of raw", f"bf16 weights: {iz['bf16_ratio']:.1%} of raw"),
        ("ichiban zstd load", f"{iz['load_s']:.2f} s", ""),
        ("torch.save (+fsync)", f"{r['torch_save']['save_s']:.2f} s", f"load {r['torch_save']['load_s']:.2f} s"),
    ]
    if "dcp" in r:
        d = r["dcp"]
        rows += [
            ("dcp.save", f"{d['save_s']:.2f} s", f"load {d['load_s']:.2f} s"),
            ("dcp.async_save blocking (first call)", f"{d['async_blocking_s'] * 1e3:.0f} ms",
             f"ichiban steady is {ib['steady']['blocking_s'] / d['async_blocking_s']:.2f} x this"),
            ("dcp.async_save total", f"{d['async_total_s']:.2f} s", ""),
            ("dcp.save with ichiban StorageWriter", f"{d['ichiban_writer_save_s']:.2f} s",
             f"load with StorageReader {d['ichiban_reader_load_s']:.2f} s"),
            ("dcp.async_save, ichiban StorageWriter, blocking",
             f"{d['ichiban_writer_async_steady_blocking_s'] * 1e3:.0f} ms",
             f"first {d['ichiban_writer_async_first_blocking_s'] * 1e3:.0f} ms; total "
             f"{d['ichiban_writer_async_steady_total_s']:.2f} s"),
        ]
    if "training" in r:
        t = r["training"]
        rows += [
            ("train step, no save", f"{t['step_s'] * 1e3:.1f} ms", ""),
            ("train step while persisting", f"{t['step_during_persist_s'] * 1e3:.1f} ms",
             f"{t['slowdown']:.2f} x ({t['steps_during_persist']} steps)"),
        ]
    w = max(len(a) for a, _, _ in rows)
    m = r["machine"]
    print(f"# checkpoint benchmark: {m['cpu']}, {m['cores']} cores, {m['mem_GiB']} GiB, torch {m['torch']}")
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:>16}  {c}")


if __name__ == "__main__":
    sys.exit(main())
