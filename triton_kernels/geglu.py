"""GeGLU gate: ``gelu(gate) * up`` (tanh approximation or exact erf), forward and backward.

Same layout as ``swiglu``: row-strided ``gate``/``up`` (halves of a fused projection) are read
in place; the backward recomputes the GELU from the saved inputs.
"""

from __future__ import annotations

import torch

from ._dispatch import (check_approximate, check_float, check_same, col_block, count_launch,
                        custom_op, rows_2d, run_op, tl, triton, use_triton)
from ._launch import launch
from ._gelu import gelu_and_grad

__all__ = ["geglu", "geglu_reference"]


def geglu_reference(gate, up, approximate="tanh"):
    """Plain torch (float32 math for low-precision inputs)."""
    g = gate if gate.dtype == torch.float64 else gate.float()
    y = torch.nn.functional.gelu(g, approximate=approximate) * up.to(g.dtype)
    return y.to(gate.dtype)


@triton.jit
def _geglu_fwd_kernel(G, U, Y, cols, stride_g, stride_u, stride_y, APPROX_TANH: tl.constexpr,
                      BLOCK: tl.constexpr):
    # grid: (rows, column blocks)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    g = tl.load(G + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    a, _ = gelu_and_grad(g, APPROX_TANH)
    tl.store(Y + row * stride_y + c, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, G, U, DG, DU, cols, stride_dy, stride_g, stride_u, stride_d,
                      APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    a, da = gelu_and_grad(g, APPROX_TANH)
    tl.store(DG + row * stride_d + c, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_d + c, (dy * a).to(DU.dtype.element_ty), mask=mask)


def _out_like(x):
    return x.new_empty(x.shape)  # (rows, cols), contiguous


@custom_op("geglu_fwd", lambda gate, up, approx_tanh: _out_like(gate))
def _geglu_fwd(gate: torch.Tensor, up: torch.Tensor, approx_tanh: bool) -> torch.Tensor:
    # gate, up: (rows, cols) with unit column stride, any row stride -> (rows, cols) contiguous
    rows, cols = gate.shape
    y = _out_like(gate)
    if y.numel():
        count_launch("geglu_fwd")
        block = col_block(gate.device, cols)
        launch(_geglu_fwd_kernel, (rows, triton.cdiv(cols, block)), gate, up, y, cols,
               gate.stride(0), up.stride(0), y.stride(0), APPROX_TANH=approx_tanh, BLOCK=block)
    return y


@custom_op("geglu_bwd",
           lambda dy, gate, up, approx_tanh: (_out_like(gate), _out_like(up)))
def _geglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approx_tanh: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = gate.shape
    dg, du = _out_like(gate), _out_like(up)
    if dg.numel():
        count_launch("geglu_bwd")
        block = col_block(gate.device, cols)
        launch(_geglu_bwd_kernel, (rows, triton.cdiv(cols, block)), dy, gate, up, dg, du, cols,
               dy.stride(0), gate.stride(0), up.stride(0), dg.stride(0), APPROX_TANH=approx_tanh,
               BLOCK=block)
    return dg, du


class _GeGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, approx_tanh):
        g, u = rows_2d(gate), rows_2d(up)  # (rows, cols), views when the rows are strided
        ctx.save_for_backward(g, u)
        ctx.shape, ctx.approx_tanh = gate.shape, approx_tanh
        return run_op("geglu_fwd", g, u, approx_tanh).view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = run_op("geglu_bwd", rows_2d(dy), g, u, ctx.approx_tanh)
        return dg.view(ctx.shape), du.view(ctx.shape), None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` elementwise; same shape and dtype for both."""
    approx_tanh = check_approximate(approximate)
    check_float("gate", gate)
    check_same("up", up, "gate", gate)
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if gate.dim() == 0:
        raise ValueError("gate must have at least one dimension, got a scalar")
    if not use_triton(gate):
        return geglu_reference(gate, up, approximate)
    return _GeGLUFn.apply(gate, up, approx_tanh)
