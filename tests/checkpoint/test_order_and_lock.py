"""Checkpoints over time: commit order, rollback, safe re-saves, one writer per root.

    python -m pytest -q tests/checkpoint/test_order_and_lock.py
"""

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer, CheckpointError
from ichiban_comm.checkpoint import _layout as layout

from _states import assert_same, make_state


def _st(v):
    return {"w": torch.full((100,), float(v)), "step": v}


def test_commit_sequence_numbers_order_the_steps(tmp_path):
    with AsyncCheckpointer(tmp_path, keep_last=5) as ck:
        for step in (10, 20, 30):
            ck.save(step, _st(step)).wait()
        seqs = [layout.read_manifest(str(tmp_path), s)["seq"] for s in (10, 20, 30)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        with pytest.raises(ValueError, match=r"step 15 is below the newest committed step 30.*rollback"):
            ck.save(15, _st(15))
        assert ck.steps() == [10, 20, 30]


def test_rollback_then_save_follows_the_new_line(tmp_path):
    root = str(tmp_path)
    with AsyncCheckpointer(root, keep_last=3) as ck:
        for step in (10, 20, 30):
            ck.save(step, _st(step)).wait()
        assert ck.rollback(10) == [20, 30]
        assert ck.steps() == [10] and ck.latest_step() == 10
        # saves below the abandoned steps are the head now: not pruned as "old" after commit
        paths = []
        for step in (15, 16, 17):
            paths.append(ck.save(step, _st(step)).wait())
            assert ck.latest_step() == step
        assert all(map(os.path.isdir, paths))
        assert open(os.path.join(root, "latest")).read().strip() == layout.step_name(17)
    assert layout.committed_steps(root) == [15, 16, 17]   # close() waited for the last prune
    ck = AsyncCheckpointer(root)
    assert ck.latest_step() == 17 and ck.load()["step"] == 17


def test_a_step_pruned_while_listed_is_not_the_head(tmp_path, monkeypatch):
    # A prune renames a step away between the directory listing and the manifest read (the
    # prune runs on the writer thread after the save's handle completes): that step is gone, not
    # "unreadable, so the newest".
    root = str(tmp_path)
    with AsyncCheckpointer(root, keep_last=5) as ck:
        for step in (10, 20):
            ck.save(step, _st(step)).wait()
    listed = layout._step_dirs(root)
    monkeypatch.setattr(layout, "_step_dirs", lambda r: listed)
    layout._remove_steps(root, [10])
    assert layout.committed_steps(root) == [20]
    layout._remove_steps(root, [20])
    assert layout.committed_steps(root) == []


_CRASH_AFTER_ROLLBACK = textwrap.dedent("""
    import os, sys, torch
    from ichiban_comm.checkpoint import AsyncCheckpointer
    from ichiban_comm.checkpoint import _layout as layout
    root = sys.argv[1]
    ck = AsyncCheckpointer(root, keep_last=5)
    for step in (10, 20, 30):
        ck.save(step, {"w": torch.full((100,), float(step)), "line": "old"}).wait()
    # the crash comes after the head moved but before the newer steps are removed (keep_last=5:
    # the prunes after each commit remove nothing)
    layout._remove_steps = lambda root, doomed: os._exit(9) if doomed else None
    ck.rollback(10)
""")

_CRASH_AFTER_SAVE = textwrap.dedent("""
    import os, sys, torch
    from ichiban_comm.checkpoint import AsyncCheckpointer
    ck = AsyncCheckpointer(sys.argv[1], keep_last=5)
    ck.save(20, {"w": torch.full((100,), -20.0), "line": "new"}).wait()
    os.kill(os.getpid(), 9)
""")


def test_rollback_save_and_crash_resumes_the_rolled_back_line(tmp_path):
    root = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _CRASH_AFTER_ROLLBACK, root], capture_output=True, timeout=120)
    assert r.returncode == 9, r.stderr.decode()[-2000:]
    ck = AsyncCheckpointer(root, keep_last=5)
    assert ck.latest_step() == 10          # the abandoned 20 and 30 are never the head
    ck.close()
    r = subprocess.run([sys.executable, "-c", _CRASH_AFTER_SAVE, root], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    ck = AsyncCheckpointer(root, keep_last=5)
    assert ck.latest_step() == 20
    out = ck.load()
    assert out["line"] == "new" and torch.equal(out["w"], torch.full((100,), -20.0))
    assert ck.steps()[-2:] == [10, 20]    # the abandoned 30 is older than the new line
    ck.close()
    with AsyncCheckpointer(root, keep_last=2) as ck:   # pruning follows commit order too:
        ck.save(21, _st(21)).wait()                     # the abandoned 30 goes, not the new line
    assert layout.committed_steps(root) == [20, 21]


def test_resave_crash_between_renames_keeps_the_committed_step(tmp_path):
    root = str(tmp_path)
    state = make_state(7)
    with AsyncCheckpointer(root) as ck:
        ck.save(5, state).wait()
    # what a crash between the two renames of a re-save leaves: only step_5.old
    final = layout.step_dir(root, 5)
    os.rename(final, final + ".old")
    os.makedirs(layout.tmp_dir(root, 5))
    ck = AsyncCheckpointer(root)
    assert ck.steps() == [5] and not os.path.exists(final + ".old")
    assert_same(state, ck.load(5))
    # and a re-save that completes replaces it
    ck.save(5, _st(5)).wait()
    assert ck.load(5)["step"] == 5 and ck.steps() == [5]
    ck.close()


def _hold_root(root, conn):
    ck = AsyncCheckpointer(root)
    ck.save(1, _st(1)).wait()
    conn.send(os.getpid())
    conn.recv()   # until killed


def test_second_writer_gets_a_clear_error_and_the_first_is_unaffected(tmp_path):
    root = str(tmp_path)
    first = AsyncCheckpointer(root)
    first.save(1, _st(1)).wait()
    second = AsyncCheckpointer(root)          # readers need no lock ...
    assert second.load()["step"] == 1
    with pytest.raises(CheckpointError, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
        second.save(2, _st(2))                # ... a second writer is refused
    with pytest.raises(CheckpointError, match="another AsyncCheckpointer of this process"):
        second.rollback(1)
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    first.save(2, _st(2)).wait()              # the first writer goes on
    assert first.steps() == [1, 2] and first.load()["step"] == 2
    second.close()
    first.close()
    AsyncCheckpointer(root).save(3, _st(3)).wait()   # released at close


def test_lock_of_a_dead_writer_is_taken_over(tmp_path):
    root = str(tmp_path)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_hold_root, args=(root, child))
    p.start()
    try:
        assert parent.poll(120)
        pid = parent.recv()
        with pytest.raises(CheckpointError, match=f"pid {pid} "):
            AsyncCheckpointer(root).save(2, _st(2))
    finally:
        p.kill()
        p.join(30)
    assert f"pid {pid} " in open(os.path.join(root, layout.LOCK)).read()   # stale content
    with AsyncCheckpointer(root) as ck:
        ck.save(2, _st(2)).wait()
        assert ck.steps() == [1, 2]
        assert f"pid {os.getpid()} " in open(os.path.join(root, layout.LOCK)).read()
