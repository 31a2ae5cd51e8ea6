"""ichiban_comm._C.strided_gather against Tensor.contiguous() on random views.

Run: python -m pytest -q tests/csrc
"""

import pytest
import torch

from ichiban_comm import _C

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]


def _random(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen, dtype=dtype)


VIEWS = {
    "contiguous": lambda t: t,
    "transpose": lambda t: t.transpose(0, 2),
    "slice_step": lambda t: t[:, ::2, 1:],
    "permute_slice": lambda t: t.permute(2, 0, 1)[1:-1],
    "expand": lambda t: t[:, :1].expand(-1, 5, -1),  # stride 0
    "single_row": lambda t: t[1:2, 3],
    "scalar": lambda t: t[0, 0, 0],
    "empty": lambda t: t[:, 0:0],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", list(VIEWS))
def test_matches_contiguous(dtype, view):
    gen = torch.Generator().manual_seed(hash((str(dtype), view)) % 2**31)
    src = VIEWS[view](_random((7, 6, 123), dtype, gen))
    out = torch.empty(src.numel(), dtype=dtype)
    _C.strided_gather(src, out)
    assert torch.equal(out.view(src.shape), src.contiguous())


def test_large_view_uses_threads_and_stays_exact():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(300, 1000, generator=gen).t()[::3]  # (334, 300), inner stride 1000
    out = torch.empty(src.numel())
    _C.strided_gather(src, out)
    assert torch.equal(out.view(src.shape), src.contiguous())


def test_bad_arguments_are_named():
    src = torch.randn(4, 5)
    with pytest.raises(ValueError, match="out has dtype Double but src has Float"):
        _C.strided_gather(src, torch.empty(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="out has 19 elements but src has 20"):
        _C.strided_gather(src, torch.empty(19))
    with pytest.raises(ValueError, match="out must be contiguous"):
        _C.strided_gather(src, torch.empty(40)[::2])
