"""Where each training step's wall time went, measured on the training thread.

A step's wall time is split into four parts, each timed around the real wait:

* data: blocked in ``next(loader)``;
* checkpoint: inside ``save()`` / ``reserve()`` (the staging copy, the only pause an async save
  makes);
* communication: blocked in collectives. With the ``"ichiban"`` backend this is the backend's own
  per-thread clock of the time the calling thread spent waiting on an op or running one inline
  (tensor-parallel all-reduces, ZeRO's reduce-scatters and all-gathers, gradient-norm
  reductions, pipeline sends and receives), plus DDP's exposed gradient all-reduce: from the moment
  the last bucket was handed to the backend (backward has nothing left to compute) to the moment
  the last bucket's result was in — DDP waits for it inside ``backward()`` through a future,
  which no backend clock sees. On other backends only DDP's exposed wait is measured; their
  other collectives count as compute.
* compute: the rest.

Waits inside the data and checkpoint sections (a checkpoint's coordination collective) count
for that section only.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch.distributed as dist

_perf = time.perf_counter


def _blocked_clock(backend: str):
    if backend != "ichiban":
        return None
    from ._native import _C

    return lambda: _C.backend.thread_blocked_ns() * 1e-9


class StepClock:
    def __init__(self, backend: str = "none"):
        self._blocked = _blocked_clock(backend)
        self._lock = threading.Lock()
        self._ddp_issued = 0.0
        self._ddp_done = 0.0
        self.begin()

    def _clock(self) -> float:
        return self._blocked() if self._blocked is not None else 0.0

    def begin(self) -> None:
        self._t0 = _perf()
        self._b0 = self._clock()
        self._data = self._ckpt = self._inside = 0.0
        with self._lock:
            self._ddp_issued = self._ddp_done = 0.0

    @contextlib.contextmanager
    def _section(self, name: str):
        t, b = _perf(), self._clock()
        try:
            yield
        finally:
            dt = _perf() - t
            self._inside += self._clock() - b
            if name == "data":
                self._data += dt
            else:
                self._ckpt += dt

    def data(self):
        """with clock.data(): x, y = next(loader)"""
        return self._section("data")

    def checkpoint(self):
        """with clock.checkpoint(): handle = ckpt.save(...)"""
        return self._section("ckpt")

    def end(self) -> dict:
        """This step's split in seconds: step_s, compute_s, comm_s, ckpt_s, data_s."""
        step = _perf() - self._t0
        comm = max(0.0, self._clock() - self._b0 - self._inside)
        with self._lock:
            comm += max(0.0, self._ddp_done - self._ddp_issued)
        comm = min(comm, max(0.0, step - self._data - self._ckpt))
        out = {"step_s": step, "compute_s": max(0.0, step - comm - self._data - self._ckpt),
               "comm_s": comm, "ckpt_s": self._ckpt, "data_s": self._data}
        self.begin()
        return out

    def ddp_hook(self, group, world: int):
        """A DDP communication hook: the default all-reduce (average of the bucket over the
        group), with the times the exposed wait is measured from."""
        def hook(_state, bucket):
            buf = bucket.buffer().div_(world)
            fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
            issued = _perf()
            with self._lock:
                self._ddp_issued = max(self._ddp_issued, issued)

            def done(f):
                t = _perf()
                with self._lock:
                    self._ddp_done = max(self._ddp_done, t)
                return f.value()[0]

            return fut.then(done)

        return hook
