"""Tensor-parallel layers on plain tensors: each is a module over an explicit ``group`` whose
collectives are autograd Functions (no DTensor, no per-op dispatch).

* :class:`ColumnParallelLinear` — output features split: ``y_r = x W_r^T + b_r``. Its backward
  issues the all-reduce of ``dx`` asynchronously and computes ``dW`` while it runs.
* :class:`RowParallelLinear` — input features split: ``y = sum_r x_r W_r^T + b`` (all-reduce;
  reduce-scatter along the sequence when sequence parallel).
* :class:`VocabParallelEmbedding` — rows of the table split by vocabulary.
* :class:`ParallelLMHead` — the output head split by vocabulary; ``loss()`` is the
  vocabulary-parallel ``fused_linear_cross_entropy(..., group=)``: the ``(tokens, vocab)``
  logits never exist, only per-row statistics cross the group.
* Sequence parallel regions: :func:`gather_sequence` (all-gather forward, reduce-scatter
  backward), :func:`scatter_sequence` (slice forward, all-gather backward) and
  :func:`reduce_scatter_sequence`; :func:`sequence_parallel_norm` hooks a norm so it runs on
  this rank's slice of the sequence and hands the full sequence on.

Every split parameter carries ``param.tp_shard`` (a :class:`ShardSpec`) that says how the full
tensor maps to this rank's piece, so checkpoints, gradient checks and ``load_state_dict`` of a
full (unsplit) state dict all slice and gather the same way. Parameters that every tensor
rank holds whole but whose gradients come from a slice of the sequence carry
``param.sequence_parallel = True``; their gradients are summed over the group by a hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShardSpec", "vocab_spec", "copy_to_group", "ColumnParallelLinear",
           "RowParallelLinear", "VocabParallelEmbedding",
           "ParallelLMHead", "gather_sequence", "gather_sequence_replicated_grad",
           "scatter_sequence", "reduce_scatter_sequence",
           "reduce_from_group", "sequence_parallel_norm", "gather_full", "SEQ_DIM"]

from .regions import (SEQ_DIM, _all_gather_dim, _rank, _size, copy_to_group,  # noqa: F401
                      gather_sequence, gather_sequence_replicated_grad, mark_sequence_parallel,
                      reduce_from_group, reduce_scatter_sequence, scatter_sequence,
                      sequence_parallel_norm)


# ---- how a full tensor maps to this rank's piece -----------------------------------------

@dataclass(frozen=True)
class ShardSpec:
    """The full tensor is ``parts`` equal segments along ``dim`` (1, or 3 for a fused q|k|v);
    each segment is cut into ``tp`` equal chunks and rank r holds chunk r of every segment,
    concatenated. ``full_shape`` is the unsplit shape.

    ``padded`` (a vocabulary that ``tp`` does not divide; ``parts == 1``): every rank's piece
    has ``padded`` rows along ``dim``. Its first :attr:`real` rows are rows ``[start, start +
    real)`` of the full tensor in ``torch.chunk``'s layout (chunks of ``ceil(n / tp)``, the
    last ranks shorter, as DTensor's ``Shard`` cuts it); the rest are zeros that nothing reads.
    """

    dim: int
    parts: int
    tp: int
    rank: int
    full_shape: tuple
    padded: int = 0

    @property
    def _chunk(self) -> int:
        return -(-self.full_shape[self.dim] // self.tp)

    def real_of(self, rank: int) -> int:
        """Rows of the full tensor that ``rank`` holds along ``dim``."""
        n = self.full_shape[self.dim]
        if not self.padded:
            return n // self.tp
        return max(0, min(self._chunk, n - rank * self._chunk))

    @property
    def real(self) -> int:
        return self.real_of(self.rank)

    @property
    def start(self) -> int:
        """This rank's first row of the full tensor along ``dim`` (parts == 1)."""
        step = self._chunk if self.padded else self.full_shape[self.dim] // self.tp
        return min(self.rank * step, self.full_shape[self.dim])

    def local(self, full: torch.Tensor) -> torch.Tensor:
        if tuple(full.shape) != tuple(self.full_shape):
            raise ValueError(f"expected the full tensor of shape {tuple(self.full_shape)}, got "
                             f"{tuple(full.shape)}")
        if self.padded:
            piece = full.narrow(self.dim, self.start, self.real)
            pad = list(piece.shape)
            pad[self.dim] = self.padded - self.real
            return torch.cat([piece, piece.new_zeros(pad)], dim=self.dim)
        segs = full.chunk(self.parts, dim=self.dim)
        return torch.cat([s.chunk(self.tp, dim=self.dim)[self.rank] for s in segs], dim=self.dim)

    def full(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, in rank order."""
        if self.padded:
            return torch.cat([p.narrow(self.dim, 0, self.real_of(r))
                              for r, p in enumerate(pieces)], dim=self.dim)
        per = [p.chunk(self.parts, dim=self.dim) for p in pieces]
        return torch.cat([per[r][s] for s in range(self.parts) for r in range(self.tp)],
                         dim=self.dim)

    def trim(self, t: torch.Tensor) -> torch.Tensor:
        """The real rows of a tensor shaped like this rank's piece (a view)."""
        return t.narrow(self.dim, 0, self.real) if self.padded else t

    @property
    def local_shape(self) -> tuple:
        s = list(self.full_shape)
        s[self.dim] = self.padded or s[self.dim] // self.tp
        return tuple(s)


def vocab_spec(vocab: int, width: int, tp: int, rank: int,
               make_vocab_size_divisible_by: int = 1) -> ShardSpec:
    """The ShardSpec of a (vocab, width) table split by vocabulary over ``tp`` ranks.

    A vocabulary that ``tp`` divides is split evenly (no padding) unless
    ``make_vocab_size_divisible_by`` asks for more; otherwise it is padded, Megatron-style, to
    the next multiple of ``make_vocab_size_divisible_by * tp`` (each rank holds 1/tp of that).
    Every rank must keep at least one real row."""
    m = make_vocab_size_divisible_by
    if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
        raise ValueError(f"make_vocab_size_divisible_by must be a positive int, got {m!r}")
    if not (isinstance(vocab, int) and vocab >= 1):
        raise ValueError(f"the vocabulary size must be a positive int, got {vocab!r}")
    unit = m * tp
    total = -(-vocab // unit) * unit
    if total == vocab:
        return ShardSpec(0, 1, tp, rank, (vocab, width))
    chunk = -(-vocab // tp)
    if (tp - 1) * chunk >= vocab:
        raise ValueError(f"vocabulary size {vocab} is too small for tp={tp}: split in chunks of "
                         f"{chunk}, rank {tp - 1} would hold no real row; use a smaller tp "
                         f"(at most {max(1, int(vocab ** 0.5))} always works)")
    return ShardSpec(0, 1, tp, rank, (vocab, width), padded=total // tp)


def _check_divisible(what: str, n: int, tp: int, parts: int = 1) -> None:
    if n % (parts * tp):
        unit = f" ({parts} fused parts of {n // parts})" if parts > 1 else ""
        raise ValueError(f"{what}={n}{unit} is not divisible by tp={tp}: every tensor-parallel "
                         f"rank needs an equal share")


def _shard_param(full: torch.Tensor, spec: ShardSpec) -> nn.Parameter:
    p = nn.Parameter(spec.local(full.detach()).clone(), requires_grad=full.requires_grad)
    p.tp_shard = spec
    p._tp_dim = spec.dim  # the split dimension alone, for code that needs only that
    return p


def gather_full(t: torch.Tensor, spec: ShardSpec | None, group) -> torch.Tensor:
    """The full tensor of a split parameter (or its gradient) from every rank of ``group``."""
    if spec is None or spec.tp == 1:
        return t
    pieces = [torch.empty_like(t) for _ in range(spec.tp)]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return spec.full(pieces)


class _SliceOnLoad:
    """Lets ``load_state_dict`` take a full (unsplit) tensor for any split parameter: it is
    sliced by the parameter's ShardSpec; a tensor already of the local shape is taken as is."""

    def _install_slicing(self):
        self._register_load_state_dict_pre_hook(self._slice_full, with_module=False)

    def _slice_full(self, state_dict, prefix, *args):
        for name, p in self.named_parameters(recurse=False):
            key = prefix + name
            spec = getattr(p, "tp_shard", None)
            if spec is None or key not in state_dict:
                continue
            t = state_dict[key]
            if tuple(t.shape) == tuple(spec.full_shape) and (spec.tp > 1 or spec.padded):
                state_dict[key] = spec.local(t)



# ---- linear layers -------------------------------------------------------------------------

class _ColumnLinearFn(torch.autograd.Function):
    """y = x W^T + b with W this rank's output rows; x replicated over the group.

    Backward: dx = dy W is a partial sum over the group. Its all-reduce is issued
    asynchronously and the weight gradient dW = dy^T x is computed while it runs; the wait
    comes last. ``reduce_dx=False`` under sequence parallelism, where the reduce-scatter of
    the gathered input's backward sums dx instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, reduce_dx, overlap=True):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.reduce_dx, ctx.has_bias = group, reduce_dx, bias is not None
        ctx.overlap = overlap
        return F.linear(x, weight, bias)  # (..., out/tp)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])  # (N, out/tp)
        dx = work = None
        if ctx.needs_input_grad[0]:
            dx = (gy2 @ weight).view(*gy.shape[:-1], weight.shape[1])  # (..., in), partial
            if ctx.reduce_dx:
                work = dist.all_reduce(dx, group=ctx.group, async_op=True)
                if not ctx.overlap:  # the baseline the benchmark measures: dx reduced first
                    work.wait()
                    work = None
        dw = gy2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None  # overlap
        db = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if work is not None:
            work.wait()
        return dx, dw, db, None, None, None


class _ParallelLinearBase(_SliceOnLoad, nn.Module):
    def __init__(self, group, conv1d: bool):
        super().__init__()
        self.group = group
        self.tp = _size(group)
        self.tp_rank = _rank(group)
        self.conv1d = conv1d  # weight stored (in, out) like transformers' Conv1D

    def _w(self):
        return self.weight.t() if self.conv1d else self.weight  # (out, in) view

    @staticmethod
    def _module_layout(module):
        if isinstance(module, nn.Linear):
            return module.weight, module.bias, False
        if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection: (in, out)
            return module.weight, module.bias, True
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


class ColumnParallelLinear(_ParallelLinearBase):
    """``nn.Linear`` with its output features split over ``group``.

    ``parts``: the output is that many equal fused blocks (3 for q|k|v in one matmul, 2 for
    gate|up), each split separately so every rank gets its heads of each block.
    ``sequence_parallel``: the input comes from a :func:`gather_sequence` (whose backward sums
    dx), so dx is not all-reduced here. ``input_reduced`` (attribute, default False): the input
    comes from a :func:`copy_to_group` shared with the other column-parallel layers that read
    it (q, k and v; gate and up), whose backward all-reduces their summed dx once, so dx is not
    all-reduced here either. The output is this rank's features (not gathered).
    """

    def __init__(self, in_features, out_features, bias=True, group=None, parts=1,
                 sequence_parallel=False, conv1d=False, dtype=None, device=None):
        super().__init__(group, conv1d)
        _check_divisible("out_features", out_features, self.tp, parts)
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        self.sequence_parallel = sequence_parallel
        self.overlap = True
        self.input_reduced = False
        full_shape = (in_features, out_features) if conv1d else (out_features, in_features)
        full = torch.empty(full_shape, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(full, a=5 ** 0.5)
        self.weight = _shard_param(full, ShardSpec(1 if conv1d else 0, parts, self.tp,
                                                   self.tp_rank, full_shape))
        if bias:
            self.bias = _shard_param(torch.zeros(out_features, dtype=dtype, device=device),
                                     ShardSpec(0, parts, self.tp, self.tp_rank, (out_features,)))
        else:
            self.register_parameter("bias", None)
        self._install_slicing()

    @classmethod
    def from_module(cls, module, group, parts=1, sequence_parallel=False):
        """Split an existing nn.Linear / Conv1D (its full weight sliced: the same numbers at
        every tp)."""
        w, b, conv1d = cls._module_layout(module)
        out_f, in_f = (w.shape[1], w.shape[0]) if conv1d else w.shape
        self = cls.__new__(cls)
        _ParallelLinearBase.__init__(self, group, conv1d)
        _check_divisible("out_features", out_f, self.tp, parts)
        self.in_features, self.out_features, self.parts = in_f, out_f, parts
        self.sequence_parallel = sequence_parallel
        self.overlap = True  # False: wait for the dx all-reduce before dW (for measuring)
        self.input_reduced = False
        self.weight = _shard_param(w, ShardSpec(1 if conv1d else 0, parts, self.tp, self.tp_rank,
                                                tuple(w.shape)))
        if b is not None:
            self.bias = _shard_param(b, ShardSpec(0, parts, self.tp, self.tp_rank, tuple(b.shape)))
        else:
            self.register_parameter("bias", None)
        self._install_slicing()
        return self

    def forward(self, x):
        if self.tp == 1:
            return F.linear(x, self._w(), self.bias)
        return _ColumnLinearFn.apply(x, self._w(), self.bias, self.group,
                                     not (self.sequence_parallel or self.input_reduced),
                                     self.overlap)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features // self.tp}/"
                f"{self.out_features}, tp={self.tp}, parts={self.parts}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_ParallelLinearBase):
    """``nn.Linear`` with its input features split over ``group``: the input is this rank's
    features (a column-parallel layer's output); the partial products are all-reduced, or
    reduce-scattered along the sequence when ``sequence_parallel``. The bias is added once,
    after the sum."""

    def __init__(self, in_features, out_features, bias=True, group=None,
                 sequence_parallel=False, conv1d=False, dtype=None, device=None):
        super().__init__(group, conv1d)
        _check_divisible("in_features", in_features, self.tp)
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        full_shape = (in_features, out_features) if conv1d else (out_features, in_features)
        full = torch.empty(full_shape, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(full, a=5 ** 0.5)
        self.weight = _shard_param(full, ShardSpec(0 if conv1d else 1, 1, self.tp, self.tp_rank,
                                                   full_shape))
        self._finish(nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                     if bias else None)

    @classmethod
    def from_module(cls, module, group, sequence_parallel=False):
        w, b, conv1d = cls._module_layout(module)
        out_f, in_f = (w.shape[1], w.shape[0]) if conv1d else w.shape
        self = cls.__new__(cls)
        _ParallelLinearBase.__init__(self, group, conv1d)
        _check_divisible("in_features", in_f, self.tp)
        self.in_features, self.out_features = in_f, out_f
        self.sequence_parallel = sequence_parallel
        self.weight = _shard_param(w, ShardSpec(0 if conv1d else 1, 1, self.tp, self.tp_rank,
                                                tuple(w.shape)))
        self._finish(nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
                     if b is not None else None)
        return self

    def _finish(self, bias):
        self.register_parameter("bias", bias)
        if bias is not None and self.sequence_parallel:
            mark_sequence_parallel(self.bias, self.group)  # added on this rank's tokens only
        self._install_slicing()

    def forward(self, x):
        y = F.linear(x, self._w())  # (..., out) partial over the group
        if self.tp > 1:
            y = reduce_scatter_sequence(y, self.group) if self.sequence_parallel \
                else reduce_from_group(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        return (f"in_features={self.in_features // self.tp}/{self.in_features}, "
                f"out_features={self.out_features}, tp={self.tp}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


# ---- vocabulary-parallel embedding and head ----------------------------------------------------

class VocabParallelEmbedding(_SliceOnLoad, nn.Module):
    """``nn.Embedding`` with its rows split by vocabulary: rank r holds ids
    ``[vocab_start, vocab_start + per_rank)``, looks up the ids it owns (zeros elsewhere) and
    the group sums.

    A vocabulary that ``tp`` does not divide is padded to a multiple of
    ``make_vocab_size_divisible_by * tp`` (see :func:`vocab_spec`): the last ranks hold fewer
    real rows (``per_rank``) and zero rows after them that no id reaches. ``num_embeddings``
    stays the real vocabulary size; the state dict and checkpoints hold the unpadded table."""

    def __init__(self, num_embeddings, embedding_dim, group=None, padding_idx=None, dtype=None,
                 device=None, _weight=None, make_vocab_size_divisible_by: int = 1):
        super().__init__()
        self.group, self.tp, self.tp_rank = group, _size(group), _rank(group)
        spec = vocab_spec(num_embeddings, embedding_dim, self.tp, self.tp_rank,
                          make_vocab_size_divisible_by)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.per_rank = spec.real             # real rows of this rank
        self.vocab_start = spec.start
        if _weight is None:
            _weight = torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device)
            nn.init.normal_(_weight)
        self.weight = _shard_param(_weight, spec)
        self.spec = spec  # (kept here too: FSDP swaps the parameters for new objects)
        self._install_slicing()

    @classmethod
    def from_module(cls, module: nn.Embedding, group, make_vocab_size_divisible_by: int = 1):
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"expected nn.Embedding, got {type(module).__name__}")
        return cls(module.num_embeddings, module.embedding_dim, group, module.padding_idx,
                   _weight=module.weight,
                   make_vocab_size_divisible_by=make_vocab_size_divisible_by)

    def forward(self, ids):
        if self.tp == 1:  # (padded rows, if any, sit after every id)
            return F.embedding(ids, self.weight, self.padding_idx)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        pad = None  # the padding row, when this rank owns it, gets no gradient (as nn.Embedding)
        if self.padding_idx is not None and \
                0 <= self.padding_idx - self.vocab_start < self.per_rank:
            pad = self.padding_idx - self.vocab_start
        out = F.embedding(local.masked_fill(outside, 0), self.weight, pad)  # (..., C)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.group)

    def extra_repr(self):
        padded = self.spec.padded
        return (f"{self.per_rank}/{self.num_embeddings}, {self.embedding_dim}, tp={self.tp}, "
                f"vocab_start={self.vocab_start}"
                + (f", padded to {padded} rows per rank" if padded else ""))


class _GatherLastFn(torch.autograd.Function):
    """All-gather along the last dim (vocabulary); backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(_size(ctx.group), dim=-1)[_rank(ctx.group)].contiguous(), None


class ParallelLMHead(_SliceOnLoad, nn.Module):
    """The output projection split by vocabulary.

    ``forward(h)`` returns the full logits (gathered: for generation and inspection), of the
    real vocabulary (``vocab_size`` columns: padding never reaches the caller);
    ``loss(h, target)`` never builds them: it is ``fused_linear_cross_entropy(h, W_r, target,
    group=)``, whose ``dh`` is already summed over the group. ``weight`` may be shared with a
    :class:`VocabParallelEmbedding` (tied embeddings): both are split (and padded) the same way.
    A padded vocabulary's zero rows never enter the softmax: the loss reads only each rank's
    real rows (unequal slices, ``vocab_start``/``vocab_total``), so it is the unpadded loss.
    """

    def __init__(self, in_features, vocab_size, bias=False, group=None, dtype=None,
                 device=None, _weight=None, _bias=None, make_vocab_size_divisible_by: int = 1):
        super().__init__()
        self.group, self.tp, self.tp_rank = group, _size(group), _rank(group)
        self.in_features, self.vocab_size = in_features, vocab_size
        if isinstance(_weight, nn.Parameter) and getattr(_weight, "tp_shard", None) is not None:
            self.weight = _weight  # already split (tied with the embedding): its padding too
            spec = _weight.tp_shard
            if spec.full_shape != (vocab_size, in_features):
                raise ValueError(f"the tied weight is {spec.full_shape}, the head "
                                 f"{(vocab_size, in_features)}")
        else:
            spec = vocab_spec(vocab_size, in_features, self.tp, self.tp_rank,
                              make_vocab_size_divisible_by)
            if _weight is None:
                _weight = torch.empty(vocab_size, in_features, dtype=dtype, device=device)
                nn.init.normal_(_weight, 0.0, 0.02)
            self.weight = _shard_param(_weight, spec)
        self.spec = spec  # (kept here too: FSDP swaps the parameters for new objects)
        if bias or _bias is not None:
            b = _bias if _bias is not None else torch.zeros(vocab_size, dtype=dtype, device=device)
            self.bias = _shard_param(b, ShardSpec(0, 1, self.tp, self.tp_rank, (vocab_size,),
                                                  spec.padded))
        else:
            self.register_parameter("bias", None)
        self._install_slicing()

    @classmethod
    def from_module(cls, module: nn.Linear, group, tied_weight=None,
                    make_vocab_size_divisible_by: int = 1):
        if not isinstance(module, nn.Linear):
            raise TypeError(f"expected nn.Linear for the output head, got "
                            f"{type(module).__name__}")
        return cls(module.in_features, module.out_features, group=group,
                   _weight=tied_weight if tied_weight is not None else module.weight,
                   _bias=module.bias, make_vocab_size_divisible_by=make_vocab_size_divisible_by)

    @property
    def padded(self) -> int:
        """Rows per rank including padding (0: not padded)."""
        return self.spec.padded

    def forward(self, h):
        spec = self.spec
        if self.tp == 1:
            return F.linear(h, spec.trim(self.weight),
                            spec.trim(self.bias) if self.bias is not None else None)
        local = _ColumnLinearFn.apply(h, self.weight, self.bias, self.group, True)  # (.., V/tp)
        logits = _GatherLastFn.apply(local, self.group)  # (..., tp * rows per rank)
        if spec.padded:  # each rank's real columns come first; chunk c holds ids [r c, r c + c)
            c = spec._chunk
            logits = logits.unflatten(-1, (self.tp, spec.padded))[..., :c].flatten(-2)
            logits = logits[..., :self.vocab_size]  # (..., V)
        return logits

    def loss(self, h, target, ignore_index: int = -100, reduction: str = "mean", **kwargs):
        """Cross-entropy of ``h @ W.T`` against ``target`` over the split vocabulary."""
        from ..triton_kernels import fused_linear_cross_entropy

        spec = self.spec
        w = spec.trim(self.weight)  # (real rows, H): padding stays out of the softmax
        b = spec.trim(self.bias) if self.bias is not None else None
        if spec.padded and self.tp > 1:
            kwargs = dict(kwargs, vocab_start=spec.start, vocab_total=self.vocab_size)
        return fused_linear_cross_entropy(h, w, target, bias=b, ignore_index=ignore_index,
                                          reduction=reduction,
                                          group=self.group if self.tp > 1 else None, **kwargs)

    def extra_repr(self):
        spec = self.spec
        return (f"in_features={self.in_features}, vocab={spec.real}/{self.vocab_size}, "
                f"tp={self.tp}, bias={self.bias is not None}"
                + (f", padded to {spec.padded} rows per rank" if spec.padded else ""))
