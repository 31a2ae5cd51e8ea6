"""GeGLU gate: ``gelu(gate) * up`` (tanh approximation or exact erf), forward and backward."""

from __future__ import annotations

import torch

from ._dispatch import (check_approximate, check_float, check_same, count_launch, custom_op,
                        elementwise_block, flat, tl, triton, use_triton)
from ._gelu import gelu_and_grad

__all__ = ["geglu", "geglu_reference"]


def geglu_reference(gate, up, approximate="tanh"):
    """Plain torch (float32 math for low-precision inputs)."""
    g = gate if gate.dtype == torch.float64 else gate.float()
    y = torch.nn.functional.gelu(g, approximate=approximate) * up.to(g.dtype)
    return y.to(gate.dtype)


@triton.jit
def _geglu_fwd_kernel(G, U, Y, n, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = gelu_and_grad(g, APPROX_TANH)
    tl.store(Y + offs, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, G, U, DG, DU, n, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = gelu_and_grad(g, APPROX_TANH)
    tl.store(DG + offs, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * a).to(DU.dtype.element_ty), mask=mask)


@custom_op("geglu_fwd", lambda gate, up, approx_tanh: torch.empty_like(gate))
def _geglu_fwd(gate: torch.Tensor, up: torch.Tensor, approx_tanh: bool) -> torch.Tensor:
    # gate, up: (n,) contiguous
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        count_launch("geglu_fwd")
        block = elementwise_block(gate.device)
        _geglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, y, n, APPROX_TANH=approx_tanh,
                                                     BLOCK=block)
    return y


@custom_op("geglu_bwd",
           lambda dy, gate, up, approx_tanh: (torch.empty_like(gate), torch.empty_like(up)))
def _geglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approx_tanh: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        count_launch("geglu_bwd")
        block = elementwise_block(gate.device)
        _geglu_bwd_kernel[(triton.cdiv(n, block),)](dy, gate, up, dg, du, n,
                                                     APPROX_TANH=approx_tanh, BLOCK=block)
    return dg, du


class _GeGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, approx_tanh):
        g, u = flat(gate), flat(up)  # (n,)
        ctx.save_for_backward(g, u)
        ctx.shape, ctx.approx_tanh = gate.shape, approx_tanh
        return torch.ops.ichiban_tk.geglu_fwd(g, u, approx_tanh).view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.ops.ichiban_tk.geglu_bwd(flat(dy), g, u, ctx.approx_tanh)
        return dg.view(ctx.shape), du.view(ctx.shape), None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` elementwise; same shape and dtype for both."""
    approx_tanh = check_approximate(approximate)
    check_float("gate", gate)
    check_same("up", up, "gate", gate)
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if not use_triton(gate):
        return geglu_reference(gate, up, approximate)
    return _GeGLUFn.apply(gate, up, approx_tanh)
