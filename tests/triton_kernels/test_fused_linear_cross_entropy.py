"""Fused linear + cross-entropy (chunked over tokens) through the Triton interpreter vs a
float64 reference that materialises the logits. The group path is in
test_parallel_cross_entropy.py.

Run: python -m pytest -q tests/triton_kernels/test_fused_linear_cross_entropy.py
"""

import pytest
import torch

from ichiban_comm.triton_kernels import fused_linear_cross_entropy
from ichiban_comm.triton_kernels.fused_linear_cross_entropy import (
    default_chunk_size, fused_linear_cross_entropy_reference)
from kernels_testlib import DTYPES, assert_bound, expect_launches, randn, run_case
from test_cross_entropy import lowp_cross_entropy, targets

# "mean"/"sum": one kernel per chunk in the forward makes loss rows and gradient together (the
# backward only scales, "scale"); "none": statistics in the forward, the gradient kernel
# ("cross_entropy_grad") over recomputed logits in the backward.
LAUNCHES = ("cross_entropy_fwd",)


def _lowp(h, w, b, t, eps, z, red):
    logits = h.reshape(-1, h.shape[-1]) @ w.t() + b
    return lowp_cross_entropy(logits, t.reshape(-1), eps, z, red).reshape(
        t.shape if red == "none" else ())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps,z,red", [(0.0, 0.0, "mean"), (0.1, 1e-3, "sum"),
                                       (0.1, 0.0, "none")])
def test_fused_linear_cross_entropy(dtype, eps, z, red):
    h, w, b = randn(2, 5, 24, seed=1), randn(37, 24, seed=2, scale=0.3), randn(37, seed=3)
    t = targets((2, 5), 37, 4, ignore=(2, 7))
    with expect_launches("cross_entropy_grad" if red == "none" else "scale"):
        run_case(lambda h, w, b: fused_linear_cross_entropy(
                     h, w, t, b, label_smoothing=eps, z_loss=z, reduction=red, chunk_size=4),
                 lambda h, w, b: _lowp(h, w, b, t, eps, z, red),
                 lambda h, w, b: fused_linear_cross_entropy_reference(h, w, t, b, -100, eps, z,
                                                                      red),
                 [h, w, b], dtype, grad=(0, 1, 2), launches=LAUNCHES)


def test_fused_linear_cross_entropy_no_bias_one_chunk_and_frozen_weight():
    h, w = randn(3, 16, seed=5), randn(50, 16, seed=6, scale=0.5)
    t = targets((3,), 50, 7, ignore=())
    with expect_launches("scale"):
        run_case(lambda h, w: fused_linear_cross_entropy(h, w, t),
                 lambda h, w: lowp_cross_entropy(h @ w.t(), t, 0.0, 0.0, "mean"),
                 lambda h, w: fused_linear_cross_entropy_reference(h, w, t), [h, w],
                 torch.float32, grad=(0, 1), launches=LAUNCHES)
    hh = h.float().requires_grad_()
    fused_linear_cross_entropy(hh, w.float(), t).backward()  # weight needs no grad
    assert hh.grad is not None and hh.grad.abs().sum() > 0


def test_fused_linear_cross_entropy_no_grad_and_double_backward():
    h, w = torch.randn(5, 8), torch.randn(12, 8)
    t = torch.randint(0, 12, (5,))
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, t, chunk_size=2),
                                   fused_linear_cross_entropy_reference(h, w, t))
    hh = h.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice is not supported"):
        loss.backward()


def test_fused_linear_cross_entropy_under_autocast_float32_master_weights():
    h = torch.randn(6, 16, requires_grad=True)
    w = (torch.randn(30, 16) * 0.3).requires_grad_()
    t = torch.randint(0, 30, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, t, chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    want = fused_linear_cross_entropy_reference(hb, wb, t)
    want.backward()
    torch.testing.assert_close(loss.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, wb.grad.float(), rtol=2e-2, atol=2e-2)


def test_default_chunk_size_bounds_logits_memory():
    assert default_chunk_size(10, 50, 4) == 10
    rows = default_chunk_size(100_000, 128 * 1024, 2)
    assert rows * 128 * 1024 * 2 <= (1 << 29) and rows >= 2048


def test_fused_linear_cross_entropy_bad_arguments():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        fused_linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear_cross_entropy(h, w, t, bias=torch.randn(9))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="target must hold one id per row"):
        fused_linear_cross_entropy(h, w, t[:2])
    with pytest.raises(ValueError, match="vocab_start and vocab_total go together"):
        fused_linear_cross_entropy(h, w, t, vocab_start=0, vocab_total=10)


@pytest.mark.parametrize("red", ["mean", "none"])
def test_fused_linear_cross_entropy_logit_scale_and_softcap(red):
    """Granite-style scaling and Gemma-2-style soft-capping inside the chunks."""
    h, w, b = randn(7, 16, seed=31), randn(29, 16, seed=32), randn(29, seed=33)
    t = targets((7,), 29, 34)
    for scale, cap in ((0.25, None), (1.0, 2.0), (0.5, 3.0)):
        def lowp(h, w, b):
            z = (h @ w.t() + b) * scale
            z = torch.tanh(z / cap) * cap if cap else z
            return lowp_cross_entropy(z, t, 0.0, 0.0, red)

        run_case(lambda h, w, b: fused_linear_cross_entropy(h, w, t, b, reduction=red,
                                                            chunk_size=3, logit_scale=scale,
                                                            softcap=cap),
                 lowp,
                 lambda h, w, b: fused_linear_cross_entropy_reference(
                     h, w, t, b, reduction=red, logit_scale=scale, softcap=cap),
                 [h, w, b], torch.float32, grad=(0, 1, 2), launches=LAUNCHES)


def test_fused_linear_cross_entropy_float32_accumulation_of_dweight():
    """bf16 head, many chunks: dweight summed in float32 (the default) is closer to the float64
    gradient than the same sum rounded to bf16 at every chunk, and within the bf16 bound."""
    h, w = randn(64, 16, seed=41), randn(20, 16, seed=42, scale=0.3)
    t = targets((64,), 20, 43, ignore=())
    want = w.clone().requires_grad_()
    fused_linear_cross_entropy_reference(h, want, t, reduction="sum").backward()
    errs = {}
    for acc in (None, torch.bfloat16):
        wb = w.bfloat16().requires_grad_()
        with expect_launches("cross_entropy_fwd"):
            fused_linear_cross_entropy(h.bfloat16(), wb, t, reduction="sum", chunk_size=2,
                                       accum_dtype=acc).backward()
        assert wb.grad.dtype == torch.bfloat16
        errs[acc] = (wb.grad.double() - want.grad).abs().max().item()
    assert errs[None] < errs[torch.bfloat16], errs
    with pytest.raises(ValueError, match="accum_dtype"):
        fused_linear_cross_entropy(h.bfloat16(), w.bfloat16(), t, accum_dtype=torch.float16)


@pytest.mark.parametrize("dtype,eps,z,red,cap", [
    (torch.float32, 0.1, 1e-3, "mean", None), (torch.bfloat16, 0.0, 0.0, "sum", 2.0),
    (torch.bfloat16, 0.1, 0.0, "none", None)])
def test_fused_linear_cross_entropy_vocabulary_blocks(dtype, eps, z, red, cap):
    """The local vocabulary in blocks (statistics over all blocks, then each block's gradient
    from recomputed logits), uneven last block, every reduction, the softcap chain rule."""
    h, w, b = randn(9, 16, seed=51), randn(45, 16, seed=52, scale=0.4), randn(45, seed=53)
    t = targets((9,), 45, 54, ignore=(3,))

    def lowp(h, w, b):
        lg = h @ w.t() + b
        lg = torch.tanh(lg / cap) * cap if cap else lg
        return lowp_cross_entropy(lg, t, eps, z, red)

    with expect_launches("cross_entropy_grad"):
        run_case(lambda h, w, b: fused_linear_cross_entropy(
                     h, w, t, b, label_smoothing=eps, z_loss=z, reduction=red, chunk_size=4,
                     vocab_chunk_size=8, softcap=cap),
                 lowp,
                 lambda h, w, b: fused_linear_cross_entropy_reference(
                     h, w, t, b, -100, eps, z, red, softcap=cap),
                 [h, w, b], dtype, grad=(0, 1, 2), launches=("cross_entropy_fwd",))


def test_fused_linear_cross_entropy_float32_accumulation_of_dhidden():
    """bf16 head in 16 vocabulary blocks: dhidden summed over the blocks in float32 (the
    default) matches the unblocked gradient bit for bit, is closer to the float64 gradient than
    the same sum rounded to bf16 after every block, and is within the kernel test bound."""
    h, w = randn(16, 64, seed=61), randn(512, 64, seed=62, scale=0.3)
    t = targets((16,), 512, 63, ignore=())
    hb, wb = h.bfloat16(), w.bfloat16()
    want = hb.double().requires_grad_()
    fused_linear_cross_entropy_reference(want, wb.double(), t, reduction="sum").backward()
    lowp = hb.clone().requires_grad_()
    fused_linear_cross_entropy_reference(lowp, wb, t, reduction="sum").backward()
    grads, errs = {}, {}
    for acc, vc in ((None, 32), (torch.bfloat16, 32), (None, None)):
        hh = hb.clone().requires_grad_()
        fused_linear_cross_entropy(hh, wb, t, reduction="sum", chunk_size=8,
                                   vocab_chunk_size=vc, accum_dtype=acc).backward()
        assert hh.grad.dtype == torch.bfloat16
        grads[acc, vc] = hh.grad
        errs[acc, vc] = (hh.grad.double() - want.grad).abs().mean().item()
    assert torch.equal(grads[None, 32], grads[None, None])
    assert errs[None, 32] < 0.9 * errs[torch.bfloat16, 32], errs
    assert_bound("dhidden", grads[None, 32], lowp.grad, want.grad, torch.bfloat16)
    with pytest.raises(ValueError, match="vocab_chunk_size must be a positive int"):
        fused_linear_cross_entropy(hb, wb, t, vocab_chunk_size=0)
