"""Rotary embedding (rotate-half) through the Triton interpreter vs a float64 reference.

Run: python -m pytest -q tests/triton_kernels/test_rope.py
"""

import pytest
import torch

from ichiban_comm.triton_kernels import rope
from ichiban_comm.triton_kernels.rope import rope_reference
from kernels_testlib import DTYPES, randn, run_case

LAUNCHES = ("rope_fwd", "rope_bwd")


def _angles(batch, seq, dim, seed, per_batch):
    # Llama layout: the same frequencies on both halves, positions per batch row
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 64, (batch if per_batch else 1, seq), generator=gen).double()
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    f = pos[..., None] * inv
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos(), emb.sin()
    return (cos, sin) if per_batch else (cos[0], sin[0])


def _lowp(q, k, cos, sin):
    # what transformers does: everything in the activation dtype
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [True, False])
def test_rope_gqa(dtype, per_batch):
    b, s, d = 2, 5, 24  # head_dim 24: half (12) is not a power of two
    q, k = randn(b, 4, s, d, seed=1), randn(b, 2, s, d, seed=2)
    cos, sin = _angles(b, s, d, 3, per_batch)
    run_case(rope, _lowp, rope_reference, [q, k, cos, sin], dtype, grad=(0, 1),
             launches=LAUNCHES)


def test_rope_transposed_input_and_general_angles():
    # q/k as produced by view(b, s, h, d).transpose(1, 2); cos halves that differ (general case)
    b, s, h, d = 2, 3, 3, 8
    q = randn(b, s, h, d, seed=4).transpose(1, 2)
    k = randn(b, s, 1, d, seed=5).transpose(1, 2)
    cos, sin = randn(b, s, d, seed=6), randn(b, s, d, seed=7)
    assert not q.is_contiguous()
    run_case(rope, _lowp, rope_reference, [q, k, cos, sin], torch.float32, grad=(0, 1),
             launches=LAUNCHES)


def test_rope_broadcast_batch_angles():
    q, k = randn(3, 2, 4, 8, seed=8), randn(3, 2, 4, 8, seed=9)
    cos, sin = _angles(1, 4, 8, 10, True)  # (1, seq, d)
    run_case(rope, _lowp, rope_reference, [q, k, cos, sin], torch.float32, grad=(0, 1),
             launches=LAUNCHES)


def test_rope_empty_seq():
    q, k = torch.randn(2, 2, 0, 8, requires_grad=True), torch.randn(2, 1, 0, 8)
    qo, ko = rope(q, k, torch.randn(0, 8), torch.randn(0, 8))
    assert qo.shape == q.shape and ko.shape == k.shape


def test_rope_bad_arguments():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    c = torch.randn(4, 8)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope(torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4, 7), torch.randn(4, 7),
             torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"cos/sin must be \(seq, head_dim\)"):
        rope(q, k, torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="q and k must be"):
        rope(q[0], k[0], c, c)
    with pytest.raises(ValueError, match="must match q"):
        rope(q, torch.randn(1, 2, 3, 8), c, c)
    with pytest.raises(ValueError, match="must not require grad"):
        rope(q, k, c.clone().requires_grad_(), c)
