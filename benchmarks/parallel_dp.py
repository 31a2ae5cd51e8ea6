"""Data-parallel benchmark: ShardedOptimizer (ZeRO-1) against DDP + AdamW, one run, same model.

    python benchmarks/parallel_dp.py                       # dp=2 on this machine, table
    python benchmarks/parallel_dp.py --dp 2 --json out.json

Rows, per backend ("ichiban", "gloo"): the median training step (forward, backward, optimizer)
of DDP + torch AdamW; of ShardedOptimizer with the reduce-scatter issued from the gradient hooks
(overlapping backward); of ShardedOptimizer with every reduction after backward (no_sync, then
step: nothing overlapped); the unsplit model in one process on the whole batch for reference;
and the optimizer state each rank holds. "hidden" is how much of the no-overlap step's extra
time the hooks remove. Medians of --steps steps after warm-up; ratios are within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _cfg(args):
    from ichiban_comm.models.gpt import GPTConfig

    return GPTConfig(vocab_size=256, seq_len=args.seq, n_layer=args.layers, n_head=8,
                     d_model=args.d_model)


def _batch(args, n, step):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 256, (n, args.seq), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_steps(args, step_fn) -> list[float]:
    times = []
    for i in range(args.warmup + args.steps * getattr(step_fn, "repeat", 1)):
        t0 = time.perf_counter()
        step_fn(i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def _state_bytes(states) -> int:
    return sum(v.numel() * v.element_size() for st in states for v in st.values()
               if isinstance(v, torch.Tensor))


def _worker(rank, world, port, backend, args, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ichiban_comm  # noqa: F401  (registers the backend)
    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel.optim import ShardedOptimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group(backend, rank=rank, world_size=world)
    res = {}

    torch.manual_seed(0)
    ddp = DDP(GPT(_cfg(args)))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)

    def ddp_step(i):
        ddp(*_batch(args, args.batch, 1000 * rank + i)).backward()
        opt.step()
        opt.zero_grad()
    res["ddp"] = _time_steps(args, ddp_step)
    res["ddp_state_bytes"] = _state_bytes(opt.state.values())
    del ddp, opt

    torch.manual_seed(0)
    model = GPT(_cfg(args))
    zopt = ShardedOptimizer(torch.optim.AdamW, model.parameters(), None, lr=1e-4,
                            bucket_mb=args.bucket_mb)

    def zero_step(i, overlap=True):
        batch = _batch(args, args.batch, 1000 * rank + i)
        if overlap:
            model(*batch).backward()
        else:
            with zopt.no_sync():
                model(*batch).backward()
        zopt.step()
        zopt.zero_grad()
    # The two modes alternate step by step, so that a change in the machine's load hits both.
    def alternate(i):
        zero_step(i // 2, overlap=i % 2 == 0)
    alternate.repeat = 2
    both = _time_steps(args, alternate)
    res["zero"], res["zero_no_overlap"] = both[args.warmup % 2::2], both[1 - args.warmup % 2::2]
    res["zero_state_bytes"] = _state_bytes(zopt.optim.state.values())
    res["buckets"] = len(zopt._buckets)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def _one_process(args) -> list[float]:
    from ichiban_comm.models.gpt import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(_cfg(args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i):
        model(*_batch(args, args.batch * args.dp, i)).backward()
        opt.step()
        opt.zero_grad()
    return _time_steps(args, step)


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--backends", default="ichiban,gloo")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank")
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.dp < 2:
        ap.error(f"--dp must be >= 2, got {args.dp}")

    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731 - ms
    rows = {"one process (whole batch)": med(_one_process(args))}
    results = {}
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            mp.spawn(_worker, args=(args.dp, free_port(), backend, args, out), nprocs=args.dp)
            with open(out) as f:
                results[backend] = json.load(f)
    print(f"# dp={args.dp}  GPT d_model={args.d_model} layers={args.layers} seq={args.seq} "
          f"batch={args.batch}/rank  torch {torch.__version__}  "
          f"{platform.processor() or platform.machine()} x{os.cpu_count()}")
    print(f"{'row':52s} {'median ms':>10s}")
    print(f"{'one process (whole batch)':52s} {rows['one process (whole batch)']:10.1f}")
    for backend, r in results.items():
        ddp, zero, noov = med(r["ddp"]), med(r["zero"]), med(r["zero_no_overlap"])
        rows.update({f"{backend}: DDP + AdamW": ddp, f"{backend}: ShardedOptimizer": zero,
                     f"{backend}: ShardedOptimizer, reduce after backward": noov})
        hidden = (noov - zero) / noov if noov else 0.0
        print(f"{backend + ': DDP + AdamW':52s} {ddp:10.1f}")
        print(f"{backend + ': ShardedOptimizer':52s} {zero:10.1f}   {zero / ddp:.2f} x DDP")
        print(f"{backend + ': ShardedOptimizer, reduce after backward':52s} {noov:10.1f}   "
              f"hooks save {100 * hidden:.0f}% of it")
        print(f"{backend + ': optimizer state per rank':52s} "
              f"{r['zero_state_bytes'] / 2**20:8.2f} MiB   "
              f"DDP {r['ddp_state_bytes'] / 2**20:.2f} MiB ({r['buckets']} buckets)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "medians_ms": rows, "raw": results,
                       "torch": torch.__version__, "cpus": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
