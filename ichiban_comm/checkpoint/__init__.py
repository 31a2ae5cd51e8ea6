"""Asynchronous, checksummed, atomic, distributed checkpoints.

    from ichiban_comm.checkpoint import AsyncCheckpointer
    ckpt = AsyncCheckpointer("runs/exp1/ckpt", keep_last=3)
    handle = ckpt.save(step, {"model": model.state_dict(), "optim": opt.state_dict(), "step": step})
    ...                      # training goes on while the snapshot is persisted
    state = ckpt.load()      # newest committed step; load(step=N), load(into=state) in place

``StorageWriter`` / ``StorageReader`` plug the same files into torch.distributed.checkpoint.
"""

from .checkpointer import AsyncCheckpointer, SaveHandle
from .errors import CheckpointCorruptError, CheckpointError

__all__ = ["AsyncCheckpointer", "SaveHandle", "CheckpointError", "CheckpointCorruptError",
           "StorageWriter", "StorageReader"]


def __getattr__(name):
    # torch.distributed.checkpoint is imported only by those who use it.
    if name in ("StorageWriter", "StorageReader"):
        from . import storage

        return getattr(storage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
