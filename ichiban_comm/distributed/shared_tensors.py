"""Host-shared tensor memory: the peers of a host all-reduce each other's
tensors in place.

A CPU tensor in private memory reaches a peer only through a copy, so the
fastest shared-memory all-reduce still moves the message through a segment
(two-shot: about 4.5x the message per rank at 4 ranks). With shared tensors
enabled, large CPU tensors are allocated from a memfd-backed arena that the
other ranks of the host map read-only; an all-reduce whose tensors are all in
arenas reduces each segment straight from the peers' tensors and touches
about 2.75x the message (algorithm "inplace" in ICHIBAN_DEBUG).

    ICHIBAN_SHARED_TENSORS=1 torchrun ... train.py      # before anything is allocated
    # or, first thing in the script:
    ichiban_comm.distributed.enable_shared_tensors()

Enable it before creating the tensors and the process group: a group decides
at creation whether every member has an arena, and only tensors allocated
afterwards live in one. It is opt-in because it changes every large CPU
allocation of the process:

- freed blocks stay in the arena for reuse, like a caching allocator, until
  ``trim_shared_tensors()`` returns their pages;
- a child forked afterwards (a fork-started DataLoader worker) *shares* the
  parent's arena tensors instead of getting copy-on-write copies, and
  allocates nothing new from the arena.
"""

from __future__ import annotations

import os

import torch

_DEFAULT_MIN_BYTES = 64 << 10


def enable_shared_tensors(reserve_bytes: int = 0, min_bytes: int = _DEFAULT_MIN_BYTES) -> None:
    """Install the host-shared CPU allocator (idempotent: the first call's sizes stand).

    reserve_bytes: address space of the arena (0: the machine's memory); only
    touched pages use memory. min_bytes: smaller blocks come from the previous
    allocator, as do blocks once the arena is full.
    """
    from .._native import _C

    if not isinstance(reserve_bytes, int) or reserve_bytes < 0:
        raise ValueError(f"reserve_bytes={reserve_bytes!r}: expected an int >= 0 (0: the machine's memory)")
    if not isinstance(min_bytes, int) or min_bytes < 1:
        raise ValueError(f"min_bytes={min_bytes!r}: expected an int >= 1")
    _C.backend.enable_shared_tensors(reserve_bytes=reserve_bytes, min_bytes=min_bytes)


def shared_tensors_enabled() -> bool:
    from .._native import _C

    return bool(_C.backend.shared_tensors_enabled())


def is_shared(tensor: torch.Tensor) -> bool:
    """Whether the tensor's bytes live in this process's arena."""
    from .._native import _C

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    return tensor.device.type == "cpu" and _C.backend.shared_tensor_offset(tensor) >= 0


def shared_tensor_stats() -> dict:
    """reserve, top (high-water mark), in_use, free, allocations, fallbacks (bytes / counts)."""
    from .._native import _C

    return dict(_C.backend.shared_tensor_stats())


def trim_shared_tensors() -> int:
    """Return the pages of free arena blocks to the system; returns the bytes released."""
    from .._native import _C

    return int(_C.backend.trim_shared_tensors())


def enable_from_env() -> None:
    """ICHIBAN_SHARED_TENSORS=1 enables it when the package is imported."""
    from .._native import _C

    if _C.backend.env_flag("ICHIBAN_SHARED_TENSORS", False):
        enable_shared_tensors()
