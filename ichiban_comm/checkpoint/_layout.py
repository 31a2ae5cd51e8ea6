"""Where a checkpoint lives on disk, and the few file operations that make it atomic.

    ROOT/
      step_000000000100/          a committed step (complete: its manifest is inside)
        manifest.json             written last; JSON, then a line "crc32c=XXXXXXXX" over the JSON
        r0_v0_w0.bin ...          chunk files: rank, staging wave, writer thread
      step_000000000200.tmp/      a save in progress (removed if it fails; swept on start)
      step_000000000050.del/      a step being pruned (renamed first, so pruning is atomic)
      latest                      "step_000000000200": a hint for tools; the scan decides

A step directory without the ``.tmp`` suffix only ever appears by rename after
its manifest and every chunk file were fsynced, so it is complete by construction.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from .._native import _C
from .errors import CheckpointCorruptError

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "ichiban_comm.checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_STALE_RE = re.compile(r"^step_(\d+)\.(tmp|del)$")


def step_name(step: int) -> str:
    return f"step_{step:012d}"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, step_name(step))


def tmp_dir(root: str, step: int) -> str:
    return step_dir(root, step) + ".tmp"


def chunk_file(rank: int, wave: int, thread: int) -> str:
    return f"r{rank}_v{wave}_w{thread}.bin"


def committed_steps(root: str) -> list[int]:
    """Committed steps, oldest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    steps = []
    for n in names:
        m = _STEP_RE.match(n)
        if m and os.path.isfile(os.path.join(root, n, MANIFEST)):
            steps.append(int(m.group(1)))
    return sorted(steps)


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
    if os.path.exists(final):  # re-saving a step: move the old one aside atomically first
        old = final + ".del"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _C.checkpoint.fsync_dir(root)
    latest_tmp = os.path.join(root, f"{LATEST}.{os.getpid()}.tmp")
    write_file_durable(latest_tmp, (step_name(step) + "\n").encode())
    os.replace(latest_tmp, os.path.join(root, LATEST))
    _C.checkpoint.fsync_dir(root)
    return final


def prune(root: str, keep_last: int) -> list[int]:
    """Remove all but the newest keep_last committed steps; returns the steps removed."""
    steps = committed_steps(root)
    doomed = steps[:-keep_last] if keep_last > 0 else []
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
    return doomed
