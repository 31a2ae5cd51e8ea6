"""residual + dropout(x + bias) with a seeded, regenerated mask (Triton interpreter).

The mask is not exposed, so it is recovered from the output (each element equals either
residual or residual + (x + bias) / (1 - p)), and then the whole output and every gradient are
checked against the float64 reference built with that mask.

Run: python -m pytest -q tests/triton_kernels/test_bias_dropout_add.py
"""

import pytest
import torch

from ichiban_comm.triton_kernels import bias_dropout_add
from ichiban_comm.triton_kernels.bias_dropout_add import bias_dropout_add_reference
from kernels_testlib import DTYPES, assert_bound, expect_launches, randn

P = 0.3


def _recover_keep(y, x, b, r, p):
    kept = r + (x + b) / (1 - p)
    return (y - kept).abs() < (y - r).abs()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dropout_add_train(dtype):
    x64, b64, r64 = randn(6, 123, seed=1), randn(123, seed=2), randn(6, 123, seed=3)
    x, b, r = (t.to(dtype).requires_grad_() for t in (x64, b64, r64))
    with expect_launches("bias_dropout_add_fwd"):
        y = bias_dropout_add(x, b, r, P, True, 1234)
    dy = randn(6, 123, seed=4)
    with expect_launches("bias_dropout_add_bwd", "finish_partials"):
        gx, gb, gr = torch.autograd.grad(y, (x, b, r), dy.to(dtype))
    keep = _recover_keep(y.double(), x64, b64, r64, P)
    # where x + b rounds to ~0 in the dtype, the output cannot tell kept from dropped: there
    # the backward's mask is taken, everywhere else both masks must agree
    sure = (x64 + b64).to(dtype).abs() > 0.05
    assert torch.equal((gx.double() != 0)[sure], keep[sure]), \
        "backward mask differs from the forward mask"
    keep = torch.where(sure, keep, gx.double() != 0)
    frac = keep.double().mean().item()
    assert abs(frac - (1 - P)) < 0.06, f"kept fraction {frac:.3f}, expected ~{1 - P}"
    ref = [t.clone().requires_grad_() for t in (x64, b64, r64)]
    y_ref = bias_dropout_add_reference(*ref, P, True, 0, keep=keep)
    y_lowp = bias_dropout_add_reference(*(t.detach().to(dtype) for t in (x64, b64, r64)), P,
                                        True, 0, keep=keep)
    assert_bound("output", y, y_lowp, y_ref, dtype)
    rx, rb, rr = torch.autograd.grad(y_ref, ref, dy)
    for name, go, gref in (("dx", gx, rx), ("dbias", gb, rb), ("dresidual", gr, rr)):
        assert_bound(name, go, gref.to(dtype), gref, dtype)


def test_bias_dropout_add_eval_bias_gradient():
    """No dropout: dx is dy itself, the bias gradient comes from the partial-sum kernel."""
    x, b, r = (randn(7, 45, seed=s).float().requires_grad_() for s in (8, 9, 10))
    b = randn(45, seed=11).float().requires_grad_()
    y = bias_dropout_add(x, b, r, 0.2, False, 3)
    dy = randn(7, 45, seed=12).float()
    with expect_launches("bias_dropout_add_bwd", "finish_partials"):
        gx, gb = torch.autograd.grad(y, (x, b), dy)
    torch.testing.assert_close(gx, dy)
    torch.testing.assert_close(gb, dy.sum(0), rtol=1e-5, atol=1e-5)


def test_bias_dropout_add_seeded():
    x, b, r = torch.randn(4, 50), torch.randn(50), torch.randn(4, 50)
    y1 = bias_dropout_add(x, b, r, 0.5, True, 7)
    y2 = bias_dropout_add(x, b, r, 0.5, True, 7)
    y3 = bias_dropout_add(x, b, r, 0.5, True, 8)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_bias_dropout_add_eval_is_exact_sum():
    x, b, r = randn(3, 17, seed=5), randn(17, seed=6), randn(3, 17, seed=7)
    with expect_launches("bias_dropout_add_fwd"):
        y = bias_dropout_add(x.float(), b.float(), r.float(), 0.5, False, 1)
    assert_bound("eval output", y, (r + x + b).float(), r + x + b, torch.float32)


def test_bias_dropout_add_p_one_and_noncontiguous():
    x = torch.randn(3, 8, 2)[..., 0]
    r = torch.randn(3, 8)
    assert torch.equal(bias_dropout_add(x, None, r, 1.0, True, 3), r)
    y = bias_dropout_add(x, None, r, 0.25, True, 3)
    keep = _recover_keep(y.double(), x.double(), 0.0, r.double(), 0.25)
    torch.testing.assert_close(y, bias_dropout_add_reference(x, None, r, 0.25, True, 0,
                                                             keep=keep))


def test_bias_dropout_add_bad_arguments():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        bias_dropout_add(x, None, x, 1.5, True, 0)
    with pytest.raises(TypeError, match="seed must be a non-negative int"):
        bias_dropout_add(x, None, x, 0.1, True, 1.5)
    with pytest.raises(ValueError, match="residual must have the shape"):
        bias_dropout_add(x, None, torch.randn(4), 0.1, True, 0)
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_dropout_add(x, torch.randn(3), x, 0.1, True, 0)


def test_bias_dropout_add_mask_is_a_function_of_row_and_column():
    """One Philox round serves four neighbouring columns: a row's mask does not depend on the
    other rows, nor on the column block, and odd widths (a partial last quad) work."""
    x, r = torch.ones(5, 4099), torch.zeros(5, 4099)
    y = bias_dropout_add(x, None, r, 0.5, True, 11)
    y2 = bias_dropout_add(x[2:3], None, r[2:3], 0.5, True, 11)  # row 2 alone is "row 0" here
    assert abs((y != 0).double().mean().item() - 0.5) < 0.02
    y3 = bias_dropout_add(x[:3], None, r[:3], 0.5, True, 11)
    assert torch.equal(y3, y[:3])
    assert not torch.equal(y2[0], y[2])  # the row index is part of the counter
