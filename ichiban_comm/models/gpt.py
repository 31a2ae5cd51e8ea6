"""A small GPT-style language model: pre-norm blocks, RMSNorm, rotary attention, SwiGLU MLP.

Its compute around the matmuls (norms, the gated activation, rotary
embeddings, the loss) goes through an ``ops`` table, so that the fused kernels
drop in without touching the model: ``GPT(cfg, ops=FUSED_OPS)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256   # byte-level tokens
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = ratio * d_model, rounded up to a multiple of 32
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def d_mlp(self) -> int:
        return 32 * math.ceil(self.mlp_ratio * self.d_model / 32)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PlainOps:
    """Plain-torch versions of the ops the fused kernels replace."""

    name = "plain torch"

    @staticmethod
    def rms_norm(x, weight, eps):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight

    @staticmethod
    def swiglu(gate, up):
        return F.silu(gate) * up

    @staticmethod
    def rope(q, k, cos, sin):
        # q, k: (B, nh, T, hs); cos, sin: (T, hs)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @staticmethod
    def linear_cross_entropy(hidden, weight, target):
        # hidden: (N, d), weight: (V, d), target: (N,)
        return F.cross_entropy(hidden @ weight.t(), target)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, ops):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ops = ops

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        # chunk/-1 rather than C and n_head: under tensor parallelism qkv holds this rank's heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # (B, T, nh * hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.ops.rope(q, k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, ops):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_mlp, bias=False)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.ops = ops

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.ops.swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, ops):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.attn = Attention(cfg, ops)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, ops=PlainOps):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        if (cfg.d_model // cfg.n_head) % 2:
            raise ValueError(f"head size d_model/n_head={cfg.d_model // cfg.n_head} must be even "
                             "for rotary embeddings")
        self.cfg = cfg
        self.ops = ops
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, ops) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        hs = cfg.d_model // cfg.n_head
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, hs, 2).float() / hs)
        freqs = torch.outer(torch.arange(cfg.seq_len).float(), inv_freq)  # (T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)                             # (T, hs)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # scaled init of residual projections
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def hidden(self, idx):
        """Final normed hidden states (B, T, C) of token ids idx (B, T)."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than seq_len={self.cfg.seq_len}")
        x = self.embed(idx)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, idx, targets=None):
        h = self.hidden(idx)
        if targets is None:
            return self.lm_head(h)
        if hasattr(self.lm_head, "loss"):  # a vocabulary-parallel head computes its own loss
            return self.lm_head.loss(h.reshape(-1, h.size(-1)), targets.reshape(-1))
        # The loss never needs the full (B*T, V) logits: the ops decide how to chunk.
        return self.ops.linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight,
                                             targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
