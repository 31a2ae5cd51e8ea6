"""Crashes, corruption and I/O errors: never a wrong tensor, never a lost checkpoint.

    python -m pytest -q tests/checkpoint/test_failures.py
"""

import multiprocessing as mp
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer, CheckpointCorruptError, CheckpointError
from ichiban_comm.checkpoint import _layout as layout

from _kill_child import kill_state, save_forever
from _states import assert_same, make_state

KILLS = 24


def test_sigkill_at_random_instants_leaves_newest_complete_checkpoint(tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ichiban_comm.checkpoint", "_kill_child"])
    rng = random.Random(20261126)
    root = str(tmp_path)
    newest_committed = 0
    stale_seen = 0
    for kill in range(KILLS):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=save_forever, args=(root, child, "zstd" if kill % 3 == 2 else None))
        p.start()
        try:
            assert parent.poll(60), "checkpointing child did not start"
            assert parent.recv()[0] == "ready"
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            p.kill()
            p.join(10)
        while parent.poll():
            kind, step = parent.recv()
            if kind == "committed":
                newest_committed = max(newest_committed, step)
        stale_seen += any(n.endswith(".tmp") or n.endswith(".del") for n in os.listdir(root))
        ck = AsyncCheckpointer(root, keep_last=3)  # a fresh start sweeps what the dead save left
        names = os.listdir(root)
        assert not [n for n in names if n.endswith((".tmp", ".del"))], names
        latest = ck.latest_step()
        if latest is None:
            assert newest_committed == 0
            continue
        assert latest >= newest_committed, (latest, newest_committed)
        assert_same(kill_state(latest), ck.load())
        assert len(ck.steps()) <= 4
        ck.close()
    assert newest_committed >= KILLS // 2, "the kills should land after several saves"
    assert stale_seen >= 3, f"only {stale_seen} kills landed inside a save; the test is not probing it"


def _first_chunk(root, step, tensor):
    m = layout.read_manifest(root, step)
    e = next(e for e in m["tensors"] if e["name"] == tensor)
    return e["shards"][0]["chunks"][0]


def _save_three(root, **kw):
    states = {s: make_state(s) for s in (1, 2, 3)}
    with AsyncCheckpointer(root, **kw) as ck:
        for s, st in states.items():
            ck.save(s, st)
    return states


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_flipped_byte_names_step_file_tensor_and_fallback(tmp_path, compression):
    root = str(tmp_path)
    states = _save_three(root, compression=compression)
    fname, foff, stored, *_ = _first_chunk(root, 3, "optim.state.0.exp_avg")
    path = os.path.join(layout.step_dir(root, 3), fname)
    with open(path, "r+b") as f:
        f.seek(foff + stored // 2)
        b = f.read(1)
        f.seek(foff + stored // 2)
        f.write(bytes([b[0] ^ 0x01]))
    ck = AsyncCheckpointer(root)
    with pytest.raises(CheckpointCorruptError) as ei:
        ck.load()
    msg = str(ei.value)
    assert "step 3" in msg and fname in msg and "'optim.state.0.exp_avg'" in msg and "crc32c" in msg
    assert (ei.value.step, ei.value.file, ei.value.tensor) == (3, fname, "optim.state.0.exp_avg")
    with pytest.raises(CheckpointCorruptError):
        ck.load(step=3)
    with pytest.warns(RuntimeWarning, match="step 3 is unreadable"):
        out = ck.load(fallback=True)
    assert_same(states[2], out)
    assert_same(states[2], ck.load(step=2))


def test_truncated_file_and_missing_file(tmp_path):
    root = str(tmp_path)
    states = _save_three(root, chunk_bytes=4096, writer_threads=1)
    d = layout.step_dir(root, 3)
    fname = _first_chunk(root, 3, "model.w")[0]
    os.truncate(os.path.join(d, fname), os.path.getsize(os.path.join(d, fname)) - 100)
    ck = AsyncCheckpointer(root)
    with pytest.raises(CheckpointCorruptError, match=rf"step 3: file {fname}: tensor '.*' chunk \d+: .*truncated"):
        ck.load()
    d2 = layout.step_dir(root, 2)
    os.unlink(os.path.join(d2, _first_chunk(root, 2, "model.w")[0]))
    with pytest.raises(CheckpointCorruptError, match="step 2: file .*No such file"):
        ck.load(step=2)
    with pytest.warns(RuntimeWarning):
        assert_same(states[1], ck.load(fallback=True))


def test_corrupt_manifest(tmp_path):
    root = str(tmp_path)
    states = _save_three(root)
    mpath = os.path.join(layout.step_dir(root, 3), layout.MANIFEST)
    raw = bytearray(open(mpath, "rb").read())
    raw[20] ^= 0x04
    open(mpath, "wb").write(bytes(raw))
    ck = AsyncCheckpointer(root)
    with pytest.raises(CheckpointCorruptError, match="step 3: file manifest.json: crc32c mismatch"):
        ck.load()
    with pytest.warns(RuntimeWarning):
        assert_same(states[2], ck.load(fallback=True))


class _FileSizeLimit:
    """RLIMIT_FSIZE for this process: writes past it fail with EFBIG (SIGXFSZ ignored)."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def __enter__(self):
        self.old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.nbytes, self.old[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.old_sig)


def test_background_write_error_surfaces_and_partial_step_removed(tmp_path):
    root = str(tmp_path)
    small = {"w": torch.randn(100)}
    big = {"w": torch.randn(256, 1024)}   # 1 MiB in one writer file
    ck = AsyncCheckpointer(root, writer_threads=1, chunk_bytes=65536)
    ck.save(1, small).wait()
    with _FileSizeLimit(256 << 10):
        h = ck.save(2, big)                # returns: the failure happens in the background
        with pytest.raises(CheckpointError, match="step 2 failed: .*File too large"):
            h.wait()
        ck.save(3, big)                    # fails in the background again ...
        time.sleep(0.2)
        with pytest.raises(CheckpointError, match="background save of step 3 failed: .*File too large"):
            ck.save(4, small)              # ... and surfaces on the next save
        ck.save(5, big)
        with pytest.raises(CheckpointError, match="step 5 failed"):
            ck.close()                     # ... or on close
    assert sorted(os.listdir(root)) == [layout.LOCK, "latest", layout.step_name(1)]
    ck = AsyncCheckpointer(root)
    assert ck.steps() == [1]
    assert torch.equal(ck.load()["w"], small["w"])


_NO_DAC = """
import os, sys, torch
from ichiban_comm.checkpoint import AsyncCheckpointer, CheckpointError
from ichiban_comm.checkpoint import _layout as layout
root = sys.argv[1]
ck = AsyncCheckpointer(root)
tmp = layout.tmp_dir(root, 2)
os.makedirs(tmp)
os.chmod(tmp, 0o555)                  # files cannot be created: fails on the writer threads
h = ck.save(2, {"w": torch.randn(10)})
try:
    h.wait()
except CheckpointError as e:
    print("BACKGROUND", e)
print("TMP_LEFT", os.path.exists(tmp))
os.chmod(root, 0o555)                 # the step directory itself cannot be created
try:
    ck.save(3, {"w": torch.randn(10)})
except PermissionError as e:
    print("AT_CALL", e)
os.chmod(root, 0o755)
print("STEPS", ck.steps())
print("LOADED", repr(ck.load()["w"].tolist()))
"""


def test_permission_denied_is_a_clear_error(tmp_path):
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE (root ignores permissions)")
    root = tmp_path / "ck"
    w = torch.randn(10)
    with AsyncCheckpointer(root) as ck:
        ck.save(1, {"w": w}).wait()
    caps = "-dac_override,-dac_read_search"
    out = subprocess.run([setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable, "-c",
                          _NO_DAC, str(root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BACKGROUND checkpoint step 2 failed" in out.stdout and "Permission denied" in out.stdout, out.stdout
    assert "TMP_LEFT False" in out.stdout
    assert "AT_CALL" in out.stdout and "step_000000000003.tmp" in out.stdout
    assert "STEPS [1]" in out.stdout
    assert "LOADED " + repr(w.tolist()) in out.stdout
