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
from .errors import CheckpointCorruptError

METADATA = ".metadata"


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class StorageWriter(_DcpWriter):
    """Writes a DCP checkpoint into directory ``path`` with ichiban_comm's writer threads."""

    def __init__(self, path, *, compression: str | None = None, compression_level: int = 1,
                 writer_threads: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        if compression not in _CODECS:
            raise ValueError(f"compression must be None or 'zstd', got {compression!r}")
        if not isinstance(writer_threads, int) or writer_threads < 1:
            raise ValueError(f"writer_threads must be an integer >= 1, got {writer_threads!r}")
        self.path = os.fspath(path)
        self.codec, self.level = _CODECS[compression], compression_level
        self.threads, self.chunk_bytes = writer_threads, chunk_bytes
        self.prefix = "r0"

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        os.makedirs(self.path, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"r{i}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        prefix = plan.storage_data or "r0"
        sources, infos = [], []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                infos.append({"kind": "bytes"})
            else:
                t = data.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                infos.append({"kind": "tensor", "dtype": str(t.dtype).removeprefix("torch."),
                              "shape": list(t.shape)})
            sources.append(t)
        sizes = [t.numel() * t.element_size() for t in sources]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // 64) * 64
        pool = _C.checkpoint.alloc_staging(max(64, total))
        _C.checkpoint.stage_copy(sources, pool, offsets)
        widths = [t.element_size() if info["kind"] == "tensor" else 1 for t, info in zip(sources, infos)]
        names = [f"{prefix}_w{k}.bin" for k in range(self.threads)]
        job = _C.checkpoint.WriteJob(pool, [(o, n, w) for o, n, w in zip(offsets, sizes, widths)],
                                     [os.path.join(self.path, n) for n in names], self.chunk_bytes,
                                     self.codec, self.level)
        job.wait()
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
        tmp = os.path.join(self.path, METADATA + ".tmp")
        layout.write_file_durable(tmp, body + b"\ncrc32c=%08x\n" % _C.checkpoint.crc32c(body))
        _C.checkpoint.fsync_dir(self.path)
        os.replace(tmp, os.path.join(self.path, METADATA))
        _C.checkpoint.fsync_dir(self.path)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

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
