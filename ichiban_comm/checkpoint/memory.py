"""The in-memory tier: snapshots held by a keeper process per host, replicated to another host.

``AsyncCheckpointer(root, memory=True)`` drives a :class:`MemoryTier`:

* save: the staged bytes are copied into a fresh memfd while the disk writers run, each chunk
  gets a CRC-32C, and once the disk commit succeeded the memfd is sealed and handed to this
  host's keeper (``keeper.py``) over its Unix socket. The keeper now owns it: the trainer may die.
* replicas: a background thread then streams the same snapshot to the keeper of the next host in
  the ``Topology`` over TCP, throttled to ``replica_bandwidth`` bytes/s so training's own traffic
  is not starved, and compressed (byte planes + zstd, the chunk codec of the disk files) only
  when asked: see docs/checkpoint.md for when it pays.
* load: the group lists what every host's keeper holds, agrees on one step, and each rank reads
  the chunks it needs: from this host's keeper (descriptors passed over the socket, read in
  place), else from another host's keeper (streamed), every chunk verified against its CRC.

A snapshot is one rank's fragment of the step (the same blobs the rank writes to disk), so a
memory restore needs the snapshots of every rank of the step; resharding into another layout
works as from disk.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from .._native import _C
from . import _replica_codec
from . import keeper as kp
from ._keeper_client import KeeperClient, ensure_keeper, stop_keepers, tcp_address
from ._memory_read import mapped_reader, needed_files, rewrite_chunks
from .errors import CheckpointCorruptError, CheckpointError

__all__ = ["MemoryTier", "KeeperClient", "ensure_keeper", "stop_keepers", "check_args"]


log = logging.getLogger("ichiban_comm.checkpoint")


def check_args(replicas, bandwidth, keep, budget, idle, compression) -> None:
    """AsyncCheckpointer's memory-tier arguments, each error naming its argument."""
    if compression not in ("auto", "zstd", None):
        raise ValueError(f"replica_compression must be 'auto', 'zstd' or None, got {compression!r}")
    if compression == "zstd" and not _C.checkpoint.zstd_available():
        raise CheckpointError(f"replica_compression='zstd' needs libzstd: {_C.checkpoint.zstd_error()}")
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0):
        raise ValueError(f"replicas must be None or an integer >= 0, got {replicas!r}")
    if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
        raise ValueError(f"replica_bandwidth must be None or bytes/s > 0, got {bandwidth!r}")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"memory_keep must be an integer >= 1, got {keep!r}")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"memory_budget_bytes must be None or an integer >= 1, got {budget!r}")
    if not isinstance(idle, (int, float)) or idle <= 0:
        raise ValueError(f"keeper_idle_timeout_s must be > 0, got {idle!r}")


# ------------------------------------------------------------------ the tier
class MemoryTier:
    def __init__(self, root: str, group, *, replicas, replica_bandwidth, keep: int, budget_bytes,
                 idle_timeout: float, topology, chunk_bytes: int, threads: int,
                 compression: str | None = "auto"):
        from .. import topology as topo_mod

        self.root, self.group, self.keep, self.chunk_bytes = root, group, keep, chunk_bytes
        self.rate = replica_bandwidth
        self.compression, self.threads = compression, max(1, threads)
        self.replica_codec: dict | None = None   # the measured decision ("auto"), once
        self.grank = group.rank
        self.world = group.world
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            me, n_global = dist.get_rank(), dist.get_world_size()
            self.global_ranks = dist.get_process_group_ranks(group.pg) if group.pg is not None else [me]
        else:
            self.global_ranks, me, n_global = [0], 0, 1
        if topology is None:
            topology = topo_mod.detect(rank=me, world_size=n_global)
        self.topology = topology
        self.hosts = [topology.host_of(g) for g in self.global_ranks]
        self.host = self.hosts[self.grank]
        order = [h for h in topology.hosts if h in set(self.hosts)]
        if replicas is None:
            replicas = 1 if len(order) > 1 else 0
        if replicas > len(order) - 1:
            warnings.warn(f"replicas={replicas} needs {replicas + 1} hosts but the topology has "
                          f"{len(order)}; keeping {len(order) - 1} replica(s)", RuntimeWarning, stacklevel=3)
            replicas = len(order) - 1
        i = order.index(self.host)
        self.peers = [order[(i + k) % len(order)] for k in range(1, replicas + 1)]
        self._keeper_args = {"keep": keep, "budget_bytes": budget_bytes, "idle_timeout": idle_timeout,
                             "tcp": tcp_address() if len(order) > 1 else None}
        self.local = None
        try:
            self.local, info, token = ensure_keeper(root, self.host, **self._keeper_args)
            mine = {"host": self.host, "tcp": info.get("tcp"), "token": token}
        except (OSError, CheckpointError, ValueError) as e:
            mine = {"error": f"rank {self.grank} (host {self.host!r}): {e}"}
        self.local_lock = threading.Lock()
        # Keepers' addresses and tokens travel on the job's own coordination group: only the
        # job's ranks learn them. A rank that could not reach its keeper fails every rank now.
        gathered = self._all_gather(mine)
        errors = [d["error"] for d in gathered if "error" in d]
        if errors:
            if self.local is not None:
                self.local.close()
            raise CheckpointError("memory=True: no checkpoint keeper: " + "; ".join(errors))
        self.keepers = {d["host"]: d for d in gathered}
        self.crc_pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ichiban-mem-crc")
        self._read_mapped = mapped_reader(self.crc_pool)
        self._snap = None
        self._warned: set[str] = set()
        self.last_load: dict | None = None
        self.replicated_bytes = 0       # sent (after compression)
        self.replicated_raw_bytes = 0
        self.replicate_s = 0.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._cv = threading.Condition()
        self._thread = None
        if self.peers:
            self._thread = threading.Thread(target=self._replicate_loop, name="ichiban-ckpt-replica",
                                            daemon=True)
            self._thread.start()

    # ---- group helpers
    def _all_gather(self, obj):
        if self.group.pg is None:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group.pg)
        return out

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # ---- save
    def begin(self, waves) -> None:
        """A new snapshot sized for every wave of this save (its memory is taken at the first
        stage(), which for a one-wave save runs off the caller's time)."""
        self.discard()
        spans = [max((p.pool_offset + p.nbytes for p in w), default=0) for w in waves]
        bases = [sum(spans[:i]) for i in range(len(spans))]
        self._snap = {"fd": None, "mmap": None, "buf": None, "bases": bases, "spans": spans,
                      "size": sum(spans), "pieces": [], "crcs": []}

    def _allocate(self, s) -> None:
        total = s["size"]
        s["fd"] = kp.new_memfd(f"ichiban-snapshot-r{self.grank}", total)
        if total:
            # MAP_POPULATE: the kernel allocates the pages in one go instead of one fault per page.
            s["mmap"] = mmap.mmap(s["fd"], total, mmap.MAP_SHARED | mmap.MAP_POPULATE)
            s["buf"] = torch.frombuffer(s["mmap"], dtype=torch.uint8)
        else:
            s["buf"] = torch.empty(0, dtype=torch.uint8)

    def stage(self, wave_index: int, wave, pool) -> None:
        """Copy one staged wave from the pool into the snapshot and checksum it in chunks.
        A failure here (no memory for the snapshot) costs the memory copy of this save, with a
        warning, never the disk save."""
        if self._snap is None:
            return
        try:
            self._stage(wave_index, wave, pool)
        except (OSError, RuntimeError, ValueError) as e:
            self._warn_once("stage", f"the memory tier could not copy this save ({e}); it is on disk only")
            self.discard()

    def _stage(self, wave_index: int, wave, pool) -> None:
        s = self._snap
        if s["fd"] is None:
            self._allocate(s)
        base, span = s["bases"][wave_index], s["spans"][wave_index]
        if span:
            _C.checkpoint.copy_bytes(s["buf"][base:base + span], pool[:span])
        chunks = []
        for p in wave:
            for off in range(0, p.nbytes, self.chunk_bytes):
                n = min(self.chunk_bytes, p.nbytes - off)
                chunks.append((p.blob, p.blob_offset + off, base + p.pool_offset + off, n))
        buf = s["buf"]
        crcs = list(self.crc_pool.map(lambda c: _C.checkpoint.crc32c_tensor(buf[c[2]:c[2] + c[3]]), chunks))
        s["pieces"].extend(chunks)
        s["crcs"].extend(crcs)

    def fragment(self, plan, tree, rank_fragment, step: int) -> None:
        """Record this rank's fragment with the snapshot's chunk lists (before the disk ones are
        attached to the same plan entries)."""
        s = self._snap
        if s is None:
            return
        name = f"r{self.grank}.f0"
        per_blob: dict[int, list] = {}
        for (b, blob_off, off, n), crc in zip(s["pieces"], s["crcs"]):
            per_blob.setdefault(b, []).append((blob_off, [name, off, n, n, int(crc), 0, 1]))
        for b, blob in enumerate(plan.blobs):
            blob.target["chunks"] = [c for _, c in sorted(per_blob.get(b, []), key=lambda x: x[0])]
        s["fragment"] = json.loads(json.dumps({"entries": plan.entries, "storages": plan.storages,
                                               "tree": tree, "rank": rank_fragment, "step": step}))

    def commit(self, step: int, header: dict) -> None:
        """The disk commit of step succeeded: hand the snapshot to the keeper, then replicate."""
        s, self._snap = self._snap, None
        if s is None or "fragment" not in s:
            if s is not None:
                self._snap = s
                self.discard()
            return
        if s["fd"] is None:   # a state without tensor bytes
            self._allocate(s)
        del s["buf"]
        if s["mmap"] is not None:
            s["mmap"].close()
        fd = s["fd"]
        meta = {"fragment": s["fragment"], "header": header, "world": self.world, "time": time.time(),
                "files": [f"r{self.grank}.f0"]}
        try:
            kp.seal(fd)
            self._put_local(step, meta, fd, s["size"])
        except (OSError, CheckpointError, ValueError) as e:
            self._warn_once("put", f"checkpoint step {step}: the memory tier could not keep the snapshot "
                                   f"({e}); it is on disk only")
        if self.peers:
            with self._cv:
                self._pending += 1
            self._queue.put((step, meta, fd, s["size"]))
        else:
            os.close(fd)

    def _put_local(self, step, meta, fd, size) -> None:
        with self.local_lock:
            try:
                self.local.put(self.grank, step, meta, [fd], [size])
            except (OSError, ConnectionError):
                # The keeper died (or was stopped): start a new one and try once more.
                self.local.close()
                self.local, info, token = ensure_keeper(self.root, self.host, **self._keeper_args)
                self.local.put(self.grank, step, meta, [fd], [size])

    def discard(self) -> None:
        s, self._snap = self._snap, None
        if s is not None:
            s.pop("buf", None)
            if s["mmap"] is not None:
                s["mmap"].close()
            if s["fd"] is not None:
                os.close(s["fd"])

    # ---- replicas
    def _replicate_loop(self) -> None:
        conns: dict[str, KeeperClient] = {}
        while True:
            item = self._queue.get()
            if item is None:
                break
            step, meta, fd, size = item
            encoded: list[int] = []
            try:
                t0 = time.perf_counter()
                send = (meta, [fd], [size])
                try:
                    if self._compress(meta, fd, size):
                        send = _replica_codec.encode(meta, fd, size, self.grank, self.threads,
                                                     self.chunk_bytes)
                        encoded = send[1]
                except (RuntimeError, OSError) as e:
                    self._warn_once("zstd", f"replica compression failed ({e}); sending raw")
                for host in self.peers:
                    try:
                        c = conns.get(host)
                        if c is None:
                            k = self.keepers[host]
                            c = conns[host] = KeeperClient(tuple(k["tcp"]), k["token"])
                        c.put(self.grank, step, send[0], send[1], send[2], origin="replica", rate=self.rate)
                        self.replicated_bytes += sum(send[2])
                        self.replicated_raw_bytes += size
                        self.replicate_s += time.perf_counter() - t0
                    except (OSError, ConnectionError, CheckpointError, KeyError, TypeError) as e:
                        old = conns.pop(host, None)
                        if old is not None:
                            old.close()
                        self._warn_once(f"replica-{host}", f"checkpoint step {step}: replica to host "
                                                          f"{host!r} failed ({e}); retried at the next save")
            finally:
                for f in [fd] + encoded:
                    os.close(f)
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()
        for c in conns.values():
            c.close()

    def _compress(self, meta, fd, size) -> bool:
        if self.compression != "auto":
            return self.compression == "zstd"
        if self.replica_codec is None:
            if not _C.checkpoint.zstd_available():
                self.replica_codec = {"compress": False, "why": _C.checkpoint.zstd_error()}
            elif self.rate is None:
                self.replica_codec = {"compress": False, "why": "no replica_bandwidth cap: the link "
                                      "is the host network, which the encoder does not outrun"}
            else:
                ratio, enc = _replica_codec.measure(meta, fd, size, self.threads, self.chunk_bytes)
                self.replica_codec = {"compress": _replica_codec.pays(ratio, enc, self.rate), "ratio": ratio,
                                      "encode_bytes_per_s": enc, "link_bytes_per_s": self.rate}
            log.info("replica compression: %s", self.replica_codec)
        return self.replica_codec["compress"]

    def wait_replicated(self, timeout: float | None = None) -> bool:
        """Wait until every committed snapshot was sent to its peer hosts; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending == 0, timeout)

    def drop_after(self, step: int) -> None:
        """Forget snapshots of steps above `step` (a rollback): in this host's keeper and in the
        keepers holding this rank's replicas. Replicas in flight are sent first."""
        self.wait_replicated()
        for host in [self.host] + self.peers:
            try:
                c = self._client_for(host)
                try:
                    with self.local_lock:
                        c.call({"op": "drop", "after": step})
                finally:
                    if c is not self.local:
                        c.close()
            except (OSError, ConnectionError, CheckpointError, KeyError, TypeError) as e:
                self._warn_once(f"drop-{host}", f"rollback: the keeper of host {host!r} could not "
                                                f"drop steps after {step} ({e})")

    def close(self) -> None:
        self.discard()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.crc_pool.shutdown()
        self.local.close()

    # ---- load
    def _client_for(self, host: str) -> KeeperClient:
        if host == self.host:
            return self.local
        k = self.keepers[host]
        return KeeperClient(tuple(k["tcp"]), k["token"])

    def load(self, step, into, disk_steps):
        """The state of the agreed step from memory, or None when the group reads disk.

        disk_steps: the committed steps on disk. Memory serves a step when the group finds
        every rank's snapshot of it in some keeper, and it is the step asked for, or (step None)
        at least as recent a commit as the disk's newest step.
        """
        from . import _layout as layout

        disk_head = disk_steps[-1] if disk_steps else None
        disk_time = None
        if disk_head is not None:
            try:
                disk_time = layout.read_manifest(self.root, disk_head).get("created_unix")
            except (OSError, CheckpointError, ValueError):
                disk_time = None
        try:
            with self.local_lock:
                mine = self.local.list()
            listing = {"host": self.host, "snaps": mine, "error": None}
        except (OSError, ConnectionError, CheckpointError) as e:
            listing = {"host": self.host, "snaps": [], "error": str(e)}
        listing["disk"] = (disk_head, disk_time)
        views = self._all_gather(listing)
        # Every rank decides from the same gathered facts (rank 0's view of the disk), so all
        # take the same branch below.
        disk_head, disk_time = views[0]["disk"]
        holders: dict[tuple[int, int], list] = {}
        times: dict[int, float] = {}
        for v in views:
            for snap in v["snaps"]:
                if snap.get("world") != self.world:
                    continue
                key = (snap["rank"], snap["step"])
                if v["host"] not in holders.setdefault(key, []):
                    holders[key].append(v["host"])
                times[snap["step"]] = max(times.get(snap["step"], 0.0), snap.get("time") or 0.0)
        complete = [s for s in times if all((k, s) in holders for k in range(self.world))]
        if step is not None:
            chosen = step if step in complete else None
        else:
            chosen = max(complete, key=lambda s: (times[s], s), default=None)
            if chosen is not None and disk_head is not None and disk_head != chosen and \
                    (disk_time or 0.0) > times[chosen]:
                chosen = None  # the disk holds a newer commit than memory does
        if chosen is None:
            return None
        error, state, tier = None, None, "memory"
        opened: list[int] = []
        try:
            state, tier = self._load_step(chosen, into, holders, opened)
        except (CheckpointError, OSError, ConnectionError, KeyError) as e:
            error = f"rank {self.grank}: {e}"
        finally:
            for fd in opened:
                os.close(fd)
        results = self._all_gather((error, tier))
        errors = [e for e, _ in results if e]
        if errors:
            warnings.warn(f"checkpoint step {chosen}: the memory tier could not serve every rank "
                          f"({'; '.join(errors)}); reading disk", RuntimeWarning, stacklevel=3)
            return None
        self.last_load = {"step": chosen, "tiers": [t for _, t in results]}
        if self.grank == 0:
            log.info("checkpoint step %d loaded from %s", chosen,
                     ", ".join(f"rank {r}: {t}" for r, t in enumerate(self.last_load["tiers"])))
        return state

    def load_rank_state(self, step: int, rank: int):
        """The rank_state that rank saved with step, from the first keeper that holds its
        snapshot (this host's, then the others'); raises CheckpointError when none does."""
        from ._loader import load_tree

        errors = []
        for host in [self.host] + [h for h in self.keepers if h != self.host]:
            opened: list[int] = []
            try:
                c = self._client_for(host)
                try:
                    with self.local_lock:
                        meta, fds = c.get(rank, step)
                finally:
                    if c is not self.local:
                        c.close()
                opened.extend(fds)
                part = meta["fragment"].get("rank")
                if part is None:
                    return None
                paths = {n: f"/proc/self/fd/{fd}" for n, fd in zip(meta["files"], fds)}
                manifest = {"ranks": [part], "tensors": [], "storages": []}
                rewrite_chunks(manifest, paths)
                return load_tree(step, "/", part, None)
            except (CheckpointError, OSError, ConnectionError, KeyError, TypeError) as e:
                errors.append(f"{host}: {e}")
            finally:
                for fd in opened:
                    os.close(fd)
        raise CheckpointError(f"no keeper holds rank {rank}'s snapshot of step {step} "
                              f"({'; '.join(errors)})")

    def _load_step(self, step, into, holders, opened):
        from ._commit import merge_fragments
        from ._loader import load_tree

        def source(k):
            hs = holders[(k, step)]
            return self.host if self.host in hs else hs[0]

        metas = {}
        remote: dict[str, KeeperClient] = {}
        try:
            def client(host):
                if host == self.host:
                    return self.local
                if host not in remote:
                    remote[host] = self._client_for(host)
                return remote[host]

            for k in range(self.world):
                with self.local_lock:
                    metas[k] = client(source(k)).get(k, step, meta_only=True)[0]
            header = metas[0]["header"]
            manifest = merge_fragments([metas[k]["fragment"] for k in range(self.world)], header)
            needed = needed_files(manifest, into)
            paths, tier = {}, "memory"
            for k in range(self.world):
                names = [n for n in metas[k]["files"] if n in needed]
                if not names:
                    continue
                host = source(k)
                with self.local_lock:
                    _meta, fds = client(host).get(k, step)
                opened.extend(fds)
                if host != self.host:
                    tier = "peer"
                for n, fd in zip(metas[k]["files"], fds):
                    paths[n] = f"/proc/self/fd/{fd}"
        finally:
            for c in remote.values():
                c.close()
        rewrite_chunks(manifest, paths)
        try:
            return load_tree(step, "/", manifest, into, read=self._read_mapped), tier
        except CheckpointCorruptError as e:
            raise CheckpointCorruptError(f"memory tier ({tier}): {e}", step=step) from e
