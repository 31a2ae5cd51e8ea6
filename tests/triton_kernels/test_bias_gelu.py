"""gelu(x + bias) through the Triton interpreter vs a float64 reference.

Run: python -m pytest -q tests/triton_kernels/test_bias_gelu.py
"""

import pytest
import torch
import torch.nn.functional as F

from ichiban_comm.triton_kernels import bias_gelu
from ichiban_comm.triton_kernels.bias_gelu import bias_gelu_reference
from kernels_testlib import DTYPES, noncontig, randn, row_strided, run_case

LAUNCHES = ("bias_gelu_fwd", "bias_gelu_bwd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123)])
def test_bias_gelu(dtype, approximate, shape):
    x, b = randn(*shape, seed=1, scale=2), randn(shape[-1], seed=2)
    run_case(lambda x, b: bias_gelu(x, b, approximate),
             lambda x, b: F.gelu(x + b, approximate=approximate),
             lambda x, b: bias_gelu_reference(x, b, approximate), [x, b], dtype, grad=(0, 1),
             launches=LAUNCHES)


def test_bias_gelu_no_bias_noncontiguous():
    x = randn(4, 33, seed=3)
    run_case(lambda x: bias_gelu(x, None), lambda x: F.gelu(x, approximate="tanh"),
             lambda x: bias_gelu_reference(x, None), [x], torch.float32, grad=(0,),
             transform=noncontig, launches=LAUNCHES)


def test_bias_gelu_row_strided_input():
    x, b = randn(2, 3, 33, seed=4), randn(33, seed=5)
    run_case(bias_gelu, lambda x, b: F.gelu(x + b, approximate="tanh"), bias_gelu_reference,
             [x, b], torch.float32, grad=(0, 1), transform=row_strided, launches=LAUNCHES)


def test_bias_gelu_empty():
    x = torch.randn(0, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    bias_gelu(x, b).sum().backward()
    assert torch.equal(b.grad, torch.zeros(5))


def test_bias_gelu_bad_arguments():
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_gelu(torch.randn(3, 4), torch.randn(3))
    with pytest.raises(ValueError, match="approximate must be"):
        bias_gelu(torch.randn(3, 4), None, approximate="fast")
