"""Checkpoints of a parallelized model and its optimizer in global coordinates.

    ckpt = AsyncCheckpointer("runs/x/ckpt")
    save(ckpt, step, model, opt, dims)             # every rank; returns the SaveHandle
    ...
    load(ckpt, model, opt, dims)                   # at any other tp x dp, in place
    load(ckpt, plain_model, torch_adamw)           # or into one unsplit process

Every parameter and every piece of optimizer state is handed to the
:class:`~ichiban_comm.checkpoint.AsyncCheckpointer` as a DTensor over a ``(tp, dp)`` mesh built
on the job's own groups: the tensor-parallel split is ``Shard(dim)`` over ``tp`` (read from the
parameter's ``tp_shard``), and a :class:`ShardedOptimizer`'s row shard is ``Shard`` over ``dp``
nested inside it. The checkpointer writes each region once with its global offsets and reads
back whatever region a rank now holds, so the layout of the save and of the load are free.

A vocabulary padded to a multiple of tp (``tp_shard.padded``) is saved unpadded: each rank
hands over its real rows, which are ``torch.chunk``'s slice of the real vocabulary, exactly
DTensor's uneven ``Shard``; the zero rows after them are not saved, and a load at any other tp
(padded differently, or not at all) reads the rows it holds.

The global shape of a fused column-parallel parameter (q|k|v, gate|up: ``tp_shard.parts > 1``)
is the unsplit shape with the split dimension cut into ``(parts, size / parts)``: a rank's piece
of every part is then one rectangle. The same row-major numbers as the unsplit tensor, so an
unsplit model loads it by a reshape. Such a model must be parallelized (at any tp, 1 included)
to load in place; a model that is not parallelized loads in one process, whole.

Saved keys: ``model/<param name>``, ``optim/state/<param name>/<state key>``, and the
optimizer's hyper-parameters per group (plain values, with parameter names).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .optim import MASTER_KEY, ShardedOptimizer, materialize_state

__all__ = ["sharded_state", "save", "load"]


def _spec(p):
    return getattr(p, "tp_shard", None)


def _canonical(p) -> tuple[tuple, int | None]:
    """(global shape, the tp-split dim in it or None) for parameter p."""
    spec = _spec(p)
    if spec is None:
        return tuple(p.shape), None
    full = list(spec.full_shape)
    d = spec.dim
    if spec.parts > 1:
        full[d:d + 1] = [spec.parts, full[d] // spec.parts]
        d += 1
    return tuple(full), (d if spec.tp > 1 else None)


def _local_view(t: torch.Tensor, p) -> torch.Tensor:
    """A tensor shaped like the (tp-local) parameter p, viewed in the canonical layout (a
    padded vocabulary's real rows only)."""
    spec = _spec(p)
    if spec is None or spec.parts == 1:
        return spec.trim(t) if spec is not None else t
    shape = list(t.shape)
    shape[spec.dim:spec.dim + 1] = [spec.parts, shape[spec.dim] // spec.parts]
    return t.view(shape)


class _Mesh:
    """The (tp, dp) DeviceMesh over the job's own groups (None in one process)."""

    def __init__(self, dims, optimizer):
        self.dims = dims
        self.mesh = None
        if dims is None:
            if dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError("dims is None but torch.distributed runs with "
                                 f"{dist.get_world_size()} ranks: pass the ParallelDims of the job")
            return
        if dims.pp > 1:
            raise NotImplementedError(f"checkpoints of pipeline-parallel jobs (pp={dims.pp}) are "
                                      "not supported: each stage holds different parameters")
        if isinstance(optimizer, ShardedOptimizer) and optimizer.dp_group is not dims.dp_group:
            raise ValueError("the ShardedOptimizer's dp group is not dims.dp_group: build it with "
                             "ShardedOptimizer(cls, params, dims)")
        from torch.distributed.device_mesh import DeviceMesh

        grid = dims.layout.grid   # grid[d][p][t] = global rank
        ranks = torch.tensor([[grid[d][0][t] for d in range(dims.dp)] for t in range(dims.tp)],
                             dtype=torch.int)
        dev = "cuda" if _first_device(optimizer) == "cuda" else "cpu"
        self.mesh = DeviceMesh.from_group([dims.tp_group, dims.dp_group], dev, mesh=ranks,
                                          mesh_dim_names=("tp", "dp"))

    def wrap(self, local: torch.Tensor, shape: tuple, tp_dim: int | None, dp_dim: int | None):
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Replicate, Shard

        placements = [Shard(tp_dim) if tp_dim is not None and self.dims.tp > 1 else Replicate(),
                      Shard(dp_dim) if dp_dim is not None and self.dims.dp > 1 else Replicate()]
        return DTensor.from_local(local, self.mesh, placements, run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _first_device(optimizer) -> str:
    if optimizer is None:
        return "cpu"
    for g in optimizer.param_groups:
        for p in g["params"]:
            return p.device.type
    return "cpu"


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _named(model) -> dict:
    return dict(model.named_parameters())


def sharded_state(model, optimizer=None, dims=None, *, materialize: bool = False) -> dict:
    """The state to hand to ``AsyncCheckpointer.save`` (or to ``load(into=)``): DTensors whose
    local tensors are the parameters and the optimizer state themselves (no copy).

    optimizer: a ShardedOptimizer, a plain torch optimizer over model's parameters, or None.
    materialize: create the optimizer's state first if it has none yet (for loading into it).
    """
    m = _Mesh(dims, optimizer)
    named = _named(model)
    out = {"model": {}}
    for name, p in named.items():
        shape, tp_dim = _canonical(p)
        out["model"][name] = m.wrap(_local_view(p.detach(), p), shape, tp_dim, None)
    if optimizer is None:
        return out
    if materialize and not optimizer.state:
        (optimizer.materialize_state() if isinstance(optimizer, ShardedOptimizer)
         else materialize_state(optimizer))
    name_of = {id(p): n for n, p in named.items()}
    sharded = isinstance(optimizer, ShardedOptimizer)
    state, groups = {}, []
    if sharded:
        pairs = [(p, optimizer.shard_of(p)) for p in optimizer.params]
        user_groups = optimizer._user_groups
    else:
        pairs = [(p, p) for g in optimizer.param_groups for p in g["params"]]
        user_groups = [g["params"] for g in optimizer.param_groups]
    for p, key in pairs:
        if key is None or id(p) not in name_of:
            if key is not None:
                raise ValueError("the optimizer holds a parameter that is not in "
                                 "model.named_parameters()")
            continue
        st = optimizer.state.get(key)
        if not st:
            continue
        shape, tp_dim = _canonical(p)
        entry = {}
        if sharded and optimizer._bucket_of[id(p)].master is not None:
            st = {**st, MASTER_KEY: key.detach()}   # the master rows: what the optimizer steps
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(key.shape) \
                    and (p.dim() > 0 or sharded):
                if sharded:
                    outer = optimizer._slot_of[id(p)].outer
                    gshape = shape if p.dim() else (1,)
                    # dp splits the rows of each fused part (dim 1 of the canonical view) or dim 0.
                    entry[k] = m.wrap(v, gshape, tp_dim, 1 if outer > 1 else 0)
                else:
                    entry[k] = m.wrap(_local_view(v, p), shape, tp_dim, None)
            else:
                entry[k] = v   # step counters and other per-parameter scalars: equal everywhere
        state[name_of[id(p)]] = entry
    for g, ps in zip(optimizer.param_groups, user_groups):
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [name_of[id(p)] for p in ps if id(p) in name_of]})
    out["optim"] = {"state": state, "param_groups": groups}
    return out


def save(ckpt, step: int, model, optimizer=None, dims=None, *, extra=None):
    """Save model (and optimizer) at step through ckpt (an AsyncCheckpointer); every rank calls
    it. extra: plain values saved alongside (equal on every rank). Returns the SaveHandle."""
    state = sharded_state(model, optimizer, dims)
    if extra is not None:
        state["extra"] = extra
    return ckpt.save(step, state)


@torch.no_grad()
def load(ckpt, model, optimizer=None, dims=None, *, step: int | None = None):
    """Load a checkpoint written by :func:`save` at any tp x dp into model (and optimizer) in
    place; returns the saved ``extra`` (or None).

    With dims (a parallelized model, any tp and dp, pp=1): each rank reads only the regions it
    holds. Without dims, in one process: everything is read whole and reshaped into the
    (unsplit) parameters and the optimizer's state.
    """
    if dims is None:
        return _load_whole(ckpt, model, optimizer, step)
    into = sharded_state(model, optimizer, dims, materialize=True)
    saved = ckpt.load(step, into=into)
    if optimizer is not None:
        _apply_groups(optimizer, saved["optim"]["param_groups"])
        _apply_scalars(optimizer, model, saved["optim"]["state"])
        if isinstance(optimizer, ShardedOptimizer) and not optimizer.has_master:
            optimizer.reload_params()   # (master rows were loaded in place, more exact)
    return saved.get("extra")


def _apply_groups(optimizer, saved_groups) -> None:
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} optimizer parameter group(s), "
                         f"the optimizer {len(optimizer.param_groups)}")
    for g, sg in zip(optimizer.param_groups, saved_groups):
        for k, v in sg.items():
            if k != "params":
                g[k] = v


def _apply_scalars(optimizer, model, saved_state) -> None:
    """Plain (non-tensor) state values come back in the loaded tree, not in place."""
    named = _named(model)
    for name, st in saved_state.items():
        p = named[name]
        key = optimizer.shard_of(p) if isinstance(optimizer, ShardedOptimizer) else p
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                optimizer.state[key][k] = v


def _load_whole(ckpt, model, optimizer, step):
    saved = ckpt.load(step)
    named = _named(model)
    missing = [n for n in named if n not in saved["model"]]
    if missing:
        raise KeyError(f"the checkpoint has no parameter(s) {missing[:5]}")
    for n, p in named.items():
        t = saved["model"][n]
        if t.numel() != p.numel():
            raise ValueError(f"checkpoint parameter {n} has shape {tuple(t.shape)}, the model's "
                             f"{tuple(p.shape)}")
        dst = _spec(p).trim(p) if _spec(p) is not None else p   # (a padded vocabulary's rows)
        dst.copy_(t.reshape(dst.shape))
    if optimizer is not None:
        if isinstance(optimizer, ShardedOptimizer):
            raise ValueError("loading into a ShardedOptimizer needs dims (the job's ParallelDims)")
        if not optimizer.state:
            materialize_state(optimizer)
        _apply_groups(optimizer, saved["optim"]["param_groups"])
        for n, st in saved["optim"]["state"].items():
            p = named[n]
            for k, v in st.items():
                if k == MASTER_KEY:   # the unrounded value of the parameter
                    p.copy_(v.reshape(p.shape))
                    continue
                cur = optimizer.state[p].get(k)
                if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor):
                    cur.copy_(v.reshape(cur.shape))
                else:
                    optimizer.state[p][k] = v
    return saved.get("extra")
