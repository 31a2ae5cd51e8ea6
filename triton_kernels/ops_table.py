"""``FusedOps``: the fused kernels as an ops table (static methods), for models that route the
compute around their matmuls through one, e.g. ``GPT(cfg, ops=FusedOps)`` in the main job.

Every entry dispatches like the functions it wraps: Triton on CUDA tensors, the plain-torch
reference on the CPU (Triton's interpreter with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = ["FusedOps"]


class FusedOps:
    name = "fused (ichiban_comm.triton_kernels)"

    @staticmethod
    def rms_norm(x, weight, eps):
        # x: (..., d), weight: (d,)
        return rms_norm(x, weight, eps)

    @staticmethod
    def swiglu(gate, up):
        return swiglu(gate, up)

    @staticmethod
    def rope(q, k, cos, sin):
        # q, k: (B, nh, T, hs); cos, sin: (T, hs) or (B, T, hs)
        return rope(q, k, cos, sin)

    @staticmethod
    def linear_cross_entropy(hidden, weight, target, group=None):
        # hidden: (N, d), weight: (V, d) or this rank's (V/tp, d) with group, target: (N,)
        return fused_linear_cross_entropy(hidden, weight, target, group=group)
