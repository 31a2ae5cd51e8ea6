"""Registration of the "ichiban" torch.distributed backend and its creator.

``init_process_group("ichiban")`` (or ``new_group(backend="ichiban")``) calls
``_create_backend`` once per group on every member. It

1. finds which host every member lives on (hosts.py),
2. agrees with the other members on the configuration (rank 0 decides: the
   algorithm thresholds of the cost model, the shared-memory name),
3. creates the Gloo groups the C++ backend delegates to: ``fallback`` over the
   whole group (send/recv, and the ops of groups spanning hosts) and, when the
   group spans hosts with the same number of ranks on each, ``inter`` among the
   ranks with the same local index (the middle step of hierarchical
   all-reduce),
4. on a CUDA machine, a NCCL group that takes every CUDA tensor,
5. and builds ``ichiban_comm._C.backend.IchibanBackend``.

Environment variables (all optional): ICHIBAN_ALGO (auto, oneshot, twoshot,
ring, hier, flat), ICHIBAN_DEBUG=1 (one line per op: algorithm, bytes,
microseconds), ICHIBAN_SHM_SLOT_BYTES, ICHIBAN_ONESHOT_MAX_BYTES,
ICHIBAN_TUNE_FILE, ICHIBAN_SPIN, ICHIBAN_TOPOLOGY.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import sys

import torch
import torch.distributed as dist

from . import cost
from .hosts import host_assignment

ICHIBAN = "ichiban"

# 256 KiB per rank and buffer: a unit of work (the caller's chunk plus n slots, two buffers
# alternating) stays inside one core's L2, so the reduction reads back what the copy-in just
# wrote from cache. Measured on a 2-core VM (4 MiB L2): 128 MiB all_reduce 60-64 ms with
# 256 KiB slots vs 75-77 ms with 1 MiB at 2 ranks, 87 vs 99 ms at 4; each barrier is still
# amortised over ~25 us of copying. With the pipelined two-shot, 128 KiB to 1 MiB slots gave
# the same times at 4 ranks within run-to-run noise, so 256 KiB stays.
_DEFAULT_SLOT_BYTES = 256 << 10
# Single-copy reads for per-peer blocks from this size up (below it the
# system call per block costs more than the second copy saves).
_DEFAULT_DIRECT_MIN_BYTES = 256 << 10


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


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


def _spin_policy(local_size: int) -> tuple[int, int]:
    """(busy polls, sched_yield polls) before a waiter sleeps on the futex.

    The spin is short on purpose: measured on a loaded 2-core box, 200 polls
    (a few microseconds) then 2 yields gave 17 us all-reduce latency at 2
    ranks where 20000 polls and 100 yields gave 600 us: a long spin holds the
    core the peer needs. Yields do not: with nothing else runnable one returns
    at once (a longer, cheap wait), and otherwise it hands the core over. A
    futex sleep costs a wake-up (in a VM, an interrupt to a halted vCPU)
    whenever the peer is more than the spin late, which torch.distributed's
    Python layer between two ops often makes it. 2 ranks on 2 cores,
    alternating runs: 8 B - 4 KiB all_reduce 9.2-12.3 us with 50 yields
    against 10.1-15.0 us with 2 (three rounds); 2-128 MiB unchanged within
    noise; with a CPU-bound process beside them, 26.8-63.5 us against
    37.1-63.3 us. ICHIBAN_SPIN="polls[,yields]" overrides.
    """
    spin = os.environ.get("ICHIBAN_SPIN")
    if spin:
        try:
            parts = [int(x) for x in spin.split(",")]
        except ValueError:
            raise ValueError(f"ICHIBAN_SPIN={spin!r}: expected 'polls' or 'polls,yields'") from None
        return parts[0], parts[1] if len(parts) > 1 else 2
    if cost.oversubscribed(local_size):
        # More ranks than cores: a yield hands the core straight to a runnable
        # peer on it, where a sleep leaves the core idle until a wake-up. 8 B
        # all_reduce, 4 ranks on 2 cores, alternating: median 42 us with 20
        # polls and 50 yields (and with 0 and 50) against 46 us with 50 and 2
        # (19 and 14 runs); 32 MiB unchanged within noise.
        return 20, 50
    return 200, 50


def _group_config(store, rank: int, local_size: int) -> dict:
    """Rank 0 decides; everyone reads the same answer."""
    key = "ichiban_config"
    if rank == 0:
        threshold, source = cost.choose_oneshot_max_bytes(local_size)
        cfg = {
            "shm_name": f"{_shm_prefix()}{os.getpid()}_{secrets.token_hex(4)}",
            "oneshot_max_bytes": threshold,
            "threshold_source": source,
            "slot_bytes": _env_int("ICHIBAN_SHM_SLOT_BYTES", _DEFAULT_SLOT_BYTES),
            "algo": os.environ.get("ICHIBAN_ALGO", "auto").strip().lower(),
            "direct_min_bytes": _env_int("ICHIBAN_CMA_MIN_BYTES", _DEFAULT_DIRECT_MIN_BYTES),
        }
        store.set(key, json.dumps(cfg))
        return cfg
    store.wait([key])
    return json.loads(store.get(key).decode())


def _gloo(store, prefix: str, rank: int, size: int, timeout: datetime.timedelta):
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, timeout)


def _nccl(store, rank: int, size: int, timeout: datetime.timedelta, group_id: str, global_ranks):
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    opts.global_ranks_in_group = list(global_ranks)
    opts.group_name = group_id
    return dist.ProcessGroupNCCL(dist.PrefixStore("ichiban_nccl/", store), rank, size, opts)


def _wants_direct() -> bool:
    """Single-copy reads between this host's ranks (cross-memory attach).

    Each rank answers for itself (ICHIBAN_CMA=0 turns it off); the backend
    uses it only when every member of the host wants it and could read from
    every other member when the group was created.
    """
    v = os.environ.get("ICHIBAN_CMA", "1").strip().lower()
    if v not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"ICHIBAN_CMA={v!r}: expected 0 or 1")
    return v not in ("0", "false", "off")


def _wants_cuda() -> bool:
    return (torch.cuda.is_available() and dist.is_nccl_available()
            and os.environ.get("ICHIBAN_NO_NCCL", "0") != "1")


def _create_backend(dist_opts, backend_options=None):
    """The creator torch calls (extended API) for every group on every member."""
    from .._native import _C

    store = dist_opts.store
    rank, size = int(dist_opts.group_rank), int(dist_opts.group_size)
    timeout = dist_opts.timeout
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    group_id = str(dist_opts.group_id)
    global_ranks = list(dist_opts.global_ranks_in_group) or list(range(size))
    timeout_s = timeout.total_seconds()

    if rank == 0:
        _sweep_stale_segments()
    host_of, hosts = host_assignment(store, rank, size, global_ranks[rank], timeout_s)
    local_size = host_of.count(host_of[rank])
    cfg = _group_config(store, rank, local_size)
    spin, yields = _spin_policy(local_size)

    fallback = _gloo(store, "ichiban_fallback/", rank, size, timeout) if size > 1 else None
    inter = None
    counts = [host_of.count(h) for h in range(len(hosts))]
    if len(hosts) > 1 and len(set(counts)) == 1:
        # Ranks with the same index on their host form one inter-host group;
        # its rank is the host index (hosts are numbered 0..H-1).
        local_index = [r for r in range(size) if host_of[r] == host_of[rank]].index(rank)
        inter = _gloo(store, f"ichiban_inter_{local_index}/", host_of[rank], len(hosts), timeout)
    cuda = _nccl(store, rank, size, timeout, group_id, global_ranks) if _wants_cuda() else None

    debug = os.environ.get("ICHIBAN_DEBUG", "0").strip() not in ("", "0", "false")
    if debug and rank == 0:
        print(f"[ichiban] group={group_id} size={size} hosts={len(hosts)} local={local_size} "
              f"oneshot_max_bytes={cfg['oneshot_max_bytes']} ({cfg['threshold_source']}) "
              f"algo={cfg['algo']} slot={cfg['slot_bytes']} inter={'gloo' if inter else 'none'} "
              f"cuda={'nccl' if cuda else 'none'}", file=sys.stderr, flush=True)
    return _C.backend.create(
        store, rank, size, group_name=group_id, shm_name=f"{cfg['shm_name']}_{group_id}",
        timeout_s=timeout_s, host_of=host_of, labels=global_ranks, slot_bytes=int(cfg["slot_bytes"]),
        oneshot_max_bytes=int(cfg["oneshot_max_bytes"]), algo=cfg["algo"], debug=debug,
        spin_iters=spin, yield_iters=yields, fallback=fallback, inter=inter, cuda=cuda,
        direct=_wants_direct(), direct_min_bytes=int(cfg["direct_min_bytes"]),
        shared=bool(_C.backend.shared_tensors_enabled()))


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
