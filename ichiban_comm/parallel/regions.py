"""Communication regions of tensor and sequence parallelism as autograd Functions.

Each Function pairs a forward collective with its adjoint in backward, over an explicit
``group``: reduce (all-reduce / identity), copy (identity / all-reduce), gather along the
sequence (all-gather / reduce-scatter), scatter along the sequence (slice / all-gather),
reduce-scatter along the sequence (reduce-scatter / all-gather). With one rank in the group
every helper returns its input untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["SEQ_DIM", "gather_sequence", "gather_sequence_replicated_grad", "scatter_sequence",
           "reduce_scatter_sequence", "reduce_from_group", "copy_to_group",
           "mark_sequence_parallel", "sequence_parallel_norm"]

SEQ_DIM = 1  # (B, T, C) activations, as transformers and the project's GPT lay them out


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)



# ---- collectives as autograd Functions -----------------------------------------------------

class _ReduceFn(torch.autograd.Function):
    """All-reduce forward (the partial sums of a row-parallel layer), identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyFn(torch.autograd.Function):
    """Identity forward, all-reduce backward: a replicated input feeding split weights."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _all_gather_dim(x, dim, group):
    n = _size(group)
    xt = x.movedim(dim, 0).contiguous()  # (T/tp, ...)
    out = xt.new_empty((n * xt.shape[0],) + tuple(xt.shape[1:]))
    dist.all_gather_single(out, xt, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x, dim, group):
    n = _size(group)
    xt = x.movedim(dim, 0).contiguous()  # (T, ...)
    if xt.shape[0] % n:
        raise ValueError(f"sequence parallel: the sequence length {xt.shape[0]} (dim {dim}) is "
                         f"not divisible by tp={n}; pad the sequence to a multiple of {n}")
    out = xt.new_empty((xt.shape[0] // n,) + tuple(xt.shape[1:]))
    dist.reduce_scatter_single(out, xt, group=group)
    return out.movedim(0, dim)


def _slice_dim(x, dim, group):
    n, r = _size(group), _rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"sequence parallel: the sequence length {x.shape[dim]} (dim {dim}) is "
                         f"not divisible by tp={n}; pad the sequence to a multiple of {n}")
    return x.chunk(n, dim=dim)[r].contiguous()


class _GatherSeqFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim(g, ctx.dim, ctx.group), None, None


class _ReduceScatterSeqFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim(g, ctx.dim, ctx.group), None, None


class _ScatterSeqFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _slice_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim(g, ctx.dim, ctx.group), None, None


class _GatherSeqSliceGradFn(torch.autograd.Function):
    """All-gather forward; backward keeps this rank's slice of a gradient that is already the
    same summed whole on every rank (what a vocabulary-parallel head hands back)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _slice_dim(g, ctx.dim, ctx.group), None, None


def gather_sequence_replicated_grad(x, group, dim: int = SEQ_DIM):
    """Like :func:`gather_sequence`, for a consumer whose input gradient is already summed
    over the group (the vocabulary-parallel head): backward slices instead of reduce-scattering."""
    return x if _size(group) == 1 else _GatherSeqSliceGradFn.apply(x, group, dim)


def gather_sequence(x, group, dim: int = SEQ_DIM):
    """This rank's slice of the sequence -> the whole sequence (reduce-scatter backward)."""
    return x if _size(group) == 1 else _GatherSeqFn.apply(x, group, dim)


def scatter_sequence(x, group, dim: int = SEQ_DIM):
    """The whole (replicated) sequence -> this rank's slice (all-gather backward)."""
    return x if _size(group) == 1 else _ScatterSeqFn.apply(x, group, dim)


def reduce_scatter_sequence(x, group, dim: int = SEQ_DIM):
    """Partial sums of the whole sequence -> the summed slice of this rank (all-gather bwd)."""
    return x if _size(group) == 1 else _ReduceScatterSeqFn.apply(x, group, dim)


def reduce_from_group(x, group):
    return x if _size(group) == 1 else _ReduceFn.apply(x, group)


def copy_to_group(x, group):
    return x if _size(group) == 1 else _CopyFn.apply(x, group)


def _sum_grad_over(group):
    def hook(g):
        g = g.clone()
        dist.all_reduce(g, group=group)
        return g
    return hook


def mark_sequence_parallel(p: nn.Parameter, group) -> None:
    """A parameter whole on every rank whose gradient is computed from this rank's slice of the
    sequence: its gradient is summed over ``group`` as backward produces it."""
    if getattr(p, "sequence_parallel", False) or _size(group) == 1:
        return
    p.sequence_parallel = True
    p.register_hook(_sum_grad_over(group))


def sequence_parallel_norm(norm: nn.Module, group, dim: int = SEQ_DIM) -> nn.Module:
    """Make ``norm`` (any module normalising the last dim) run on this rank's slice of the
    sequence and return the whole sequence: forward all-gather, backward reduce-scatter.
    Its parameters' gradients are summed over the group."""
    if _size(group) == 1:
        return norm
    for p in norm.parameters():
        mark_sequence_parallel(p, group)
    norm.register_forward_hook(lambda m, inp, out: gather_sequence(out, group, dim))
    return norm
