"""Fused-kernel benchmark (CUDA GPU): every op of ichiban_comm.triton_kernels, forward + backward,
against torch eager, torch.compile, Liger-Kernel (when installed) and torch's own
linear_cross_entropy (when it exists), in one run.

Per op and implementation: median wall time of forward+backward (CUDA events), effective GB/s
(the minimum bytes the op must read and write, over the median time) as a share of the measured
device-copy bandwidth, and the peak memory allocated by one step.

    python benchmarks/kernels.py                      # table
    python benchmarks/kernels.py --json out.json      # table + machine-readable rows
    python benchmarks/kernels.py --ops rms_norm,fused_linear_cross_entropy --dtype float16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

OPS = ["rms_norm", "layer_norm", "swiglu", "geglu", "rope", "bias_gelu", "bias_dropout_add",
       "cross_entropy", "fused_linear_cross_entropy"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Needs a CUDA GPU; exits with status 2 without one.")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: "
                   + ", ".join(OPS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=30, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the token counts (0.25 for a quick look)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds; start no new op once spent (0 = no limit)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="check the harness itself on the CPU with tiny shapes (no baselines "
                        "but eager; numbers meaningless); set TRITON_INTERPRET=1 to run the "
                        "kernels through Triton's interpreter")
    args = p.parse_args(argv)
    unknown = [o for o in args.ops.split(",") if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {OPS}")
    return args


# ----------------------------------------------------------------------------- cases
def _cases(torch, dtype, scale, dev="cuda"):
    """name -> (make_inputs() -> (args, grad leaves), bytes moved fwd+bwd, {impl: fn})."""
    import torch.nn.functional as F

    import ichiban_comm.triton_kernels as tk

    small = dev != "cuda"  # --smoke-cpu: tiny model dims too
    e = torch.tensor([], dtype=dtype).element_size()
    tok = lambda n: max(1, int(n * scale))  # noqa: E731

    def rnd(*shape, grad=True, s=1.0):
        t = (torch.randn(*shape, device=dev, dtype=torch.float32) * s).to(dtype)
        return t.requires_grad_(grad)

    def rms_eager(x, w):  # what transformers' Llama RMSNorm does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)

    def rope_eager(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rot(q) * s, k * c + rot(k) * s

    # Llama-3-8B-like dims: hidden 4096, MLP 14336, 32 q / 8 kv heads of 128, vocab 128256
    n_norm, hid = tok(8192), (4096 if not small else 96)
    n_mlp, inter = tok(4096), (14336 if not small else 200)
    b_rope, s_rope = 4, max(16, tok(2048))
    n_ce, vocab = tok(4096), (128256 if not small else 1000)
    n_fl = tok(8192)

    def rope_inputs():
        q, k = rnd(b_rope, 32, s_rope, 128), rnd(b_rope, 8, s_rope, 128)
        pos = torch.arange(s_rope, device=dev, dtype=torch.float32)
        inv = 1.0 / (500000 ** (torch.arange(0, 128, 2, device=dev, dtype=torch.float32) / 128))
        f = pos[:, None] * inv
        emb = torch.cat([f, f], -1)[None].expand(b_rope, -1, -1)
        return (q, k, emb.cos().to(dtype), emb.sin().to(dtype)), (q, k)

    def two(shape_a, shape_b=None):
        def make():
            a, b = rnd(*shape_a, s=2.0), rnd(*(shape_b or shape_a))
            return (a, b), (a, b)
        return make

    def norm_inputs(bias):
        def make():
            x, w = rnd(n_norm, hid), rnd(hid)
            if bias:
                b = rnd(hid)
                return (x, w, b), (x, w, b)
            return (x, w), (x, w)
        return make

    def ce_inputs():
        x = rnd(n_ce, vocab, s=2.0)
        t = torch.randint(0, vocab, (n_ce,), device=dev)
        return (x, t), (x,)

    def flce_inputs():
        h, w = rnd(n_fl, hid), rnd(vocab, hid, s=0.02)
        t = torch.randint(0, vocab, (n_fl,), device=dev)
        return (h, w, t), (h, w)

    def bda_inputs():
        x, b, r = rnd(n_norm, hid), rnd(hid), rnd(n_norm, hid)
        return (x, b, r), (x, b, r)

    rope_elems = b_rope * 40 * s_rope * 128
    return {
        "rms_norm": (norm_inputs(False), 5 * n_norm * hid * e, {
            "ichiban": lambda x, w: tk.rms_norm(x, w, 1e-6),
            "eager": rms_eager,
            "liger": ("liger_rms_norm", lambda f: lambda x, w: f(x, w, 1e-6, in_place=False))}),
        "layer_norm": (norm_inputs(True), 5 * n_norm * hid * e, {
            "ichiban": lambda x, w, b: tk.layer_norm(x, w, b, 1e-5),
            "eager": lambda x, w, b: F.layer_norm(x, (hid,), w, b, 1e-5),
            "liger": ("liger_layer_norm", lambda f: lambda x, w, b: f(x, w, b, 1e-5))}),
        "swiglu": (two((n_mlp, inter)), 8 * n_mlp * inter * e, {
            "ichiban": tk.swiglu,
            "eager": lambda g, u: F.silu(g) * u,
            "liger": ("liger_swiglu", lambda f: f)}),
        "geglu": (two((n_mlp, inter)), 8 * n_mlp * inter * e, {
            "ichiban": lambda g, u: tk.geglu(g, u, "tanh"),
            "eager": lambda g, u: F.gelu(g, approximate="tanh") * u,
            "liger": ("liger_geglu", lambda f: f)}),
        "rope": (rope_inputs, 4 * rope_elems * e, {
            "ichiban": tk.rope,
            "eager": rope_eager,
            "liger": ("liger_rope", lambda f: f)}),
        "bias_gelu": (two((n_mlp, inter), (inter,)), 5 * n_mlp * inter * e, {
            "ichiban": lambda x, b: tk.bias_gelu(x, b, "tanh"),
            "eager": lambda x, b: F.gelu(x + b, approximate="tanh")}),
        "bias_dropout_add": (bda_inputs, 5 * n_norm * hid * e, {
            "ichiban": lambda x, b, r: tk.bias_dropout_add(x, b, r, 0.1, True, 1234),
            "eager": lambda x, b, r: r + F.dropout(x + b, 0.1, training=True)}),
        "cross_entropy": (ce_inputs, 3 * n_ce * vocab * e, {
            "ichiban": lambda x, t: tk.cross_entropy(x, t),
            "eager": lambda x, t: F.cross_entropy(x.float(), t),
            "liger": ("liger_cross_entropy", lambda f: lambda x, t: f(x, t))}),
        "fused_linear_cross_entropy": (flce_inputs, 0, {
            "ichiban": lambda h, w, t: tk.fused_linear_cross_entropy(h, w, t),
            "eager": lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t),
            "liger": ("liger_fused_linear_cross_entropy", lambda f: lambda h, w, t: f(h, w, t)),
            "torch_linear_ce": (lambda h, w, t: F.linear_cross_entropy(h, w, t))
            if hasattr(F, "linear_cross_entropy") else None}),
    }


# ----------------------------------------------------------------------------- measurement
def _copy_bandwidth(torch):
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer, median of 20."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = _time(torch, lambda: dst.copy_(src), reps=20, warmup=3)
    return 2 * src.numel() / statistics.median(times) / 1e9


def _time(torch, step, reps, warmup, queue=1):
    """Seconds per step, one sample per rep, each rep timing ``queue`` steps issued back to back.

    queue=1: every step starts from an idle GPU, so the host's cost per step counts. A longer
    queue lets the GPU work on one step while the host issues the next: a host cost smaller than
    the GPU's work drops out."""
    for _ in range(warmup):
        step()
    cuda = torch.cuda.is_available()  # else --smoke-cpu: host clock
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t = time.perf_counter()
        for _ in range(queue):
            step()
        if cuda:
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3 / queue)
        else:
            out.append((time.perf_counter() - t) / queue)
    return out


def _device_ms(torch, step):
    """GPU time of one step from the profiler: the kernels' (and copies') own durations summed,
    with no host time and no idle gaps between them. None when the profiler gives nothing."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()  # the step is warm: it was just timed
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    total_us = sum(ev.self_device_time_total for ev in prof.key_averages())
    return total_us / 1e3 if total_us > 0 else None


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


def _peak_bytes(torch, step):
    if not torch.cuda.is_available():  # --smoke-cpu
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _impls(torch, table, no_compile, smoke):
    """Resolve the implementations of one op: name -> callable (or an error string)."""
    out = {"eager": table["eager"], "ichiban": table["ichiban"]}
    if smoke:
        return out
    if not no_compile:
        out["torch.compile"] = torch.compile(table["eager"])
    if "liger" in table:
        name, wrap = table["liger"]
        try:
            import liger_kernel.transformers.functional as lf

            out["liger"] = wrap(getattr(lf, name))
        except Exception as exc:  # noqa: BLE001 - not installed / other version: say so
            out["liger"] = f"unavailable: {type(exc).__name__}: {exc}"
    if table.get("torch_linear_ce") is not None:
        out["torch linear_cross_entropy"] = table["torch_linear_ce"]
    return out


def run(args):
    import torch

    dtype = getattr(torch, args.dtype)
    t0 = time.monotonic()
    smoke = args.smoke_cpu
    bw = _copy_bandwidth(torch) if not smoke else float("nan")
    cases = _cases(torch, dtype, args.scale, "cpu" if smoke else "cuda")
    rows = []
    for op in args.ops.split(","):
        if args.budget and time.monotonic() - t0 > args.budget:
            rows.append({"op": op, "impl": "-", "error": "skipped: time budget spent"})
            continue
        make, nbytes, table = cases[op]
        eager_out = None
        for impl, fn in _impls(torch, table, args.no_compile, smoke).items():
            row = {"op": op, "impl": impl, "dtype": args.dtype}
            if isinstance(fn, str):
                rows.append({**row, "error": fn})
                continue
            try:
                torch.manual_seed(0)  # the same inputs for every implementation of the op
                inputs, leaves = make()
                # forward-output check against eager (dropout draws its own mask: skipped)
                if op != "bias_dropout_add" and impl in ("eager", "ichiban"):
                    with torch.no_grad():
                        out = fn(*inputs)
                        out = (out[0] if isinstance(out, tuple) else out).float()
                    if impl == "eager":
                        eager_out = out
                    elif eager_out is not None:
                        row["max_diff_vs_eager"] = (out - eager_out).abs().max().item()
                    del out
                step = _make_step(torch, fn, inputs, leaves)
                times = _time(torch, step, args.reps, args.warmup)
                med = statistics.median(times)
                row.update(median_ms=med * 1e3, peak_mib=_peak_bytes(torch, step) / 2**20)
                if not smoke:  # under the interpreter a step takes seconds: one timing is enough
                    queued = _time(torch, step, max(3, args.reps // 3), warmup=0, queue=8)
                    row["queued_ms"] = statistics.median(queued) * 1e3
                    try:
                        dev = _device_ms(torch, step)
                        if dev is not None:
                            row["device_ms"] = dev
                    except Exception as exc:  # noqa: BLE001 - the column stays empty
                        row["device_ms_error"] = f"{type(exc).__name__}: {exc}"[:160]
                if nbytes:
                    row["gbps"] = nbytes / med / 1e9
                    if bw == bw:  # not NaN (--smoke-cpu measures no copy bandwidth)
                        row["pct_copy_bw"] = 100 * row["gbps"] / bw
            except Exception as exc:  # noqa: BLE001 - one failing baseline must not stop the run
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            finally:
                inputs = leaves = step = None
                if not smoke:
                    torch.cuda.empty_cache()
            rows.append(row)
    _add_speedups(rows)
    return rows, bw


def _add_speedups(rows):
    """ichiban's speed-up over the faster of torch.compile and Liger (the target is >= 1)."""
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], {})[r["impl"]] = r
    for impls in by_op.values():
        ours = impls.get("ichiban", {}).get("median_ms")
        rivals = [impls[k]["median_ms"] for k in ("torch.compile", "liger")
                  if "median_ms" in impls.get(k, {})]
        if ours and rivals:
            impls["ichiban"]["speedup_vs_best_rival"] = min(rivals) / ours
        eager = impls.get("eager", {}).get("peak_mib")
        if ours and eager:
            impls["ichiban"]["peak_vs_eager"] = impls["ichiban"]["peak_mib"] / eager


def _table(rows):
    head = f"{'op':<28}{'impl':<24}{'median ms':>10}{'queued ms':>10}{'GPU ms':>8}{'GB/s':>9}" \
           f"{'% copy':>8}{'peak MiB':>10}{'vs best':>9}{'mem/eager':>10}{'diff':>10}"
    lines = [head, "-" * len(head)]
    # "median ms": one step from an idle GPU (host costs included); "queued ms": per step with 8
    # steps issued back to back (host costs hidden when the GPU is the slower side); "GPU ms":
    # the profiler's kernel durations of one step summed (no host time, no gaps);
    # "vs best": faster-of(torch.compile, Liger) time / ichiban time (>= 1 means ichiban wins);
    # "mem/eager": ichiban peak memory / eager peak memory; "diff": max |ichiban - eager| of the
    # forward output on the same inputs (a wrong kernel shows here, not only in the tests)
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<28}{r['impl']:<24}  {r['error']}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
        lines.append(f"{r['op']:<28}{r['impl']:<24}{f('median_ms', '.3f'):>10}"
                     f"{f('queued_ms', '.3f'):>10}{f('device_ms', '.3f'):>8}"
                     f"{f('gbps', '.0f'):>9}{f('pct_copy_bw', '.0f'):>8}"
                     f"{f('peak_mib', '.0f'):>10}{f('speedup_vs_best_rival', '.2f'):>9}"
                     f"{f('peak_vs_eager', '.2f'):>10}{f('max_diff_vs_eager', '.1e'):>10}")
    return "\n".join(lines)


def _versions(torch):
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "python": platform.python_version()}
    for mod in ("triton", "liger_kernel"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
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
    if args.smoke_cpu:
        rows, _ = run(args)
        print(_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": "cpu (smoke)", "rows": rows}, f, indent=1)
        return 1 if any("error" in r for r in rows) else 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU here (torch.cuda.is_available() is False). "
              "These are GPU benchmarks; on a CPU machine run the kernel tests instead: "
              "python -m pytest tests/triton_kernels", file=sys.stderr)
        return 2
    rows, bw = run(args)
    info = _versions(torch)
    print(f"# {info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"liger {info['liger_kernel']}  dtype {args.dtype}  copy bandwidth {bw:.0f} GB/s")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "dtype": args.dtype, "copy_bandwidth_gbps": bw, "rows": rows}, f,
                      indent=1, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
