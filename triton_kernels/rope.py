"""Rotary position embedding, rotate-half convention (the Llama family in transformers).

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

q: (batch, q_heads, seq, head_dim), k: (batch, kv_heads, seq, head_dim) (grouped-query attention:
the head counts may differ); cos, sin: (batch, seq, head_dim), (1, seq, head_dim) or
(seq, head_dim). Any strides on q/k (the usual ``view(...).transpose(1, 2)`` input is fine): the
kernels read and write through strides. cos and sin are constants (no gradient flows to them).
"""

from __future__ import annotations

import torch

from ._dispatch import check_float, count_launch, custom_op, run_op, tl, triton, use_triton
from ._launch import launch

__all__ = ["rope", "rope_reference"]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """Plain torch (float32 math for low-precision inputs); returns (q_rot, k_rot)."""
    if cos.dim() == 3:  # (batch, seq, D) -> (batch, 1, seq, D), broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = cos.to(ct), sin.to(ct)
    out = []
    for x in (q, k):
        xf = x.to(ct)
        out.append((xf * c + _rotate_half(xf) * s).to(x.dtype))
    return tuple(out)


@triton.jit
def _rope_kernel(X, Y, COS, SIN, S, H, sxb, sxh, sxs, syb, syh, sys, scb, scs, HALF,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch, position): cos/sin are loaded once and applied to every head.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cbase = b * scb + s * scs
    c1 = tl.load(COS + cbase + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cbase + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    hs = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hs
        mask = (h < H)[:, None] & dmask[None, :]
        xp = X + b * sxb + s * sxs + h[:, None] * sxh + d[None, :]  # (BLOCK_H, BLOCK_D)
        yp = Y + b * syb + s * sys + h[:, None] * syh + d[None, :]
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _apply(x, cos, sin, backward):
    # x: (B, H, S, D) any strides with unit last stride; cos/sin: (B, S, D) (batch stride may be 0)
    bsz, heads, seq, dim = x.shape
    y = torch.empty_like(x)
    if x.numel():
        count_launch("rope_bwd" if backward else "rope_fwd")
        half = dim // 2
        launch(_rope_kernel, (bsz * seq,), x, y, cos, sin, seq, heads, x.stride(0), x.stride(1),
               x.stride(2), y.stride(0), y.stride(1), y.stride(2), cos.stride(0), cos.stride(1),
               half, BACKWARD=backward,
               # 16 heads x 64 pairs = 1024 values per loop step; more heads loop
               BLOCK_H=min(16, triton.next_power_of_2(heads)),
               BLOCK_D=max(16, triton.next_power_of_2(half)))
    return y


@custom_op("rope", lambda q, k, cos, sin, backward: (torch.empty_like(q), torch.empty_like(k)))
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _apply(q, cos, sin, backward), _apply(k, cos, sin, backward)


def _unit_last(t):
    return t if t.numel() == 0 or t.stride(-1) == 1 else t.contiguous()


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return run_op("rope", _unit_last(q), _unit_last(k), cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = run_op("rope", _unit_last(dq), _unit_last(dk), cos, sin, True)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate ``q`` and ``k`` by the angles in ``cos``/``sin``; returns ``(q_rot, k_rot)``."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be (batch, heads, seq, head_dim), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    bsz, _, seq, dim = q.shape
    if k.shape[0] != bsz or k.shape[2] != seq or k.shape[3] != dim:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and "
                         "head_dim")
    if dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {dim}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    ok = cos.shape in ((seq, dim), (bsz, seq, dim), (1, seq, dim))
    if not ok:
        raise ValueError(f"cos/sin must be (seq, head_dim), (batch, seq, head_dim) or "
                         f"(1, seq, head_dim) = ({seq}, {dim}) / ({bsz}, {seq}, {dim}), "
                         f"got {tuple(cos.shape)}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos and sin must not require grad: rope treats them as constants "
                         "(compute them under torch.no_grad() or .detach() them)")
    if not use_triton(q):
        return rope_reference(q, k, cos, sin)
    c = _unit_last(cos.expand(bsz, seq, dim))  # batch stride 0 when broadcast
    s = _unit_last(sin.expand(bsz, seq, dim))
    return _RoPEFn.apply(q, k, c, s)
