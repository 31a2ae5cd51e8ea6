"""RMSNorm, optionally fused with the residual add before it.

    y = (weight + offset) * h / sqrt(mean(h^2) + eps),   h = x (+ residual)

``offset`` is 0 for the usual RMSNorm and 1 for the Gemma family's ``(1 + w)`` norm (weights
stored zero-centred); the weight gradient is the same either way.

With ``residual`` the op returns ``(y, h)``: the sum is written once and normalised in the same
pass, which is the pre-norm transformer block pattern (``h`` is the next residual stream).
Statistics are computed in float32 whatever the input dtype; ``h`` is rounded to the input dtype
before normalising, so the forward and the backward see the same ``h``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import (check_rows, check_same, count_launch, custom_op, finish_partials,
                        num_programs, row_block, row_warps, rows_2d, rows_per_program, run_op,
                        tl, triton, use_triton)
from ._launch import launch

__all__ = ["rms_norm", "rms_norm_reference"]


# ----------------------------------------------------------------------------- reference
def rms_norm_reference(x, weight, eps=1e-6, residual=None, offset=0.0):
    """Plain torch: the CPU path and the test oracle (float64 in, float64 math)."""
    h = x + residual if residual is not None else x
    hf = h if h.dtype == torch.float64 else h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * (weight.to(hf.dtype) + offset)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, rows, N,
                         eps, offset, HAS_RES: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr):
    # A (ROWS, BLOCK) tile: ROWS > 1 for narrow rows (hidden <= 256), so a program still moves
    # a few KiB; int64 row offsets (rows * stride can pass 2**31)
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = r < rows
    mask = rmask[:, None] & (cols < N)[None, :]
    h = tl.load(X + r[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(R + r[:, None] * stride_r + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        h = h.to(H.dtype.element_ty)
        tl.store(H + r[:, None] * stride_h + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / N + eps)
    tl.store(RSTD + r, rstd, mask=rmask)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + offset
    y = h * rstd[:, None] * w[None, :]
    tl.store(Y + r[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, H, W, RSTD, DHO, DX, DWP, stride_dy, stride_h, stride_dho, stride_dx,
                         rows, N, rows_per_prog, offset, HAS_DHO: tl.constexpr,
                         BLOCK: tl.constexpr):
    # Each program owns a contiguous range of rows and accumulates its partial dweight in
    # registers; the (programs, N) partials are summed on the host side afterwards.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, rows_per_prog):
        row = pid * rows_per_prog + i
        mask = cmask & (row < rows)
        rstd = tl.load(RSTD + row, mask=row < rows, other=0.0)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        hhat = h * rstd
        g = dy * w
        dx = rstd * (g - hhat * (tl.sum(g * hhat, axis=0) / N))
        if HAS_DHO:
            dx += tl.load(DHO + row * stride_dho + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * hhat
    tl.store(DWP + pid * N + cols, dw, mask=cmask)


# ----------------------------------------------------------------------------- launchers (ops)
def _fwd_fake(x, weight, residual, eps, offset):
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), h, x.new_empty(x.shape[0], dtype=torch.float32)


@custom_op("rms_norm_fwd", _fwd_fake)
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                  eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x, residual: (rows, N) with unit last stride; weight: (N,)
    rows, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = x.new_empty(rows, dtype=torch.float32)
    block = row_block(n, "hidden")
    if rows:
        count_launch("rms_norm_fwd")
        r = residual if residual is not None else x
        hh = h if residual is not None else y
        nr = rows_per_program(block)
        launch(_rms_norm_fwd_kernel, (triton.cdiv(rows, nr),), x, r, weight, y, hh, rstd,
               x.stride(0), r.stride(0), y.stride(0), hh.stride(0), rows, n, eps, offset,
               HAS_RES=residual is not None, ROWS=nr, BLOCK=block, num_warps=row_warps(block * nr))
    return y, h, rstd


def _bwd_fake(dy, h, weight, rstd, dh_out, offset):
    return torch.empty_like(h), torch.empty_like(weight)


@custom_op("rms_norm_bwd", _bwd_fake)
def _rms_norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  dh_out: Optional[torch.Tensor], offset: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # dy, h, dh_out: (rows, N); returns dx (rows, N) in h's dtype and dweight (N,) in weight's
    rows, n = h.shape
    dx = torch.empty_like(h)
    progs = num_programs(h.device, rows)
    # (programs, N) partial dweight; every program writes its row (zeros only without rows)
    dwp = (h.new_empty if rows else h.new_zeros)((progs, n), dtype=torch.float32)
    block = row_block(n, "hidden")
    if rows:
        count_launch("rms_norm_bwd")
        dho = dh_out if dh_out is not None else dy
        launch(_rms_norm_bwd_kernel, (progs,), dy, h, weight, rstd, dho, dx, dwp, dy.stride(0),
               h.stride(0), dho.stride(0), dx.stride(0), rows, n, triton.cdiv(rows, progs), offset,
               HAS_DHO=dh_out is not None, BLOCK=block, num_warps=row_warps(block))
    return dx, finish_partials(dwp, weight.dtype)


# ----------------------------------------------------------------------------- autograd
class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset):
        shape = x.shape
        x2 = rows_2d(x)  # (rows, N)
        r2 = rows_2d(residual) if residual is not None else None
        y, h, rstd = run_op("rms_norm_fwd", x2, weight, r2, eps, offset)
        ctx.offset = offset
        ctx.save_for_backward(h if residual is not None else x2, weight, rstd)
        ctx.has_res = residual is not None
        ctx.shape = shape
        if ctx.has_res:
            return y.view(shape), h.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        dy2 = rows_2d(dy)
        dho = rows_2d(dh_out) if (ctx.has_res and dh_out is not None) else None
        dx, dw = run_op("rms_norm_bwd", dy2, h, weight, rstd, dho, ctx.offset)
        dx = dx.view(ctx.shape)
        return dx, dw, (dx if ctx.has_res else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: Optional[torch.Tensor] = None, offset: float = 0.0):
    """RMSNorm over the last dim of ``x`` (any leading shape); see the module docstring.
    ``offset=1.0``: the Gemma ``(1 + weight)`` form.

    Returns ``y`` (x's dtype), or ``(y, x + residual)`` when ``residual`` is given.
    """
    check_rows("x", x)
    check_same("weight", weight, "x", x, shape=False)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) (the last dim of x), "
                         f"got {tuple(weight.shape)}")
    if residual is not None:
        check_same("residual", residual, "x", x)
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps, residual, offset)
    return _RMSNormFn.apply(x, weight.contiguous(), residual, float(eps), float(offset))
