"""Fused Triton kernels, installed as ``ichiban_comm.triton_kernels``.

One op per file (reference, Triton kernels, launcher, autograd Function, torch.library op).
CUDA tensors run the Triton kernels; CPU tensors run the plain-torch reference, or the Triton
kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` (see ``_dispatch``).
``cross_entropy`` and ``fused_linear_cross_entropy`` take ``group=`` for a vocabulary split
across a tensor-parallel group. Importing this package needs no GPU and no driver.
"""

from ._dispatch import HAS_TRITON, launch_counts, reset_launch_counts, use_triton
from .bias_dropout_add import bias_dropout_add
from .bias_gelu import bias_gelu
from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .geglu import geglu
from .layer_norm import layer_norm
from .ops_table import FusedOps
from .modules import FusedBiasGeLUMLP, FusedGatedMLP, FusedGateUpMLP, LayerNorm, RMSNorm
from .patch import causal_lm_loss, patch_model, unpatch_rotary
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = [
    "rms_norm", "layer_norm", "swiglu", "geglu", "rope", "bias_gelu", "bias_dropout_add",
    "cross_entropy", "fused_linear_cross_entropy",
    "RMSNorm", "LayerNorm", "FusedGatedMLP", "FusedGateUpMLP", "FusedBiasGeLUMLP", "patch_model",
    "unpatch_rotary",
    "causal_lm_loss", "FusedOps",
    "HAS_TRITON", "use_triton", "launch_counts", "reset_launch_counts",
]
