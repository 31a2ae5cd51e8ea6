"""SwiGLU gate: ``silu(gate) * up`` (the Llama-family MLP activation), forward and backward.

``gate`` and ``up`` are read through their row strides, so the two halves of a fused
``gate_up`` projection (``gate_up(x).chunk(2, -1)``) are used in place, without a copy. The
backward recomputes ``silu(gate)`` from the saved inputs instead of storing it.
"""

from __future__ import annotations

import torch

from ._dispatch import (check_float, check_same, col_block, count_launch, custom_op, rows_2d,
                        run_op, tl, triton, use_triton)
from ._launch import launch

__all__ = ["swiglu", "swiglu_reference"]


def swiglu_reference(gate, up):
    """Plain torch (float32 math for low-precision inputs)."""
    g = gate if gate.dtype == torch.float64 else gate.float()
    return (torch.nn.functional.silu(g) * up.to(g.dtype)).to(gate.dtype)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, cols, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
    # grid: (rows, column blocks)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    g = tl.load(G + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + c, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, cols, stride_dy, stride_g, stride_u, stride_d,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    # d silu / dg = s * (1 + g * (1 - s))
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row * stride_d + c, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_d + c, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


def _out_like(x):
    return x.new_empty(x.shape)  # (rows, cols), contiguous


@custom_op("swiglu_fwd", lambda gate, up: _out_like(gate))
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate, up: (rows, cols) with unit column stride, any row stride -> (rows, cols) contiguous
    rows, cols = gate.shape
    y = _out_like(gate)
    if y.numel():
        count_launch("swiglu_fwd")
        block = col_block(gate.device, cols)
        launch(_swiglu_fwd_kernel, (rows, triton.cdiv(cols, block)), gate, up, y, cols,
               gate.stride(0), up.stride(0), y.stride(0), BLOCK=block)
    return y


@custom_op("swiglu_bwd", lambda dy, gate, up: (_out_like(gate), _out_like(up)))
def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = gate.shape
    dg, du = _out_like(gate), _out_like(up)
    if dg.numel():
        count_launch("swiglu_bwd")
        block = col_block(gate.device, cols)
        launch(_swiglu_bwd_kernel, (rows, triton.cdiv(cols, block)), dy, gate, up, dg, du, cols,
               dy.stride(0), gate.stride(0), up.stride(0), dg.stride(0), BLOCK=block)
    return dg, du


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = rows_2d(gate), rows_2d(up)  # (rows, cols), views when the rows are strided
        ctx.save_for_backward(g, u)
        ctx.shape = gate.shape
        return run_op("swiglu_fwd", g, u).view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = run_op("swiglu_bwd", rows_2d(dy), g, u)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise; ``gate`` and ``up`` have the same shape and dtype."""
    check_float("gate", gate)
    check_same("up", up, "gate", gate)
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if gate.dim() == 0:
        raise ValueError("gate must have at least one dimension, got a scalar")
    if not use_triton(gate):
        return swiglu_reference(gate, up)
    return _SwiGLUFn.apply(gate, up)
