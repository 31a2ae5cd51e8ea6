"""Fused-kernel benchmark: every op of ichiban_comm.triton_kernels, forward + backward, against
torch eager, torch.compile (default and max-autotune-no-cudagraphs), Liger-Kernel (when
installed) and torch's own linear_cross_entropy (when it exists), all in the same dtype.

Method (per op, every implementation on the same inputs):
  * "GPU ms" (the primary column): the device time of one forward + backward — a CUDA-graph
    replay of the step timed with events (no host work, no launch gaps), or, for a step that
    cannot be captured or that overwrites its inputs, the profiler's kernel durations of one
    step summed. The column "how" says which.
  * "host ms": the time the host spends issuing one step (no synchronisation inside).
  * "wall ms": one step from an idle GPU to its end (host and device together).
  * implementations are interleaved (round r times every implementation once), --reps rounds
    (>= 100 by default); inputs an implementation overwrites (Liger's cross-entropy, ours with
    inplace=True) are restored from a copy before each step, outside the timing.
  * "% copy": the op's minimum bytes moved / GPU time, as a share of the device's measured
    copy bandwidth.
  * the "_tp2" rows run the vocabulary-parallel path on one GPU: the local half of the
    vocabulary is timed, the collectives go to torch's fake process group (world size 2, no
    communication) and are counted ("coll fwd/bwd").
  * "launch_overhead" (GPU only): host time per call of a few launchers, with the compiled
    kernels reused from the launch layer's cache ("cached") against Triton's own launch path
    ("plain", the cache switched off), interleaved; "vs best" there is plain / cached.

    python benchmarks/kernels.py                      # table
    python benchmarks/kernels.py --json out.json      # table + machine-readable rows
    python benchmarks/kernels.py --ops rms_norm,fused_linear_cross_entropy --dtype float16
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run   # the method on the CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

OPS = ["rms_norm", "rms_norm_residual", "layer_norm", "layer_norm_residual", "swiglu", "geglu",
       "rope", "bias_gelu", "bias_dropout_add", "cross_entropy", "fused_linear_cross_entropy",
       "cross_entropy_tp2", "fused_linear_cross_entropy_tp2", "launch_overhead"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Needs a CUDA GPU (exit status 2 without one), except "
                                       "with --dry-run.")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: "
                   + ", ".join(OPS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=100, help="interleaved rounds (timed steps per "
                   "implementation)")
    p.add_argument("--gpu-samples", type=int, default=20,
                   help="profiled steps per implementation when a step cannot be graph-captured")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the token counts (0.25 for a quick look)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds; start no new op once spent (0 = no limit)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--dry-run", action="store_true",
                   help="exercise the whole method on the CPU with tiny shapes (host clock in "
                        "place of GPU time, no torch.compile); set TRITON_INTERPRET=1 to run the "
                        "kernels through Triton's interpreter. Numbers are meaningless.")
    args = p.parse_args(argv)
    unknown = [o for o in args.ops.split(",") if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {OPS}")
    if args.reps < 1 or args.gpu_samples < 1 or args.warmup < 0:
        p.error("--reps and --gpu-samples must be >= 1, --warmup >= 0")
    return args


class Impl:
    """One implementation of an op: ``fn(*inputs)``; ``mutates``: it overwrites its inputs."""

    def __init__(self, fn, mutates=False):
        self.fn, self.mutates = fn, mutates


# ----------------------------------------------------------------------------- cases
def _cases(torch, dtype, scale, dev, group):
    """op -> (make_inputs() -> (inputs, grad leaves), bytes moved fwd+bwd, {impl: Impl | spec})."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import ichiban_comm.triton_kernels as tk

    small = dev != "cuda"  # --dry-run: tiny model dims too
    e = torch.tensor([], dtype=dtype).element_size()
    tok = lambda n: max(1, int(n * scale))  # noqa: E731

    def rnd(*shape, grad=True, s=1.0):
        t = (torch.randn(*shape, device=dev, dtype=torch.float32) * s).to(dtype)
        return t.requires_grad_(grad)

    def rms_eager(x, w):  # transformers' Llama RMSNorm, in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)

    def rope_eager(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rot(q) * s, k * c + rot(k) * s

    def vocab_parallel_ce(x, t):
        # Megatron's formulation in torch ops, same dtype: the group's sums enter as constants
        # added to the local ones, so autograd gives each rank its slice's gradient and the
        # backward needs no collective
        m = x.detach().max(-1).values.float()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        start = dist.get_rank(group) * x.shape[-1]
        local = t - start
        inside = (local >= 0) & (local < x.shape[-1])
        xf = x.float()
        xt = torch.where(inside, xf.gather(1, torch.where(inside, local, 0)[:, None])[:, 0], 0.0)
        part = torch.stack([(xf - m[:, None]).exp().sum(-1), xt])
        total = part.detach().clone()
        dist.all_reduce(total, group=group)
        s, xt = part + (total - part.detach())
        return (m + s.log() - xt).mean()

    # Llama-3-8B-like dims: hidden 4096, MLP 14336, 32 q / 8 kv heads of 128, vocab 128256
    n_norm, hid = tok(8192), (4096 if not small else 96)
    n_mlp, inter = tok(4096), (14336 if not small else 200)
    b_rope, s_rope, hd = 4, max(16, tok(2048)), (128 if not small else 16)
    n_ce, vocab = tok(4096), (128256 if not small else 1000)
    n_fl = tok(8192)
    v_half = vocab // 2

    def rope_inputs():
        q, k = rnd(b_rope, 32 if not small else 4, s_rope, hd), rnd(b_rope, 8 if not small
                                                                     else 2, s_rope, hd)
        pos = torch.arange(s_rope, device=dev, dtype=torch.float32)
        inv = 1.0 / (500000 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        f = pos[:, None] * inv
        emb = torch.cat([f, f], -1)[None].expand(b_rope, -1, -1)
        return (q, k, emb.cos().to(dtype), emb.sin().to(dtype)), (q, k)

    def two(shape_a, shape_b=None):
        def make():
            a, b = rnd(*shape_a, s=2.0), rnd(*(shape_b or shape_a))
            return (a, b), (a, b)
        return make

    def norm_inputs(bias, residual=False):
        def make():
            x, w = rnd(n_norm, hid), rnd(hid)
            extra = (rnd(hid),) if bias else ()
            res = (rnd(n_norm, hid),) if residual else ()
            args = (x, w) + extra + res
            return args, args
        return make

    def ce_inputs(v):
        def make():
            x = rnd(n_ce, v, s=2.0)
            t = torch.randint(0, vocab, (n_ce,), device=dev) if v != vocab else \
                torch.randint(0, v, (n_ce,), device=dev)
            return (x, t), (x,)
        return make

    def flce_inputs(v):
        def make():
            h, w = rnd(n_fl, hid), rnd(v, hid, s=0.02)
            t = torch.randint(0, vocab, (n_fl,), device=dev)
            return (h, w, t), (h, w)
        return make

    def bda_inputs():
        x, b, r = rnd(n_norm, hid), rnd(hid), rnd(n_norm, hid)
        return (x, b, r), (x, b, r)

    def rms_res_eager(x, w, r):
        h = x + r
        return rms_eager(h, w), h

    def ln_res_eager(x, w, b, r):
        h = x + r
        return F.layer_norm(h, (hid,), w, b, 1e-5), h

    rope_elems = b_rope * 40 * s_rope * 128 if not small else b_rope * 6 * s_rope * hd
    return {
        "rms_norm": (norm_inputs(False), 5 * n_norm * hid * e, {
            "ichiban": Impl(lambda x, w: tk.rms_norm(x, w, 1e-6)),
            "eager": Impl(rms_eager),
            "liger": ("liger_rms_norm", lambda f: Impl(lambda x, w: f(x, w, 1e-6,
                                                                      in_place=False)))}),
        # x + residual -> (norm, sum): reads x, r, dy, dh; writes y, h, dx
        "rms_norm_residual": (norm_inputs(False, True), 8 * n_norm * hid * e, {
            "ichiban": Impl(lambda x, w, r: tk.rms_norm(x, w, 1e-6, residual=r)),
            "eager": Impl(rms_res_eager)}),
        "layer_norm": (norm_inputs(True), 5 * n_norm * hid * e, {
            "ichiban": Impl(lambda x, w, b: tk.layer_norm(x, w, b, 1e-5)),
            "eager": Impl(lambda x, w, b: F.layer_norm(x, (hid,), w, b, 1e-5)),
            "liger": ("liger_layer_norm", lambda f: Impl(lambda x, w, b: f(x, w, b, 1e-5)))}),
        "layer_norm_residual": (norm_inputs(True, True), 8 * n_norm * hid * e, {
            "ichiban": Impl(lambda x, w, b, r: tk.layer_norm(x, w, b, 1e-5, residual=r)),
            "eager": Impl(ln_res_eager)}),
        "swiglu": (two((n_mlp, inter)), 8 * n_mlp * inter * e, {
            "ichiban": Impl(tk.swiglu),
            "eager": Impl(lambda g, u: F.silu(g) * u),
            "liger": ("liger_swiglu", Impl)}),
        "geglu": (two((n_mlp, inter)), 8 * n_mlp * inter * e, {
            "ichiban": Impl(lambda g, u: tk.geglu(g, u, "tanh")),
            "eager": Impl(lambda g, u: F.gelu(g, approximate="tanh") * u),
            "liger": ("liger_geglu", Impl)}),
        "rope": (rope_inputs, 4 * rope_elems * e, {
            "ichiban": Impl(tk.rope),
            "eager": Impl(rope_eager),
            "liger": ("liger_rope", Impl)}),
        "bias_gelu": (two((n_mlp, inter), (inter,)), 5 * n_mlp * inter * e, {
            "ichiban": Impl(lambda x, b: tk.bias_gelu(x, b, "tanh")),
            "eager": Impl(lambda x, b: F.gelu(x + b, approximate="tanh"))}),
        "bias_dropout_add": (bda_inputs, 5 * n_norm * hid * e, {
            "ichiban": Impl(lambda x, b, r: tk.bias_dropout_add(x, b, r, 0.1, True, 1234)),
            "eager": Impl(lambda x, b, r: r + F.dropout(x + b, 0.1, training=True))}),
        # one read for the statistics, one for the gradient, one write of the gradient
        "cross_entropy": (ce_inputs(vocab), 3 * n_ce * vocab * e, {
            "ichiban": Impl(lambda x, t: tk.cross_entropy(x, t)),
            "ichiban inplace": Impl(lambda x, t: tk.cross_entropy(x, t, inplace=True),
                                    mutates=True),
            "eager": Impl(lambda x, t: F.cross_entropy(x, t)),
            "liger": ("liger_cross_entropy", lambda f: Impl(lambda x, t: f(x, t),
                                                           mutates=True))}),
        "fused_linear_cross_entropy": (flce_inputs(vocab), 0, {
            "ichiban": Impl(lambda h, w, t: tk.fused_linear_cross_entropy(h, w, t)),
            "eager": Impl(lambda h, w, t: F.cross_entropy(h @ w.t(), t)),
            "liger": ("liger_fused_linear_cross_entropy",
                      lambda f: Impl(lambda h, w, t: f(h, w, t))),
            "torch linear_cross_entropy": Impl(lambda h, w, t: F.linear_cross_entropy(h, w, t))
            if hasattr(F, "linear_cross_entropy") else None}),
        "cross_entropy_tp2": (ce_inputs(v_half), 3 * n_ce * v_half * e, {
            "ichiban": Impl(lambda x, t: tk.cross_entropy(x, t, group=group)),
            "eager": Impl(vocab_parallel_ce)}),
        "fused_linear_cross_entropy_tp2": (flce_inputs(v_half), 0, {
            "ichiban": Impl(lambda h, w, t: tk.fused_linear_cross_entropy(h, w, t, group=group)),
            "eager": Impl(lambda h, w, t: vocab_parallel_ce(h @ w.t(), t))}),
    }


# ----------------------------------------------------------------------------- measurement
def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _copy_bandwidth(torch, dry):
    """Device copy GB/s (read + write) of a 1 GiB buffer (64 MiB host memory in a dry run)."""
    n = (1 << 26) if dry else (1 << 30)
    dev = "cpu" if dry else "cuda"
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        _sync(torch)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(torch)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times) / 1e9


def _make_step(torch, fn, args, leaves):
    grads = {}

    def step():
        for t in leaves:
            t.grad = None
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        gs = []
        for o in outs:
            key = (tuple(o.shape), o.dtype)
            if key not in grads:  # fixed random output grads, made once
                grads[key] = torch.randn(o.shape, device=o.device, dtype=torch.float32).to(
                    o.dtype) if o.dim() else torch.ones((), device=o.device, dtype=o.dtype)
            gs.append(grads[key])
        torch.autograd.backward(outs, gs)
        return outs[0]

    return step


class _Runner:
    """One implementation's step plus what the timing needs: input restore, graph, samples."""

    def __init__(self, torch, name, impl, make, dry):
        self.torch, self.name, self.impl, self.dry = torch, name, impl, dry
        torch.manual_seed(0)  # the same inputs for every implementation of an op
        self.inputs, self.leaves = make()
        self.saved = [t.detach().clone() for t in self.inputs if torch.is_tensor(t)] \
            if impl.mutates else None
        self.step = _make_step(torch, impl.fn, self.inputs, self.leaves)
        self.host, self.wall, self.gpu = [], [], []
        self.graph, self.how = None, None
        self.restores_seen = set()

    def restore(self):
        """Put back the inputs this implementation overwrote (outside any timing)."""
        if self.saved is None:
            return
        with self.torch.no_grad():
            for t, s in zip([t for t in self.inputs if self.torch.is_tensor(t)], self.saved):
                t.copy_(s)
        if self.dry:  # the check the dry run makes: every timed step saw the original inputs
            self.restores_seen.add(round(float(sum(t.double().sum() for t in self.saved
                                                   if t.is_floating_point())), 6))
            self.restores_seen.add(round(float(sum(t.detach().double().sum()
                                                   for t in self.inputs
                                                   if self.torch.is_tensor(t) and
                                                   t.is_floating_point())), 6))

    def timed_eager_step(self):
        """Host issue time and wall time of one step (the GPU idle before it)."""
        torch = self.torch
        self.restore()
        _sync(torch)
        cuda = not self.dry
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t = time.perf_counter()
        self.step()
        self.host.append(time.perf_counter() - t)
        if cuda:
            b.record()
            b.synchronize()
            self.wall.append(a.elapsed_time(b) / 1e3)
        else:
            self.wall.append(time.perf_counter() - t)

    def prepare_gpu_timing(self, warmup):
        """CUDA-graph capture of the step when it can be (not for input-overwriting steps)."""
        torch = self.torch
        if self.dry:
            self.how = "host clock (dry run)"
            return
        if not self.impl.mutates:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(max(2, warmup)):
                        self.step()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    self.step()
                g.replay()
                torch.cuda.synchronize()
                self.graph, self.how = g, "graph"
                return
            except Exception as exc:  # noqa: BLE001 - not capturable: profile it instead
                self.graph = None
                self.capture_error = f"{type(exc).__name__}: {str(exc)[:120]}"
                torch.cuda.synchronize()
        self.how = "profiler"

    def gpu_sample(self):
        torch = self.torch
        if self.dry:
            self.restore()
            t = time.perf_counter()
            self.step()
            self.gpu.append(time.perf_counter() - t)
            return
        if self.graph is not None:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            self.graph.replay()
            b.record()
            b.synchronize()
            self.gpu.append(a.elapsed_time(b) / 1e3)
            return
        from torch.profiler import ProfilerActivity, profile

        self.restore()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.step()
            torch.cuda.synchronize()
        us = sum(ev.self_device_time_total for ev in prof.key_averages())
        if us > 0:
            self.gpu.append(us / 1e6)


def _peak_bytes(torch, runner):
    if runner.dry:
        return 0
    runner.restore()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _count_collectives(torch, runner):
    """all_reduce calls in the forward and in the backward of one step (eager implementations;
    a compiled one traces its collectives into the graph and is not counted)."""
    import torch.distributed as dist

    calls = {"n": 0}
    real = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    runner.restore()
    for t in runner.leaves:
        t.grad = None
    dist.all_reduce = counting
    try:
        out = runner.impl.fn(*runner.inputs)
        fwd = calls["n"]
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        return fwd, calls["n"] - fwd
    finally:
        dist.all_reduce = real


def _impls(torch, table, no_compile, dry):
    """Resolve the implementations of one op: name -> Impl (or an error string)."""
    out = {k: v for k, v in table.items() if isinstance(v, Impl)}
    if not no_compile and not dry:
        eager = table["eager"]
        out["torch.compile"] = Impl(torch.compile(eager.fn))
        out["torch.compile max-autotune"] = Impl(
            torch.compile(eager.fn, mode="max-autotune-no-cudagraphs"))
    if "liger" in table and not dry:
        name, wrap = table["liger"]
        try:
            import liger_kernel.transformers.functional as lf

            out["liger"] = wrap(getattr(lf, name))
        except Exception as exc:  # noqa: BLE001 - not installed / other version: say so
            out["liger"] = f"unavailable: {type(exc).__name__}: {exc}"
    return out


def _fake_group(torch):
    """A world-size-2 process group that communicates nothing (torch's "fake" backend)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    return dist.group.WORLD


def run(args):
    import torch

    dtype = getattr(torch, args.dtype)
    t0 = time.monotonic()
    dry = args.dry_run
    ops = args.ops.split(",")
    group = _fake_group(torch) if any(o.endswith("_tp2") for o in ops) else None
    bw = _copy_bandwidth(torch, dry)
    cases = _cases(torch, dtype, args.scale, "cpu" if dry else "cuda", group)
    rows = []
    for op in ops:
        if args.budget and time.monotonic() - t0 > args.budget:
            rows.append({"op": op, "impl": "-", "error": "skipped: time budget spent"})
            continue
        if op == "launch_overhead":
            rows.extend(_launch_overhead(torch, dtype, args.reps, dry))
            continue
        make, nbytes, table = cases[op]
        runners, op_rows = [], {}
        for name, impl in _impls(torch, table, args.no_compile, dry).items():
            row = op_rows[name] = {"op": op, "impl": name, "dtype": args.dtype}
            if isinstance(impl, str):
                row["error"] = impl
                continue
            try:
                r = _Runner(torch, name, impl, make, dry)
                for _ in range(args.warmup):
                    r.restore()
                    r.step()
                _sync(torch)
                runners.append(r)
            except Exception as exc:  # noqa: BLE001 - one failing baseline must not stop the run
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        _check_outputs(torch, op, runners, op_rows)
        # interleaved: every round times each implementation once, in turn
        for _ in range(args.reps):
            for r in list(runners):
                try:
                    r.timed_eager_step()
                except Exception as exc:  # noqa: BLE001
                    op_rows[r.name]["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    runners.remove(r)
        for r in runners:
            r.prepare_gpu_timing(args.warmup)
        samples = args.reps if dry else max(args.reps, 100)
        for i in range(samples):
            for r in runners:
                if r.graph is not None or r.dry or i < args.gpu_samples:
                    r.gpu_sample()
        for r in runners:
            row = op_rows[r.name]
            row.update(host_ms=statistics.median(r.host) * 1e3,
                       wall_ms=statistics.median(r.wall) * 1e3, gpu_how=r.how,
                       gpu_samples=len(r.gpu), reps=len(r.host))
            if r.gpu:
                row["gpu_ms"] = statistics.median(r.gpu) * 1e3
            if getattr(r, "capture_error", None):
                row["capture_error"] = r.capture_error
            if r.impl.mutates:
                row["mutates_inputs"] = True
                if dry:
                    row["inputs_restored"] = len(r.restores_seen) == 1
            try:
                row["peak_mib"] = _peak_bytes(torch, r) / 2**20
            except Exception as exc:  # noqa: BLE001
                row["peak_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            if group is not None and op.endswith("_tp2") and not r.name.startswith("torch."):
                row["coll_fwd"], row["coll_bwd"] = _count_collectives(torch, r)
            if nbytes and "gpu_ms" in row:
                row["gbps"] = nbytes / (row["gpu_ms"] / 1e3) / 1e9
                row["pct_copy_bw"] = 100 * row["gbps"] / bw
        for r in runners:
            r.graph = r.inputs = r.leaves = r.step = r.saved = None
        if not dry:
            torch.cuda.empty_cache()
        rows.extend(op_rows.values())
    _add_ratios(rows)
    return rows, bw


def _launch_overhead(torch, dtype, reps, dry, inner=200):
    """Host microseconds per launcher call, cached compiled kernel vs Triton's launch path.

    Each round times ``inner`` back-to-back calls per way (the GPU work is tiny: a scale by 1
    returns at once, small rows elsewhere) and synchronises outside the timing; the ways are
    interleaved round by round and the median round is reported. GPU only: under the
    interpreter there is no compiled kernel to cache."""
    if dry:
        return [{"op": "launch_overhead", "impl": "-",
                 "skipped": "GPU only (the interpreter has no compiled kernels to cache)"}]
    import ichiban_comm.triton_kernels as tk
    from ichiban_comm.triton_kernels import _dispatch, _launch
    from ichiban_comm.triton_kernels.cross_entropy import _scale_kernel
    from ichiban_comm.triton_kernels.rms_norm import _rms_norm_fwd_kernel

    launchers = _dispatch._LAUNCHERS
    x = torch.randn(16, 1024, device="cuda", dtype=dtype)
    w = torch.ones(1024, device="cuda", dtype=dtype)
    g = torch.ones((), device="cuda")
    buf = torch.randn(4096, device="cuda")
    xr = x.detach().requires_grad_()

    def step():  # one autograd forward + backward of the fused RMSNorm (3 kernels)
        tk.rms_norm(xr, w).sum().backward()

    calls = {"scale": lambda: launchers["scale_inplace"](buf, g),
             "rms_norm fwd": lambda: launchers["rms_norm_fwd"](x, w, None, 1e-6, 0.0),
             "rms_norm fwd+bwd": step}
    rows = []
    was = _launch.cached_launch_enabled()
    try:
        for what, fn in calls.items():
            times = {"cached": [], "plain": []}
            for way in times:  # warm-up: compile, fill the cache
                _launch.set_cached_launch(way == "cached")
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            for _ in range(reps):
                for way, ts in times.items():
                    _launch.set_cached_launch(way == "cached")
                    t = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    ts.append((time.perf_counter() - t) / inner)
                    torch.cuda.synchronize()
            med = {k: statistics.median(v) for k, v in times.items()}
            for way in times:
                row = {"op": f"launch: {what}", "impl": f"ichiban {way}",
                       "dtype": str(dtype).replace("torch.", ""), "host_ms": med[way] * 1e3,
                       "host_us": med[way] * 1e6, "reps": reps, "calls_per_rep": inner}
                if way == "cached":
                    row["gpu_speedup_vs_best_rival"] = med["plain"] / med["cached"]
                    row["host_plain_over_cached"] = med["plain"] / med["cached"]
                rows.append(row)
        rows.append({"op": "launch_overhead", "impl": "cache entries",
                     "skipped": f"rms_norm_fwd {_launch.cached_kernels(_rms_norm_fwd_kernel)}, "
                                f"scale {_launch.cached_kernels(_scale_kernel)}"})
    finally:
        _launch.set_cached_launch(was)
    return rows


def _check_outputs(torch, op, runners, op_rows):
    """max |impl - eager| of the forward output on the same inputs (dropout draws its own mask:
    skipped); a wrong kernel shows here, not only in the tests."""
    if op == "bias_dropout_add":
        return
    ref = None
    for r in sorted(runners, key=lambda r: r.name != "eager"):  # eager first
        try:
            r.restore()
            with torch.no_grad():
                out = r.impl.fn(*[t.detach() if torch.is_tensor(t) else t for t in r.inputs])
            out = (out[0] if isinstance(out, tuple) else out).float()
            r.restore()
        except Exception as exc:  # noqa: BLE001
            op_rows[r.name]["check_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            continue
        if r.name == "eager":
            ref = out
        elif ref is not None:
            op_rows[r.name]["max_diff_vs_eager"] = (out - ref).abs().max().item()


def _add_ratios(rows):
    """ichiban's GPU-time speed-up over the fastest of torch.compile (either mode) and Liger
    (the target is >= 1), and its peak memory over eager's."""
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], {})[r["impl"]] = r
    for impls in by_op.values():
        ours = impls.get("ichiban", {})
        rivals = [v["gpu_ms"] for k, v in impls.items()
                  if (k.startswith("torch.compile") or k == "liger") and "gpu_ms" in v]
        if ours.get("gpu_ms") and rivals:
            ours["gpu_speedup_vs_best_rival"] = min(rivals) / ours["gpu_ms"]
        hosts = [v["host_ms"] for k, v in impls.items() if k == "liger" and "host_ms" in v]
        if ours.get("host_ms") and hosts:
            ours["host_vs_liger"] = ours["host_ms"] / hosts[0]
        eager = impls.get("eager", {}).get("peak_mib")
        if ours.get("peak_mib") is not None and eager:
            ours["peak_vs_eager"] = ours["peak_mib"] / eager


def _table(rows):
    head = (f"{'op':<31}{'impl':<28}{'GPU ms':>9}{'how':>9}{'host ms':>9}{'wall ms':>9}"
            f"{'% copy':>8}{'peak MiB':>10}{'vs best':>8}{'mem/eager':>10}{'coll f/b':>9}"
            f"{'diff':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['op']:<31}{r['impl']:<28}  {r.get('error', r.get('skipped'))}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        coll = f"{r['coll_fwd']}/{r['coll_bwd']}" if "coll_fwd" in r else "-"
        how = {"graph": "graph", "profiler": "prof"}.get(r.get("gpu_how"), "host")
        lines.append(f"{r['op']:<31}{r['impl']:<28}{f('gpu_ms', '.3f'):>9}{how:>9}"
                     f"{f('host_ms', '.3f'):>9}{f('wall_ms', '.3f'):>9}"
                     f"{f('pct_copy_bw', '.0f'):>8}{f('peak_mib', '.0f'):>10}"
                     f"{f('gpu_speedup_vs_best_rival', '.2f'):>8}{f('peak_vs_eager', '.2f'):>10}"
                     f"{coll:>9}{f('max_diff_vs_eager', '.1e'):>9}")
    return "\n".join(lines)


def _versions(torch, dry):
    info = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
            "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "liger_kernel"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("benchmarks/kernels.py: torch is not installed", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU here (torch.cuda.is_available() is False). "
              "These are GPU benchmarks; on a CPU machine run the kernel tests "
              "(python -m pytest tests/triton_kernels) or exercise the method with --dry-run",
              file=sys.stderr)
        return 2
    rows, bw = run(args)
    info = _versions(torch, args.dry_run)
    print(f"# {info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"liger {info['liger_kernel']}  dtype {args.dtype}  copy bandwidth {bw:.0f} GB/s  "
          f"{args.reps} interleaved rounds")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "dtype": args.dtype, "copy_bandwidth_gbps": bw,
                       "reps": args.reps, "rows": rows}, f, indent=1, allow_nan=False)
    return 1 if args.dry_run and any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
