"""The staging pool and the snapshot copy into it: the only time the trainer waits.

The pool is one range of reserved address space that grows in place
(``_C.checkpoint.StagingArena``). Bytes a save stages for the first time (the
first save, or the part of a grown state past the old end) are fresh pages:
the copy faults them in on the copier threads, which is the cheapest way to
fill new memory (cheaper than prefaulting first and copying after, and than
torch's per-tensor clone: ``benchmarks/results/checkpoint_cpu2.md``). Once
that save's copy is done, a pinning thread pins the new range (the CUDA
driver's ``cudaHostRegister`` when a driver is present, ``mlock`` otherwise),
off the caller's thread, so the saves that follow stage into pinned, resident
memory. ``AsyncCheckpointer.reserve`` instead prefaults and pins up front.

Pinning that fails (RLIMIT_MEMLOCK, a driver error) is reported once per pool
as a RuntimeWarning naming the reason; staging goes on unpinned.
"""

from __future__ import annotations

import os
import queue
import resource
import threading
import warnings

import torch

from .._native import _C


def _cuda_driver() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken driver install means no pinning, not a crash
        return False


def _physical_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40


def _fmt(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _advise_huge(address: int, length: int) -> None:
    """MADV_HUGEPAGE on a freshly grown range. Fresh huge pages fill several times faster than
    base pages where the host has free huge pages, and several times slower where each needs a
    direct compaction (fragmented memory): both measured, benchmarks/results/checkpoint_cpu2.md.
    A training host usually has the free memory, so the pool asks for them; the kernel's THP
    policy decides (with THP "never" this does nothing)."""
    global _libc
    if length <= 0:
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise(address, length, 14)   # MADV_HUGEPAGE; advisory, errors ignored
    except (OSError, AttributeError):
        pass


_libc = None

# (pool kind, reason) already warned about in this process: one warning each, however many
# pools (a StorageWriter keeps one per overlapping save) hit the same refusal.
_WARNED: set = set()

# Fault injection for tests: a callable (offset, length) -> reason string or None, consulted
# before each pin. None in production.
PIN_FAULT = None


class StagingPool:
    """Host memory reused by every save; grows in place, pinned off the caller's thread.

    Args:
        pin: True pins new ranges (cudaHostRegister with a CUDA driver, else mlock);
            False never pins.
        what: how the warnings name this pool.
    """

    def __init__(self, pin: bool = True, what: str = "checkpoint staging pool"):
        self.pin = pin
        self.what = what
        self.arena = None                 # _C.checkpoint.StagingArena
        self.buffer: torch.Tensor | None = None   # [0, the largest size asked for) as uint8
        self.mode = ("cuda" if _cuda_driver() else "mlock") if pin else "off"
        self._streams: dict[int, torch.cuda.Stream] = {}   # device index -> side stream
        self._lock = threading.Lock()
        self._ready = 0          # [0, _ready) is faulted in and pinned (or pinning was given up)
        self._pinned = 0         # bytes pinned
        self._registered: list[int] = []   # cudaHostRegister'd addresses (unregistered on release)
        self._pin_error: str | None = None
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.counters = {"allocations": 0, "grows": 0, "fresh_saves": 0, "pooled_saves": 0,
                         "pin_failures": 0}

    # ------------------------------------------------------------------ size
    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    @property
    def pinned(self) -> bool:
        return self._pinned > 0 and self._pinned >= self.nbytes

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters, pool_bytes=self.nbytes, pinned_bytes=self._pinned,
                        ready_bytes=self._ready, pin=self.mode, pin_error=self._pin_error)

    def prepare(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """The pool, holding at least nbytes; and whether any of [0, nbytes) is fresh (not yet
        faulted in and pinned), i.e. this save stages (partly) into ordinary new pages."""
        nbytes = max(int(nbytes), 64)
        if self.arena is None or self.arena.reserved < nbytes:
            self.release()
            # Address space is reserved for the largest pool this host could hold (it costs no
            # memory), so later growth stays in place.
            self.arena = _C.checkpoint.StagingArena(max(_physical_bytes(), 2 * nbytes))
            self.counters["allocations"] += 1
        if self.nbytes < nbytes:
            if self.nbytes:
                self.counters["grows"] += 1
            if self.arena.size < nbytes:
                old = self.arena.size
                self.arena.grow(nbytes)
                _advise_huge(self.arena.address + old, self.arena.size - old)
            self.buffer = self.arena.tensor()[:nbytes]
        with self._lock:
            fresh = self._ready < nbytes
        self.counters["fresh_saves" if fresh else "pooled_saves"] += 1
        return self.buffer, fresh

    def reserve(self, nbytes: int) -> torch.Tensor:
        """Grow to nbytes now, fault the new pages in and pin them before returning."""
        buf, fresh = self.prepare(nbytes)
        self.counters["fresh_saves"] -= fresh
        self.counters["pooled_saves"] -= not fresh
        if fresh:
            self.wait_ready()
            with self._lock:
                start = self._ready
            self.arena.prefault(start, self.nbytes - start)
            self._pin_range(start, self.nbytes)
        return buf

    # ------------------------------------------------------------------ pinning
    def settle(self) -> None:
        """After a copy into fresh pages: pin what is not pinned yet, on the pinning thread."""
        if self.arena is None:
            return
        with self._lock:
            if self._ready >= self.nbytes:
                return
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._pin_loop, name="ichiban-ckpt-pin", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._queue.put((self.arena, self.nbytes))

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the pinning thread has nothing left to do."""
        return self._idle.wait(timeout)

    def _pin_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            arena, end = item
            try:
                if arena is self.arena:
                    with self._lock:
                        start = self._ready
                    if end > start:
                        self._pin_range(start, end)
            except Exception as e:  # noqa: BLE001 - pinning is an optimisation: report, never die
                with self._lock:
                    self._ready = max(self._ready, end)
                    if self._pin_error is None:
                        self._pin_error = f"pinning thread: {e}"
                        self.counters["pin_failures"] += 1
                warnings.warn(f"{self.what}: pinning failed ({e}); staging continues unpinned",
                              RuntimeWarning)
            finally:
                if self._queue.empty():
                    self._idle.set()

    def _pin_range(self, start: int, end: int) -> None:
        """Pin [start, end) of the arena (pages already touched or about to be: pinning faults
        them in without changing their contents). Marks the range ready either way."""
        reason = None
        if self.mode != "off" and self._pin_error is None:
            reason = PIN_FAULT(start, end - start) if PIN_FAULT is not None else None
            if reason is None:
                reason = (self._cuda_register if self.mode == "cuda" else self._mlock)(start, end - start)
        with self._lock:
            if reason is None and self.mode != "off" and self._pin_error is None:
                self._pinned = end
            self._ready = max(self._ready, end)
            first = reason is not None and self._pin_error is None
            if first:
                self._pin_error = reason
                self.counters["pin_failures"] += 1
        if first and (self.what, reason) not in _WARNED:
            _WARNED.add((self.what, reason))
            warnings.warn(f"{self.what}: pinning {_fmt(end - start)} failed ({reason}); staging "
                          f"continues in unpinned memory (device copies are slower and the pool may "
                          f"be swapped out). Raise the limit, or pass pin_memory=False to skip "
                          f"pinning.", RuntimeWarning, stacklevel=2)

    def _cuda_register(self, offset: int, length: int) -> str | None:
        cudart = torch.cuda.cudart()
        addr = self.arena.address + offset
        rc = int(cudart.cudaHostRegister(addr, length, 0))
        if rc != 0:
            return f"cudaHostRegister of {_fmt(length)} returned CUDA error {rc}"
        self._registered.append(addr)
        return None

    def _mlock(self, offset: int, length: int) -> str | None:
        err = self.arena.lock(offset, length)
        if err == 0:
            return None
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else _fmt(soft)
        return f"mlock: {os.strerror(err)}; RLIMIT_MEMLOCK is {limit} (ulimit -l)"

    def release(self) -> None:
        self.wait_ready()
        if self._registered:
            cudart = torch.cuda.cudart()
            for addr in self._registered:
                cudart.cudaHostUnregister(addr)
        self._registered = []
        # munmap (which also unlocks) happens when the last tensor over the arena is gone.
        self.arena, self.buffer = None, None
        with self._lock:
            self._ready = self._pinned = 0

    def close(self) -> None:
        self.release()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ copy
    def copy_in(self, pieces, buf: torch.Tensor | None = None) -> None:
        """Copy every piece's source into the pool at its offset; returns when all are done."""
        buf = self.buffer if buf is None else buf
        cpu = [p for p in pieces if p.source.device.type == "cpu"]
        gpu = [p for p in pieces if p.source.device.type == "cuda"]
        events = []
        for index in sorted({p.source.device.index for p in gpu}):
            with torch.cuda.device(index):
                stream = self._streams.get(index)
                if stream is None:
                    stream = self._streams[index] = torch.cuda.Stream()
                # The side stream first waits for the work that produced the tensors.
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.no_grad():
                    for p in gpu:
                        if p.source.device.index != index:
                            continue
                        src = p.source
                        dst = buf[p.pool_offset:p.pool_offset + p.nbytes].view(src.dtype).view(src.shape)
                        dst.copy_(src.detach(), non_blocking=True)
                events.append(stream.record_event())
        if cpu:  # overlaps with the device copies
            _C.checkpoint.stage_copy([_resolved(p.source) for p in cpu], buf, [p.pool_offset for p in cpu])
        for event in events:
            event.synchronize()  # save() returns only once the device copies have landed


def _resolved(t: torch.Tensor) -> torch.Tensor:
    """Materialise lazy conjugate/negative bits so the raw bytes mean what the tensor shows."""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.detach()
