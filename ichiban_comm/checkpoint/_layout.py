"""Where a checkpoint lives on disk, and the few file operations that make it atomic.

    ROOT/
      step_000000000100/          a committed step (complete: its manifest is inside)
        manifest.json             written last; JSON, then a line "crc32c=XXXXXXXX" over the JSON
        r0_v0_w0.bin ...          chunk files: rank, staging wave, writer thread
      step_000000000200.tmp/      a save in progress (removed if it fails; swept on start)
      step_000000000050.del/      a step being pruned (renamed first, so pruning is atomic)
      step_000000000100.old/      the committed copy of a step being re-saved (restored on
                                  start if the new copy never took its place)
      latest                      "step_000000000200": a hint for tools; the scan decides
      .lock                       flock'ed by the one process that writes; holds its pid and host

Order is commit order, not step order: every manifest holds ``seq``, one more than
the newest committed step's when it was committed; the head (``latest_step()``)
is the step with the highest ``seq``, pruning removes the lowest, and
``rollback(step)`` re-stamps an older step with a new ``seq`` (one atomic rename
of its manifest) before removing the steps committed after it.

A step directory without the ``.tmp`` suffix only ever appears by rename after
its manifest and every chunk file were fsynced, so it is complete by construction.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import socket
import time

from .._native import _C
from .errors import CheckpointCorruptError

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "ichiban_comm.checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_STALE_RE = re.compile(r"^step_(\d+)\.(tmp|del)$")
_OLD_RE = re.compile(r"^step_(\d+)\.old$")
LOCK = ".lock"


def step_name(step: int) -> str:
    return f"step_{step:012d}"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, step_name(step))


def tmp_dir(root: str, step: int) -> str:
    return step_dir(root, step) + ".tmp"


def chunk_file(rank: int, wave: int, thread: int) -> str:
    return f"r{rank}_v{wave}_w{thread}.bin"


def _step_dirs(root: str) -> list[int]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    steps = []
    for n in names:
        m = _STEP_RE.match(n)
        if m and os.path.isfile(os.path.join(root, n, MANIFEST)):
            steps.append(int(m.group(1)))
    return steps


def commit_seq(root: str, step: int) -> float | None:
    """The commit sequence number of a committed step: -1 for a manifest without one (older
    format: ordered by step, before the others); +inf for an unreadable manifest, so that it
    counts as the newest and loading it fails loudly (or falls back with a warning) rather than
    an older step being taken in silence; None when the step vanished since it was listed (a
    prune or rollback renamed it away: it is no longer committed, not the newest)."""
    path = os.path.join(step_dir(root, step), MANIFEST)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return math.inf
    key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
    seq = _SEQ_CACHE.get(key)
    if seq is None:
        try:
            seq = int(read_manifest(root, step).get("seq", -1))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, CheckpointCorruptError):
            return math.inf
        if len(_SEQ_CACHE) > 4096:
            _SEQ_CACHE.clear()
        _SEQ_CACHE[key] = seq
    return seq


# (manifest path, inode, mtime, size) -> seq: ordering the steps reads each manifest once, not on
# every save and prune (a manifest is replaced only by a new file: a re-save or a rollback).
_SEQ_CACHE: dict = {}


def commit_order(root: str) -> list[tuple[int, int]]:
    """(seq, step) of every committed step, in commit order (oldest first)."""
    seqs = ((commit_seq(root, s), s) for s in _step_dirs(root))
    return sorted((q, s) for q, s in seqs if q is not None)


def committed_steps(root: str) -> list[int]:
    """Committed steps in commit order, oldest first: the last one is the head."""
    return [s for _, s in commit_order(root)]


def next_seq(root: str) -> int:
    order = [q for q, _ in commit_order(root) if q != math.inf]
    return int(max(order, default=-1)) + 1


def sweep_stale(root: str) -> list[str]:
    """Remove what dead saves and interrupted prunes left behind; returns the names removed."""
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for n in names:
        if _STALE_RE.match(n):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
            removed.append(n)
        m = _OLD_RE.match(n)
        if m:  # a re-save interrupted between its two renames: the old copy is the committed one
            final = os.path.join(root, n[:-len(".old")])
            if os.path.isdir(final) and os.path.isfile(os.path.join(final, MANIFEST)):
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
                removed.append(n)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(os.path.join(root, n), final)
                _C.checkpoint.fsync_dir(root)
    for n in names:  # a 'latest' being replaced when the process died
        if n.startswith(LATEST + ".") and n.endswith(".tmp"):
            _unlink_quiet(os.path.join(root, n))
    return removed


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_file_durable(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_manifest(manifest: dict) -> bytes:
    body = json.dumps(manifest, separators=(",", ":")).encode()
    return body + b"\ncrc32c=%08x\n" % _C.checkpoint.crc32c(body)


def write_manifest(directory: str, manifest: dict) -> None:
    write_file_durable(os.path.join(directory, MANIFEST), encode_manifest(manifest))


def read_manifest(root: str, step: int) -> dict:
    path = os.path.join(step_dir(root, step), MANIFEST)
    where = f"checkpoint step {step}: file {MANIFEST}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: not found in {root}") from None
    body, sep, trailer = raw.rstrip(b"\n").rpartition(b"\ncrc32c=")
    if not sep:
        raise CheckpointCorruptError(f"{where}: no checksum line (truncated or not a checkpoint)",
                                     step=step, file=MANIFEST)
    try:
        want = int(trailer, 16)
    except ValueError:
        raise CheckpointCorruptError(f"{where}: malformed checksum line", step=step, file=MANIFEST) from None
    got = _C.checkpoint.crc32c(body)
    if got != want:
        raise CheckpointCorruptError(f"{where}: crc32c mismatch (stored {want:08x}, computed {got:08x})",
                                     step=step, file=MANIFEST)
    manifest = json.loads(body)
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointCorruptError(f"{where}: not an {FORMAT} v{FORMAT_VERSION} manifest",
                                     step=step, file=MANIFEST)
    return manifest


def commit(root: str, step: int) -> str:
    """tmp -> step dir (atomic), fsync the root, point 'latest' at it. Returns the step dir."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    _C.checkpoint.fsync_dir(tmp)
    if os.path.exists(final):
        # Re-saving a step: the committed copy is moved aside as .old (restored on start if the
        # process dies before the new copy takes its place), never to .del.
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        _C.checkpoint.fsync_dir(root)
        os.rename(tmp, final)
        _C.checkpoint.fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _C.checkpoint.fsync_dir(root)
    write_latest(root, step)
    return final


def write_latest(root: str, step: int) -> None:
    latest_tmp = os.path.join(root, f"{LATEST}.{os.getpid()}.tmp")
    write_file_durable(latest_tmp, (step_name(step) + "\n").encode())
    os.replace(latest_tmp, os.path.join(root, LATEST))
    _C.checkpoint.fsync_dir(root)


def _remove_steps(root: str, doomed) -> None:
    for s in doomed:
        d = step_dir(root, s)
        gone = d + ".del"
        try:
            os.rename(d, gone)
        except FileNotFoundError:
            continue
        shutil.rmtree(gone, ignore_errors=True)
    if doomed:
        _C.checkpoint.fsync_dir(root)


def prune(root: str, keep_last: int) -> list[int]:
    """Remove all but the keep_last most recently committed steps; returns the steps removed."""
    steps = committed_steps(root)
    doomed = steps[:-keep_last] if keep_last > 0 else []
    _remove_steps(root, doomed)
    return doomed


def rollback(root: str, step: int, seq: int) -> list[int]:
    """Make committed `step` the head with commit number `seq` (one atomic manifest rename), then
    remove the steps committed after it. Returns the steps removed."""
    order = commit_order(root)
    old = dict((s, q) for q, s in order)
    if step not in old:
        raise FileNotFoundError(f"no committed checkpoint for step {step} in {root}")
    manifest = read_manifest(root, step)
    manifest["seq"] = seq
    d = step_dir(root, step)
    tmp = os.path.join(d, MANIFEST + ".tmp")
    write_file_durable(tmp, encode_manifest(manifest))
    os.replace(tmp, os.path.join(d, MANIFEST))
    _C.checkpoint.fsync_dir(d)
    doomed = [s for q, s in order if q > old[step] and s != step]
    _remove_steps(root, doomed)
    write_latest(root, step)
    return doomed


class RootLock:
    """An exclusive flock on ROOT/.lock for the one process that writes checkpoints there.

    The file holds the holder's pid and host for the error another writer gets. The kernel
    drops the lock when its holder dies (a SIGKILL included), so a stale lock is simply
    taken over; readers never lock.
    """

    def __init__(self, root: str):
        self.path = os.path.join(root, LOCK)
        self.fd: int | None = None

    def try_acquire(self) -> str | None:
        """None when this process now holds the lock, else who holds it."""
        if self.fd is not None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            finally:
                os.close(fd)
            return holder
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)   # closing drops the flock
            self.fd = None
