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
