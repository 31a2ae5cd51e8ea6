"""Registration of the "ichiban" torch.distributed backend, its settings and its creator.

``init_process_group("ichiban")`` (or ``new_group(backend="ichiban")``) calls
``_create_backend`` once per group on every member. It

1. reads which host every member lives on from the job's one topology
   (``topology.job_topology``; the default group's creation runs its exchange),
2. removes this user's segments left by crashed jobs, on every host,
3. agrees with the other members on the group-wide settings (rank 0 decides:
   the shared-memory name, slot size, algorithm, the one-shot threshold of the
   cost model),
4. creates the Gloo groups the C++ backend delegates to: ``fallback`` over the
   whole group (send/recv, and the ops of groups spanning hosts) and, when the
   group spans hosts with the same number of ranks on each, ``inter`` among the
   ranks with the same local index (the middle step of hierarchical all-reduce),
5. hands the C++ backend a recipe for a NCCL group, which it follows only when
   the first CUDA tensor arrives (a CPU-only group never makes one),
6. and builds ``ichiban_comm._C.backend.IchibanBackend``.

Settings come from an :class:`IchibanOptions` passed as ``pg_options`` /
``backend_options``; the ``ICHIBAN_*`` environment variables only fill its
defaults (docs/settings.md).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import sys

import torch.distributed as dist

from .. import topology
from .._native import _C
from . import cost
from .hosts import host_assignment

ICHIBAN = "ichiban"


class IchibanOptions(_C.backend.BackendConfig):
    """Settings of one "ichiban" group.

        opts = IchibanOptions(algo="twoshot", slot_bytes=1 << 20)
        g = dist.new_group(backend="ichiban", pg_options=opts)

    A new object holds the C++ defaults with the ``ICHIBAN_*`` variables that
    are set applied on top; keyword arguments override both. ``nccl_options``
    (a ``ProcessGroupNCCL.Options``) configures the NCCL group made for CUDA
    tensors. Settings (all optional): slot_bytes, oneshot_max_bytes (-1: the
    cost model), algo (auto, oneshot, twoshot, ring, hier, flat), debug,
    spin_iters (-1: by cores), yield_iters, direct, direct_min_bytes, shared,
    nccl, liveness (auto, pid, heartbeat), heartbeat_ms. The group-wide ones
    (slot_bytes, oneshot_max_bytes, algo, direct_min_bytes) are rank 0's.
    """

    SETTINGS = ("slot_bytes", "oneshot_max_bytes", "algo", "debug", "spin_iters", "yield_iters",
                "direct", "direct_min_bytes", "shared", "nccl", "liveness", "heartbeat_ms")

    def __init__(self, *, nccl_options=None, **settings):
        super().__init__()
        self.fill_from_env()
        self.nccl_options = nccl_options
        for name, value in settings.items():
            if name not in self.SETTINGS:
                raise TypeError(f"IchibanOptions: unknown setting {name!r}; the settings are "
                                f"{', '.join(self.SETTINGS)} and nccl_options")
            want = type(getattr(self, name))
            if isinstance(value, bool) and want is not bool or not isinstance(value, want):
                raise TypeError(f"IchibanOptions: {name} must be {want.__name__}, got {value!r}")
            setattr(self, name, value)

    def __repr__(self) -> str:
        return "IchibanOptions(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.SETTINGS) + ")"


def _options(backend_options) -> IchibanOptions:
    if backend_options is None:
        return IchibanOptions()
    if isinstance(backend_options, IchibanOptions):
        return backend_options
    if dist.is_nccl_available() and isinstance(backend_options, dist.ProcessGroupNCCL.Options):
        return IchibanOptions(nccl_options=backend_options)
    raise TypeError(f"backend_options/pg_options for the ichiban backend must be IchibanOptions "
                    f"(or ProcessGroupNCCL.Options for its CUDA tensors), got {type(backend_options).__name__}")


def _shm_prefix() -> str:
    return f"ichiban_{os.getuid()}_"


def _sweep_stale_segments() -> None:
    """Remove this user's segments whose creating job (the pid in the name) is gone.

    Segments are unlinked as soon as every member has mapped them, so only a
    job killed while its members were connecting can leave one behind.
    """
    prefix = _shm_prefix()
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("_", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        except PermissionError:
            pass


def _group_config(store, rank: int, opts: IchibanOptions, local_size: int) -> dict:
    """Rank 0 decides the group-wide settings; everyone reads the same answer."""
    key = "ichiban_config"
    if rank == 0:
        if opts.oneshot_max_bytes >= 0:
            threshold, source = opts.oneshot_max_bytes, "options"
        else:
            threshold, source = cost.choose_oneshot_max_bytes(local_size)
        cfg = {
            "shm_name": f"{_shm_prefix()}{os.getpid()}_{secrets.token_hex(4)}",
            "oneshot_max_bytes": int(threshold),
            "threshold_source": source,
            "slot_bytes": int(opts.slot_bytes),
            "algo": opts.algo.strip().lower(),
            "direct_min_bytes": int(opts.direct_min_bytes),
        }
        store.set(key, json.dumps(cfg))
        return cfg
    store.wait([key])
    return json.loads(store.get(key).decode())


def _gloo(store, prefix: str, rank: int, size: int, timeout: datetime.timedelta):
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, timeout)


class _NcclRecipe:
    """What the C++ backend calls on the first CUDA tensor: the NCCL group over
    the same ranks, with the caller's NCCL options (timeout and ranks are the group's)."""

    def __init__(self, store, rank, size, timeout, group_id, global_ranks, nccl_options):
        self.args = (store, rank, size, timeout, group_id, list(global_ranks), nccl_options)

    def __call__(self):
        store, rank, size, timeout, group_id, global_ranks, base = self.args
        opts = dist.ProcessGroupNCCL.Options()
        if base is not None:
            for name in ("is_high_priority_stream", "config"):
                if hasattr(base, name):
                    try:
                        setattr(opts, name, getattr(base, name))
                    except (AttributeError, TypeError):
                        pass
        opts._timeout = timeout
        opts.global_ranks_in_group = global_ranks
        opts.group_name = group_id
        return dist.ProcessGroupNCCL(dist.PrefixStore("ichiban_nccl/", store), rank, size, opts)


def _job_topology(store, rank: int, size: int, timeout_s: float):
    if not dist.is_initialized():
        # The default group being created: the job's one exchange, through its store.
        return topology.job_topology(store, rank, size, timeout=timeout_s, refresh=True)
    return topology.job_topology(None, world_size=dist.get_world_size())


def _create_backend(dist_opts, backend_options=None):
    """The creator torch calls (extended API) for every group on every member."""
    opts = _options(backend_options)
    store = dist_opts.store
    rank, size = int(dist_opts.group_rank), int(dist_opts.group_size)
    timeout = dist_opts.timeout
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    group_id = str(dist_opts.group_id)
    global_ranks = list(dist_opts.global_ranks_in_group) or list(range(size))
    timeout_s = timeout.total_seconds()

    topo = _job_topology(store, rank, size, timeout_s)
    host_of, hosts = host_assignment(topo, global_ranks)
    local_size = host_of.count(host_of[rank])
    if host_of.index(host_of[rank]) == rank:  # the first member on each host
        _sweep_stale_segments()
    agreed = _group_config(store, rank, opts, local_size)

    fallback = _gloo(store, "ichiban_fallback/", rank, size, timeout) if size > 1 else None
    inter = None
    counts = [host_of.count(h) for h in range(len(hosts))]
    if len(hosts) > 1 and len(set(counts)) == 1:
        # Ranks with the same index on their host form one inter-host group;
        # its rank is the host index (hosts are numbered 0..H-1).
        local_index = [r for r in range(size) if host_of[r] == host_of[rank]].index(rank)
        inter = _gloo(store, f"ichiban_inter_{local_index}/", host_of[rank], len(hosts), timeout)
    # No CUDA call here: ICHIBAN_NO_NCCL=1 (nccl=False) or no NCCL build means CUDA tensors are refused.
    make_cuda = (_NcclRecipe(store, rank, size, timeout, group_id, global_ranks, opts.nccl_options)
                 if opts.nccl and dist.is_nccl_available() else None)

    cfg = opts._copy()
    cfg.group_name = group_id
    cfg.shm_name = f"{agreed['shm_name']}_{group_id}"
    cfg.timeout_s = timeout_s
    cfg.host_of = host_of
    cfg.labels = global_ranks
    cfg.slot_bytes = agreed["slot_bytes"]
    cfg.oneshot_max_bytes = agreed["oneshot_max_bytes"]
    cfg.algo = agreed["algo"]
    cfg.direct_min_bytes = agreed["direct_min_bytes"]
    cfg.shared = bool(opts.shared or _C.backend.shared_tensors_enabled())
    if cfg.debug and rank == 0:
        print(f"[ichiban] group={group_id} size={size} hosts={len(hosts)} local={local_size} "
              f"oneshot_max_bytes={cfg.oneshot_max_bytes} ({agreed['threshold_source']}) "
              f"algo={cfg.algo} slot={cfg.slot_bytes} inter={'gloo' if inter else 'none'} "
              f"cuda={'nccl on first use' if make_cuda else 'none'} topology={topo.source}",
              file=sys.stderr, flush=True)
    return _C.backend.create(store, rank, size, cfg, fallback, inter, make_cuda)


def is_registered() -> bool:
    return ICHIBAN.upper() in dist.Backend._plugins


def register() -> None:
    """Register "ichiban" with torch.distributed (idempotent)."""
    if not dist.is_available() or is_registered():
        return
    dist.Backend.register_backend(ICHIBAN, _create_backend, extended_api=True, devices=["cpu", "cuda"])


def _entry_point() -> None:
    """torch.distributed.backends entry point: torch calls it with no arguments."""
    register()
