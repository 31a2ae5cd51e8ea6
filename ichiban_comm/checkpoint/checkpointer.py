"""AsyncCheckpointer: save returns after the snapshot; persisting and committing run behind."""

from __future__ import annotations

import atexit
import gc
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


class SaveHandle:
    """A save in flight. ``wait()`` returns the committed step directory or raises."""

    def __init__(self, step: int):
        self.step = step
        self.path: str | None = None
        self.error: BaseException | None = None
        self.blocking_s = 0.0   # time save() held the caller
        self.total_s = 0.0      # save() call to commit
        self.bytes_written = 0  # stored (after compression) by this rank
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
        commit_timeout_s: how long the commit waits for every rank before the save fails.
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
                 process_group=None, commit_timeout_s: float = 300.0, memory: bool = False,
                 replicas: int | None = None, replica_bandwidth: float | None = None,
                 memory_keep: int = 2, memory_budget_bytes: int | None = None,
                 keeper_idle_timeout_s: float = 900.0, topology=None,
                 replica_compression: str | None = "auto"):
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
        self._group = CommitGroup(process_group, commit_timeout_s)
        self._pool = StagingPool()
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
        if self._group.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            layout.sweep_stale(self.root)
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
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        tree, leaves = flatten(state)  # refuses unsupported objects before anything else happens
        rank_part = flatten(rank_state) if rank_state is not None else None
        self._finish_inflight()
        self._raise_pending()
        plan = build_plan(leaves, self._group.rank, self._group.world)
        rank_plan = None
        if rank_part is not None:
            rank_plan = build_plan(rank_part[1], 0, 1)   # everything in it is this rank's own
            plan.blobs.extend(rank_plan.blobs)
        need = staging_bytes(plan)
        budget = min(need, self.budget) if self.budget is not None else need
        pool = self._pool.reserve(budget)
        waves = split_pieces(plan, pool.numel(), self.chunk_bytes)
        if self.memory_tier is not None:
            self.memory_tier.begin(waves)
        handle = SaveHandle(step)
        tmp = layout.tmp_dir(self.root, step)
        records: list = []
        try:
            os.makedirs(tmp, exist_ok=True)
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
            self._discard(tmp)
            if self._group.world > 1:
                # The other ranks are (or will be) waiting in the commit: tell them now rather
                # than letting them time out.
                handle._reported = True
                self._inflight = handle
                self._work.put((handle, plan, tree, None, tmp, [], None, t0, e))
            raise
        self._inflight = handle
        rank_fragment = None if rank_plan is None else {
            "tree": rank_part[0], "tensors": rank_plan.entries, "storages": rank_plan.storages}
        self._work.put((handle, plan, tree, rank_fragment, tmp, records, last, t0, None))
        handle.blocking_s = time.perf_counter() - t0
        return handle

    def reserve(self, state) -> int:
        """Allocate (and prefault) the staging pool for a state like this one now, so the first
        save() does not pay for it. Returns the pool size in bytes."""
        self._check_open()
        _, leaves = flatten(state)
        need = staging_bytes(build_plan(leaves, self._group.rank, self._group.world))
        self._finish_inflight()
        return self._pool.reserve(min(need, self.budget) if self.budget is not None else need).numel()

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

    def _persist(self, handle, plan, tree, rank_fragment, tmp, records, last, t0, failed=None):
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
                        "rank": rank_fragment, "step": handle.step}
        except BaseException as e:  # noqa: BLE001 - every rank must still take part in the commit
            local_error = e
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
        handle._done.set()
        if handle.error is None and self._group.rank == 0:
            # After the commit, off the handle's critical path; the next save's commit runs on
            # this same thread, so it never overtakes the prune.
            self._prune_quietly()

    def _prune_quietly(self) -> None:
        try:
            layout.prune(self.root, self.keep_last)
        except OSError as e:
            warnings.warn(f"could not prune old checkpoints in {self.root}: {e}", RuntimeWarning)

    def _discard(self, tmp: str) -> None:
        # Distributed: rank 0 removes a failed step inside the commit protocol, before the other
        # ranks learn of the failure (see CommitGroup.commit).
        if self._group.world == 1:
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
            self._pool.release()
            if self.memory_tier is not None:
                self.memory_tier.close()
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
        s = self.steps()
        return s[-1] if s else None

    def load(self, step: int | None = None, *, into=None, fallback: bool = False):
        """The state saved at step (default: the newest committed one).

        into: a state of the same structure whose tensors (plain or DTensor, any device) are
        filled in place, resharded from the saved shards; the returned state holds them.
        fallback: when step is None and the newest step is corrupt, warn and try older ones.
        """
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ValueError(f"step must be None or a non-negative integer, got {step!r}")
        steps = self.steps()
        # ---- memory tier: this host's keeper, else another host's, else the disk below
        if self.memory_tier is not None:
            state = self.memory_tier.load(step, into, steps)
            if state is not None:
                self.last_load = self.memory_tier.last_load
                return state
        self.last_load = {"step": step if step is not None else (steps[-1] if steps else None),
                          "tiers": ["disk"] * self._group.world}
        # ---- end memory tier
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no committed checkpoint for step {step} in {self.root} "
                                      f"(committed: {steps or 'none'})")
            return load_step(self.root, step, into)
        if not steps:
            raise CheckpointError(f"no committed checkpoint in {self.root}")
        for i, s in enumerate(reversed(steps)):
            try:
                return load_step(self.root, s, into)
            except CheckpointCorruptError as e:
                if not fallback or i == len(steps) - 1:
                    raise
                warnings.warn(f"checkpoint step {s} is unreadable ({e}); falling back to an older step",
                              RuntimeWarning, stacklevel=2)
        raise AssertionError("unreachable")


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

