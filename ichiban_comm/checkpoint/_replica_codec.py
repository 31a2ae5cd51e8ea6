"""zstd on the replica stream, and the measurement that decides whether it pays.

A replica is streamed at most at ``replica_bandwidth``; encoding overlaps with sending, so a
compressed replica takes max(encode time, ratio x bytes / link) against bytes / link raw. It
pays only when the encoder is faster than the link and the data compresses; with no bandwidth
cap the link is the host network (or loopback), which one host's encoder threads rarely
outrun, so "auto" sends raw then. The decision is measured once on a sample of the first
snapshot and kept.

The encoded replica is the disk files' chunk format (byte planes + zstd per chunk, CRC-32C of
the stored bytes), so the keeper stores it as it arrives and the loader decodes it with the same
reader as disk chunks.
"""

from __future__ import annotations

import copy
import mmap
import os
import time

import torch

from .._native import _C
from . import keeper as kp
from ._plan import _plane_width
from ._tree import dtype_from_name

_SAMPLE = 64 << 20   # bytes encoded to decide
_MARGIN = 0.9        # compress only when it saves at least 10 %


def _chunk_lists(fragment):
    """(chunks, plane_width) for every chunk list of a fragment."""
    def parts():
        yield fragment
        if fragment.get("rank"):
            yield fragment["rank"]
    for part in parts():
        for e in part.get("entries", part.get("tensors", [])):
            width = _plane_width(dtype_from_name(e["dtype"]))
            for s in e.get("shards", []):
                yield s.get("chunks", []), width
        for s in part.get("storages", []):
            yield s.get("chunks", []), 1


def _private_view(fd: int, size: int):
    # A private mapping of a sealed memfd: readable without a copy (pages are shared until
    # written, and nothing writes them).
    m = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    return m, torch.frombuffer(m, dtype=torch.uint8)


def encode(meta: dict, fd: int, size: int, rank: int, threads: int, chunk_bytes: int, level: int = 1):
    """(meta, fds, sizes) of the snapshot encoded with byte planes + zstd, the fds sealed."""
    if size == 0:
        return meta, [], []
    m, src = _private_view(fd, size)
    out = [kp.new_memfd(f"ichiban-replica-z{i}", 0) for i in range(threads)]
    try:
        lists = list(_chunk_lists(meta["fragment"]))
        blobs = [(int(c[1]), int(c[3]), w) for chunks, w in lists for c in chunks]
        job = _C.checkpoint.WriteJob(src, blobs, [f"/proc/self/fd/{f}" for f in out], chunk_bytes, 1, level)
        job.wait()
        recs = {}
        for (b, _i, _ro, _rl, f, f_off, stored, crc, codec, planes) in job.records():
            recs[blobs[b][0]] = [f"r{rank}.z{f}", f_off, stored, blobs[b][1], crc, codec, planes]
        new = copy.deepcopy(meta)
        for chunks, _w in _chunk_lists(new["fragment"]):
            for j, c in enumerate(chunks):
                chunks[j] = recs[int(c[1])]
        new["files"] = [f"r{rank}.z{i}" for i in range(threads)]
        sizes = [os.fstat(f).st_size for f in out]
        for f in out:
            kp.seal(f)
        return new, out, sizes
    except BaseException:
        for f in out:
            os.close(f)
        raise
    finally:
        del src
        m.close()


def measure(meta: dict, fd: int, size: int, threads: int, chunk_bytes: int,
            level: int = 1) -> tuple[float, float]:
    """(ratio, encode bytes/s) of the replica encoding over the snapshot's first _SAMPLE bytes."""
    m, src = _private_view(fd, size)
    out = [kp.new_memfd("ichiban-replica-probe", 0) for _ in range(threads)]
    try:
        blobs, n = [], 0
        for chunks, w in _chunk_lists(meta["fragment"]):
            for c in chunks:
                if n < _SAMPLE:
                    blobs.append((int(c[1]), int(c[3]), w))
                    n += int(c[3])
        if not n:
            return 1.0, float("inf")
        t0 = time.perf_counter()
        job = _C.checkpoint.WriteJob(src, blobs, [f"/proc/self/fd/{f}" for f in out], chunk_bytes, 1, level)
        job.wait()
        dt = time.perf_counter() - t0
        return job.bytes_stored() / n, n / max(dt, 1e-9)
    finally:
        for f in out:
            os.close(f)
        del src
        m.close()


def pays(ratio: float, encode_rate: float, link_rate: float | None) -> bool:
    if link_rate is None:
        return False
    raw = 1.0 / link_rate
    return max(1.0 / encode_rate, ratio / link_rate) <= _MARGIN * raw
