"""The compiled Triton kernels on a CUDA GPU (run with ICHIBAN_TEST_GPU=1, which leaves the
interpreter off), at realistic sizes, against the float64 CPU reference.

Run: ICHIBAN_TEST_GPU=1 python -m pytest -q -m gpu tests/triton_kernels/test_kernels_gpu.py
"""

import pytest
import torch
import torch.nn.functional as F

import ichiban_comm.triton_kernels as tk
from ichiban_comm.triton_kernels.cross_entropy import cross_entropy_reference
from ichiban_comm.triton_kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy_reference)
from ichiban_comm.triton_kernels.layer_norm import layer_norm_reference
from ichiban_comm.triton_kernels.rms_norm import rms_norm_reference
from ichiban_comm.triton_kernels.rope import rope_reference
from ichiban_comm.triton_kernels.swiglu import swiglu_reference
from kernels_testlib import randn, run_case
from test_cross_entropy import lowp_cross_entropy, targets
from test_rope import _angles, _lowp as rope_lowp

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4099, 8192])
def test_gpu_norms(dtype, hidden):
    x, w, b, r = randn(64, hidden, seed=1), randn(hidden, seed=2), randn(hidden, seed=3), \
        randn(64, hidden, seed=4)
    run_case(lambda x, w, r: tk.rms_norm(x, w, 1e-6, r),
             lambda x, w, r: (F.rms_norm(x + r, (hidden,), w, 1e-6), x + r),
             lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), [x, w, r], dtype,
             grad=(0, 1, 2), launches=("rms_norm_fwd", "rms_norm_bwd"), device="cuda")
    run_case(lambda x, w, b: tk.layer_norm(x, w, b),
             lambda x, w, b: F.layer_norm(x, (hidden,), w, b, 1e-5),
             lambda x, w, b: layer_norm_reference(x, w, b), [x, w, b], dtype, grad=(0, 1, 2),
             launches=("layer_norm_fwd", "layer_norm_bwd"), device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_swiglu_rope(dtype):
    g, u = randn(128, 11008, seed=5, scale=3), randn(128, 11008, seed=6)
    run_case(tk.swiglu, lambda g, u: F.silu(g) * u, swiglu_reference, [g, u], dtype,
             grad=(0, 1), launches=("swiglu_fwd", "swiglu_bwd"), device="cuda")
    q, k = randn(2, 32, 64, 128, seed=7), randn(2, 8, 64, 128, seed=8)
    cos, sin = _angles(2, 64, 128, 9, True)
    run_case(tk.rope, rope_lowp, rope_reference, [q, k, cos, sin], dtype, grad=(0, 1),
             launches=("rope_fwd", "rope_bwd"), device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_cross_entropy(dtype):
    v = 32000
    x = randn(64, v, seed=10, scale=3)
    t = targets((64,), v, 11, ignore=(3,))
    tc = t.cuda()
    run_case(lambda x: tk.cross_entropy(x, tc if x.is_cuda else t, label_smoothing=0.1,
                                        z_loss=1e-4),
             lambda x: lowp_cross_entropy(x, tc, 0.1, 1e-4, "mean"),
             lambda x: cross_entropy_reference(x, t, -100, 0.1, 1e-4), [x], dtype, grad=(0,),
             launches=("cross_entropy_fwd", "cross_entropy_bwd"), device="cuda")


def test_gpu_fused_linear_cross_entropy_memory():
    torch.manual_seed(0)
    n, h, v = 8192, 1024, 65536  # the unfused logits alone: 8192 x 65536 bf16 = 1 GiB
    hidden = (torch.randn(n, h, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = tk.fused_linear_cross_entropy(hidden, weight, target, chunk_size=256)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = n * v * 2
    # dweight summed in float32 (v*h*4 = 256 MiB) and rounded to bf16 (128 MiB) + dhidden
    # (16 MiB) + one 256-token chunk of logits (32 MiB): under half of the unfused logits
    assert peak < logits_bytes / 2, \
        f"peak {peak / 2**20:.0f} MiB >= half the logits {logits_bytes / 2**21:.0f} MiB"
    ref = fused_linear_cross_entropy_reference(hidden.detach().double().cpu()[:256],
                                               weight.detach().double().cpu(),
                                               target.cpu()[:256])
    got = tk.fused_linear_cross_entropy(hidden.detach()[:256], weight.detach(), target[:256])
    assert abs(got.float().item() - ref.item()) < 2e-2 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_gelu_family_and_dropout(dtype):
    from ichiban_comm.triton_kernels.bias_gelu import bias_gelu_reference
    from ichiban_comm.triton_kernels.geglu import geglu_reference

    g, u, b = randn(64, 5000, seed=12, scale=3), randn(64, 5000, seed=13), randn(5000, seed=14)
    run_case(lambda g, u: tk.geglu(g, u, "tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u,
             geglu_reference, [g, u], dtype, grad=(0, 1), launches=("geglu_fwd", "geglu_bwd"),
             device="cuda")
    run_case(lambda x, b: tk.bias_gelu(x, b, "none"), lambda x, b: F.gelu(x + b),
             lambda x, b: bias_gelu_reference(x, b, "none"), [g, b], dtype, grad=(0, 1),
             launches=("bias_gelu_fwd", "bias_gelu_bwd"), device="cuda")
    x, r = g.to("cuda", dtype), u.to("cuda", dtype)
    y1 = tk.bias_dropout_add(x, None, r, 0.2, True, 99)
    y2 = tk.bias_dropout_add(x, None, r, 0.2, True, 99)
    assert torch.equal(y1, y2)
    kept = ((y1 - r).abs() > 0).float().mean().item()
    assert abs(kept - 0.8) < 0.01, f"kept fraction {kept}"


def test_gpu_cached_launch_matches_plain_and_keys_on_alignment_and_dtype():
    """The launch layer's cache on real compiled kernels: after the first launch of a
    specialisation the compiled kernel is reused; a 16-byte-misaligned view or another dtype
    gets an entry of its own, exactly as Triton compiles a variant of its own for it (a key
    coarser than Triton's would hold fewer entries than Triton has variants, and reuse a kernel
    compiled for other arguments); cached and plain launches give bit-identical results."""
    from triton.runtime import driver

    from ichiban_comm.triton_kernels import _launch
    from ichiban_comm.triton_kernels.rms_norm import _rms_norm_fwd_kernel as kernel

    _launch.clear_launch_cache()
    kernel.device_caches.clear()  # Triton's compiled variants of this kernel, per device
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(33 * 1024 + 1, device="cuda", generator=gen)
    w = torch.randn(1024, device="cuda", generator=gen)
    cases = (("aligned", torch.float32, 0), ("misaligned", torch.float32, 1),
             ("bf16", torch.bfloat16, 0))
    results, entries = {}, []
    for way in ("plain", "cached"):
        _launch.set_cached_launch(way == "cached")
        try:
            for name, dt, off in cases:
                x = base.to(dt)[off:off + 32 * 1024].view(32, 1024)
                assert (x.data_ptr() % 16 == 0) == (off == 0)
                outs = [tk.rms_norm(x, w.to(dt)) for _ in range(3)]  # 1st fills, then reuses
                assert all(torch.equal(o, outs[0]) for o in outs)
                ref = rms_norm_reference(x.double(), w.to(dt).double())
                torch.testing.assert_close(outs[0].double(), ref, rtol=2e-2, atol=2e-2)
                results[way, name] = outs[0]
                if way == "cached":
                    entries.append(_launch.cached_kernels(kernel))
        finally:
            _launch.set_cached_launch(True)
    for name, _, _ in cases:
        assert torch.equal(results["plain", name], results["cached", name]), name
    variants = len(kernel.device_caches[driver.active.get_current_device()][0])
    assert entries == [1, 2, 3] and variants == 3, (entries, variants)


def test_gpu_cached_launch_under_cuda_graph_capture():
    """Cached launches go to the current stream, so a CUDA graph captures them."""
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    before = tk.rms_norm(x, w)  # warm: compiled and cached
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tk.rms_norm(x, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk.rms_norm(x, w)
    x.add_(1.0)  # (not a scaling: RMSNorm does not change under one)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, tk.rms_norm(x, w))
    assert not torch.equal(out, before)


def _compiled_block(x, w, g, t):
    return tk.cross_entropy(tk.swiglu(tk.rms_norm(x, w), g), t)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_torch_compile_inductor_runs_the_triton_ops(mode):
    """torch.compile with Inductor on CUDA: the ops are triton_ops, so the compiled code holds
    their Triton kernels (launched by Inductor's wrapper; with reduce-overhead, replayed from a
    CUDA graph) and no call of the opaque op; forward and gradients match eager."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(1)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    x, w, g = mk(64, 512), mk(512), mk(64, 512)
    t = torch.randint(0, 512, (64,), device="cuda", generator=gen)
    eager = [a.clone().requires_grad_() for a in (x, w, g)]
    loss_e = _compiled_block(*eager, t)
    loss_e.backward()
    fn = torch.compile(_compiled_block, fullgraph=True, mode=mode)
    codes = []
    for _ in range(3):  # reduce-overhead records the CUDA graph on a later call
        comp = [a.clone().requires_grad_() for a in (x, w, g)]
        loss_c, code = run_and_get_code(_compiled_step, fn, comp, t)
        codes.append("\n".join(code))
        torch.testing.assert_close(loss_c, loss_e.detach())
        for a, b in zip(comp, eager):
            torch.testing.assert_close(a.grad, b.grad)
    first = codes[0]  # the compiling call: forward and backward code
    assert "_rms_norm_fwd_kernel" in first and "_rms_norm_bwd_kernel" in first, first[-3000:]
    assert "torch.ops.ichiban_tk" not in first, first[-3000:]


def _compiled_step(fn, leaves, t):
    loss = fn(*leaves, t)
    loss.backward()
    return loss.detach()


def test_gpu_fused_linear_ce_float32_dhidden_over_vocabulary_blocks():
    """The float32 GEMM accumulation path (cuBLAS out_dtype) of dhidden over vocabulary blocks:
    equal to the unblocked gradient within one bf16 rounding, closer to float64 than the sum
    rounded to bf16 after every block."""
    torch.manual_seed(2)
    n, h, v = 256, 512, 8192
    hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    wt = (torch.randn(v, h, device="cuda") * 0.05).bfloat16()
    tgt = torch.randint(0, v, (n,), device="cuda")
    want = hid.double().cpu().requires_grad_()
    fused_linear_cross_entropy_reference(want, wt.double().cpu(), tgt.cpu(),
                                         reduction="sum").backward()
    errs, grads = {}, {}
    for acc, vc in ((None, None), (None, 512), (torch.bfloat16, 512)):
        hh = hid.clone().requires_grad_()
        tk.fused_linear_cross_entropy(hh, wt, tgt, reduction="sum", vocab_chunk_size=vc,
                                      accum_dtype=acc).backward()
        grads[acc, vc] = hh.grad.double().cpu()
        errs[acc, vc] = (grads[acc, vc] - want.grad).abs().mean().item()
    assert errs[None, 512] < 0.9 * errs[torch.bfloat16, 512], errs
    assert errs[None, 512] < 1.2 * errs[None, None], errs
