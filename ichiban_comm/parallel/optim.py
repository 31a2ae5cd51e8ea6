"""ZeRO-1 over the data-parallel group: each rank keeps and steps 1/dp of the optimizer state.

    opt = ShardedOptimizer(torch.optim.AdamW, model.parameters(), dims, lr=3e-4)
    loss.backward()          # gradients reduce-scattered bucket by bucket while backward runs
    opt.clip_grad_norm_(1.0) # global norm over tp x dp (x pp)
    opt.step()               # the wrapped AdamW steps this rank's shard; parameters all-gathered
    opt.zero_grad()

Sharding is per parameter along dim 0, torch.chunk style: dp rank ``d`` owns rows
``[d*c, min((d+1)*c, rows))`` with ``c = ceil(rows/dp)`` of every parameter (a 0-dim
parameter counts as one row). A tensor-parallel parameter that fuses ``parts`` column blocks
along dim 0 (q|k|v, gate|up: ``param.tp_shard.parts``) is sharded the same way inside each
part, so every rank's rows stay one rectangle of the unsplit parameter.

A bucket is laid out rank-major: rank ``d``'s segment is the concatenation of its
(zero-padded) row chunks of the bucket's parameters, so one reduce-scatter hands every rank
exactly the gradient rows it owns, and one all-gather of the same layout brings the updated
rows back. Row sharding
(rather than cutting one flat buffer anywhere, as Megatron's distributed optimizer does) keeps
each rank's optimizer state a rectangular block of each parameter, so a checkpoint can describe
it with global offsets and reload it at any other tp x dp (see ``parallel/checkpoint.py``);
the price is padding of at most ``dp - 1`` rows per parameter.

Each parameter's gradient is copied into its bucket by a post-accumulate-grad hook and its
``.grad`` released; a full bucket is reduce-scattered asynchronously at once, so the
communication overlaps the rest of backward. Buckets start in one fixed order on every rank
(a bucket waits for the earlier ones), which keeps the collectives matched.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["ShardedOptimizer", "tp_shard_dim", "dp_outer"]

# state_dict() key of the master rows (a tensor shaped like the parameter); a torch optimizer
# that loads such a state dict keeps it as an unused entry.
MASTER_KEY = "master_param"

# Bucket size: large enough that per-collective latency is amortised, small enough that the
# first reduce-scatter starts early in backward (the same trade-off as DDP's 25 MiB default).
DEFAULT_BUCKET_MB = 25.0


def tp_shard_dim(p: torch.Tensor) -> int | None:
    """The dimension a tensor-parallel layer split this parameter along (None: whole on every
    rank of the tp group). Read from ``param.tp_shard``, set by the layers of
    ``ichiban_comm.parallel``."""
    spec = getattr(p, "tp_shard", None)
    return None if spec is None or spec.tp == 1 else spec.dim


def real_rows(p: torch.Tensor) -> int:
    """Rows along dim 0 that hold the model: all of them, except for a vocabulary padded to a
    multiple of tp (``param.tp_shard.padded``), whose zero rows after the real ones are not
    sharded, stepped or saved."""
    spec = getattr(p, "tp_shard", None)
    if spec is not None and spec.padded and spec.dim == 0:
        return spec.real
    return p.shape[0] if p.dim() else 1


def dp_outer(p: torch.Tensor) -> int:
    """Blocks along dim 0 that are row-sharded over dp separately: the fused parts of a
    column-parallel parameter split along dim 0, else 1."""
    spec = getattr(p, "tp_shard", None)
    return spec.parts if spec is not None and spec.dim == 0 and spec.parts > 1 else 1


@dataclass
class _Slot:
    param: torch.Tensor
    index: int          # position in the order the parameters were given
    outer: int          # blocks along dim 0 sharded separately (fused parts), usually 1
    rows: int           # rows per block
    row_numel: int
    chunk: int          # rows per rank (padded)
    offset: int         # element offset of this parameter inside each rank's segment
    own: int            # rows this rank owns
    shard: torch.Tensor = None   # this rank's rows (a view of the bucket's shard buffer)

    @property
    def slot_numel(self) -> int:
        return self.outer * self.chunk * self.row_numel

    @property
    def shard_shape(self) -> tuple:
        """This rank's rows: (own, *rest); (outer, own, *rest) for a fused parameter."""
        p = self.param
        if not p.dim():
            return (self.own,)
        return ((self.outer,) if self.outer > 1 else ()) + (self.own,) + tuple(p.shape[1:])

    def seg_view(self, seg: torch.Tensor) -> torch.Tensor:
        """This parameter's owned rows inside one rank's bucket segment, shaped shard_shape
        (strided for a fused parameter on a rank that owns fewer than chunk rows)."""
        v = seg[self.offset:self.offset + self.slot_numel]
        v = v.view(self.outer, self.chunk, self.row_numel)
        return v[:, :self.own].view(self.shard_shape)


def _real(t: torch.Tensor, s: _Slot) -> torch.Tensor:
    """t (shaped like s.param) without a padded vocabulary's zero rows (a view)."""
    if t.dim() and t.shape[0] != s.outer * s.rows:
        return t[:s.outer * s.rows]
    return t


@dataclass
class _Bucket:
    slots: list
    seg: int                      # elements per rank
    buf: torch.Tensor = None      # (dp * seg): gradients in, updated parameters out
    shard_param: torch.Tensor = None  # (seg): this rank's parameter rows
    shard_grad: torch.Tensor = None   # (seg): this rank's reduced gradient rows
    master: torch.Tensor = None       # (seg) in master_dtype: what the optimizer steps, or None
    master_grad: torch.Tensor = None  # (seg) in master_dtype
    ready: set = field(default_factory=set)
    work: object = None
    launched: bool = False
    reduced: bool = False

    @property
    def opt_param(self) -> torch.Tensor:
        return self.master if self.master is not None else self.shard_param

    @property
    def opt_grad(self) -> torch.Tensor:
        return self.master_grad if self.master_grad is not None else self.shard_grad


def _dp_group_of(dims):
    if dims is None:
        return None
    if isinstance(dims, dist.ProcessGroup):
        return dims
    return dims.dp_group


class ShardedOptimizer(torch.optim.Optimizer):
    """Wrap a torch optimizer class so that it steps this rank's dp shard only (ZeRO-1).

    Args:
        optimizer_class: a ``torch.optim.Optimizer`` subclass (AdamW, Adam, SGD, ...) whose
            per-parameter state is elementwise (the state of a parameter has its shape).
        params: parameters or parameter groups, as for the torch optimizer.
        dims: a ``ParallelDims`` (its dp group shards the state; tp and pp groups enter the
            gradient norm), a process group (pure data parallel), or None (the default group).
        bucket_mb: gradient bucket size in MiB.
        master_dtype: keep this rank's rows in this dtype for the optimizer (e.g. torch.float32
            for bf16 parameters: fp32 master weights, gradients and state of 1/dp of the model);
            the parameters get the rounded result after each step. None: the parameters' dtype.
        **defaults: the optimizer's arguments (lr, betas, weight_decay, ...).

    The parameters must be equal on every dp rank at construction (they are broadcast from the
    group's first rank to make sure). Gradients are averaged over dp.
    """

    def __init__(self, optimizer_class, params, dims=None, *, bucket_mb: float = DEFAULT_BUCKET_MB,
                 master_dtype: torch.dtype | None = None, **defaults):
        if not (isinstance(optimizer_class, type)
                and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass (e.g. "
                            f"torch.optim.AdamW), got {optimizer_class!r}")
        if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        if master_dtype is not None and not (isinstance(master_dtype, torch.dtype)
                                             and master_dtype.is_floating_point):
            raise TypeError(f"master_dtype must be None or a floating torch.dtype (e.g. "
                            f"torch.float32), got {master_dtype!r}")
        self.master_dtype = master_dtype
        if not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs torch.distributed: call "
                               "dist.init_process_group(...) (and init_parallel) first")
        self.dims = None if dims is None or isinstance(dims, dist.ProcessGroup) else dims
        self.dp_group = _dp_group_of(dims)
        self.dp = dist.get_world_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group)
        self._dp_src = dist.get_global_rank(self.dp_group, 0) if self.dp_group is not None else 0

        groups = list(params)
        if not groups:
            raise ValueError("params is empty: ShardedOptimizer got no parameters to optimize")
        groups = [dict(g) for g in groups] if isinstance(groups[0], dict) else [{"params": groups}]
        self._params: list[torch.Tensor] = []
        seen = set()
        for g in groups:
            ps = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
            for p in ps:
                if not isinstance(p, torch.Tensor) or not p.is_leaf:
                    raise TypeError("params must be leaf tensors (model.parameters()), got "
                                    f"{type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("a parameter appears twice in params")
                seen.add(id(p))
                self._params.append(p)
            g["params"] = ps
        self._user_groups = [list(g["params"]) for g in groups]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._buckets = self._build_buckets(bucket_mb)
        self._slot_of = {id(s.param): s for b in self._buckets for s in b.slots}
        self._bucket_of = {id(s.param): b for b in self._buckets for s in b.slots}
        self._broadcast_params()

        inner_groups = []
        for g in groups:
            shards = [self._slot_of[id(p)].shard for p in g["params"] if id(p) in self._slot_of]
            inner_groups.append({**g, "params": shards})
        self.optim = optimizer_class(inner_groups, **defaults)
        # torch.optim.Optimizer's own bookkeeping (hooks, LR schedulers' checks) over the shards;
        # the groups and the state are the wrapped optimizer's own objects.
        super().__init__(inner_groups, dict(self.optim.defaults))
        self.param_groups = self.optim.param_groups
        self.state = self.optim.state
        self.defaults = self.optim.defaults

        self._sync = True
        self._next_launch = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for b in self._buckets for p in (s.param for s in b.slots)]

    # ------------------------------------------------------------------ layout
    def _build_buckets(self, bucket_mb: float) -> list[_Bucket]:
        cap = int(bucket_mb * 2**20)
        dp, d = self.dp, self.dp_rank
        buckets, cur, cur_bytes, key = [], [], 0, None
        trainable = [(i, p) for i, p in enumerate(self._params) if p.requires_grad]
        # Reverse order: backward produces the last layers' gradients first.
        for i, p in reversed(trainable):
            outer = dp_outer(p)
            rows = real_rows(p) // outer
            row_numel = math.prod(p.shape[1:])
            chunk = -(-rows // dp)
            own = max(0, min(rows - d * chunk, chunk))
            slot = _Slot(p, i, outer, rows, row_numel, chunk, 0, own)
            k = (p.dtype, p.device)
            nbytes = slot.slot_numel * dp * p.element_size()
            if cur and (k != key or cur_bytes + nbytes > cap):
                buckets.append(cur)
                cur, cur_bytes = [], 0
            cur.append(slot)
            cur_bytes += nbytes
            key = k
        if cur:
            buckets.append(cur)
        out = []
        for slots in buckets:
            off = 0
            for s in slots:
                s.offset = off
                off += s.slot_numel
            b = _Bucket(slots, off)
            p0 = slots[0].param
            b.buf = torch.zeros(dp * off, dtype=p0.dtype, device=p0.device)
            b.shard_param = torch.zeros(off, dtype=p0.dtype, device=p0.device)
            b.shard_grad = torch.zeros(off, dtype=p0.dtype, device=p0.device)
            if self.master_dtype is not None and self.master_dtype != p0.dtype:
                b.master = torch.zeros(off, dtype=self.master_dtype, device=p0.device)
                b.master_grad = torch.zeros(off, dtype=self.master_dtype, device=p0.device)
            for s in slots:
                s.shard = torch.nn.Parameter(s.seg_view(b.opt_param))
                s.shard.grad = s.seg_view(b.opt_grad)
            out.append(b)
        return out

    def _rank_view(self, b: _Bucket, s: _Slot) -> torch.Tensor:
        """(dp, outer, chunk, row_numel) view of a parameter's place in the bucket buffer."""
        return b.buf.view(self.dp, b.seg)[:, s.offset:s.offset + s.slot_numel].view(
            self.dp, s.outer, s.chunk, s.row_numel)

    def _pack(self, b: _Bucket, s: _Slot, t: torch.Tensor) -> None:
        """Copy a tensor shaped like s.param into its rank-major place in the bucket."""
        src = _real(t.detach(), s).reshape(s.outer, s.rows, s.row_numel)
        view = self._rank_view(b, s)
        full, rem = divmod(s.rows, s.chunk) if s.chunk else (0, 0)
        if full:   # ranks with a whole chunk; then one partial chunk; later ranks hold padding
            view[:full].copy_(src[:, :full * s.chunk].reshape(
                s.outer, full, s.chunk, s.row_numel).transpose(0, 1))
        if rem:
            view[full, :, :rem].copy_(src[:, full * s.chunk:])

    def _unpack(self, b: _Bucket, s: _Slot, out: torch.Tensor) -> None:
        """The inverse of _pack: the bucket's rows into out (shaped like s.param)."""
        dst = _real(out, s).view(s.outer, s.rows, s.row_numel)
        view = self._rank_view(b, s)
        full, rem = divmod(s.rows, s.chunk) if s.chunk else (0, 0)
        if full:
            dst[:, :full * s.chunk].view(s.outer, full, s.chunk, s.row_numel).copy_(
                view[:full].transpose(0, 1))
        if rem:
            dst[:, full * s.chunk:].copy_(view[full, :, :rem])

    def _own_rows(self, s: _Slot, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (tp-local) tensor shaped like s.param, shaped like s.shard."""
        start = min(self.dp_rank * s.chunk, s.rows)
        rows = _real(t, s).reshape(s.outer, s.rows, s.row_numel)[:, start:start + s.own]
        return rows.reshape(s.shard_shape)

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        for b in self._buckets:
            if self.dp > 1:
                for s in b.slots:
                    self._pack(b, s, s.param)
                dist.broadcast(b.buf, self._dp_src, group=self.dp_group)
                for s in b.slots:
                    self._unpack(b, s, s.param.data)
            for s in b.slots:
                s.shard.data.copy_(self._own_rows(s, s.param.data))

    # ------------------------------------------------------------------ gradients
    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (in ``param.grad``) across the backward passes inside;
        the first backward after it reduces the sum."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync or p.grad is None:
            return
        b = self._bucket_of[id(p)]
        if b.launched:
            raise RuntimeError("a second backward before step(): this step's gradients were "
                               "already reduce-scattered; accumulate micro-batches inside "
                               "opt.no_sync() and run only the last backward outside it")
        s = self._slot_of[id(p)]
        with torch.no_grad():
            self._pack(b, s, p.grad)
        p.grad = None
        b.ready.add(id(p))
        if len(b.ready) == len(b.slots):
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next_launch < len(self._buckets):
            b = self._buckets[self._next_launch]
            if not force and len(b.ready) < len(b.slots):
                return
            if force:
                with torch.no_grad():
                    for s in b.slots:   # parameters that got no gradient this step count as zero
                        if id(s.param) not in b.ready:
                            if s.param.grad is not None:  # from no_sync, no final backward
                                self._pack(b, s, s.param.grad)
                                s.param.grad = None
                            else:
                                self._rank_view(b, s).zero_()
            b.launched = True
            if self.dp > 1:
                b.work = dist.reduce_scatter_single(b.shard_grad, b.buf, group=self.dp_group,
                                                    async_op=True)
            else:
                b.shard_grad.copy_(b.buf)
            self._next_launch += 1

    def _finish_grad_sync(self) -> None:
        if all(b.reduced for b in self._buckets):
            return
        self._launch_ready(force=True)
        for b in self._buckets:
            if b.reduced:
                continue
            if b.work is not None:
                b.work.wait()
                b.work = None
            if b.master_grad is not None:
                b.master_grad.copy_(b.shard_grad)   # summed in the parameters' dtype
            if self.dp > 1:
                b.opt_grad.div_(self.dp)
            b.reduced = True

    def _reset(self) -> None:
        for b in self._buckets:
            b.ready.clear()
            b.launched = False
            b.reduced = False
        self._next_launch = 0

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale this step's gradients so that their global norm is at most max_norm; returns
        the norm before clipping (the same on every rank).

        The norm is over the whole model: every dp shard, every tensor-parallel shard of a
        split parameter, a tp-replicated parameter once, and every pipeline stage.
        """
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if norm_type <= 0:
            raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type}")
        self._finish_grad_sync()
        tp_rank = getattr(self.dims, "tp_rank", 0)
        grads = [s.shard.grad for b in self._buckets for s in b.slots
                 if s.own and (tp_shard_dim(s.param) is not None or tp_rank == 0)]
        dev = self._buckets[0].buf.device if self._buckets else torch.device("cpu")
        inf = math.isinf(norm_type)
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.float(), norm_type) for g in grads])
            local = norms.max() if inf else norms.pow(norm_type).sum()
        else:
            local = torch.zeros((), device=dev)
        local = local.reshape(1).to(dev)
        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        for g in self._norm_groups():
            dist.all_reduce(local, op=op, group=g)
        total = local[0] if inf else local[0].pow(1.0 / norm_type)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for b in self._buckets:
            b.opt_grad.mul_(coef.to(b.opt_grad.dtype))
        return total

    def _norm_groups(self):
        groups = [self.dp_group] if self.dp > 1 else []
        if self.dims is not None:
            if self.dims.tp > 1:
                groups.append(self.dims.tp_group)
            if self.dims.pp > 1:
                groups.append(self.dims.pp_group)
        return groups

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedOptimizer.step does not take a closure (a closure would "
                             "re-run backward across the dp group); call backward before step()")
        self._finish_grad_sync()
        self.optim.step()
        for b in self._buckets:
            if b.master is not None:
                b.shard_param.copy_(b.master)   # rounded to the parameters' dtype
        # All-gather every bucket (started together, finished in order), then copy back.
        works = []
        for b in self._buckets:
            if self.dp > 1:
                works.append(dist.all_gather_single(b.buf, b.shard_param, group=self.dp_group,
                                                         async_op=True))
            else:
                b.buf.copy_(b.shard_param)
                works.append(None)
        for b, w in zip(self._buckets, works):
            if w is not None:
                w.wait()
            for s in b.slots:
                self._unpack(b, s, s.param.data)
        self._reset()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's accumulated gradients (and this rank's reduced shard)."""
        for p in self._params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        for b in self._buckets:   # a reduction in flight (backward without step) is finished first
            if b.work is not None:
                b.work.wait()
                b.work = None
            b.shard_grad.zero_()
            if b.master_grad is not None:
                b.master_grad.zero_()
        self._reset()

    # ------------------------------------------------------------------ introspection
    def shard_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """This rank's rows of parameter p as the wrapped optimizer sees it (None when p is not
        trained); its state is ``opt.state[opt.shard_of(p)]``."""
        s = self._slot_of.get(id(p))
        return None if s is None else s.shard

    def owned_rows(self, p: torch.Tensor) -> tuple[int, int, int]:
        """(blocks, first row, number of rows): this dp rank owns those rows of each of the
        parameter's blocks along dim 0 (blocks is 1 but for fused tensor-parallel parameters)."""
        s = self._slot_of[id(p)]
        return s.outer, min(self.dp_rank * s.chunk, s.rows), s.own

    @property
    def params(self) -> list:
        return list(self._params)

    @property
    def has_master(self) -> bool:
        return any(b.master is not None for b in self._buckets)

    def local_state_numel(self) -> int:
        """Elements of optimizer state held by this rank (tensors only; master rows included)."""
        return sum(v.numel() for st in self.optim.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor)) + sum(
            s.shard.numel() for b in self._buckets if b.master is not None for s in b.slots)

    # ------------------------------------------------------------------ state dict
    def _gather_full(self, b: _Bucket, pick) -> list:
        """All-gather per-slot shard tensors (pick(slot) -> tensor shaped like slot.shard, or
        None for zeros) into full (tp-local) tensors shaped like the parameters."""
        seg = torch.zeros(b.seg, dtype=b.buf.dtype, device=b.buf.device)
        dtype = None
        for s in b.slots:
            t = pick(s)
            if t is not None:
                dtype = t.dtype
        seg = seg.to(dtype or b.buf.dtype)
        for s in b.slots:
            t = pick(s)
            if t is not None and s.own:
                s.seg_view(seg).copy_(t)
        full = torch.empty(self.dp * b.seg, dtype=seg.dtype, device=seg.device)
        if self.dp > 1:
            dist.all_gather_single(full, seg, group=self.dp_group)
        else:
            full.copy_(seg)
        outs = []
        saved = b.buf
        b.buf = full
        for s in b.slots:
            o = torch.zeros(s.param.shape, dtype=full.dtype, device=full.device)  # (+ padding)
            self._unpack(b, s, o)
            outs.append(o)
        b.buf = saved
        return outs

    def _state_keys(self):
        """The state keys of the wrapped optimizer: (sharded keys, per-parameter scalar keys)."""
        sharded, scalar = set(), set()
        for shard, st in self.optim.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == shard.shape and v.dim() > 0:
                    sharded.add(k)
                else:
                    scalar.add(k)
        if self.dp > 1:   # a rank that owns no rows of anything still agrees on the keys
            keys = [None] * self.dp
            dist.all_gather_object(keys, (sorted(sharded), sorted(scalar)), group=self.dp_group)
            sharded = set().union(*(set(k[0]) for k in keys))
            scalar = set().union(*(set(k[1]) for k in keys)) - sharded
        return sorted(sharded), sorted(scalar)

    def state_dict(self) -> dict:
        """The whole optimizer state, gathered over dp, in the wrapped torch optimizer's format
        for the (tp-local) parameters in the order they were given: loadable into a plain
        ``optimizer_class(params)`` or into a ShardedOptimizer of any dp size. Collective."""
        sharded, scalar = self._state_keys()
        state: dict = {}
        for b in self._buckets:
            for k in sharded:
                outs = self._gather_full(b, lambda s: self.optim.state.get(s.shard, {}).get(k))
                for s, o in zip(b.slots, outs):
                    state.setdefault(s.index, {})[k] = o
        for b in self._buckets:   # fp32 master rows: the exact values the optimizer steps
            if b.master is not None:
                for s, o in zip(b.slots, self._gather_full(b, lambda s: s.shard.detach())):
                    state.setdefault(s.index, {})[MASTER_KEY] = o
        for k in scalar:
            for s in self._slot_of.values():
                v = self.optim.state.get(s.shard, {}).get(k)
                if v is not None:
                    v = v.clone() if isinstance(v, torch.Tensor) else v
                    state.setdefault(s.index, {})[k] = v
        inner = self.optim.state_dict()
        groups = [{**{k: v for k, v in ig.items() if k != "params"},
                   "params": [self._index[id(p)] for p in g]}
                  for g, ig in zip(self._user_groups, inner["param_groups"])]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from ``state_dict()`` (any dp size) or from a plain torch optimizer over
        the same parameters: this rank keeps its rows."""
        if not (isinstance(state_dict, dict) and "state" in state_dict
                and "param_groups" in state_dict):
            raise ValueError("state_dict must be an optimizer state dict with 'state' and "
                             "'param_groups' (from ShardedOptimizer.state_dict() or a torch "
                             "optimizer)")
        groups, saved = state_dict["param_groups"], state_dict["state"]
        mine = self._user_groups
        if len(groups) != len(mine) or any(len(g["params"]) != len(m)
                                           for g, m in zip(groups, mine)):
            raise ValueError(f"state_dict has {len(groups)} parameter group(s) of sizes "
                             f"{[len(g['params']) for g in groups]}, this optimizer "
                             f"{[len(m) for m in mine]}")
        pairs = [(sid, p) for g, m in zip(groups, mine) for sid, p in zip(g["params"], m)]
        # Elementwise state has the parameter's shape; which keys those are is read off the
        # parameters of dim > 0 (for a 0-dim parameter a shape cannot tell "exp_avg" from "step").
        sharded = {k for sid, p in pairs if p.dim() > 0 for k, v in saved.get(sid, {}).items()
                   if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape)}
        inner_state, n, masters = {}, 0, []
        for sid, p in pairs:
            s = self._slot_of.get(id(p))
            if s is None:
                continue
            st = {}
            for k, v in saved.get(sid, {}).items():
                if k == MASTER_KEY:
                    if self._bucket_of[id(p)].master is not None:
                        masters.append((s, v))
                    continue
                if k in sharded:
                    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"state_dict: state {k!r} of parameter {sid} has "
                                         f"shape {tuple(getattr(v, 'shape', ()))}, expected "
                                         f"{tuple(p.shape)}")
                    v = self._own_rows(s, v).clone()
                st[k] = v
            if st:
                inner_state[n] = st
            n += 1
        inner_groups, n = [], 0
        for g, m in zip(groups, mine):
            k = sum(1 for p in m if id(p) in self._slot_of)
            inner_groups.append({**{a: b for a, b in g.items() if a != "params"},
                                 "params": list(range(n, n + k))})
            n += k
        self.optim.load_state_dict({"state": inner_state, "param_groups": inner_groups})
        self.state = self.optim.state
        self.param_groups = self.optim.param_groups
        with torch.no_grad():
            for s, v in masters:
                s.shard.copy_(self._own_rows(s, v))

    @torch.no_grad()
    def reload_params(self) -> None:
        """Take this rank's rows from the model's parameters again (after they were loaded or
        changed in place outside step())."""
        for s in self._slot_of.values():
            s.shard.data.copy_(self._own_rows(s, s.param.data))

    def materialize_state(self) -> None:
        """Create the wrapped optimizer's state (zeros) without changing any parameter: one step
        with zero gradients and lr=0. Needed before loading state in place (a fresh torch
        optimizer creates its state lazily at its first step)."""
        materialize_state(self.optim)

    def __repr__(self) -> str:
        n = sum(s.param.numel() for s in self._slot_of.values())
        return (f"ShardedOptimizer({type(self.optim).__name__}, {len(self._slot_of)} parameters "
                f"({n} elements) in {len(self._buckets)} bucket(s), dp={self.dp}, "
                f"dp_rank={self.dp_rank})")


@torch.no_grad()
def materialize_state(optim: torch.optim.Optimizer) -> None:
    """Run one step of a torch optimizer with zero gradients and lr=0 so that its lazily created
    state exists (and is zero), leaving the parameters unchanged. Gradients are restored."""
    saved_lr, saved_grads = [], {}
    for g in optim.param_groups:
        saved_lr.append(g["lr"])
        g["lr"] = 0.0 if not isinstance(g["lr"], torch.Tensor) else torch.zeros_like(g["lr"])
        for p in g["params"]:
            saved_grads[p] = p.grad
            p.grad = torch.zeros_like(p)
    try:
        optim.step()
    finally:
        for g, lr in zip(optim.param_groups, saved_lr):
            g["lr"] = lr
        for p, gr in saved_grads.items():
            p.grad = gr
    for st in optim.state.values():   # a step counter starts from zero, as if never stepped
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                v.zero_()
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                st[k] = type(v)(0)
