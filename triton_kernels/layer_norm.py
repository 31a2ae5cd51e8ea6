"""LayerNorm, optionally fused with the residual add before it.

    y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias,   h = x (+ residual)

Same contract as ``rms_norm``: with ``residual`` returns ``(y, h)``. ``weight`` and ``bias`` may be
None (no affine scale / shift). Statistics in float32; ``h`` rounded to the input dtype first.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import (check_rows, check_same, count_launch, custom_op, finish_partials,
                        num_programs, row_block, row_warps, rows_2d, rows_per_program, run_op,
                        tl, triton, use_triton)
from ._launch import launch

__all__ = ["layer_norm", "layer_norm_reference"]


# ----------------------------------------------------------------------------- reference
def layer_norm_reference(x, weight, bias, eps=1e-5, residual=None):
    """Plain torch: the CPU path and the test oracle (float64 in, float64 math)."""
    h = x + residual if residual is not None else x
    hf = h if h.dtype == torch.float64 else h.float()
    mu = hf.mean(-1, keepdim=True)
    var = (hf - mu).pow(2).mean(-1, keepdim=True)
    y = (hf - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    if bias is not None:
        y = y + bias.to(hf.dtype)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _layer_norm_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, stride_x, stride_r, stride_y, stride_h,
                           rows, N, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                           HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # A (ROWS, BLOCK) tile (ROWS > 1 for rows of at most 256 columns); int64 row offsets
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = r < rows
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    h = tl.load(X + r[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(R + r[:, None] * stride_r + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        h = h.to(H.dtype.element_ty)
        tl.store(H + r[:, None] * stride_h + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    mean = tl.sum(h, axis=1) / N
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
    tl.store(MEAN + r, mean, mask=rmask)
    tl.store(RSTD + r, rstd, mask=rmask)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, H, W, MEAN, RSTD, DHO, DX, DWP, DBP, stride_dy, stride_h,
                           stride_dho, stride_dx, rows, N, rows_per_prog, HAS_DHO: tl.constexpr,
                           HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    # Persistent over a contiguous range of rows; partial dweight/dbias per program in registers.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, rows_per_prog):
        row = pid * rows_per_prog + i
        mask = cmask & (row < rows)
        mean = tl.load(MEAN + row, mask=row < rows, other=0.0)
        rstd = tl.load(RSTD + row, mask=row < rows, other=0.0)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        hhat = tl.where(mask, (h - mean) * rstd, 0.0)
        g = dy * w
        dx = rstd * (g - tl.sum(g, axis=0) / N - hhat * (tl.sum(g * hhat, axis=0) / N))
        if HAS_DHO:
            dx += tl.load(DHO + row * stride_dho + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * hhat
        db += dy
    tl.store(DWP + pid * N + cols, dw, mask=cmask)
    tl.store(DBP + pid * N + cols, db, mask=cmask)


# ----------------------------------------------------------------------------- launchers (ops)
def _fwd_fake(x, weight, bias, residual, eps):
    rows = x.shape[0]
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    stat = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x), h, stat, torch.empty_like(stat)


@custom_op("layer_norm_fwd", _fwd_fake)
def _layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # x, residual: (rows, N) with unit last stride; weight, bias: (N,)
    rows, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(rows, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block = row_block(n, "hidden")
    if rows:
        count_launch("layer_norm_fwd")
        r = residual if residual is not None else x
        hh = h if residual is not None else y
        nr = rows_per_program(block)
        launch(_layer_norm_fwd_kernel, (triton.cdiv(rows, nr),), x, r,
               weight if weight is not None else x, bias if bias is not None else x, y, hh, mean,
               rstd, x.stride(0), r.stride(0), y.stride(0), hh.stride(0), rows, n, eps,
               HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
               ROWS=nr, BLOCK=block, num_warps=row_warps(block * nr))
    return y, h, mean, rstd


def _bwd_fake(dy, h, weight, mean, rstd, dh_out, param_dtype):
    n = h.shape[1]
    return (torch.empty_like(h), h.new_empty(n, dtype=param_dtype),
            h.new_empty(n, dtype=param_dtype))


@custom_op("layer_norm_bwd", _bwd_fake)
def _layer_norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: Optional[torch.Tensor],
                    mean: torch.Tensor, rstd: torch.Tensor, dh_out: Optional[torch.Tensor],
                    param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # dy, h, dh_out: (rows, N); returns dx (rows, N), dweight (N,), dbias (N,) in param_dtype
    rows, n = h.shape
    dx = torch.empty_like(h)
    progs = num_programs(h.device, rows)
    # (programs, N) partial sums; every program writes its row, so no fill is needed (zeros
    # only when there are no rows and the kernel does not run)
    part = h.new_empty if rows else h.new_zeros
    dwp = part((progs, n), dtype=torch.float32)
    dbp = part((progs, n), dtype=torch.float32)
    block = row_block(n, "hidden")
    if rows:
        count_launch("layer_norm_bwd")
        dho = dh_out if dh_out is not None else dy
        launch(_layer_norm_bwd_kernel, (progs,), dy, h, weight if weight is not None else h, mean,
               rstd, dho, dx, dwp, dbp, dy.stride(0), h.stride(0), dho.stride(0), dx.stride(0),
               rows, n, triton.cdiv(rows, progs), HAS_DHO=dh_out is not None,
               HAS_W=weight is not None, BLOCK=block, num_warps=row_warps(block))
    dw, db = finish_partials(dwp, param_dtype, dbp, param_dtype)  # one launch for both sums
    return dx, dw, db


# ----------------------------------------------------------------------------- autograd
class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        shape = x.shape
        x2 = rows_2d(x)  # (rows, N)
        r2 = rows_2d(residual) if residual is not None else None
        y, h, mean, rstd = run_op("layer_norm_fwd", x2, weight, bias, r2, eps)
        ctx.save_for_backward(h if residual is not None else x2, weight, mean, rstd)
        ctx.has_res, ctx.has_b, ctx.shape = residual is not None, bias is not None, shape
        ctx.b_dtype = bias.dtype if bias is not None else None
        if ctx.has_res:
            return y.view(shape), h.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, mean, rstd = ctx.saved_tensors
        dho = rows_2d(dh_out) if (ctx.has_res and dh_out is not None) else None
        pdt = weight.dtype if weight is not None else (ctx.b_dtype or dy.dtype)
        dx, dw, db = run_op("layer_norm_bwd", rows_2d(dy), h, weight, mean, rstd, dho, pdt)
        dx = dx.view(ctx.shape)
        dw = dw if weight is not None else None
        db = db.to(ctx.b_dtype) if ctx.has_b else None  # no-op when it is the weight's dtype
        return dx, dw, db, (dx if ctx.has_res else None), None


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, residual: Optional[torch.Tensor] = None):
    """LayerNorm over the last dim of ``x``; returns ``y`` or ``(y, x + residual)``."""
    check_rows("x", x)
    n = x.shape[-1] if x.dim() else 0
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_same(name, p, "x", x, shape=False)
            if p.dim() != 1 or p.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},) (the last dim of x), "
                                 f"got {tuple(p.shape)}")
    if residual is not None:
        check_same("residual", residual, "x", x)
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if not use_triton(x):
        return layer_norm_reference(x, weight, bias, eps, residual)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    return _LayerNormFn.apply(x, weight, bias, residual, float(eps))
