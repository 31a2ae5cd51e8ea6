"""Loading a committed step: verify, read in parallel, reassemble by global offsets.

Every tensor is described by its global shape and the shards that were saved
(each with its global offsets). A load asks for a *region* of each tensor: the
whole tensor, or, when filling a DTensor in place, the local shard of the
loading rank's placement. Shards that overlap the region are read (checksums
verified, in parallel on the thread pool) and their overlap copied in, so any
saved layout loads into any other.
"""

from __future__ import annotations

import math
import os

import torch

from .._native import _C
from . import _layout as layout
from ._tree import dtype_from_name, flatten, unflatten
from .errors import CheckpointCorruptError


class _ReadBatch:
    def __init__(self, step, directory: str, what: str | None = None, read=None):
        self.step, self.dir = step, directory
        # read(specs, dsts): _C.checkpoint.read_chunks, or the memory tier's reader of mapped snapshots
        self.read = read or _C.checkpoint.read_chunks
        self.what = what or f"checkpoint step {step}"
        self.specs: list[tuple] = []
        self.dsts: list[torch.Tensor] = []
        self.labels: dict[str, tuple[str, str]] = {}

    def add(self, chunks: list, dst: torch.Tensor, tensor_name: str, expected: int) -> None:
        """Read chunks (in order) into the flat uint8 tensor dst."""
        idx = len(self.dsts)
        self.dsts.append(dst)
        off = 0
        for k, (fname, foff, stored, raw, crc, codec, planes) in enumerate(chunks):
            label = f"{self.what}: file {fname}: tensor {tensor_name!r} chunk {k}"
            self.labels[label] = (fname, tensor_name)
            self.specs.append((os.path.join(self.dir, fname), int(foff), int(stored), int(raw), int(crc),
                               int(codec), int(planes), idx, off, label))
            off += int(raw)
        if off != expected or dst.numel() != expected:
            raise CheckpointCorruptError(
                f"{self.what}: file {layout.MANIFEST}: tensor {tensor_name!r} has chunks "
                f"of {off} bytes in all but needs {expected}", step=self.step, file=layout.MANIFEST,
                tensor=tensor_name)

    def run(self) -> None:
        if not self.specs:
            return
        try:
            self.read(self.specs, self.dsts)
        except RuntimeError as e:
            msg = str(e).split("\nException raised from")[0]
            for label, (fname, tname) in self.labels.items():
                if msg.startswith(label + ":"):
                    raise CheckpointCorruptError(msg, step=self.step, file=fname, tensor=tname) from None
            raise CheckpointCorruptError(f"{self.what}: {msg}", step=self.step) from None


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _local_region(target, shape):
    """(offsets, shape) of the part of a saved tensor that target holds on this rank."""
    from ._plan import _is_dtensor

    if _is_dtensor(target):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        lshape, offsets = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                target.placements)
        return [int(o) for o in offsets], [int(s) for s in lshape]
    return [0] * len(shape), list(shape)


def _overlap(r_off, r_shape, s_off, s_shape):
    lo = [max(a, b) for a, b in zip(r_off, s_off)]
    hi = [min(a + n, b + m) for a, n, b, m in zip(r_off, r_shape, s_off, s_shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, hi


def _narrow(t, start, lo, hi):
    for d, (a, b) in enumerate(zip(lo, hi)):
        t = t.narrow(d, a - start[d], b - a)
    return t


def load_step(root: str, step: int, into=None):
    manifest = layout.read_manifest(root, step)
    return load_tree(step, layout.step_dir(root, step), manifest, into)


def load_rank_step(root: str, step: int, rank: int):
    """The rank-local state that `rank` saved with the step (None when it saved none)."""
    manifest = layout.read_manifest(root, step)
    ranks = manifest.get("ranks") or []
    if not 0 <= rank < manifest["world_size"]:
        raise ValueError(f"rank must be in [0, {manifest['world_size']}) for checkpoint step {step} "
                         f"(saved by {manifest['world_size']} ranks), got {rank}")
    part = ranks[rank] if rank < len(ranks) else None
    return None if part is None else load_tree(step, layout.step_dir(root, step), part, None)


def load_tree(step: int, directory: str, manifest: dict, into=None, read=None):
    """Rebuild manifest["tree"] from manifest["tensors"] / manifest["storages"]."""
    entries, storages = manifest["tensors"], manifest["storages"]
    targets: dict[str, torch.Tensor] = {}
    if into is not None:
        _, into_leaves = flatten(into)
        targets = dict(into_leaves)
        names = {e["name"] for e in entries}
        missing = [n for n in targets if n not in names]
        if missing:
            raise KeyError(f"into has tensors that checkpoint step {step} does not: {missing[:5]}")

    batch = _ReadBatch(step, directory, read=read)
    storage_bufs: dict[int, torch.Tensor] = {}
    outs: list = [None] * len(entries)
    copies: list = []   # (dst region view, shard buffer view) after the reads
    for i, e in enumerate(entries):
        dtype, shape, name = dtype_from_name(e["dtype"]), e["shape"], e["name"]
        target = targets.get(name)
        if target is not None:
            _check_target(step, name, target, dtype, shape)
        if "view" in e:
            sid = e["view"]["storage"]
            if sid not in storage_bufs:
                nbytes = storages[sid]["nbytes"]
                buf = torch.empty(nbytes, dtype=torch.uint8)
                batch.add(storages[sid]["chunks"], buf, f"{name} (shared storage {sid})", nbytes)
                storage_bufs[sid] = buf
            continue
        r_off, r_shape = _local_region(target, shape)
        out = torch.empty(r_shape, dtype=dtype)
        outs[i] = out
        for s in e["shards"]:
            s_off, s_shape = s["offsets"], s["shape"]
            nbytes = math.prod(s_shape) * out.element_size()
            if s_off == r_off and s_shape == r_shape:
                batch.add(s["chunks"], _flat_bytes(out), name, nbytes)
                continue
            ov = _overlap(r_off, r_shape, s_off, s_shape)
            if ov is None:
                continue
            buf = torch.empty(s_shape, dtype=dtype)
            batch.add(s["chunks"], _flat_bytes(buf), name, nbytes)
            copies.append((_narrow(out, r_off, *ov), _narrow(buf, s_off, *ov)))
    batch.run()
    for dst, src in copies:
        dst.copy_(src)
    for i, e in enumerate(entries):
        if "view" in e:
            v = e["view"]
            dtype = dtype_from_name(e["dtype"])
            es = torch.empty((), dtype=dtype).element_size()
            outs[i] = torch.empty(0, dtype=dtype).set_(storage_bufs[v["storage"]].untyped_storage(),
                                                       v["byte_offset"] // es, e["shape"], v["stride"])
    tensors = []
    for i, e in enumerate(entries):
        target = targets.get(e["name"])
        if target is None:
            tensors.append(outs[i])
            continue
        local = target.to_local() if hasattr(target, "to_local") else target
        with torch.no_grad():
            local.copy_(outs[i])
        tensors.append(target)
    return unflatten(manifest["tree"], tensors)


def _check_target(step, name, target, dtype, shape):
    if target.dtype != dtype:
        raise TypeError(f"into[{name}] has dtype {target.dtype} but checkpoint step {step} saved "
                        f"{dtype}; convert after loading")
    if list(target.shape) != list(shape):
        raise ValueError(f"into[{name}] has shape {tuple(target.shape)} but checkpoint step {step} saved "
                         f"{tuple(shape)}")
