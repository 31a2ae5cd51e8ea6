"""LayerNorm (+residual) through the Triton interpreter vs a float64 reference.

Run: python -m pytest -q tests/triton_kernels/test_layer_norm.py
"""

import pytest
import torch
import torch.nn.functional as F

from ichiban_comm.triton_kernels import layer_norm
from ichiban_comm.triton_kernels.layer_norm import layer_norm_reference
from kernels_testlib import DTYPES, noncontig, randn, run_case

EPS = 1e-5


def _lowp(x, w, b, r=None):
    h = x + r if r is not None else x
    y = F.layer_norm(h, (h.shape[-1],), w, b, EPS)
    return (y, h) if r is not None else y


def _ref(x, w, b, r=None):
    return layer_norm_reference(x, w, b, EPS, r)


def _ours(x, w, b, r=None):
    return layer_norm(x, w, b, EPS, residual=r)


@pytest.mark.parametrize("dtype", DTYPES)
# (37, 100): narrow rows, 16 per program -> three programs, the last one partly masked
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123), (7, 33), (37, 100)])
def test_layer_norm(dtype, shape):
    x = randn(*shape, seed=1) * 2 + 0.5  # a non-zero mean exercises the centring
    w, b = randn(shape[-1], seed=2) * 0.5 + 1, randn(shape[-1], seed=3)
    run_case(_ours, _lowp, _ref, [x, w, b], dtype, grad=(0, 1, 2),
             launches=("layer_norm_fwd", "layer_norm_bwd"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_residual(dtype):
    x, w, b, r = randn(4, 123, seed=4), randn(123, seed=5), randn(123, seed=6), randn(4, 123,
                                                                                     seed=7)
    run_case(_ours, _lowp, _ref, [x, w, b, r], dtype, grad=(0, 1, 2, 3),
             launches=("layer_norm_fwd", "layer_norm_bwd"))


def test_layer_norm_no_affine_noncontiguous():
    x = randn(2, 3, 40, seed=8)
    run_case(lambda x: layer_norm(x, None, None, EPS),
             lambda x: F.layer_norm(x, (40,), None, None, EPS),
             lambda x: layer_norm_reference(x, None, None, EPS), [x], torch.float32, grad=(0,),
             transform=noncontig, launches=("layer_norm_fwd", "layer_norm_bwd"))


def test_layer_norm_many_rows():
    x, w, b = randn(13, 24, seed=9), randn(24, seed=10), randn(24, seed=11)
    run_case(_ours, _lowp, _ref, [x, w, b], torch.float32, grad=(0, 1, 2),
             launches=("layer_norm_fwd", "layer_norm_bwd"))


def test_layer_norm_empty_batch():
    x = torch.randn(0, 17, requires_grad=True)
    w, b = torch.randn(17, requires_grad=True), torch.randn(17, requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == (0, 17)
    y.sum().backward()
    assert x.grad.shape == (0, 17) and torch.equal(b.grad, torch.zeros(17))


def test_layer_norm_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm(x, torch.randn(8), torch.randn(9))
    with pytest.raises(TypeError, match="weight must be float16"):
        layer_norm(x, torch.ones(8, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="residual must have the shape"):
        layer_norm(x, None, None, residual=torch.randn(8))
