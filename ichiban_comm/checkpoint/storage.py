"""torch.distributed.checkpoint storage on ichiban_comm's chunk files.

    dcp.save(state, storage_writer=StorageWriter(path))
    dcp.async_save(state, storage_writer=StorageWriter(path))
    dcp.load(state, storage_reader=StorageReader(path))

DCP plans the save (which rank writes what, resharding on load); these classes
move the bytes: the same C++ writer threads as AsyncCheckpointer (chunked,
crc32c, optional byte planes + zstd, fsync), and the same verified parallel
reader. The metadata file is written last, fsynced, with a checksum line.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import threading

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader as _DcpReader
from torch.distributed.checkpoint.storage import StorageWriter as _DcpWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .._native import _C
from . import _layout as layout
from ._loader import _ReadBatch
from .checkpointer import _CODECS, DEFAULT_CHUNK_BYTES
from ._plan import Piece, _is_dtensor
from ._stager import StagingPool
from .errors import CheckpointCorruptError

METADATA = ".metadata"


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class StorageWriter(_DcpWriter):
    """Writes a DCP checkpoint into directory ``path`` with ichiban_comm's writer threads.

    It is also ``dcp.async_save``'s stager: tensors (plain, or DTensors' local shards on any
    mesh) are copied into a staging pool (C++ threads for CPU tensors, a side stream for CUDA
    ones) and the caller waits only for that copy. Every save owns the pool it staged into
    until DCP has let go of the staged tensors (written them, or, with the process executor,
    handed them to the checkpoint process); an ``async_save`` that overlaps one still in flight
    takes another pool, never a busy one. Idle pools are kept and reused, so with one writer
    a run allocates one pool (two while saves overlap), pinned off the caller's thread as in
    ``AsyncCheckpointer``.
    """

    # AsyncStager protocol: stage() returns a finished copy, nothing to synchronize later.
    _synchronize_after_execute = False

    def __init__(self, path, *, compression: str | None = None, compression_level: int = 1,
                 writer_threads: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 pin_memory: bool = True):
        super().__init__()
        if compression not in _CODECS:
            raise ValueError(f"compression must be None or 'zstd', got {compression!r}")
        if not isinstance(writer_threads, int) or writer_threads < 1:
            raise ValueError(f"writer_threads must be an integer >= 1, got {writer_threads!r}")
        if not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be a bool, got {pin_memory!r}")
        self.path = os.fspath(path)
        self.codec, self.level = _CODECS[compression], compression_level
        self.threads, self.chunk_bytes = writer_threads, chunk_bytes
        self.pin_memory = pin_memory
        self.prefix = "r0"
        self._pools: list[StagingPool] = []
        self._claimed: set[int] = set()     # id() of pools a stage() is filling right now
        self._leases: dict[int, tuple] = {}  # id(pool) -> (storage of its staged views, address, length)
        self._pools_lock = threading.Lock()
        self._tls = threading.local()       # per save thread: the checkpoint path of that save

    def __getstate__(self):  # a process-based async_save pickles the writer: not its pools
        state = dict(self.__dict__)
        state["_pools"], state["_claimed"], state["_leases"] = [], set(), {}
        del state["_pools_lock"], state["_tls"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pools_lock = threading.Lock()
        self._tls = threading.local()

    @property
    def _path(self) -> str:
        # Overlapping async_saves run on different executor threads through this one writer:
        # each save's reset(checkpoint_id) sets the path for its own thread only.
        return getattr(self._tls, "path", self.path)

    # ------------------------------------------------------------------ staging
    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        pass

    def stats(self) -> dict:
        """Per staging pool: its counters (see AsyncCheckpointer.stats) and how many saves still
        hold it (leases)."""
        with self._pools_lock:
            return {"pools": [dict(p.stats(), leases=int(self._busy(p))) for p in self._pools]}

    def _busy(self, pool: StagingPool) -> bool:
        """Whether a save still holds the pool: its staged views share one storage of their own
        over the pool's bytes, and that storage is alive (DCP has not let go of them) and still
        points there (pickling them for the checkpoint process moves them to shared memory)."""
        lease = self._leases.get(id(pool))
        if lease is None:
            return False
        storage, address, _ = lease
        if storage.data_ptr() == address and torch._C._storage_Use_Count(storage._cdata) > 1:
            return True
        del self._leases[id(pool)]
        return False

    def close(self) -> None:
        """Release the idle staging pools (a pool a save still holds is freed with it)."""
        with self._pools_lock:
            keep = []
            for p in self._pools:
                if self._busy(p):
                    keep.append(p)
                else:
                    p.close()
            self._pools = keep

    def _written(self, sources) -> None:
        """This save's staged bytes are on disk: the pool they were staged in (found by address;
        never another save's) is free, even while DCP still holds the views for a moment."""
        with self._pools_lock:
            for key, (_, address, length) in list(self._leases.items()):
                if any(address <= t.data_ptr() < address + length for t in sources if t.numel()):
                    del self._leases[key]

    def _claim_pool(self, nbytes: int) -> StagingPool:
        with self._pools_lock:
            free = [p for p in self._pools if id(p) not in self._claimed and not self._busy(p)]
            if free:  # the smallest that holds the state, else the largest (it grows)
                fits = [p for p in free if p.nbytes >= nbytes]
                pool = min(fits, key=lambda p: p.nbytes) if fits else max(free, key=lambda p: p.nbytes)
            else:
                pool = StagingPool(pin=self.pin_memory, what="StorageWriter staging pool")
                self._pools.append(pool)
            self._claimed.add(id(pool))
            return pool

    def stage(self, state_dict):
        """A copy of state_dict whose tensors live in a staging pool this save owns."""
        leaves: list[torch.Tensor] = []

        def collect(x):
            if _is_dtensor(x):
                leaves.append(x.to_local())
            elif isinstance(x, torch.Tensor):
                leaves.append(x)
            elif isinstance(x, dict):
                for v in x.values():
                    collect(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    collect(v)

        collect(state_dict)
        pieces, used = [], 0
        for i, t in enumerate(leaves):
            n = t.numel() * t.element_size()
            pieces.append(Piece(i, t.detach(), 0, n, used))
            used += -(-n // 64) * 64
        pool = self._claim_pool(used)
        try:
            buf, fresh = pool.prepare(used)
            pool.copy_in([p for p in pieces if p.nbytes], buf)
            # The staged tensors are views of a storage of their own over the pool's bytes:
            # the pool is busy exactly as long as that storage holds them.
            lease = pool.arena.tensor()[:max(64, used)]
            if fresh:
                pool.settle()
        finally:
            with self._pools_lock:
                if "lease" in locals():
                    self._leases[id(pool)] = (lease.untyped_storage(), pool.arena.address, lease.numel())
                self._claimed.discard(id(pool))
        staged = iter([lease[p.pool_offset:p.pool_offset + p.nbytes].view(p.source.dtype).view(p.source.shape)
                       for p in pieces])
        del lease

        def rebuild(x):
            if _is_dtensor(x):
                from torch.distributed.tensor import DTensor

                # The spec (mesh, placements, global shape) is kept; the local shard is the CPU
                # copy, also for a CUDA mesh (as torch's own CPU staging does).
                return DTensor(next(staged), x._spec, requires_grad=False)
            if isinstance(x, torch.Tensor):
                return next(staged)
            if isinstance(x, dict):
                return type(x)((k, rebuild(v)) for k, v in x.items())
            if isinstance(x, list):
                return [rebuild(v) for v in x]
            if isinstance(x, tuple):
                return tuple(rebuild(v) for v in x)
            return x

        return rebuild(state_dict)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self._tls.path = os.fspath(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        os.makedirs(self._path, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"r{i}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        prefix = plan.storage_data or "r0"
        sources, infos, widths = [], [], []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                infos.append({"kind": "bytes"})
                widths.append(1)
            else:
                t = data.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                if t.is_conj() or t.is_neg():
                    t = t.resolve_conj().resolve_neg()
                infos.append({"kind": "tensor", "dtype": str(t.dtype).removeprefix("torch."),
                              "shape": list(t.shape)})
                widths.append(t.element_size())
            # Written in place from the tensor's memory: DCP has already staged it (async_save)
            # or the caller is waiting (save); only strided tensors are packed first.
            sources.append(t.contiguous().reshape(-1).view(torch.uint8))
        sizes = [t.numel() for t in sources]
        names = [f"{prefix}_w{k}.bin" for k in range(self.threads)]
        job = _C.checkpoint.WriteJob(sources, [(i, 0, n, w) for i, (n, w) in enumerate(zip(sizes, widths))],
                                     [os.path.join(self._path, n) for n in names], self.chunk_bytes,
                                     self.codec, self.level)
        job.wait()
        self._written(sources)
        chunks: dict[int, list] = {}
        for (b, _i, raw_off, raw_len, f, f_off, stored, crc, codec, planes) in job.records():
            chunks.setdefault(b, []).append((raw_off, [names[f], f_off, stored, raw_len, crc, codec, planes]))
        results = []
        for b, (item, info) in enumerate(zip(plan.items, infos)):
            info = dict(info, nbytes=sizes[b], chunks=[c for _, c in sorted(chunks.get(b, []))])
            results.append(WriteResult(index=item.index, size_in_bytes=sizes[b], storage_data=info))
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        body = pickle.dumps(metadata)
        path = self._path
        tmp = os.path.join(path, METADATA + ".tmp")
        layout.write_file_durable(tmp, body + b"\ncrc32c=%08x\n" % _C.checkpoint.crc32c(body))
        _C.checkpoint.fsync_dir(path)
        os.replace(tmp, os.path.join(path, METADATA))
        _C.checkpoint.fsync_dir(path)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self._path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


class StorageReader(_DcpReader):
    """Reads a checkpoint written by StorageWriter, verifying every chunk's checksum."""

    def __init__(self, path):
        super().__init__()
        self.path = os.fspath(path)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = os.path.join(self.path, METADATA)
        with open(path, "rb") as f:
            raw = f.read()
        body, sep, trailer = raw.rstrip(b"\n").rpartition(b"\ncrc32c=")
        if not sep or int(trailer, 16) != _C.checkpoint.crc32c(body):
            raise CheckpointCorruptError(f"{path}: checksum mismatch or truncated", file=METADATA)
        return pickle.loads(body)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        batch = _ReadBatch(None, self.path, what=f"checkpoint {self.path}")
        bufs: dict = {}
        for item in plan.items:
            key = item.storage_index
            if key in bufs:
                continue
            info = self.storage_data[key]
            buf = torch.empty(info["nbytes"], dtype=torch.uint8)
            batch.add(info["chunks"], buf, key.fqn, info["nbytes"])
            bufs[key] = buf
        batch.run()
        for item in plan.items:
            info, buf = self.storage_data[item.storage_index], bufs[item.storage_index]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(buf.numpy().tobytes()))
                continue
            from ._tree import dtype_from_name

            saved = buf.view(dtype_from_name(info["dtype"])).view(info["shape"])
            for d, (o, n) in enumerate(zip(item.storage_offsets, item.lengths)):
                saved = saved.narrow(d, o, n)
            target = planner.resolve_tensor(item).detach()
            target.copy_(saved)
            planner.commit_tensor(item, target)
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))
