"""RMSNorm (+residual) through the Triton interpreter vs a float64 reference.

Run: python -m pytest -q tests/triton_kernels/test_rms_norm.py
"""

import pytest
import torch
import torch.nn.functional as F

from ichiban_comm.triton_kernels import rms_norm
from ichiban_comm.triton_kernels.rms_norm import rms_norm_reference
from kernels_testlib import DTYPES, noncontig, randn, run_case

EPS = 1e-6


def _lowp(x, w, r=None):
    h = x + r if r is not None else x
    y = F.rms_norm(h, (h.shape[-1],), w, EPS)
    return (y, h) if r is not None else y


def _ref(x, w, r=None):
    return rms_norm_reference(x, w, EPS, r)


def _ours(x, w, r=None):
    return rms_norm(x, w, EPS, residual=r)


@pytest.mark.parametrize("dtype", DTYPES)
# (37, 100): narrow rows, 16 per program -> three programs, the last one partly masked
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123), (7, 33), (37, 100)])
def test_rms_norm(dtype, shape):
    x, w = randn(*shape, seed=1), randn(shape[-1], seed=2) * 0.5 + 1
    run_case(_ours, _lowp, _ref, [x, w], dtype, grad=(0, 1),
             launches=("rms_norm_fwd", "rms_norm_bwd"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_residual(dtype):
    x, w, r = randn(4, 123, seed=3), randn(123, seed=4), randn(4, 123, seed=5)
    run_case(_ours, _lowp, _ref, [x, w, r], dtype, grad=(0, 1, 2),
             launches=("rms_norm_fwd", "rms_norm_bwd"))


def test_rms_norm_noncontiguous():
    x, w, r = randn(2, 3, 40, seed=6), randn(40, seed=7), randn(2, 3, 40, seed=8)
    run_case(_ours, _lowp, _ref, [x, w, r], torch.float32, grad=(0, 1, 2), transform=noncontig,
             launches=("rms_norm_fwd", "rms_norm_bwd"))


def test_rms_norm_float32_weight_low_precision_input():
    # mixed precision: float32 master weight, bfloat16 activations -> bfloat16 output,
    # float32 weight gradient
    x = torch.randn(5, 48, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(48) * 0.5 + 1).requires_grad_()
    y = rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(5, 48)
    y.backward(dy.bfloat16())
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_reference(xd, wd).backward(dy.bfloat16().double())
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), rms_norm_reference(xd, wd).detach(), rtol=1.6e-2,
                               atol=1.6e-2)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1.6e-2, atol=1.6e-2)


def test_rms_norm_empty_batch():
    x = torch.randn(0, 17, requires_grad=True)
    w = torch.randn(17, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 17)
    y.sum().backward()
    assert x.grad.shape == (0, 17) and torch.equal(w.grad, torch.zeros(17))


def test_rms_norm_many_rows_backward_partials():
    # More rows than backward programs: each program loops over several rows.
    x, w = randn(13, 24, seed=9), randn(24, seed=10)
    run_case(_ours, _lowp, _ref, [x, w], torch.float32, grad=(0, 1),
             launches=("rms_norm_fwd", "rms_norm_bwd"))


def test_rms_norm_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.randn(7))
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        rms_norm(x.long(), torch.randn(8))
    with pytest.raises(ValueError, match="residual must have the shape"):
        rms_norm(x, torch.randn(8), residual=torch.randn(4, 7))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        rms_norm(x, torch.randn(8), residual=torch.randn(4, 8).half())
    with pytest.raises(ValueError, match="at least one dimension"):
        rms_norm(torch.tensor(1.0), torch.randn(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_one_plus_weight_offset(dtype):
    """offset=1: the Gemma (1 + w) norm, with and without the residual add."""
    x, w, r = randn(3, 37, seed=11), randn(37, seed=12) * 0.1, randn(3, 37, seed=13)

    def lowp(x, w, r):
        h = x + r
        return F.rms_norm(h, (h.shape[-1],), 1 + w, EPS), h

    run_case(lambda x, w, r: rms_norm(x, w, EPS, residual=r, offset=1.0), lowp,
             lambda x, w, r: rms_norm_reference(x, w, EPS, r, offset=1.0), [x, w, r], dtype,
             grad=(0, 1, 2), launches=("rms_norm_fwd", "rms_norm_bwd"))
    run_case(lambda x, w: rms_norm(x, w, EPS, offset=1.0),
             lambda x, w: F.rms_norm(x, (x.shape[-1],), 1 + w, EPS),
             lambda x, w: rms_norm_reference(x, w, EPS, offset=1.0), [x, w], dtype, grad=(0, 1),
             launches=("rms_norm_fwd", "rms_norm_bwd"))
