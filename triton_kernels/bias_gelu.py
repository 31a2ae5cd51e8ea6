"""``gelu(x + bias)`` in one pass (the GPT-2 / BERT MLP after a bias-free matmul), fwd and bwd.

The backward recomputes ``x + bias`` from the saved inputs; dbias is the row sum of dx.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import (check_approximate, check_float, check_same, col_block, count_launch,
                        custom_op, finish_partials, num_programs, rows_2d, run_op, tl, triton,
                        use_triton)
from ._launch import launch
from ._gelu import gelu_and_grad

__all__ = ["bias_gelu", "bias_gelu_reference"]


def bias_gelu_reference(x, bias, approximate="tanh"):
    """Plain torch (float32 math for low-precision inputs)."""
    xf = x if x.dtype == torch.float64 else x.float()
    if bias is not None:
        xf = xf + bias.to(xf.dtype)
    return torch.nn.functional.gelu(xf, approximate=approximate).to(x.dtype)


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, cols, stride_x, stride_y, HAS_B: tl.constexpr,
                          APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (rows, column blocks); the bias is indexed by column, no per-element modulo
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        x += tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    y, _ = gelu_and_grad(x, APPROX_TANH)
    tl.store(Y + row * stride_y + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DBP, rows, cols, rows_per_prog, stride_dy, stride_x,
                          stride_dx, HAS_B: tl.constexpr, HAS_DB: tl.constexpr,
                          APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (programs, column blocks); each program walks a contiguous range of rows and, for
    # the bias gradient, sums its dx column-wise in registers: one (programs, cols) float32
    # partial row per program, finished by one small kernel — dx is never read again.
    pid = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = c < cols
    b = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, rows_per_prog):
        row = pid * rows_per_prog + i
        mask = cmask & (row < rows)
        dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32) + b
        _, dgelu = gelu_and_grad(x, APPROX_TANH)
        dx = dy * dgelu
        tl.store(DX + row * stride_dx + c, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DB:
            db += tl.where(mask, dx, 0.0)
    if HAS_DB:
        tl.store(DBP + pid * cols + c, db, mask=cmask)


def _out_like(x):
    return x.new_empty(x.shape)  # (rows, cols), contiguous


@custom_op("bias_gelu_fwd", lambda x, bias, approx_tanh: _out_like(x))
def _bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approx_tanh: bool
                   ) -> torch.Tensor:
    # x: (rows, cols) unit column stride; bias: (cols,) contiguous -> (rows, cols) contiguous
    rows, cols = x.shape
    y = _out_like(x)
    if y.numel():
        count_launch("bias_gelu_fwd")
        block = col_block(x.device, cols)
        launch(_bias_gelu_fwd_kernel, (rows, triton.cdiv(cols, block)), x,
               bias if bias is not None else x, y, cols, x.stride(0), y.stride(0),
               HAS_B=bias is not None, APPROX_TANH=approx_tanh, BLOCK=block)
    return y


def _bwd_fake(dy, x, bias, approx_tanh, need_db):
    return _out_like(x), (bias.new_empty(bias.shape) if need_db else x.new_empty(0))


@custom_op("bias_gelu_bwd", _bwd_fake)
def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                   approx_tanh: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # -> dx (rows, cols) contiguous, dbias (cols,) in bias' dtype (empty unless need_db)
    rows, cols = x.shape
    dx = _out_like(x)
    need_db = need_db and bias is not None
    progs = num_programs(x.device, rows)
    # every program stores its whole partial row (zeros only when no kernel runs)
    dbp = (x.new_empty if dx.numel() else x.new_zeros)((progs, cols), dtype=torch.float32) \
        if need_db else None
    if dx.numel():
        count_launch("bias_gelu_bwd")
        block = col_block(x.device, cols)
        launch(_bias_gelu_bwd_kernel, (progs, triton.cdiv(cols, block)), dy, x,
               bias if bias is not None else x, dx, dbp if need_db else dx, rows, cols,
               triton.cdiv(rows, progs), dy.stride(0), x.stride(0), dx.stride(0),
               HAS_B=bias is not None, HAS_DB=need_db, APPROX_TANH=approx_tanh, BLOCK=block)
    db = finish_partials(dbp, bias.dtype) if need_db else x.new_empty(0)
    return dx, db


class _BiasGeLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approx_tanh):
        x2 = rows_2d(x)  # (rows, cols)
        b = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(x2, b)
        ctx.shape, ctx.approx_tanh = x.shape, approx_tanh
        return run_op("bias_gelu_fwd", x2, b, approx_tanh).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, b = ctx.saved_tensors
        need_db = b is not None and ctx.needs_input_grad[1]
        dx, db = run_op("bias_gelu_bwd", rows_2d(dy), x2, b, ctx.approx_tanh, need_db)
        return dx.view(ctx.shape), (db if need_db else None), None


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "tanh"
              ) -> torch.Tensor:
    """``gelu(x + bias, approximate)``; ``bias`` is (x.shape[-1],) or None."""
    approx_tanh = check_approximate(approximate)
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    if bias is not None:
        check_same("bias", bias, "x", x, shape=False)
        if x.dim() == 0 or bias.shape != (x.shape[-1],):
            raise ValueError(f"bias must have shape (x.shape[-1],) = "
                             f"({x.shape[-1] if x.dim() else '?'},), got {tuple(bias.shape)}")
    if not use_triton(x):
        return bias_gelu_reference(x, bias, approximate)
    return _BiasGeLUFn.apply(x, bias, approx_tanh)
