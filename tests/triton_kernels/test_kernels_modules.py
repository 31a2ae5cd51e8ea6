"""RMSNorm / LayerNorm modules: state-dict compatible with torch.nn, same outputs.

Run: python -m pytest -q tests/triton_kernels/test_kernels_modules.py
"""

import pytest
import torch
from torch import nn

from ichiban_comm.triton_kernels import LayerNorm, RMSNorm
from kernels_testlib import expect_launches


def test_rms_norm_module_state_dict_and_output():
    ref = nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(24))
    ours = RMSNorm(24, eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 24)
    with expect_launches("rms_norm_fwd"):
        y = ours(x)
    torch.testing.assert_close(y, ref(x))
    back = nn.RMSNorm(24, eps=1e-6)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.weight, ref.weight)


def test_rms_norm_module_from_module_shares_parameter_and_residual():
    ref = nn.RMSNorm(16, eps=1e-5)
    ours = RMSNorm.from_module(ref)
    assert ours.weight is ref.weight and ours.eps == 1e-5
    x, r = torch.randn(2, 16), torch.randn(2, 16)
    y, h = ours(x, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref(x + r))
    assert RMSNorm.from_module(nn.RMSNorm(8)).eps == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_module_state_dict_and_output(bias):
    ref = nn.LayerNorm(20, eps=1e-5, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(20))
        if bias:
            ref.bias.copy_(torch.randn(20))
    ours = LayerNorm(20, bias=bias)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 20)
    with expect_launches("layer_norm_fwd"):
        y = ours(x)
    torch.testing.assert_close(y, ref(x))
    shared = LayerNorm.from_module(ref)
    assert shared.weight is ref.weight and shared.bias is ref.bias


def test_layer_norm_module_rejects_multi_dim_shape():
    with pytest.raises(ValueError, match="last dim only"):
        LayerNorm.from_module(nn.LayerNorm((4, 5)))
