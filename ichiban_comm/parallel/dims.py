"""Where every rank goes: tensor-, pipeline- and data-parallel groups placed by the topology.

``init_parallel(tp, pp, dp)`` splits the world into a ``dp x pp x tp`` grid. The one
:class:`~ichiban_comm.topology.Topology` of the job (declared with ``ICHIBAN_TOPOLOGY`` or
detected) decides the order: tensor parallelism is innermost and its groups are cut from the
ranks of one host first, so the collectives that run every layer stay on shared memory
whenever each host holds a multiple of ``tp`` ranks; pipeline stages come next and data
parallelism is outermost (its gradients cross hosts once per step).

    dims = init_parallel(tp=2, pp=1, dp=-1)      # -1: whatever the world leaves
    print(dims.describe())

:func:`plan_layout` is the same placement without any process group, which is what
``python -m ichiban_comm.parallel --tp 2 --dp 2 --topology FILE`` prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

from .. import topology as _topology

__all__ = ["ParallelDims", "Layout", "init_parallel", "plan_layout", "ParallelDimsError"]


class ParallelDimsError(ValueError):
    """Parallel sizes that do not fit the world or the topology."""


@dataclass(frozen=True)
class Layout:
    """The placement of every global rank on the ``(dp, pp, tp)`` grid (no process groups)."""

    tp: int
    pp: int
    dp: int
    topology: _topology.Topology
    # grid[d][p][t] = global rank
    grid: tuple = field(repr=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, pp, tp) coordinates of a global rank."""
        for d, stage in enumerate(self.grid):
            for p, row in enumerate(stage):
                if rank in row:
                    return d, p, row.index(rank)
        raise ParallelDimsError(f"rank {rank} is not in this layout of {self.world_size} ranks")

    def tp_groups(self) -> list[list[int]]:
        return [list(row) for stage in self.grid for row in stage]

    def pp_groups(self) -> list[list[int]]:
        return [[self.grid[d][p][t] for p in range(self.pp)]
                for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.grid[d][p][t] for d in range(self.dp)]
                for p in range(self.pp) for t in range(self.tp)]

    def split_tp_groups(self) -> list[list[int]]:
        """Tensor-parallel groups whose ranks are on more than one host."""
        topo = self.topology
        return [g for g in self.tp_groups() if len({topo.host_of(r) for r in g}) > 1]

    def describe(self) -> str:
        topo = self.topology
        lines = [f"parallel layout: tp={self.tp} x pp={self.pp} x dp={self.dp} = "
                 f"{self.world_size} rank(s) on {topo.num_hosts} host(s); "
                 f"topology {topo.source}"]
        for host in topo.hosts:
            cells = []
            for r in topo.ranks_on(host):
                d, p, t = self.coords(r)
                cells.append(f"rank {r} (dp {d}, pp {p}, tp {t})")
            lines.append(f"  host {host}: " + ", ".join(cells))
        lines.append(f"  tp groups: {self.tp_groups()}")
        if self.pp > 1:
            lines.append(f"  pp groups: {self.pp_groups()}")
        lines.append(f"  dp groups: {self.dp_groups()}")
        split = self.split_tp_groups()
        if split:
            lines.append(f"  warning: tp group(s) {split} span hosts (no host holds a multiple of "
                         f"tp={self.tp} ranks); their per-layer collectives leave shared memory")
        return "\n".join(lines)


def _check_size(name: str, v, allow_rest: bool = False) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and not (allow_rest and v == -1)):
        extra = " or -1 (the rest of the world)" if allow_rest else ""
        raise ParallelDimsError(f"{name} must be a positive integer{extra}, got {v!r}")


def resolve_sizes(tp: int, pp: int, dp: int, world_size: int) -> tuple[int, int, int]:
    """(tp, pp, dp) with ``dp=-1`` filled in; an error naming every factor when they do not
    multiply to the world size."""
    _check_size("tp", tp)
    _check_size("pp", pp)
    _check_size("dp", dp, allow_rest=True)
    if dp == -1:
        if world_size % (tp * pp):
            raise ParallelDimsError(
                f"tp={tp} x pp={pp} = {tp * pp} does not divide the world size {world_size}, "
                f"so no data-parallel size fits (dp=-1); choose tp and pp whose product divides "
                f"{world_size}")
        dp = world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ParallelDimsError(f"tp={tp} x pp={pp} x dp={dp} = {tp * pp * dp}, but the world "
                                f"size is {world_size}; the three must multiply to it (dp=-1 "
                                f"takes whatever tp x pp leaves)")
    return tp, pp, dp


def _tp_blocks(topo: _topology.Topology, tp: int) -> list[list[int]]:
    """Ranks cut into tp-sized blocks: whole blocks inside each host first (host order, local
    rank order), then the hosts' leftovers joined into blocks that must span hosts."""
    blocks, rest = [], []
    for host in topo.hosts:
        ranks = sorted(topo.ranks_on(host), key=topo.local_rank_of)
        whole = len(ranks) - len(ranks) % tp
        blocks += [ranks[i:i + tp] for i in range(0, whole, tp)]
        rest += ranks[whole:]
    blocks += [rest[i:i + tp] for i in range(0, len(rest), tp)]
    return blocks


def plan_layout(tp: int = 1, pp: int = 1, dp: int = -1,
                topology: _topology.Topology | str | None = None,
                world_size: int | None = None) -> Layout:
    """The placement :func:`init_parallel` would make, computed without process groups.

    ``topology``: a Topology, a path to a declared topology file, or None (``ICHIBAN_TOPOLOGY``
    when set, else one host with ``world_size`` ranks).
    """
    topo = _load_topology(topology, world_size)
    if world_size is not None and world_size != topo.world_size:
        raise ParallelDimsError(f"the topology ({topo.source}) has {topo.world_size} rank(s) but "
                                f"the world size is {world_size}")
    tp, pp, dp = resolve_sizes(tp, pp, dp, topo.world_size)
    blocks = _tp_blocks(topo, tp)  # consecutive blocks: pp stages, then dp replicas
    grid = tuple(tuple(tuple(blocks[d * pp + p]) for p in range(pp)) for d in range(dp))
    return Layout(tp, pp, dp, topo, grid)


def _load_topology(topology, world_size):
    if isinstance(topology, _topology.Topology):
        return topology
    if isinstance(topology, (str, os.PathLike)):
        return _topology.Topology.from_json(os.fspath(topology))
    if topology is not None:
        raise ParallelDimsError(f"topology must be a Topology, a path to a topology file or None, "
                                f"got {type(topology).__name__}")
    if os.environ.get(_topology.ENV_TOPOLOGY):
        return _topology.detect(world_size=world_size or None)
    n = world_size or 1
    return _topology.Topology([{"name": "localhost"}],
                              [_topology.RankInfo(r, "localhost", r) for r in range(n)],
                              source="assumed (one host)")


def _job_topology(world_size: int, rank: int):
    """The job's one topology (``topology.job_topology``): the object the ``"ichiban"`` backend
    built when the default group was created, or, under another backend, the same exchange run
    once here through the default group's store (the declared file, else detection)."""
    store = None
    if world_size > 1 and dist.is_initialized():
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - fall back to the environment's layout
            store = None
    return _topology.job_topology(store, rank, world_size)


class ParallelDims:
    """This rank's process groups and coordinates on the ``dp x pp x tp`` grid.

    Attributes: ``tp, pp, dp, world_size, rank``; ``tp_group, pp_group, dp_group`` (process
    groups, valid at size 1 too); ``tp_rank, pp_rank, dp_rank`` (this rank inside each);
    ``tp_ranks, pp_ranks, dp_ranks`` (global ranks of this rank's groups); ``layout`` (every
    rank's place) and ``topology``.
    """

    def __init__(self, layout: Layout, rank: int, groups: dict):
        self.layout = layout
        self.topology = layout.topology
        self.tp, self.pp, self.dp = layout.tp, layout.pp, layout.dp
        self.world_size = layout.world_size
        self.rank = rank
        self.dp_rank, self.pp_rank, self.tp_rank = layout.coords(rank)
        d, p, t = self.dp_rank, self.pp_rank, self.tp_rank
        self.tp_ranks = list(layout.grid[d][p])
        self.pp_ranks = [layout.grid[d][i][t] for i in range(self.pp)]
        self.dp_ranks = [layout.grid[i][p][t] for i in range(self.dp)]
        self.tp_group = groups["tp"]
        self.pp_group = groups["pp"]
        self.dp_group = groups["dp"]
        self._mesh = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def device_mesh(self, device_type: str = "cpu"):
        """A torch ``DeviceMesh`` of shape (dp, pp, tp) named ``("dp", "pp", "tp")`` over these
        very groups (for FSDP2's ``fully_shard`` or DTensor code that wants a mesh)."""
        if self._mesh is None:
            import torch
            from torch.distributed.device_mesh import DeviceMesh

            mesh = torch.tensor(self.layout.grid, dtype=torch.int)
            self._mesh = DeviceMesh.from_group([self.dp_group, self.pp_group, self.tp_group],
                                               device_type, mesh=mesh,
                                               mesh_dim_names=("dp", "pp", "tp"))
        return self._mesh

    def describe(self) -> str:
        return (self.layout.describe() + f"\n  this rank: {self.rank} on host "
                f"{self.topology.host_of(self.rank)} -> dp {self.dp_rank}, pp {self.pp_rank}, "
                f"tp {self.tp_rank}")

    def __repr__(self) -> str:
        return (f"ParallelDims(tp={self.tp}, pp={self.pp}, dp={self.dp}, rank={self.rank}, "
                f"tp_rank={self.tp_rank}, pp_rank={self.pp_rank}, dp_rank={self.dp_rank})")


def init_parallel(tp: int = 1, pp: int = 1, dp: int = -1, topology=None, timeout=None) -> ParallelDims:
    """Build the tensor-, pipeline- and data-parallel groups of this job.

    Needs an initialised default process group (``dist.init_process_group``); every rank must
    call it with the same sizes. ``topology``: a Topology or a declared topology file; None
    reads the job's (``ICHIBAN_TOPOLOGY``, else detected). Collective: every group is created
    on every rank, in one order. ``timeout`` (a ``datetime.timedelta``): how long the groups'
    collectives wait for a peer; None: torch's default for new groups (torch does not pass the
    default group's timeout on to the groups made from it).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_parallel needs a default process group: call "
                           "torch.distributed.init_process_group(...) first (or run under "
                           "torchrun / `ichiban-train --nproc N`)")
    world, rank = dist.get_world_size(), dist.get_rank()
    resolve_sizes(tp, pp, dp, world)  # the sizes' error before any topology error
    if topology is None:
        topology = _job_topology(world, rank)
    layout = plan_layout(tp, pp, dp, topology, world_size=world)
    groups = {}
    for kind, ranks_list in (("tp", layout.tp_groups()), ("pp", layout.pp_groups()),
                             ("dp", layout.dp_groups())):
        for ranks in ranks_list:
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                groups[kind] = g
    return ParallelDims(layout, rank, groups)
