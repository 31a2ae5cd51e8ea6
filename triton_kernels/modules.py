"""Thin ``nn.Module`` wrappers over the fused ops (state-dict compatible with torch / transformers).

``RMSNorm``: parameter ``weight`` (like ``torch.nn.RMSNorm`` and transformers' ``*RMSNorm``).
``LayerNorm``: parameters ``weight`` and ``bias`` (like ``torch.nn.LayerNorm``).
Both accept ``residual=`` in ``forward`` and then return ``(normed, x + residual)``.
Output dtype is the input's (transformers' Llama RMSNorm returns ``weight.dtype`` when the weight
is wider than the input; here the input dtype wins).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .bias_gelu import bias_gelu
from .geglu import geglu
from .layer_norm import layer_norm
from .rms_norm import rms_norm
from .swiglu import swiglu

__all__ = ["RMSNorm", "LayerNorm", "FusedGatedMLP", "FusedGateUpMLP", "FusedBiasGeLUMLP"]


class RMSNorm(nn.Module):
    """``offset=1.0``: the Gemma form ``(1 + weight) * x / rms(x)`` (weight initialised to 0)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None,
                 offset: float = 0.0):
        super().__init__()
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.eps = eps
        self.offset = float(offset)

    @property
    def variance_epsilon(self) -> float:  # the attribute name transformers' norms use
        return self.eps

    @classmethod
    def from_module(cls, norm: nn.Module, offset: float = 0.0) -> "RMSNorm":
        """Wrap an existing RMSNorm, sharing its weight Parameter (optimizers stay valid)."""
        eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            eps = getattr(norm, "eps", None)
        if eps is None:  # torch.nn.RMSNorm(eps=None) means the dtype's machine epsilon
            eps = torch.finfo(norm.weight.dtype).eps
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = norm.weight
        new.eps = float(eps)
        new.offset = float(offset)
        return new

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return rms_norm(x, self.weight, self.eps, residual, self.offset)

    def extra_repr(self) -> str:
        off = f", offset={self.offset}" if self.offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.eps}{off}"


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(hidden_size, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(hidden_size, **kw)) \
            if (elementwise_affine and bias) else None
        self.eps = eps
        self.normalized_shape = (hidden_size,)

    @classmethod
    def from_module(cls, norm: nn.LayerNorm) -> "LayerNorm":
        """Wrap an ``nn.LayerNorm`` over one dim, sharing its Parameters."""
        if len(norm.normalized_shape) != 1:
            raise ValueError("LayerNorm.from_module supports normalisation over the last dim "
                             f"only, got normalized_shape={norm.normalized_shape}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight, new.bias = norm.weight, norm.bias
        new.eps, new.normalized_shape = float(norm.eps), tuple(norm.normalized_shape)
        return new

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class FusedGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the gate fused (SwiGLU, or GeGLU when
    ``approximate`` is given); reuses the original projections, so the state dict is unchanged."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 approximate: Optional[str] = None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        a = swiglu(g, u) if self.approximate is None else geglu(g, u, self.approximate)
        return self.down_proj(a)


class FusedGateUpMLP(nn.Module):
    """``down(act(gate) * up)`` with ``gate, up = gate_up(x).chunk(2, -1)`` (Phi-3 layout): the
    two halves are read in place by the fused kernel (row strides), no copy."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module,
                 approximate: Optional[str] = None):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        a = swiglu(g, u) if self.approximate is None else geglu(g, u, self.approximate)
        return self.down_proj(a)


class FusedBiasGeLUMLP(nn.Module):
    """GPT-2 style MLP (transformers ``Conv1D`` layers, weight ``(in, out)``): the first bias add
    is fused into the GELU. Reuses the original layers; the state dict is unchanged."""

    def __init__(self, c_fc: nn.Module, c_proj: nn.Module, dropout: nn.Module,
                 approximate: str = "tanh"):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = c_fc, c_proj, dropout
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.c_fc.weight  # (..., in) @ (in, inner) -> (..., inner), bias added below
        h = bias_gelu(h, self.c_fc.bias, self.approximate)
        return self.dropout(self.c_proj(h))
