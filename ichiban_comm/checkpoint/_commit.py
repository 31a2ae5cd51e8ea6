"""Committing a step: one rank writes the global manifest once every rank has written its files.

Coordination runs on its own Gloo group, created from the ranks that save
together: a commit never queues behind training collectives, and a dead rank
turns into a failed save on every other rank after the commit wait instead of a
hang or a watchdog kill. The wait is set per save: ``commit_timeout_s`` plus the
time to write the state's bytes at ``commit_min_bytes_per_s``, so a healthy
save that is merely large or slow is never failed by a fixed timeout.

A rank whose save() failed at the call (a bad state, a refused root lock) still
joins the commit with its error, so every rank hears of it as soon as it
arrives. Rank 0 also checks that the tensors declared replicated (plain tensors
in ``state``) are equal on every rank, by the CRC-32C each rank computed of its
own copy, and refuses the step naming the tensor and the ranks otherwise.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import shutil

from . import _layout as layout
from .errors import CheckpointError


log = logging.getLogger("ichiban_comm.checkpoint")


class CommitGroup:
    def __init__(self, process_group=None, timeout_s: float = 300.0):
        self.pg = None
        self.timeout_s = timeout_s
        self.rank, self.world, self.root_rank = 0, 1, 0
        try:
            import torch.distributed as dist
        except ImportError:
            return
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group was given but torch.distributed is not initialised")
            return
        group = process_group if process_group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        self.world = len(ranks)
        self.rank = dist.get_rank(group)
        self.root_rank = ranks[0]
        if self.world > 1:
            self.pg = dist.new_group(ranks=ranks, backend="gloo",
                                     timeout=datetime.timedelta(seconds=timeout_s))

    def barrier(self) -> None:
        if self.pg is not None:
            import torch.distributed as dist

            dist.barrier(group=self.pg)

    def close(self) -> None:
        if self.pg is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group(self.pg)
            except Exception:  # noqa: BLE001 - the default group may already be gone
                pass
            self.pg = None

    def set_wait(self, seconds: float) -> None:
        """The wait of the coordination that follows (the commit of one save)."""
        if self.pg is not None:
            from torch.distributed import distributed_c10d as c10d

            c10d.set_timeout(datetime.timedelta(seconds=seconds), self.pg)

    def all_gather(self, obj) -> list:
        """obj from every rank, in rank order (one process: [obj])."""
        if self.pg is None:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def commit(self, root, step, tmp, fragment, local_error, header) -> str:
        """Every rank calls this after writing its files; returns the step directory or raises."""
        if self.pg is None:
            if local_error is not None:
                raise local_error
            return _commit_files(root, step, tmp, [fragment], header)
        import torch.distributed as dist

        mine = ("error", f"rank {self.rank}: {local_error}") if local_error is not None else ("ok", fragment)
        gathered = [None] * self.world if self.rank == 0 else None
        try:
            dist.gather_object(mine, gathered, dst=self.root_rank, group=self.pg)
            if self.rank == 0:
                errors = [g[1] for g in gathered if g[0] != "ok"]
                if errors:
                    result = ("error", "; ".join(errors))
                else:
                    try:
                        result = ("ok", _commit_files(root, step, tmp, [g[1] for g in gathered],
                                                      header))
                    except Exception as e:  # noqa: BLE001 - every rank must hear about it
                        result = ("error", f"rank 0 commit: {e}")
                if result[0] != "ok" and tmp:
                    # Removed before anyone hears of the failure: a rank that retries the same
                    # step at once must not have its new files swept away.
                    shutil.rmtree(tmp, ignore_errors=True)
            box = [(result, step) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=self.root_rank, group=self.pg)
        except Exception as e:  # a rank died or timed out
            if self.rank == 0 and tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint step {step}: commit coordination failed ({e})") from e
        (status, payload), root_step = box[0]
        if status != "ok" and root_step != step and tmp:
            shutil.rmtree(tmp, ignore_errors=True)  # a directory rank 0 does not know about
        if status != "ok":
            raise CheckpointError(f"checkpoint step {step} was not committed: {payload}")
        return payload


def merge_fragments(fragments: list[dict], header: dict) -> dict:
    """The global manifest from every rank's entries (same tree on every rank)."""
    base = fragments[0]
    steps = [f.get("step", header["step"]) for f in fragments]
    if any(s != header["step"] for s in steps):
        raise CheckpointError(f"the ranks saved different steps {steps}; every rank must call "
                              f"save() with the same step")
    _check_replicated(fragments)
    tree_text = json.dumps(base["tree"], sort_keys=True)
    for r, f in enumerate(fragments[1:], start=1):
        if json.dumps(f["tree"], sort_keys=True) != tree_text:
            raise CheckpointError(f"rank {r} saved a state whose keys or plain values differ from rank "
                                  f"0's; values that differ between ranks belong in save(rank_state=...) "
                                  f"(or in DTensors)")
    entries = []
    for i, e0 in enumerate(base["entries"]):
        e = {k: v for k, v in e0.items() if k != "shards"}
        if "shards" in e0:
            shards = [s for f in fragments for s in f["entries"][i]["shards"] if "chunks" in s]
            volume = sum(math.prod(s["shape"]) for s in shards)
            if volume != math.prod(e0["shape"]):
                raise CheckpointError(f"tensor {e0['name']!r}: the ranks' shards cover {volume} of "
                                      f"{math.prod(e0['shape'])} elements")
            e["shards"] = shards
        entries.append(e)
    storages = []
    for sid, s0 in enumerate(base["storages"]):
        written = [f["storages"][sid] for f in fragments if "chunks" in f["storages"][sid]]
        if len(written) != 1:
            raise CheckpointError(f"shared storage {sid} was written by {len(written)} ranks, expected 1")
        storages.append(written[0])
    manifest = dict(header, tree=base["tree"], tensors=entries, storages=storages)
    if any(f.get("rank") is not None for f in fragments):
        manifest["ranks"] = [f.get("rank") for f in fragments]
    return manifest


def _check_replicated(fragments: list[dict]) -> None:
    """Tensors saved once for all ranks must hold the same bytes on every rank."""
    crcs = [f.get("replicated") for f in fragments]
    if len(fragments) < 2 or any(c is None for c in crcs):
        return
    for name, crc0 in crcs[0].items():
        by_value: dict = {}
        for r, c in enumerate(crcs):
            by_value.setdefault(c.get(name), []).append(r)
        if len(by_value) > 1:
            groups = "; ".join(f"ranks {v} hold crc32c {k:08x}" if k is not None else f"ranks {v} lack it"
                               for k, v in by_value.items())
            raise CheckpointError(
                f"tensor {name!r} differs between ranks ({groups}): a plain tensor in state is saved "
                f"once for all ranks, so its values must be the same everywhere. Put per-rank tensors "
                f"in save(rank_state=...) (saved and loaded per rank) and sharded ones in DTensors")


def _commit_files(root, step, tmp, fragments, header) -> str:
    # The commit number: one past the newest committed step's (see _layout.py).
    header = dict(header, seq=layout.next_seq(root))
    manifest = merge_fragments(fragments, header)
    layout.write_manifest(tmp, manifest)
    return layout.commit(root, step)
