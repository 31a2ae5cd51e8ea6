"""``gelu(x + bias)`` in one pass (the GPT-2 / BERT MLP after a bias-free matmul), fwd and bwd.

The backward recomputes ``x + bias`` from the saved inputs; dbias is the row sum of dx.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import (check_approximate, check_float, check_same, count_launch, custom_op,
                        elementwise_block, flat, tl, triton, use_triton)
from ._gelu import gelu_and_grad

__all__ = ["bias_gelu", "bias_gelu_reference"]


def bias_gelu_reference(x, bias, approximate="tanh"):
    """Plain torch (float32 math for low-precision inputs)."""
    xf = x if x.dtype == torch.float64 else x.float()
    if bias is not None:
        xf = xf + bias.to(xf.dtype)
    return torch.nn.functional.gelu(xf, approximate=approximate).to(x.dtype)


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, n, N, HAS_B: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        x += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
    y, _ = gelu_and_grad(x, APPROX_TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, n, N, HAS_B: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        x += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
    _, dgelu = gelu_and_grad(x, APPROX_TANH)
    tl.store(DX + offs, (dy * dgelu).to(DX.dtype.element_ty), mask=mask)


@custom_op("bias_gelu_fwd", lambda x, bias, approx_tanh: torch.empty_like(x))
def _bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approx_tanh: bool
                   ) -> torch.Tensor:
    # x: (n,) contiguous, row-major over (..., N); bias: (N,)
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        count_launch("bias_gelu_fwd")
        block = elementwise_block(x.device)
        b = bias if bias is not None else x
        _bias_gelu_fwd_kernel[(triton.cdiv(n, block),)](
            x, b, y, n, b.numel(), HAS_B=bias is not None, APPROX_TANH=approx_tanh, BLOCK=block)
    return y


@custom_op("bias_gelu_bwd", lambda dy, x, bias, approx_tanh: torch.empty_like(x))
def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                   approx_tanh: bool) -> torch.Tensor:
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        count_launch("bias_gelu_bwd")
        block = elementwise_block(x.device)
        b = bias if bias is not None else x
        _bias_gelu_bwd_kernel[(triton.cdiv(n, block),)](
            dy, x, b, dx, n, b.numel(), HAS_B=bias is not None, APPROX_TANH=approx_tanh,
            BLOCK=block)
    return dx


class _BiasGeLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approx_tanh):
        xf = flat(x)  # (n,), row-major over (..., N)
        b = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(xf, b)
        ctx.shape, ctx.approx_tanh = x.shape, approx_tanh
        return torch.ops.ichiban_tk.bias_gelu_fwd(xf, b, approx_tanh).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        xf, b = ctx.saved_tensors
        dx = torch.ops.ichiban_tk.bias_gelu_bwd(flat(dy), xf, b, ctx.approx_tanh)
        db = None
        if b is not None and ctx.needs_input_grad[1]:
            # (rows, N) summed over rows in float32, then back to the bias dtype
            db = dx.view(-1, b.numel()).sum(0, dtype=torch.float32).to(b.dtype)
        return dx.view(ctx.shape), db, None


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "tanh"
              ) -> torch.Tensor:
    """``gelu(x + bias, approximate)``; ``bias`` is (x.shape[-1],) or None."""
    approx_tanh = check_approximate(approximate)
    check_float("x", x)
    if bias is not None:
        check_same("bias", bias, "x", x, shape=False)
        if x.dim() == 0 or bias.shape != (x.shape[-1],):
            raise ValueError(f"bias must have shape (x.shape[-1],) = "
                             f"({x.shape[-1] if x.dim() else '?'},), got {tuple(bias.shape)}")
    if not use_triton(x):
        return bias_gelu_reference(x, bias, approximate)
    return _BiasGeLUFn.apply(x, bias, approx_tanh)
