"""``residual + dropout(x + bias, p)`` in one pass, with a counter-based (seeded) dropout mask.

The mask is a pure function of ``(seed, element index)`` (Philox via ``tl.rand``), so it is never
stored: the backward regenerates it. The same seed gives the same output on the same device.
The CPU reference path draws its mask from a ``torch.Generator`` seeded with ``seed``, so it is
deterministic too, but its mask differs from the Triton one.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import (check_float, check_same, col_block, count_launch, custom_op, rows_2d,
                        run_op, tl, triton, use_triton)

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
def _bda_fwd_kernel(X, B, R, Y, cols, stride_x, stride_r, p, seed, HAS_B: tl.constexpr,
                    DROP: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (rows, column blocks); Y is contiguous, so its offset is the flat element index
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    idx = row * cols + c  # the mask's counter: a function of the element, not of the layout
    h = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        h += tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    if DROP:
        keep = tl.rand(seed, idx) >= p
        h = tl.where(keep, h / (1.0 - p), 0.0)
    r = tl.load(R + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + idx, (r + h).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bda_bwd_kernel(DY, DX, cols, stride_dy, p, seed, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    idx = row * cols + c
    dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
    keep = tl.rand(seed, idx) >= p  # the forward's mask, regenerated from (seed, index)
    tl.store(DX + idx, tl.where(keep, dy / (1.0 - p), 0.0).to(DX.dtype.element_ty), mask=mask)


def _out_like(x):
    return x.new_empty(x.shape)  # (rows, cols), contiguous


@custom_op("bias_dropout_add_fwd", lambda x, bias, residual, p, drop, seed: _out_like(x))
def _bda_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float,
             drop: bool, seed: int) -> torch.Tensor:
    # x, residual: (rows, cols) unit column stride; bias: (cols,) -> (rows, cols) contiguous
    rows, cols = x.shape
    y = _out_like(x)
    if y.numel():
        count_launch("bias_dropout_add_fwd")
        block = col_block(x.device, cols)
        _bda_fwd_kernel[(rows, triton.cdiv(cols, block))](
            x, bias if bias is not None else x, residual, y, cols, x.stride(0),
            residual.stride(0), p, seed, HAS_B=bias is not None, DROP=drop, BLOCK=block)
    return y


@custom_op("bias_dropout_add_bwd", lambda dy, p, seed: _out_like(dy))
def _bda_bwd(dy: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    # dy: (rows, cols) unit column stride -> dx (rows, cols) contiguous
    rows, cols = dy.shape
    dx = _out_like(dy)
    if dx.numel():
        count_launch("bias_dropout_add_bwd")
        block = col_block(dy.device, cols)
        _bda_bwd_kernel[(rows, triton.cdiv(cols, block))](dy, dx, cols, dy.stride(0), p, seed,
                                                          BLOCK=block)
    return dx


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
        dx = run_op("bias_dropout_add_bwd", dy2, ctx.p, ctx.seed) if ctx.drop \
            else dy2
        db = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            db = dx.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx.reshape(ctx.shape), db, dy, None, None, None


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
