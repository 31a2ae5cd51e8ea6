"""Reading a memory-tier step: which snapshot files a rank needs, and the mapped reader."""

from __future__ import annotations

import mmap
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from .._native import _C

_FD_PATH = "/proc/self/fd/"


def mapped_reader(pool: ThreadPoolExecutor):
    """A read(specs, dsts) for load_tree: raw chunks of snapshot memfds are checked (CRC-32C)
    and copied straight out of a read-only mapping; anything else goes to read_chunks.

    Reading a memfd with pread goes through the kernel's shmem read path page by page, slower
    than a memory copy (benchmarks/checkpoint_memory.py measures both); a populated mapping
    costs one page-table pass, then the CRC and the copy run at memory bandwidth.
    """
    def read(specs, dsts):
        mapped = [s for s in specs if s[5] == 0 and s[0].startswith(_FD_PATH)]
        rest = [s for s in specs if not (s[5] == 0 and s[0].startswith(_FD_PATH))]
        if rest:
            _C.checkpoint.read_chunks(rest, dsts)
        if not mapped:
            return
        views = {}
        maps = []
        try:
            for path in {s[0] for s in mapped}:
                fd = int(path[len(_FD_PATH):])
                size = os.fstat(fd).st_size
                if size == 0:
                    views[path] = torch.empty(0, dtype=torch.uint8)
                    continue
                m = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ)
                maps.append(m)
                with warnings.catch_warnings():   # read-only on purpose: nothing writes through it
                    warnings.simplefilter("ignore", UserWarning)
                    views[path] = torch.frombuffer(m, dtype=torch.uint8)
            flat = [d.view(-1) for d in dsts]

            def one(spec):
                path, off, stored, raw, crc, _codec, _planes, di, doff, label = spec
                src = views[path]
                if off + stored > src.numel() or stored != raw:
                    raise RuntimeError(f"{label}: chunk [{off}, +{stored}) is outside the snapshot of "
                                       f"{src.numel()} bytes")
                piece = src[off:off + stored]
                got = _C.checkpoint.crc32c_tensor(piece)
                if got != crc:
                    raise RuntimeError(f"{label}: crc32c mismatch (manifest 0x{crc:08x}, memory "
                                       f"0x{got:08x}): the snapshot is corrupted")
                _C.checkpoint.copy_bytes(flat[di][doff:doff + raw], piece)

            # Every chunk's read must end before the mappings close below: with pool.map the first
            # failure (a CRC mismatch) would leave other threads still reading unmapped pages.
            futures = [pool.submit(one, spec) for spec in mapped]
            wait(futures)
            for f in futures:
                f.result()
        finally:
            views.clear()
            for m in maps:
                try:
                    m.close()
                except BufferError:
                    pass  # a traceback still holds a view: the mapping goes with it
    return read


def _all_chunk_lists(manifest):
    for e in manifest["tensors"]:
        for s in e.get("shards", []):
            yield s, e
    for s in manifest["storages"]:
        yield s, None


def needed_files(manifest, into) -> set[str]:
    """Snapshot files holding a chunk this rank's load reads (the regions of into's DTensors)."""
    from ._loader import _local_region, _overlap
    from ._tree import flatten

    targets = dict(flatten(into)[1]) if into is not None else {}
    needed = set()
    for s in manifest["storages"]:
        needed.update(c[0] for c in s.get("chunks", []))
    for e in manifest["tensors"]:
        if "view" in e:
            continue
        r_off, r_shape = _local_region(targets.get(e["name"]), e["shape"])
        for s in e.get("shards", []):
            if _overlap(r_off, r_shape, s["offsets"], s["shape"]) is not None or not r_shape:
                needed.update(c[0] for c in s.get("chunks", []))
    for part in manifest.get("ranks") or []:
        if part:
            for e in part["tensors"]:
                for s in e.get("shards", []):
                    needed.update(c[0] for c in s.get("chunks", []))
            for s in part["storages"]:
                needed.update(c[0] for c in s.get("chunks", []))
    return needed


def rewrite_chunks(manifest, paths) -> None:
    def fix(chunks):
        for c in chunks:
            c[0] = paths.get(c[0], c[0])
    for s, _ in _all_chunk_lists(manifest):
        fix(s.get("chunks", []))
    for part in manifest.get("ranks") or []:
        if part:
            for e in part["tensors"]:
                for s in e.get("shards", []):
                    fix(s.get("chunks", []))
            for s in part["storages"]:
                fix(s.get("chunks", []))
