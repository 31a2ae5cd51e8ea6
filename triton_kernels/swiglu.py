"""SwiGLU gate: ``silu(gate) * up`` (the Llama-family MLP activation), forward and backward.

The backward recomputes ``silu(gate)`` from the saved inputs instead of storing it.
"""

from __future__ import annotations

import torch

from ._dispatch import (check_float, check_same, count_launch, custom_op, elementwise_block, flat,
                        tl, triton, use_triton)

__all__ = ["swiglu", "swiglu_reference"]


def swiglu_reference(gate, up):
    """Plain torch (float32 math for low-precision inputs)."""
    g = gate if gate.dtype == torch.float64 else gate.float()
    return (torch.nn.functional.silu(g) * up.to(g.dtype)).to(gate.dtype)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    # d silu / dg = s * (1 + g * (1 - s))
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


@custom_op("swiglu_fwd", lambda gate, up: torch.empty_like(gate))
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate, up: (n,) contiguous
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        count_launch("swiglu_fwd")
        block = elementwise_block(gate.device)
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block)
    return y


@custom_op("swiglu_bwd", lambda dy, gate, up: (torch.empty_like(gate), torch.empty_like(up)))
def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        count_launch("swiglu_bwd")
        block = elementwise_block(gate.device)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, gate, up, dg, du, n, BLOCK=block)
    return dg, du


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = flat(gate), flat(up)  # (n,)
        ctx.save_for_backward(g, u)
        ctx.shape = gate.shape
        return torch.ops.ichiban_tk.swiglu_fwd(g, u).view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.ops.ichiban_tk.swiglu_bwd(flat(dy), g, u)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise; ``gate`` and ``up`` have the same shape and dtype."""
    check_float("gate", gate)
    check_same("up", up, "gate", gate)
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if not use_triton(gate):
        return swiglu_reference(gate, up)
    return _SwiGLUFn.apply(gate, up)
