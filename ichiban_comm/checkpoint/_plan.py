"""What a save writes: from the state's tensor leaves to byte blobs and manifest entries.

A *blob* is one run of bytes persisted as a unit, in row-major order of its
source: a whole plain tensor, a DTensor's local shard, or the span of a storage
that several leaves share (written once; the leaves become views into it on
load). In a distributed save each rank writes only its own blobs: DTensor
shards where the rank is the first replica, and plain (replicated) tensors
spread over the ranks by size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ._tree import dtype_name

_ALIGN = 64  # staging offsets: cache-line aligned, and a multiple of every element size


@dataclass
class Blob:
    source: torch.Tensor   # copied in row-major order (any strides, CPU or CUDA)
    nbytes: int
    plane_width: int
    target: dict           # the manifest dict (shard or storage) that gets "chunks"
    name: str


@dataclass
class Piece:
    blob: int
    source: torch.Tensor   # rows or a byte range of the blob's source
    blob_offset: int
    nbytes: int
    pool_offset: int = 0


@dataclass
class Plan:
    entries: list = field(default_factory=list)    # manifest "tensors", one per leaf
    storages: list = field(default_factory=list)   # manifest "storages"
    blobs: list = field(default_factory=list)      # what this rank writes
    replicated: list = field(default_factory=list)  # (name, source) saved once for all ranks

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blobs)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plane_width(dtype: torch.dtype) -> int:
    return dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize


def _is_dtensor(t) -> bool:
    # No DTensor exists unless its module was imported; importing it here costs seconds.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _check_tensor(path: str, t: torch.Tensor) -> None:
    if t.layout == torch.strided and (t.is_cpu or t.is_cuda):  # the common case, cheaply
        dtype_name(t.dtype)
        return
    if t.layout != torch.strided:
        raise TypeError(f"state[{path}] is a {t.layout} tensor; only dense tensors can be checkpointed "
                        f"(convert with .to_dense())")
    if t.device.type not in ("cpu", "cuda") and t.device.type != "meta":
        raise TypeError(f"state[{path}] is on {t.device}; only CPU and CUDA tensors can be checkpointed")
    if t.device.type == "meta":
        raise TypeError(f"state[{path}] is a meta tensor and holds no data")
    dtype_name(t.dtype)


def _dtensor_shard(path: str, dt):
    """(local tensor, global offsets, whether this rank writes it)."""
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = dt.device_mesh, dt.placements
    for p in placements:
        if isinstance(p, Partial):
            raise ValueError(f"state[{path}] is a DTensor with a Partial placement; reduce it "
                             f"(dt.redistribute(placements=[Replicate()]) or full_tensor()) before saving")
    local = dt.to_local()
    shape, offsets = compute_local_shape_and_global_offset(dt.shape, mesh, placements)
    coord = mesh.get_coordinate()
    writes = coord is not None and all(
        coord[i] == 0 for i, p in enumerate(placements) if isinstance(p, Replicate))
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"state[{path}]: DTensor local shape {tuple(local.shape)} does not match its "
                         f"placement ({tuple(shape)}); uneven custom shards are not supported")
    return local, [int(o) for o in offsets], writes


def _owner(sizes: list[tuple[int, str]], world: int) -> list[int]:
    """Greedy balance of replicated blobs over ranks; identical on every rank."""
    if world == 1:
        return [0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], sizes[i][1]))
    load = [0] * world
    owner = [0] * len(sizes)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += sizes[i][0]
    return owner


def build_plan(leaves: list, rank: int = 0, world: int = 1) -> Plan:
    plan = Plan()
    is_dt = [_is_dtensor(t) for _, t in leaves]
    for (path, t), dt in zip(leaves, is_dt):
        _check_tensor(path, t.to_local() if dt else t)

    # Plain leaves that share a storage with another leaf: one storage span blob.
    # (Storage addresses are unique across CPU and CUDA devices: one virtual address space.)
    groups: dict[int, list[int]] = {}
    for i, (path, t) in enumerate(leaves):
        if is_dt[i]:
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            groups.setdefault(storage.data_ptr(), []).append(i)
    view_of: dict[int, tuple[int, int]] = {}  # leaf -> (storage id, byte offset in span)
    replicated: list[tuple[int, str, torch.Tensor, int, dict]] = []  # (nbytes, name, source, width, target)
    for members in groups.values():
        if len(members) < 2:
            continue
        starts, ends = [], []
        for i in members:
            t = leaves[i][1]
            es = t.element_size()
            starts.append(t.storage_offset() * es)
            last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else t.storage_offset()
            ends.append((last + 1) * es if t.numel() else t.storage_offset() * es)
        span0 = (min(starts) // 16) * 16  # 16: keeps every member's byte offset a multiple of its element size
        span1 = max(ends)
        first = leaves[members[0]][1]
        span = torch.empty(0, dtype=torch.uint8, device=first.device).set_(
            first.untyped_storage(), span0, (span1 - span0,), (1,))
        widths = {_plane_width(leaves[i][1].dtype) for i in members}
        sid = len(plan.storages)
        target = {"nbytes": span1 - span0}
        plan.storages.append(target)
        label = f"<storage {sid} shared by {', '.join(leaves[i][0] for i in members[:3])}>"
        replicated.append((span1 - span0, label, span, widths.pop() if len(widths) == 1 else 1, target))
        for i in members:
            t = leaves[i][1]
            view_of[i] = (sid, t.storage_offset() * t.element_size() - span0)

    for i, (path, t) in enumerate(leaves):
        entry = {"name": path, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        plan.entries.append(entry)
        if is_dt[i]:
            local, offsets, writes = _dtensor_shard(path, t)
            entry["dtensor"] = True
            entry["shards"] = []
            if writes:
                shard = {"offsets": offsets, "shape": list(local.shape)}
                entry["shards"].append(shard)
                plan.blobs.append(Blob(local, _nbytes(local), _plane_width(t.dtype), shard, path))
        elif i in view_of:
            sid, off = view_of[i]
            entry["view"] = {"storage": sid, "byte_offset": off, "stride": list(t.stride())}
        else:
            shard = {"offsets": [0] * t.dim(), "shape": list(t.shape)}
            entry["shards"] = [shard]
            replicated.append((_nbytes(t), path, t, _plane_width(t.dtype), shard))

    plan.replicated = [(name, src) for _, name, src, _, _ in replicated]
    owners = _owner([(n, name) for n, name, *_ in replicated], world)
    for (n, name, src, width, target), r in zip(replicated, owners):
        target["rank"] = r
        if r == rank:
            plan.blobs.append(Blob(src, n, width, target, name))
    return plan


def split_pieces(plan: Plan, budget: int, chunk_bytes: int) -> list[list[Piece]]:
    """Cut the blobs into pieces that fit the staging pool and pack them into waves."""
    pieces: list[Piece] = []
    for b, blob in enumerate(plan.blobs):
        if blob.nbytes == 0:
            continue
        src = blob.source
        if _aligned(blob.nbytes) <= budget:
            pieces.append(Piece(b, src, 0, blob.nbytes))
        elif src.is_contiguous():
            step = budget // chunk_bytes * chunk_bytes if budget >= chunk_bytes else budget // _ALIGN * _ALIGN
            flat = src.reshape(-1).view(torch.uint8)
            for off in range(0, blob.nbytes, step):
                n = min(step, blob.nbytes - off)
                pieces.append(Piece(b, flat[off:off + n], off, n))
        else:
            row = blob.nbytes // max(1, src.shape[0]) if src.dim() else blob.nbytes
            rows = (budget - _ALIGN) // row if row else 0
            if rows < 1:
                raise ValueError(f"staging_budget_bytes={budget} is too small for {blob.name}: one row of "
                                 f"this non-contiguous tensor is {row} bytes")
            for r0 in range(0, src.shape[0], rows):
                r1 = min(src.shape[0], r0 + rows)
                pieces.append(Piece(b, src[r0:r1], r0 * row, (r1 - r0) * row))
    waves: list[list[Piece]] = []
    used = budget
    for p in pieces:
        size = _aligned(p.nbytes)
        if used + size > budget:
            waves.append([])
            used = 0
        p.pool_offset = used
        waves[-1].append(p)
        used += size
    return waves


def staging_bytes(plan: Plan) -> int:
    """Pool size that holds the whole snapshot in one wave."""
    return sum(_aligned(b.nbytes) for b in plan.blobs) or _ALIGN


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
