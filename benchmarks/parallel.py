"""Tensor-parallel training step: ichiban_comm.parallel against torch's DTensor
``parallelize_module``, on the same model and batch, in one run.

Rows (median step time of forward + backward + AdamW step, and tokens/s):
  * ``unsplit``          the whole model in one process (all cores; and with one thread)
  * ``ours tp=2``        ``parallelize(model, dims)`` over gloo and over "ichiban"
  * ``dtensor tp=2``     ``parallelize_module`` Colwise/Rowwise (embedding Rowwise, head Colwise
                         with replicated logits), over gloo and over "ichiban"; and the same with
                         the logits left split and the loss under ``loss_parallel()``
  * ``ours tp=2, dx per layer``  the auto plan given as a dict: every column-parallel layer
                         all-reduces its own dx (overlapped with its dW) instead of one shared
                         all-reduce per norm; ``waited``: that all-reduce waited before dW
  * ``ours tp=2, collectives stubbed out``  our step with every collective returning at once:
                         its compute alone (wrong numbers, right work)
  * ``ddp dp=2``         the whole model on each rank, DDP over "ichiban" (twice the tokens)
and the collectives one step of each split configuration issues (recorded: count, bytes),
replayed alone on the same backend with no compute (and between matmul bursts), which
decomposes our step into compute + collectives + the cost of mixing them (waiting for the peer,
waking the backend's threads; context switches per step are counted); and the best ratio to
DTensor that sequence of collectives allows. And, per backend, how much of the column-parallel
dx all-reduce the overlap hides: with
``t_ar`` the all-reduce alone, ``t_w`` the weight-gradient matmul alone and ``t_ov`` both with
the all-reduce issued asynchronously first, hidden = (t_ar + t_w - t_ov) / t_ar.

The split configurations run interleaved inside one pair of processes (one thread each), round
after round, so machine noise hits them alike; the unsplit model runs in this process between
the rounds.

    python benchmarks/parallel.py                         # table
    python benchmarks/parallel.py --json out.json         # table + rows as JSON
    python benchmarks/parallel.py --d-model 512 --layers 8 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import sys
import time

# This folder holds kernels.py, which would shadow the `kernels` package transformers imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

ROWS = ["ours-gloo", "ours-gloo-perlayer", "dtensor-gloo", "dtensorlp-gloo", "ours-ichiban",
        "ours-ichiban-perlayer", "dtensor-ichiban", "dtensorlp-ichiban", "ours-ichiban-nooverlap",
        "ours-nocomm", "ddp-ichiban"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1024, help="MLP intermediate size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replay-reps", type=int, default=30,
                   help="replays of each configuration's collectives alone (median)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    for k in ("d_model", "layers", "heads", "kv_heads", "ffn", "vocab", "batch", "seq", "steps",
              "rounds"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def build_model(args):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                         intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(128, args.seq), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(cfg).float()


def batch(args):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return ids, ids.clone()


def _forward_backward(model, ids, labels):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss


def _forward_backward_loss_parallel(model, ids, labels):
    """DTensor's vocabulary-parallel loss: the head's logits stay split over the vocabulary."""
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel

    h = model.model(input_ids=ids).last_hidden_state
    logits = model.lm_head(h)  # DTensor (B, T, V) sharded on V
    target = F.pad(labels, (0, 1), value=-100)[..., 1:]  # transformers' shift by one
    with loss_parallel():
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        loss.backward()
    return loss


def time_steps(model, opt, ids, labels, n, warmup, step=_forward_backward):
    """Per-step wall times (s) of forward + backward + optimizer step."""
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        loss = step(model, ids, labels)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times, loss.detach().item()


def _dtensor(model, group, split_logits=False):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    mesh = DeviceMesh.from_group(group, "cpu")
    parallelize_module(model, mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        if split_logits else ColwiseParallel(output_layouts=Replicate()),
    })
    return model


def _overlap_probe(args, group, reps=200):
    """(t_ar, t_w, t_ov) medians in seconds at the model's MLP shapes: dx (tokens, d_model)
    all-reduced, dW = gy^T x with gy (tokens, ffn/tp)."""
    import torch
    import torch.distributed as dist

    n = args.batch * args.seq
    tp = dist.get_world_size(group)
    x = torch.randn(n, args.d_model)
    gy = torch.randn(n, args.ffn // tp)
    dx = torch.randn(n, args.d_model)
    res = {"ar": [], "w": [], "ov": []}
    for _ in range(reps):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_reduce(dx, group=group)
        res["ar"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gy.t() @ x
        res["w"].append(time.perf_counter() - t0)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        work = dist.all_reduce(dx, group=group, async_op=True)
        gy.t() @ x
        work.wait()
        res["ov"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in res.items()}


# ---- the collectives of one step, alone -------------------------------------------------------

_DIST_FNS = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
             "reduce_scatter_tensor", "broadcast")


class CollectiveLog:
    """Records the collectives one training step issues, in order, as (kind, numel, dtype,
    reduce op): torch.distributed calls (ours: plain tensors and autograd Functions) by
    wrapping the module's functions, and functional collectives (DTensor's) through a
    TorchDispatchMode. ``numel`` is the input's element count."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.entries = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
                if "_c10d_functional" in str(func) and name in ("all_reduce",
                                                                "all_gather_into_tensor",
                                                                "reduce_scatter_tensor"):
                    op = args[1] if name != "all_gather_into_tensor" else "sum"
                    kind = {"all_gather_into_tensor": "all_gather_single",
                            "reduce_scatter_tensor": "reduce_scatter_single"}.get(name, name)
                    log.append((kind, args[0].numel(), args[0].dtype, str(op).lower()))
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        for name in _DIST_FNS:
            fn = getattr(dist, name)
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, fn))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        self._mode.__exit__(*exc)
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        import torch.distributed as dist

        kinds = {"all_gather_into_tensor": "all_gather_single",
                 "reduce_scatter_tensor": "reduce_scatter_single"}

        def wrapped(*a, **kw):
            t = a[0] if name in ("all_reduce", "broadcast") else a[1]   # the input
            op = kw.get("op", a[1] if name == "all_reduce" and len(a) > 1 else dist.ReduceOp.SUM)
            self.entries.append((kinds.get(name, name), t.numel(), t.dtype,
                                 str(op).split(".")[-1].lower()))
            return fn(*a, **kw)
        return wrapped

    def summary(self) -> dict:
        """{"count": n, "bytes": total input bytes, "by_kind": {kind: [count, bytes]}}."""
        by = {}
        for kind, n, dtype, _ in self.entries:
            c = by.setdefault(kind, [0, 0])
            c[0] += 1
            c[1] += n * dtype.itemsize
        return {"count": len(self.entries), "bytes": sum(b for _, b in by.values()),
                "by_kind": by}


class NoCollectives:
    """Every torch.distributed collective of our layers returns at once, untouched: the step's
    compute alone, in the same processes and code path (the numbers it computes are wrong; only
    its time is used)."""

    class _Done:
        def wait(self, *a, **kw):
            return True

        def is_completed(self):
            return True

    def __enter__(self):
        import torch.distributed as dist

        self._saved = {n: getattr(dist, n) for n in _DIST_FNS}
        for n in _DIST_FNS:
            setattr(dist, n, lambda *a, async_op=False, **kw: self._Done() if async_op else None)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for n, fn in self._saved.items():
            setattr(dist, n, fn)


def _buffers(entries, group):
    import torch
    import torch.distributed as dist

    tp = dist.get_world_size(group)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}
    bufs = []
    for kind, n, dtype, op in entries:
        x = torch.randn(n).to(dtype)
        if kind == "all_gather_single":
            bufs.append((kind, x.new_empty(n * tp), x, None))
        elif kind == "reduce_scatter_single":
            bufs.append((kind, x.new_empty(n // tp), x, ops.get(op, dist.ReduceOp.SUM)))
        else:
            bufs.append((kind, x, None, ops.get(op, dist.ReduceOp.SUM)))
    return bufs


def _issue(buf, group):
    import torch.distributed as dist

    kind, a, b, op = buf
    if kind == "all_reduce":
        dist.all_reduce(a, op=op, group=group)
    elif kind == "all_gather_single":
        dist.all_gather_single(a, b, group=group)
    elif kind == "reduce_scatter_single":
        dist.reduce_scatter_single(a, b, op=op, group=group)
    else:
        dist.broadcast(a, dist.get_global_rank(group, 0), group=group)


def replay(entries, group, reps):
    """Median seconds of the recorded collectives issued back to back on ``group`` (each
    waited before the next, as the step waits for them), with no compute between them."""
    import torch.distributed as dist

    bufs = _buffers(entries, group)
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        for buf in bufs:
            _issue(buf, group)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _burst(seconds):
    """A callable that multiplies for about ``seconds`` (calibrated here): compute that keeps
    the core busy between two collectives, as the step's layers do."""
    import torch

    a, b = torch.randn(64, 256), torch.randn(256, 256)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.05:
        a @ b
        n += 1
    iters = max(0, round(seconds / ((time.perf_counter() - t0) / n)))

    def run():
        for _ in range(iters):
            a @ b
    return run


def replay_interleaved(entries, group, reps, compute_s):
    """(collectives with compute between them, the compute alone), median seconds: the step's
    compute time cut into equal bursts, one before each recorded collective. What the first
    exceeds the sum of the second and the collectives alone is the cost of alternating them on
    this backend (the backend's threads sleep during compute and must be woken; the peer may
    be late), not of our layers' code."""
    import torch.distributed as dist

    burst = _burst(compute_s / max(1, len(entries)))
    bufs = _buffers(entries, group)
    both, alone = [], []
    for _ in range(reps):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        for _ in entries:
            burst()
        alone.append(time.perf_counter() - t0)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        for buf in bufs:
            burst()
            _issue(buf, group)
        both.append(time.perf_counter() - t0)
    return statistics.median(both), statistics.median(alone)


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        import torch
        import torch.distributed as dist
        from types import SimpleNamespace

        import ichiban_comm  # noqa: F401  (registers "ichiban")
        from ichiban_comm.parallel import parallelize
        from ichiban_comm.parallel.plans import auto_plan

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        groups = {"gloo": dist.new_group([0, 1], backend="gloo"),
                  "ichiban": dist.new_group([0, 1], backend="ichiban")}
        ids, labels = batch(args)
        base = build_model(args)
        setups = {}
        for row in ROWS:
            kind, backend = row.split("-")[0], row.split("-")[1]
            backend = "gloo" if backend == "nocomm" else backend
            m = copy.deepcopy(base)
            if kind == "ours":
                dims = SimpleNamespace(tp=2, tp_group=groups[backend])
                if row.endswith(("perlayer", "nooverlap")):
                    # the auto plan given as a dict: each column-parallel layer all-reduces
                    # its own dx (overlapped with its dW, or waited first: "nooverlap")
                    parallelize(m, dims, plan=auto_plan(m, 2)[0])
                else:
                    parallelize(m, dims, plan="auto")
                if row.endswith("nooverlap"):
                    for mod in m.modules():
                        if hasattr(mod, "overlap"):
                            mod.overlap = False
            elif kind in ("dtensor", "dtensorlp"):
                _dtensor(m, groups[backend], split_logits=kind == "dtensorlp")
            else:  # ddp
                m = torch.nn.parallel.DistributedDataParallel(m, process_group=groups[backend])
            setups[row] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
        times = {row: [] for row in ROWS}
        switches = {row: [0, 0, 0] for row in ROWS}
        losses = {}
        for r in range(args.rounds):
            for row in ROWS:
                m, opt = setups[row]
                dist.barrier()
                step = _forward_backward_loss_parallel if row.startswith("dtensorlp") \
                    else _forward_backward
                warm = args.warmup if r == 0 else 1
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                with NoCollectives() if row == "ours-nocomm" else contextlib.nullcontext():
                    t, losses[row] = time_steps(m, opt, ids, labels, args.steps, warm, step)
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                # context switches of this process (all its threads) per step: how often a
                # thread blocked (voluntary) or was preempted (involuntary)
                switches[row][0] += ru1.ru_nvcsw - ru0.ru_nvcsw
                switches[row][1] += ru1.ru_nivcsw - ru0.ru_nivcsw
                switches[row][2] += args.steps + warm
                times[row] += t
        probe = {b: _overlap_probe(args, groups[b]) for b in ("gloo", "ichiban")}
        # The collectives of one step of each split configuration, then those alone, replayed
        # on the same backend (after the timed rounds: the recording hooks cost nothing then).
        comm = {}
        for row in ROWS:
            if row.startswith("ddp") or row == "ours-nocomm":
                continue
            m, opt = setups[row]
            step = _forward_backward_loss_parallel if row.startswith("dtensorlp") \
                else _forward_backward
            with CollectiveLog() as log:
                step(m, ids, labels)
            opt.zero_grad(set_to_none=True)
            backend = row.split("-")[1]
            comm[row] = dict(log.summary(), replay_s=replay(log.entries, groups[backend],
                                                             args.replay_reps))
            if row in ("ours-gloo", "ours-ichiban"):
                both, alone = replay_interleaved(log.entries, groups[backend],
                                                 max(3, args.replay_reps // 3),
                                                 statistics.median(times["ours-nocomm"]))
                comm[row].update(interleaved_s=both, bursts_s=alone)
        dist.barrier()
        dist.destroy_process_group()
        switches = {row: {"voluntary": v / n, "involuntary": i / n}
                    for row, (v, i, n) in switches.items()}
        out.put((rank, "ok", {"times": times, "losses": losses, "probe": probe, "comm": comm,
                              "switches": switches}))
    except BaseException:  # noqa: BLE001
        import traceback

        out.put((rank, "error", traceback.format_exc()))


def run_pair(args, timeout=1800):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, out), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) < 2:
            rank, status, payload = out.get(timeout=max(1.0, deadline - time.monotonic()))
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return results[0]


def run_unsplit(args, threads):
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    m = build_model(args)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ids, labels = batch(args)
    # as many steps as each split configuration takes (its later rounds warm up one step each),
    # so that the final losses are comparable
    t, loss = time_steps(m, opt, ids, labels, args.steps * args.rounds,
                         args.warmup + args.rounds - 1)
    torch.set_num_threads(saved)
    return t, loss


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    tokens = args.batch * args.seq
    print(f"tensor-parallel step: Llama d_model {args.d_model}, {args.layers} layers, "
          f"{args.heads} heads ({args.kv_heads} kv), ffn {args.ffn}, vocab {args.vocab}; batch "
          f"{args.batch} x {args.seq} tokens; {args.rounds} rounds x {args.steps} steps; "
          f"{os.cpu_count()} cpus, torch {torch.__version__}", flush=True)
    cores = os.cpu_count() or 1
    load = [os.getloadavg()[0]]
    unsplit_all, loss_u = run_unsplit(args, cores)
    pair = run_pair(args)
    unsplit_1, _ = run_unsplit(args, 1)
    unsplit_all2, _ = run_unsplit(args, cores)
    load.append(os.getloadavg()[0])
    med = {row: statistics.median(pair["times"][row]) for row in ROWS}
    med["unsplit"] = statistics.median(unsplit_all + unsplit_all2)
    med["unsplit-1thread"] = statistics.median(unsplit_1)
    label = {"unsplit": f"unsplit, 1 process ({cores} threads)",
             "unsplit-1thread": "unsplit, 1 process (1 thread)",
             "ours-gloo": "ours tp=2, gloo", "dtensor-gloo": "DTensor tp=2, gloo",
             "dtensorlp-gloo": "DTensor tp=2, gloo, loss_parallel",
             "dtensorlp-ichiban": "DTensor tp=2, ichiban, loss_parallel",
             "ours-ichiban": "ours tp=2, ichiban", "dtensor-ichiban": "DTensor tp=2, ichiban",
             "ours-ichiban-nooverlap": "ours tp=2, ichiban, dx per layer, waited",
             "ours-gloo-perlayer": "ours tp=2, gloo, dx per layer",
             "ours-ichiban-perlayer": "ours tp=2, ichiban, dx per layer",
             "ours-nocomm": "ours tp=2, collectives stubbed out",
             "ddp-ichiban": "DDP dp=2, ichiban (2 batches)"}
    # The baseline is the faster unsplit run (all cores, or one thread when the cores are
    # oversubscribed and OpenMP's barriers cost more than they give).
    base = min(med["unsplit"], med["unsplit-1thread"])
    rows = []
    for key in ["unsplit", "unsplit-1thread"] + ROWS:
        tok = tokens * (2 if key.startswith("ddp") else 1)
        row = {"config": key, "label": label[key], "step_ms": 1e3 * med[key],
               "tokens_per_s": tok / med[key], "vs_unsplit": base / med[key]}
        if key.startswith("ours") and key != "ours-nocomm":
            backend = key.split("-")[1]
            # against the faster of DTensor's two loss set-ups on the same backend
            row["vs_dtensor_same_backend"] = min(med[f"dtensor-{backend}"],
                                                 med[f"dtensorlp-{backend}"]) / med[key]
        rows.append(row)
    print(f"\nload average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end; "
          "'x unsplit': the faster unsplit row over this row")
    print(f"\n{'configuration':<36}{'step ms':>10}{'tok/s':>10}{'x unsplit':>11}{'x DTensor':>11}")
    for r in rows:
        vs_d = f"{r['vs_dtensor_same_backend']:.2f}" if "vs_dtensor_same_backend" in r else ""
        print(f"{r['label']:<36}{r['step_ms']:>10.1f}{r['tokens_per_s']:>10.0f}"
              f"{r['vs_unsplit']:>11.2f}{vs_d:>11}")
    overlap = {}
    print("\ncolumn-parallel dx all-reduce under the dW matmul (medians, us):")
    for b, p in pair["probe"].items():
        hidden = max(0.0, min(1.0, (p["ar"] + p["w"] - p["ov"]) / p["ar"])) if p["ar"] else 0.0
        overlap[b] = {"all_reduce_us": 1e6 * p["ar"], "dw_matmul_us": 1e6 * p["w"],
                      "overlapped_us": 1e6 * p["ov"], "hidden_fraction": hidden}
        print(f"  {b:<8} all-reduce {1e6 * p['ar']:.1f}, dW {1e6 * p['w']:.1f}, both overlapped "
              f"{1e6 * p['ov']:.1f} -> {100 * hidden:.0f}% of the all-reduce hidden")
    comm, decomposition = pair["comm"], {}
    print("\nthe collectives of one step alone, replayed on the same backend with no compute "
          "(medians, ms):")
    print(f"  {'configuration':<36}{'count':>6}{'KiB':>8}{'alone':>9}{'step':>9}{'rest':>9}"
          f"{'switches/step':>15}")
    sw = pair["switches"]
    for key in (k for k in ROWS if k in comm):
        c = comm[key]
        c["replay_ms"] = 1e3 * c.pop("replay_s")
        c["step_ms"], c["rest_ms"] = 1e3 * med[key], 1e3 * med[key] - c["replay_ms"]
        c["context_switches_per_step"] = sw[key]
        print(f"  {label[key]:<36}{c['count']:>6}{c['bytes'] / 1024:>8.0f}{c['replay_ms']:>9.1f}"
              f"{c['step_ms']:>9.1f}{c['rest_ms']:>9.1f}"
              f"{sw[key]['voluntary']:>9.0f} +{sw[key]['involuntary']:>4.0f}")
    # Our step = compute alone (the same step with every collective stubbed out) + its
    # collectives alone (replayed) + what mixing the two costs (waiting for the peer, waking
    # the backend's threads, cores taken from the compute). Without that last part, and with
    # the collectives as they are, the step would take compute + collectives: the best ratio
    # to DTensor this sequence of collectives allows on the backend.
    compute = 1e3 * med["ours-nocomm"]
    print(f"\nour step decomposed (ms): compute alone {compute:.1f} (collectives stubbed out; "
          f"{sw['ours-nocomm']['voluntary']:.0f} + {sw['ours-nocomm']['involuntary']:.0f} "
          "context switches per step)")
    for b in ("gloo", "ichiban"):
        dt = min(med[f"dtensor-{b}"], med[f"dtensorlp-{b}"]) * 1e3
        ours = comm[f"ours-{b}"]
        d = {"ours_step_ms": ours["step_ms"], "compute_ms": compute,
             "collectives_ms": ours["replay_ms"], "collectives": ours["count"],
             "interaction_ms": ours["step_ms"] - compute - ours["replay_ms"],
             "dtensor_step_ms": dt, "x_dtensor": dt / ours["step_ms"],
             "best_x_dtensor": dt / (compute + ours["replay_ms"]),
             "overlapped_x_dtensor": dt / max(compute, ours["replay_ms"])}
        if "interleaved_s" in ours:
            # the same collectives between synthetic compute bursts of the same total: how much
            # alternating compute and collectives costs on this backend by itself
            both, alone = 1e3 * ours.pop("interleaved_s"), 1e3 * ours.pop("bursts_s")
            d.update(synthetic_ms=both, synthetic_compute_ms=alone,
                     synthetic_interaction_ms=both - alone - ours["replay_ms"])
        decomposition[b] = d
        print(f"  {b:<8} step {d['ours_step_ms']:.1f} = compute {compute:.1f} + "
              f"{d['collectives']} collectives {d['collectives_ms']:.1f} + interaction "
              f"{d['interaction_ms']:.1f}; DTensor {dt:.1f}: now {d['x_dtensor']:.2f}x, best "
              f"{d['best_x_dtensor']:.2f}x (no interaction), {d['overlapped_x_dtensor']:.2f}x "
              f"(collectives fully hidden)")
        if "synthetic_ms" in d:
            print(f"  {'':<8} the same collectives between matmul bursts totalling "
                  f"{d['synthetic_compute_ms']:.1f}: {d['synthetic_ms']:.1f}, interaction "
                  f"{d['synthetic_interaction_ms']:.1f}")
    losses = dict(pair["losses"], unsplit=loss_u)
    losses.pop("ours-nocomm")   # (its collectives did nothing: not the same training)
    spread = max(abs(v - loss_u) for v in losses.values()) / abs(loss_u)
    print(f"\nloss after the last step, every configuration against the unsplit one: max relative "
          f"difference {spread:.1e} (the same training, split differently)")
    if args.json:
        doc = {"benchmark": "parallel", "args": vars(args), "rows": rows, "overlap": overlap,
               "collectives": {k: {**v, "by_kind": {kk: {"count": vv[0], "bytes": vv[1]}
                                                    for kk, vv in v["by_kind"].items()}}
                               for k, v in comm.items()},
               "decomposition": decomposition,
               "last_losses": losses, "last_loss_max_rel_diff": spread,
               "load_average_1min": {"start": load[0], "end": load[1]},
               "machine": {"cpus": cores, "platform": platform.platform(),
                           "python": sys.version.split()[0], "torch": torch.__version__},
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
