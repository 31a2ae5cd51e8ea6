"""The staging pool and the snapshot copy into it: the only time the trainer waits."""

from __future__ import annotations

import torch

from .._native import _C


def _cuda_driver() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken driver install means no pinning, not a crash
        return False


class StagingPool:
    """Host memory allocated once and reused by every save.

    Pinned (registered with the CUDA driver) when a driver is present, so device
    copies run at full PCIe speed; plain host memory otherwise. Pages are
    prefaulted at allocation and never shared with a forked child.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.pinned = False
        self._stream = None

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def reserve(self, nbytes: int) -> torch.Tensor:
        if self.buffer is not None and self.buffer.numel() >= nbytes:
            return self.buffer
        self.release()
        buf = _C.checkpoint.alloc_staging(int(nbytes))
        if _cuda_driver():
            rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
            self.pinned = int(rc) == 0
        self.buffer = buf
        return buf

    def release(self) -> None:
        if self.buffer is not None and self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
        self.buffer, self.pinned = None, False

    def copy_in(self, pieces) -> None:
        """Copy every piece's source into the pool at its offset; returns when all are done."""
        buf = self.buffer
        cpu = [p for p in pieces if p.source.device.type == "cpu"]
        gpu = [p for p in pieces if p.source.device.type == "cuda"]
        if gpu:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            stream = self._stream
            # The side stream first waits for the work that produced the tensors.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for p in gpu:
                    src = p.source
                    dst = buf[p.pool_offset:p.pool_offset + p.nbytes].view(src.dtype).view(src.shape)
                    dst.copy_(src, non_blocking=True)
            event = stream.record_event()
        if cpu:
            _C.checkpoint.stage_copy([_resolved(p.source) for p in cpu], buf, [p.pool_offset for p in cpu])
        if gpu:
            event.synchronize()  # save() returns only once the device copies have landed


def _resolved(t: torch.Tensor) -> torch.Tensor:
    """Materialise lazy conjugate/negative bits so the raw bytes mean what the tensor shows."""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.detach()
