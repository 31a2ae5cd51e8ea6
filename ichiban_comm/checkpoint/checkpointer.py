"""AsyncCheckpointer: save returns after the snapshot; persisting and committing run behind."""

from __future__ import annotations

import atexit
import gc
import logging
import math
import os
import queue
import shutil
import threading
import time
import warnings
import weakref

import torch

from .._native import _C
from . import _layout as layout
from ._commit import CommitGroup
from ._loader import load_rank_step, load_step
from ._plan import build_plan, split_pieces, staging_bytes
from ._stager import StagingPool
from ._tree import flatten
from .errors import CheckpointCorruptError, CheckpointError

# A chunk is the unit of checksum, compression and write: 4 MiB keeps the
# per-chunk syscall and zstd frame overhead under 1% while still spreading a
# tensor over all writer threads.
DEFAULT_CHUNK_BYTES = 4 << 20
_CODECS = {None: 0, "none": 0, "zstd": 1}
log = logging.getLogger("ichiban_comm.checkpoint")


class SaveHandle:
    """A save in flight. ``wait()`` returns the committed step directory or raises."""

    def __init__(self, step: int):
        self.step = step
        self.path: str | None = None
        self.error: BaseException | None = None
        self.blocking_s = 0.0   # time save() held the caller
        self.total_s = 0.0      # save() call to commit
        self.bytes_written = 0  # stored (after compression) by this rank
        self.staged_fresh = False  # staged (partly) into new, not yet pinned pages
        self._done = threading.Event()
        self._reported = False

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> str:
        if not self._done.wait(timeout):
            raise TimeoutError(f"checkpoint step {self.step} not committed within {timeout} s")
        self._reported = True
        if self.error is not None:
            raise CheckpointError(f"checkpoint step {self.step} failed: {self.error}") from self.error
        return self.path


_LIVE: "weakref.WeakSet[AsyncCheckpointer]" = weakref.WeakSet()


@atexit.register
def _finish_saves_at_exit() -> None:
    """A save in flight when the interpreter exits is finished, not silently dropped."""
    for ck in list(_LIVE):
        h = ck._inflight
        if h is not None and not h.done():
            h._done.wait()
            if h.error is not None:
                warnings.warn(f"checkpoint step {h.step} failed at exit: {h.error}", RuntimeWarning)


class AsyncCheckpointer:
    """Checkpoints of a training state under one directory.

    Args:
        path: root directory (created if needed; shared by all ranks).
        keep_last: committed steps to keep (>= 1); older ones are pruned after each commit.
        compression: None or "zstd" (byte planes + zstd per chunk, libzstd loaded at run time).
        compression_level: zstd level (1 is fast; higher is smaller and slower).
        staging_budget_bytes: cap on the staging pool; a larger snapshot is staged in waves.
            None: the size of one snapshot.
        writer_threads: background threads writing chunk files (per rank).
        chunk_bytes: bytes per chunk (checksum, compression and write unit).
        process_group: ranks saving together (default: the whole world when torch.distributed is
            initialised). Coordination runs on a separate Gloo group built from it.
        commit_timeout_s: how long the commit waits for every rank before the save fails, on top
            of the time to write the state at commit_min_bytes_per_s.
        commit_min_bytes_per_s: the slowest write rate a healthy rank is allowed: the commit wait
            grows by the state's bytes over this rate, so large saves are not failed by a fixed
            timeout.
        check_replicated: in a distributed save, compare the CRC-32C of every plain (replicated)
            tensor across ranks at commit and refuse the step when they differ. It reads each
            such tensor once per rank on the caller's thread.
        pin_memory: pin the staging pool (cudaHostRegister with a CUDA driver, else mlock), off
            the caller's thread. A failure to pin warns once and staging goes on unpinned.
        memory: also keep every committed save as a checksummed snapshot in this host's keeper
            process (``memory.py``), which outlives the trainer; ``load()`` reads it before disk.
        replicas: hosts (after this one, in the topology's order) that also hold each rank's
            snapshot; None: 1 when the topology has more than one host, else 0.
        replica_bandwidth: bytes/s cap of each rank's replica stream (None: no cap).
        replica_compression: "auto" (zstd on the replica stream when a measurement on the first
            snapshot says it beats the bandwidth cap), "zstd" or None.
        memory_keep: steps each keeper holds per rank (newest first), within memory_budget_bytes.
        memory_budget_bytes: bytes a keeper may hold (None: half the host's available memory
            when the keeper starts).
        keeper_idle_timeout_s: a keeper with no trainer attached for this long exits.
        topology: the ``Topology`` placing ranks on hosts (default: ``topology.detect()``).
    """

    def __init__(self, path, *, keep_last: int = 3, compression: str | None = None,
                 compression_level: int = 1, staging_budget_bytes: int | None = None,
                 writer_threads: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 process_group=None, commit_timeout_s: float = 300.0,
                 commit_min_bytes_per_s: float = 50e6, check_replicated: bool = True,
                 pin_memory: bool = True, memory: bool = False, replicas: int | None = None,
                 replica_bandwidth: float | None = None, memory_keep: int = 2,
                 memory_budget_bytes: int | None = None, keeper_idle_timeout_s: float = 900.0,
                 topology=None, replica_compression: str | None = "auto"):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if compression not in _CODECS:
            raise ValueError(f"compression must be None or 'zstd', got {compression!r}")
        if _CODECS[compression] and not _C.checkpoint.zstd_available():
            raise CheckpointError(f"compression='zstd' needs libzstd: {_C.checkpoint.zstd_error()}; "
                                  f"install libzstd1 or set ICHIBAN_ZSTD_LIBRARY")
        if not isinstance(compression_level, int) or not -7 <= compression_level <= 22:
            raise ValueError(f"compression_level must be an integer in [-7, 22], got {compression_level!r}")
        if staging_budget_bytes is not None and (not isinstance(staging_budget_bytes, int)
                                                 or staging_budget_bytes < 4096):
            raise ValueError(f"staging_budget_bytes must be None or an integer >= 4096, got "
                             f"{staging_budget_bytes!r}")
        if not isinstance(writer_threads, int) or writer_threads < 1:
            raise ValueError(f"writer_threads must be an integer >= 1, got {writer_threads!r}")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 4096 or chunk_bytes % 64:
            raise ValueError(f"chunk_bytes must be a multiple of 64 and >= 4096, got {chunk_bytes!r}")
        if commit_timeout_s <= 0:
            raise ValueError(f"commit_timeout_s must be > 0, got {commit_timeout_s!r}")
        if not commit_min_bytes_per_s > 0:
            raise ValueError(f"commit_min_bytes_per_s must be > 0, got {commit_min_bytes_per_s!r}")
        if memory:
            from .memory import check_args as _check_memory_args

            _check_memory_args(replicas, replica_bandwidth, memory_keep, memory_budget_bytes,
                               keeper_idle_timeout_s, replica_compression)
        self.root = os.fspath(path)
        self.keep_last = keep_last
        self.codec = _CODECS[compression]
        self.compression = compression if self.codec else None
        self.level = compression_level
        self.budget = staging_budget_bytes
        self.writer_threads = writer_threads
        self.chunk_bytes = chunk_bytes
        self.commit_timeout_s = float(commit_timeout_s)
        self.commit_min_bytes_per_s = float(commit_min_bytes_per_s)
        self.check_replicated = bool(check_replicated)
        self.loaded_step: int | None = None   # the step the last load() returned
        self._head: int | None = None         # newest committed step (known from the first save)
        self._group = CommitGroup(process_group, commit_timeout_s)
        if not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be a bool, got {pin_memory!r}")
        self._pool = StagingPool(pin=pin_memory)
        self._inflight: SaveHandle | None = None
        # One long-lived thread runs every save's tail (wait for the writers, commit): starting a
        # thread per save would put its start-up latency on the caller.
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._background, name="ichiban-ckpt-commit", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        self._pending_error: BaseException | None = None
        self._closed = False
        self._pid = os.getpid()
        # Rank 0 writes the root's entries; it locks the root at its first save (readers never
        # lock). What a dead writer left behind is swept here only when no writer holds the lock.
        self._lock = layout.RootLock(self.root) if self._group.rank == 0 else None
        self._locked = False
        self._swept = False
        if self._lock is not None:
            os.makedirs(self.root, exist_ok=True)
            if self._lock.try_acquire() is None:
                try:
                    layout.sweep_stale(self.root)
                    self._swept = True
                finally:
                    self._lock.release()
        # ---- memory tier (memory.py): a keeper per host, replicas on other hosts
        self.memory_tier = None
        self.last_load: dict | None = None   # {"step": N, "tiers": ["memory"|"peer"|"disk", ...]}
        if memory:
            from .memory import MemoryTier

            self.memory_tier = MemoryTier(self.root, self._group, replicas=replicas,
                                          replica_bandwidth=replica_bandwidth, keep=memory_keep,
                                          budget_bytes=memory_budget_bytes,
                                          idle_timeout=keeper_idle_timeout_s, topology=topology,
                                          chunk_bytes=chunk_bytes, threads=writer_threads,
                                          compression=replica_compression)
        # ---- end memory tier
        self._group.barrier()

    # ------------------------------------------------------------------ save
    @property
    def rank(self) -> int:
        return self._group.rank

    def save(self, step: int, state, *, rank_state=None) -> SaveHandle:
        """Snapshot state into the staging pool and persist it in the background.

        In a distributed save, ``state`` must have the same keys and plain values on every rank:
        DTensors are saved by shard, plain tensors as replicated (written once). What differs
        between ranks (a data loader's position, a per-rank RNG) goes in ``rank_state``, saved
        per rank and read back with ``load_rank_state()``.
        """
        # The cyclic GC is paused while save() walks the state: a collection triggered by the
        # many small objects it creates would otherwise scan the whole heap on the caller's time.
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._save(step, state, rank_state)
        finally:
            if paused:
                gc.enable()

    def _save(self, step: int, state, rank_state) -> SaveHandle:
        t0 = time.perf_counter()
        self._check_open()
        try:
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"step must be a non-negative integer, got {step!r}")
            tree, leaves = flatten(state)  # refuses unsupported objects before anything else happens
            rank_part = flatten(rank_state) if rank_state is not None else None
        except BaseException as e:
            self._fail_at_call(step, e, t0)
            raise
        self._finish_inflight()
        self._raise_pending()
        handle = SaveHandle(step)
        try:
            self._acquire_root()   # raises on every rank alike, before any file is written
        except _CoordinationError as e:   # a rank is dead: the save fails, the caller goes on
            handle.error, handle.total_s = e, time.perf_counter() - t0
            handle._done.set()
            self._inflight = handle
            return handle
        tmp = layout.tmp_dir(self.root, step)
        records: list = []
        plan, made_tmp = None, False
        try:
            if self._head is None:
                self._head = self.latest_step()
            if self._head is not None and step < self._head:
                raise ValueError(f"step {step} is below the newest committed step {self._head} in "
                                 f"{self.root}; call rollback(step) first to make an older step the "
                                 f"head (the steps committed after it are removed)")
            plan = build_plan(leaves, self._group.rank, self._group.world)
            replicated = None
            if self._group.world > 1 and self.check_replicated:
                replicated = {name: _crc_of(src) for name, src in plan.replicated}
            rank_plan = None
            if rank_part is not None:
                rank_plan = build_plan(rank_part[1], 0, 1)   # everything in it is this rank's own
                plan.blobs.extend(rank_plan.blobs)
            need = staging_bytes(plan)
            budget = min(need, self.budget) if self.budget is not None else need
            # A state larger than the pool (the first save, or one that grew) stages its new part
            # into fresh pages, which the pool then pins off this thread (see _stager.py).
            pool, fresh = self._pool.prepare(budget)
            waves = split_pieces(plan, pool.numel(), self.chunk_bytes)
            if self.memory_tier is not None:
                self.memory_tier.begin(waves)
            os.makedirs(tmp, exist_ok=True)
            made_tmp = True
            for w, wave in enumerate(waves[:-1]):  # earlier waves persist while the caller waits
                self._pool.copy_in(wave)
                job = self._start_job(tmp, w, wave, pool, plan)
                if self.memory_tier is not None:
                    self.memory_tier.stage(w, wave, pool)
                job.wait()
                records.append((wave, job))
            last = None
            if waves:
                self._pool.copy_in(waves[-1])
                # The background thread starts the writers: spawning them here would let them
                # compete with the caller before save() has returned.
                last = (len(waves) - 1, waves[-1], pool)
        except BaseException as e:
            if made_tmp:
                self._discard(tmp)
            self._fail_at_call(step, e, t0, tmp if made_tmp else None)
            raise
        if fresh:
            self._pool.settle()
        handle.staged_fresh = fresh
        self._inflight = handle
        rank_fragment = None if rank_plan is None else {
            "tree": rank_part[0], "tensors": rank_plan.entries, "storages": rank_plan.storages}
        state_bytes = sum(t.numel() * t.element_size() for _, t in leaves)
        self._work.put((handle, plan, tree, rank_fragment, tmp, records, last, t0, None,
                        replicated, state_bytes))
        handle.blocking_s = time.perf_counter() - t0
        return handle

    def _fail_at_call(self, step, error, t0, tmp=None) -> None:
        """A save that failed at the call still takes part in the commit with its error, so the
        other ranks (already waiting there, or about to) hear of it at once."""
        if self._group.world == 1:
            return
        if self._inflight is not None:
            self._finish_inflight()
        handle = SaveHandle(step if isinstance(step, int) else -1)
        handle._reported = True
        self._inflight = handle
        self._work.put((handle, None, None, None, tmp, [], None, t0, error, None, 0))

    def _acquire_root(self) -> None:
        """Rank 0 holds the root's lock from the first save (or rollback) to close(); the first
        time, the group learns whether it got it, so every rank fails alike if not."""
        if self._locked:
            return
        holder = None
        if self._lock is not None:
            try:
                os.makedirs(self.root, exist_ok=True)
                holder = self._lock.try_acquire()
                if holder is None and not self._swept:
                    layout.sweep_stale(self.root)   # another writer held it at construction
                    self._swept = True
            except OSError as e:
                holder = f"the lock could not be taken: {e}"
        try:
            holder = self._group.all_gather(holder)[0]
        except Exception as e:  # noqa: BLE001 - Gloo reports a dead or stuck peer as a RuntimeError
            if self._lock is not None:
                self._lock.release()
            raise _CoordinationError(f"checkpoint root lock: commit coordination failed ({e})") from e
        if holder is not None:
            import socket

            if holder.startswith(f"pid {os.getpid()} on host {socket.gethostname()} "):
                raise CheckpointError(f"{self.root} is being written by another AsyncCheckpointer of "
                                      f"this process ({holder}); one writer per checkpoint root: close "
                                      f"that one first or save elsewhere")
            raise CheckpointError(f"{self.root} is being written by another process ({holder}); one "
                                  f"writer per checkpoint root: stop that process or save elsewhere")
        self._locked = True

    def rollback(self, step: int) -> list[int]:
        """Make committed `step` the head: the steps committed after it are removed (the head
        moves in one atomic rename first, so a crash mid-way never resumes the abandoned line),
        and the next save may use any step above it. Collective in a distributed checkpointer.
        Returns the steps removed."""
        self._check_open()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self._finish_inflight()
        self._raise_pending()
        self._acquire_root()
        result = None
        if self._group.rank == 0:
            try:
                if step not in self.steps():
                    raise CheckpointError(f"no committed checkpoint for step {step} in {self.root} "
                                         f"(committed: {self.steps() or 'none'})")
                result = ("ok", layout.rollback(self.root, step, layout.next_seq(self.root)))
            except Exception as e:  # noqa: BLE001 - every rank raises it
                result = ("error", str(e))
        status, payload = self._group.all_gather(result)[0]
        if status != "ok":
            raise CheckpointError(f"rollback to step {step} failed: {payload}")
        self._head = step
        if self.memory_tier is not None:   # the abandoned line leaves the keepers too
            self.memory_tier.drop_after(step)
        log.info("checkpoint: rolled back %s to step %d (removed %s)", self.root, step, payload)
        return payload

    def reserve(self, state, *, rank_state=None) -> int:
        """Grow, fault in and pin the staging pool for a state like this one now, so that the
        first save() blocks like a steady one. Returns the pool size in bytes. Without it, the
        first save stages into fresh pages and the pool is pinned behind it (see _stager.py)."""
        self._check_open()
        _, leaves = flatten(state)
        plan = build_plan(leaves, self._group.rank, self._group.world)
        if rank_state is not None:
            plan.blobs.extend(build_plan(flatten(rank_state)[1], 0, 1).blobs)
        need = staging_bytes(plan)
        self._finish_inflight()
        return self._pool.reserve(min(need, self.budget) if self.budget is not None else need).numel()

    def stats(self) -> dict:
        """The staging pool's counters: pool_bytes, pinned_bytes, pin ("cuda", "mlock" or "off"),
        pin_error, allocations (new address ranges), grows (in place), fresh_saves (staged into
        new pages) and pooled_saves (staged into the ready pool)."""
        return self._pool.stats()

    def _start_job(self, tmp, wave_index, wave, pool, plan):
        paths = [os.path.join(tmp, layout.chunk_file(self._group.rank, wave_index, k))
                 for k in range(self.writer_threads)]
        blobs = [(p.pool_offset, p.nbytes, plan.blobs[p.blob].plane_width) for p in wave]
        return _C.checkpoint.WriteJob(pool, blobs, paths, self.chunk_bytes, self.codec, self.level)

    def _background(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            self._persist(*item)

    def _persist(self, handle, plan, tree, rank_fragment, tmp, records, last, t0, failed=None,
                 replicated=None, state_bytes=0):
        fragment, local_error = None, failed
        if self._group.rank == 0:
            # Steps left unpruned by a process that died between a commit and its prune: trimmed
            # to keep_last before this commit, so a directory never holds more than keep_last + 1.
            self._prune_quietly()
        try:
            if failed is not None:
                raise failed
            if last is not None:
                index, wave, pool = last
                job = self._start_job(tmp, index, wave, pool, plan)
                if self.memory_tier is not None:  # copied to memory while the writers run
                    self.memory_tier.stage(index, wave, pool)
                job.wait()  # GIL released while the writer threads finish
                records.append((wave, job))
            if self.memory_tier is not None:
                self.memory_tier.fragment(plan, tree, rank_fragment, handle.step)
            _attach_chunks(plan, records, self._group.rank, self.writer_threads)
            handle.bytes_written = sum(j.bytes_stored() for _, j in records)
            fragment = {"entries": plan.entries, "storages": plan.storages, "tree": tree,
                        "rank": rank_fragment, "step": handle.step, "replicated": replicated}
        except BaseException as e:  # noqa: BLE001 - every rank must still take part in the commit
            local_error = e
        self._group.set_wait(self.commit_timeout_s + state_bytes / self.commit_min_bytes_per_s)
        try:
            handle.path = self._group.commit(self.root, handle.step, tmp, fragment, local_error,
                                             self.manifest_header(handle.step))
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller on wait/save/close
            handle.error = e
            self._discard(tmp)
        if self.memory_tier is not None:  # the keeper takes the snapshot only of a committed step
            if handle.error is None:
                self.memory_tier.commit(handle.step, self.manifest_header(handle.step))
            else:
                self.memory_tier.discard()
        handle.total_s = time.perf_counter() - t0
        if handle.error is None:
            self._head = handle.step
        handle._done.set()
        if handle.error is None and self._group.rank == 0:
            # After the commit, off the handle's critical path; the next save's commit runs on
            # this same thread, so it never overtakes the prune.
            self._prune_quietly()

    def _prune_quietly(self) -> None:
        if not self._locked:
            return   # another process may be writing this root
        try:
            layout.prune(self.root, self.keep_last)
        except OSError as e:
            warnings.warn(f"could not prune old checkpoints in {self.root}: {e}", RuntimeWarning)

    def _discard(self, tmp: str) -> None:
        # Distributed: rank 0 removes a failed step inside the commit protocol, before the other
        # ranks learn of the failure (see CommitGroup.commit).
        if self._group.world == 1 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def manifest_header(self, step: int) -> dict:
        return {"format": layout.FORMAT, "version": layout.FORMAT_VERSION, "step": step,
                "world_size": self._group.world, "created_unix": time.time(),
                "compression": self.compression, "chunk_bytes": self.chunk_bytes,
                "torch": torch.__version__}

    def _finish_inflight(self) -> None:
        h = self._inflight
        if h is not None:
            h._done.wait()
        self._inflight = None
        if h is not None and h.error is not None and not h._reported:
            self._pending_error = h.error
            self._pending_step = h.step

    def _raise_pending(self) -> None:
        if self._pending_error is not None:
            e, step = self._pending_error, self._pending_step
            self._pending_error = None
            raise CheckpointError(f"the background save of step {step} failed: {e}") from e

    def wait(self) -> str | None:
        """Wait for the save in flight; raise its error. Returns its step directory (None if none)."""
        h = self._inflight
        self._finish_inflight()
        self._raise_pending()
        if h is not None and h.error is not None:
            h._reported = True
            raise CheckpointError(f"checkpoint step {h.step} failed: {h.error}") from h.error
        return h.path if h is not None else None

    def close(self) -> None:
        """Wait for pending work, release the staging pool; raises a background error once."""
        if self._closed:
            return
        try:
            self._finish_inflight()
            self._raise_pending()
        finally:
            self._closed = True
            self._work.put(None)
            self._thread.join()
            self._pool.close()
            if self.memory_tier is not None:
                self.memory_tier.close()
            if self._lock is not None:
                self._lock.release()
            self._locked = False
            self._group.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed")
        if os.getpid() != self._pid:
            # Its staging memory is not mapped in a forked child and its threads did not follow.
            raise CheckpointError(f"this AsyncCheckpointer was created in process {self._pid}; "
                                  f"create a new one in process {os.getpid()}")

    # ------------------------------------------------------------------ load
    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return layout.committed_steps(self.root)

    def load_rank_state(self, step: int | None = None, rank: int | None = None):
        """The rank_state that ``rank`` (default: this rank) passed to save() at step (default:
        the newest committed step); None when it passed none."""
        # ---- memory tier: the step just loaded from memory, when the disk no longer has it
        if self.memory_tier is not None:
            s = step if step is not None else (self.last_load or {}).get("step")
            if s is not None and s not in self.steps():
                return self.memory_tier.load_rank_state(s, self._group.rank if rank is None else rank)
        # ---- end memory tier
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no committed checkpoint in {self.root}")
        elif step not in self.steps():
            raise CheckpointError(f"no committed checkpoint for step {step} in {self.root}")
        return load_rank_step(self.root, step, self._group.rank if rank is None else rank)

    def latest_step(self) -> int | None:
        """The head: the most recently committed step (commit order, not step number)."""
        s = self.steps()
        return s[-1] if s else None

    def load(self, step: int | None = None, *, into=None, fallback: bool = False,
             return_step: bool = False):
        """The state saved at step (default: the head, the most recently committed step).

        into: a state of the same structure whose tensors (plain or DTensor, any device) are
            filled in place, resharded from the saved shards; the returned state holds them.
        fallback: when step is None and the head cannot be read, warn and try older steps.
        return_step: return (step, state) instead of state.

        In a distributed checkpointer this is collective: every rank verifies what it reads,
        the group agrees, and all ranks load the same step: the newest that every rank could
        read (with fallback), or all raise naming the ranks that could not. The step loaded is
        logged and kept in ``loaded_step``.
        """
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ValueError(f"step must be None or a non-negative integer, got {step!r}")
        self._check_open()
        steps = self.steps()
        # ---- memory tier: this host's keeper, else another host's, else the disk below
        if self.memory_tier is not None:
            out = self.memory_tier.load(step, into, steps)
            if out is not None:
                self.last_load = self.memory_tier.last_load
                self.loaded_step = self.last_load["step"]
                return (self.loaded_step, out) if return_step else out
        # ---- end memory tier
        if step is not None:
            candidates = [step]
        else:
            candidates = list(reversed(steps)) or [None]
        for i, s in enumerate(candidates):
            out, mine = None, None
            try:
                if s is None:
                    raise CheckpointError(f"no committed checkpoint in {self.root}")
                if s not in steps:
                    raise CheckpointError(f"no committed checkpoint for step {s} in {self.root} "
                                          f"(committed: {steps or 'none'})")
                out = load_step(self.root, s, into)
            except Exception as e:  # noqa: BLE001 - the group hears of it before anyone raises
                mine = e
            kind = None if mine is None else ("corrupt" if isinstance(mine, CheckpointCorruptError) else "error")
            verdicts = self._group.all_gather(None if mine is None else (kind, str(mine)))
            bad = {r: v for r, v in enumerate(verdicts) if v is not None}
            if not bad:
                self.loaded_step = s
                self.last_load = {"step": s, "tiers": ["disk"] * self._group.world}
                log.info("checkpoint: loaded step %d from %s", s, self.root)
                return (s, out) if return_step else out
            where = "; ".join(f"rank {r}: {m}" for r, (_, m) in sorted(bad.items()))
            corrupt_only = all(k == "corrupt" for k, _ in bad.values())
            if not (corrupt_only and fallback and step is None and i + 1 < len(candidates)):
                msg = f"checkpoint step {s} could not be loaded on every rank ({where})"
                if mine is not None and kind == "error":
                    raise mine
                if corrupt_only:
                    found = mine if mine is not None else CheckpointCorruptError("", step=s)
                    raise CheckpointCorruptError(msg, step=s, file=found.file, tensor=found.tensor) from mine
                raise CheckpointError(msg) from mine
            warnings.warn(f"checkpoint step {s} is unreadable ({where}); every rank falls back to "
                          f"step {candidates[i + 1]}", RuntimeWarning, stacklevel=2)
        raise AssertionError("unreachable")


class _CoordinationError(CheckpointError):
    pass


_CRC_PIECE = 4 << 20   # bytes per checksum task: large enough to amortise the call
_crc_workers = None


def _crc_of(t: torch.Tensor) -> int:
    """A CRC-32C fingerprint of a tensor's bytes in row-major order (the check of replicated
    tensors): the CRC-32C of the 4 MiB pieces' CRC-32Cs, the pieces checksummed in parallel
    (the C++ call releases the GIL), since this runs on the caller's time."""
    global _crc_workers
    if t.numel() == 0:
        return 0
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    n = flat.numel()
    if n <= _CRC_PIECE:
        return int(_C.checkpoint.crc32c_tensor(flat))
    if _crc_workers is None:
        from concurrent.futures import ThreadPoolExecutor

        _crc_workers = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                          thread_name_prefix="ichiban-ckpt-crc")
    crcs = list(_crc_workers.map(lambda o: int(_C.checkpoint.crc32c_tensor(flat[o:o + _CRC_PIECE])),
                                 range(0, n, _CRC_PIECE)))
    return int(_C.checkpoint.crc32c(torch.tensor(crcs, dtype=torch.int64).numpy().tobytes()))


def _attach_chunks(plan, records, rank, threads) -> None:
    """Turn WriteJob records into the chunk lists of the manifest's shards and storages."""
    per_blob: dict[int, list] = {}
    for wave_index, (wave, job) in enumerate(records):
        names = [layout.chunk_file(rank, wave_index, k) for k in range(threads)]
        for (jb, _i, raw_off, raw_len, f, f_off, stored, crc, codec, planes) in job.records():
            piece = wave[jb]
            per_blob.setdefault(piece.blob, []).append(
                (piece.blob_offset + raw_off, [names[f], f_off, stored, raw_len, crc, codec, planes]))
    for b, blob in enumerate(plan.blobs):
        chunks = sorted(per_blob.get(b, []), key=lambda x: x[0])
        blob.target["chunks"] = [c for _, c in chunks]

