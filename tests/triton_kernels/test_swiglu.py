"""SwiGLU through the Triton interpreter vs a float64 reference.

Run: python -m pytest -q tests/triton_kernels/test_swiglu.py
"""

import pytest
import torch
import torch.nn.functional as F

from ichiban_comm.triton_kernels import swiglu
from ichiban_comm.triton_kernels.swiglu import swiglu_reference
from kernels_testlib import DTYPES, noncontig, randn, row_strided, run_case

LAUNCHES = ("swiglu_fwd", "swiglu_bwd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123), (4100,)])
def test_swiglu(dtype, shape):
    g, u = randn(*shape, seed=1, scale=3), randn(*shape, seed=2)
    run_case(swiglu, lambda g, u: F.silu(g) * u, swiglu_reference, [g, u], dtype, grad=(0, 1),
             launches=LAUNCHES)


def test_swiglu_noncontiguous():
    g, u = randn(3, 40, seed=3), randn(3, 40, seed=4)
    run_case(swiglu, lambda g, u: F.silu(g) * u, swiglu_reference, [g, u], torch.float32,
             grad=(0, 1), transform=noncontig, launches=LAUNCHES)


def test_swiglu_empty():
    g = torch.randn(0, 8, requires_grad=True)
    y = swiglu(g, torch.randn(0, 8))
    y.sum().backward()
    assert y.shape == (0, 8) and g.grad.shape == (0, 8)


def test_swiglu_bad_arguments():
    with pytest.raises(ValueError, match="up must have the shape of gate"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        swiglu(torch.randn(3, 4), torch.randn(3, 4).half())
    with pytest.raises(TypeError, match="gate must be float16"):
        swiglu(torch.ones(3, dtype=torch.int64), torch.randn(3))


def test_swiglu_halves_of_a_fused_projection_and_zero_width():
    # gate/up as gate_up(x).chunk(2, -1): row-strided views, read in place
    g, u = randn(3, 5, 37, seed=20), randn(3, 5, 37, seed=21)
    run_case(swiglu, lambda g, u: F.silu(g) * u,
             swiglu_reference, [g, u], torch.float32, grad=(0, 1), transform=row_strided,
             launches=LAUNCHES)
    assert swiglu(torch.randn(3, 0), torch.randn(3, 0)).shape == (3, 0)
