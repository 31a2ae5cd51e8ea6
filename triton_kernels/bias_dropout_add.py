"""``residual + dropout(x + bias, p)`` in one pass, with a counter-based (seeded) dropout mask.

The mask is a pure function of ``(seed, row, column)`` (Philox: one ``tl.randint4x`` round gives
the mask of four neighbouring columns), so it is never stored: the backward regenerates it.
The same seed gives the same output on the same device.
The CPU reference path draws its mask from a ``torch.Generator`` seeded with ``seed``, so it is
deterministic too, but its mask differs from the Triton one.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import (check_float, check_same, col_block, count_launch, custom_op,
                        finish_partials, num_programs, rows_2d, run_op, tl, triton, use_triton)
from ._launch import launch

__all__ = ["bias_dropout_add", "bias_dropout_add_reference"]


def bias_dropout_add_reference(x, bias, residual, p, training, seed, keep=None):
    """Plain torch. ``keep`` (bool, x's shape) overrides the seeded mask (tests)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(ct) + (bias.to(ct) if bias is not None else 0.0)
    if training and p > 0:
        if keep is None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
            keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
        h = torch.where(keep, h / (1.0 - p), 0.0) if p < 1 else torch.zeros_like(h)
    return (residual.to(ct) + h).to(x.dtype)


@triton.jit
def _keep_mask(seed, row, quads_per_row, cb, p, BLOCK: tl.constexpr):
    """(BLOCK // 4, 4) keep mask of columns cb * BLOCK + [0, BLOCK) of ``row``: one Philox
    round per 4 elements (all four outputs of randint4x used); the counter of a quad is
    row * quads_per_row + column // 4, so the mask is a function of (seed, row, column)."""
    QB: tl.constexpr = BLOCK // 4
    q = row * quads_per_row + cb * QB + tl.arange(0, QB)
    r0, r1, r2, r3 = tl.randint4x(seed, q)
    j = tl.arange(0, 4)[None, :]
    r = tl.where(j == 0, r0[:, None], tl.where(j == 1, r1[:, None],
                                                tl.where(j == 2, r2[:, None], r3[:, None])))
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _bda_fwd_kernel(X, B, R, Y, cols, quads_per_row, stride_x, stride_r, p, seed,
                    HAS_B: tl.constexpr, DROP: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (rows, column blocks); a (BLOCK // 4, 4) tile: four columns per Philox round
    row = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    c = cb * BLOCK + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = c < cols
    h = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        h += tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    if DROP:
        keep = _keep_mask(seed, row, quads_per_row, cb, p, BLOCK)
        h = tl.where(keep, h / (1.0 - p), 0.0)
    r = tl.load(R + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * cols + c, (r + h).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bda_bwd_kernel(DY, DX, DBP, rows, cols, quads_per_row, rows_per_prog, stride_dy, p, seed,
                    DROP: tl.constexpr, HAS_DB: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (programs, column blocks); each program walks a range of rows: dx with the
    # regenerated mask, and the bias gradient summed in registers (one float32 partial row per
    # program, finished by one small kernel). DROP=False: only the bias partials (dx is dy).
    pid = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    c = cb * BLOCK + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    cmask = c < cols
    db = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    for i in range(0, rows_per_prog):
        row = pid * rows_per_prog + i
        mask = cmask & (row < rows)
        dx = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
        if DROP:
            keep = _keep_mask(seed, row, quads_per_row, cb, p, BLOCK)  # the forward's mask
            dx = tl.where(keep, dx / (1.0 - p), 0.0)
            tl.store(DX + row * cols + c, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DB:
            db += tl.where(mask, dx, 0.0)
    if HAS_DB:
        tl.store(DBP + pid * cols + c, db, mask=cmask)


# ----------------------------------------------------------------------------- launchers (ops)
def _out_like(x):
    return x.new_empty(x.shape)  # (rows, cols), contiguous


def _block(device, cols):
    return max(16, col_block(device, cols))  # a multiple of 4: whole Philox quads


@custom_op("bias_dropout_add_fwd", lambda x, bias, residual, p, drop, seed: _out_like(x))
def _bda_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float,
             drop: bool, seed: int) -> torch.Tensor:
    # x, residual: (rows, cols) unit column stride; bias: (cols,) -> (rows, cols) contiguous
    rows, cols = x.shape
    y = _out_like(x)
    if y.numel():
        count_launch("bias_dropout_add_fwd")
        block = _block(x.device, cols)
        launch(_bda_fwd_kernel, (rows, triton.cdiv(cols, block)), x,
               bias if bias is not None else x, residual, y, cols, triton.cdiv(cols, 4),
               x.stride(0), residual.stride(0), p, seed, HAS_B=bias is not None, DROP=drop,
               BLOCK=block)
    return y


def _bwd_fake(dy, p, seed, drop, need_db, db_dtype):
    return (_out_like(dy) if drop else dy.new_empty(0),
            dy.new_empty(dy.shape[1], dtype=db_dtype) if need_db else dy.new_empty(0))


@custom_op("bias_dropout_add_bwd", _bwd_fake)
def _bda_bwd(dy: torch.Tensor, p: float, seed: int, drop: bool, need_db: bool,
             db_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # dy: (rows, cols) unit column stride -> dx (rows, cols) contiguous (empty unless drop: it
    # is dy then), dbias (cols,) in db_dtype (empty unless need_db)
    rows, cols = dy.shape
    dx = _out_like(dy) if drop else dy.new_empty(0)
    progs = num_programs(dy.device, rows)
    dbp = (dy.new_empty if dy.numel() else dy.new_zeros)((progs, cols), dtype=torch.float32) \
        if need_db else None
    if dy.numel() and (drop or need_db):
        count_launch("bias_dropout_add_bwd")
        block = _block(dy.device, cols)
        launch(_bda_bwd_kernel, (progs, triton.cdiv(cols, block)), dy, dx if drop else dy,
               dbp if need_db else dy, rows, cols, triton.cdiv(cols, 4), triton.cdiv(rows, progs),
               dy.stride(0), p, seed, DROP=drop, HAS_DB=need_db, BLOCK=block)
    db = finish_partials(dbp, db_dtype) if need_db else dy.new_empty(0)
    return dx, db


class _BiasDropoutAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, p, drop, seed):
        b = bias.contiguous() if bias is not None else None
        ctx.shape, ctx.p, ctx.drop, ctx.seed = x.shape, p, drop, seed
        ctx.bias_dtype = b.dtype if b is not None else None
        y = run_op("bias_dropout_add_fwd", rows_2d(x), b, rows_2d(residual), p, drop, seed)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        dy2 = rows_2d(dy)  # (rows, cols)
        need_db = ctx.bias_dtype is not None and ctx.needs_input_grad[1]
        dx, db = dy2, None
        if ctx.drop or need_db:
            dx, db = run_op("bias_dropout_add_bwd", dy2, ctx.p, ctx.seed, ctx.drop, need_db,
                            ctx.bias_dtype or dy.dtype)
            dx = dx if ctx.drop else dy2
        return dx.reshape(ctx.shape), (db if need_db else None), dy, None, None, None


def bias_dropout_add(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                     p: float, training: bool, seed: int) -> torch.Tensor:
    """``residual + dropout(x + bias, p)`` (no dropout when ``training`` is False or p == 0).

    ``seed`` (int) fixes the mask; use a different seed per layer and per step.
    """
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    check_same("residual", residual, "x", x)
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if bias is not None:
        check_same("bias", bias, "x", x, shape=False)
        if x.dim() == 0 or bias.shape != (x.shape[-1],):
            raise ValueError(f"bias must have shape (x.shape[-1],), got {tuple(bias.shape)}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if not use_triton(x):
        return bias_dropout_add_reference(x, bias, residual, float(p), training, seed)
    p = float(p)
    drop = bool(training) and p > 0.0
    if drop and p == 1.0:  # everything dropped: the scale 1/(1-p) is undefined, the result is not
        return residual + 0.0 * (x + (bias if bias is not None else 0.0))
    return _BiasDropoutAddFn.apply(x, bias, residual, p, drop, seed)
