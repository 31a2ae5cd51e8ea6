"""FusedOps (the ops table the main job's model takes) matches the plain-torch formulas of the
same contract, forward and backward, through the Triton interpreter.

Run: python -m pytest -q tests/triton_kernels/test_kernels_ops_table.py
"""

import torch
import torch.nn.functional as F

from ichiban_comm.triton_kernels import FusedOps
from kernels_testlib import expect_launches


def _rot(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def _plain_block(x, w, wg, wu, q, k, cos, sin, head, target):
    h = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w
    a = F.silu(h @ wg.t()) * (h @ wu.t())
    qr, kr = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
    loss = F.cross_entropy(a @ head.t(), target)
    return loss + (qr * kr).sum()


def _fused_block(x, w, wg, wu, q, k, cos, sin, head, target):
    h = FusedOps.rms_norm(x, w, 1e-6)
    a = FusedOps.swiglu(h @ wg.t(), h @ wu.t())
    qr, kr = FusedOps.rope(q, k, cos, sin)
    loss = FusedOps.linear_cross_entropy(a, head, target)
    return loss + (qr * kr).sum()


def test_fused_ops_table_matches_plain_torch():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    pos = torch.arange(6).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    emb = torch.cat([pos, pos], -1)
    leaves = [r(6, 16), r(16), r(24, 16) * 0.3, r(24, 16) * 0.3, r(1, 2, 6, 8), r(1, 2, 6, 8)]
    rest = [emb.cos(), emb.sin(), r(40, 24) * 0.3, torch.randint(0, 40, (6,), generator=gen)]
    a = [t.clone().requires_grad_() for t in leaves]
    b = [t.clone().requires_grad_() for t in leaves]
    with expect_launches("rms_norm_fwd", "swiglu_fwd", "rope_fwd", "cross_entropy_fwd",
                         "rms_norm_bwd", "swiglu_bwd", "rope_bwd", "scale"):
        fused = _fused_block(*a, *rest)
        fused.backward()
    plain = _plain_block(*b, *rest)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
