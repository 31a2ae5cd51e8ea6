"""GeGLU (tanh and erf GELU) through the Triton interpreter vs a float64 reference.

Run: python -m pytest -q tests/triton_kernels/test_geglu.py
"""

import pytest
import torch
import torch.nn.functional as F

from ichiban_comm.triton_kernels import geglu
from ichiban_comm.triton_kernels.geglu import geglu_reference
from kernels_testlib import DTYPES, noncontig, randn, row_strided, run_case

LAUNCHES = ("geglu_fwd", "geglu_bwd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123)])
def test_geglu(dtype, approximate, shape):
    g, u = randn(*shape, seed=1, scale=3), randn(*shape, seed=2)
    run_case(lambda g, u: geglu(g, u, approximate),
             lambda g, u: F.gelu(g, approximate=approximate) * u,
             lambda g, u: geglu_reference(g, u, approximate), [g, u], dtype, grad=(0, 1),
             launches=LAUNCHES)


def test_geglu_noncontiguous():
    g, u = randn(3, 40, seed=3), randn(3, 40, seed=4)
    run_case(geglu, lambda g, u: F.gelu(g, approximate="tanh") * u, geglu_reference, [g, u],
             torch.float32, grad=(0, 1), transform=noncontig, launches=LAUNCHES)


def test_geglu_empty():
    y = geglu(torch.randn(0, 3), torch.randn(0, 3))
    assert y.shape == (0, 3)


def test_geglu_bad_arguments():
    with pytest.raises(ValueError, match='approximate must be "tanh" or "none"'):
        geglu(torch.randn(3), torch.randn(3), approximate="sigmoid")
    with pytest.raises(ValueError, match="up must have the shape of gate"):
        geglu(torch.randn(3, 4), torch.randn(4, 3))


def test_geglu_halves_of_a_fused_projection_and_zero_width():
    # gate/up as gate_up(x).chunk(2, -1): row-strided views, read in place
    g, u = randn(3, 5, 37, seed=20), randn(3, 5, 37, seed=21)
    run_case(geglu, lambda g, u: F.gelu(g, approximate="tanh") * u,
             geglu_reference, [g, u], torch.float32, grad=(0, 1), transform=row_strided,
             launches=LAUNCHES)
    assert geglu(torch.randn(3, 0), torch.randn(3, 0)).shape == (3, 0)
