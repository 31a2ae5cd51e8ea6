"""Checkpoints across ranks: per-rank tensors never merged, loads agreed by the group, errors at
the call reaching every rank, and a commit wait that scales with the bytes. Real processes (Gloo).

    python -m pytest -q tests/checkpoint/test_across_ranks.py
"""

import os
import time

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer, CheckpointCorruptError, CheckpointError
from ichiban_comm.checkpoint import _layout as layout
from spawn import run_workers

from _states import bits_equal


def _per_rank_body(rank, world, root):
    ck = AsyncCheckpointer(root, writer_threads=1, chunk_bytes=4096, commit_timeout_s=60)
    shared = torch.arange(50, dtype=torch.float32)
    mine = torch.full((7,), 10.0 * rank + 1)          # a ZeRO-style flat shard, different per rank
    # Declared per rank: saved per rank, each loads its own.
    ck.save(1, {"model": shared}, rank_state={"flat_shard": mine}).wait()
    own = ck.load_rank_state(1)["flat_shard"]
    # Put in state (declared replicated) although it differs: the step is refused, naming it.
    try:
        ck.save(2, {"model": shared, "optim_shard": mine}).wait()
        refused = "committed"
    except CheckpointError as e:
        refused = str(e)
    # Equal values in state are fine (and written once).
    ck.save(3, {"model": shared, "same": torch.ones(4)}).wait()
    steps = ck.steps()
    ck.close()
    return own.tolist(), refused, steps


def test_per_rank_tensors_are_never_merged():
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        results = run_workers(_per_rank_body, 2, backend="gloo", timeout=90, args=(root,))
    for rank, (own, refused, steps) in enumerate(results):
        assert own == [10.0 * rank + 1] * 7                 # each rank its own values
        assert "'optim_shard'" in refused and "ranks [0]" in refused and "ranks [1]" in refused, refused
        assert "rank_state" in refused
        assert steps == [1, 3]


def _sharded(world, fill):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(fill)
    return {"w": distribute_tensor(torch.randn(64, 300, generator=g), mesh, [Shard(0)])}


def _fallback_body(rank, world, root, phase):
    ck = AsyncCheckpointer(root, writer_threads=1, chunk_bytes=4096, commit_timeout_s=60)
    if phase == "save":
        for step in (1, 2):
            ck.save(step, _sharded(world, step)).wait()
        ck.close()
        return None
    target = _sharded(world, 99)
    out = {}
    try:
        ck.load(into=target)
        out["plain"] = "loaded"
    except CheckpointCorruptError as e:
        out["plain"] = str(e)
    step, state = ck.load(into=target, fallback=True, return_step=True)
    expect = _sharded(world, step)["w"].to_local()
    out["fallback"] = (step, ck.loaded_step, bits_equal(state["w"].to_local(), expect))
    return out


def test_fallback_is_agreed_by_every_rank(tmp_path):
    root = str(tmp_path)
    run_workers(_fallback_body, 2, backend="gloo", timeout=90, args=(root, "save"))
    # Corrupt a chunk of step 2 that only rank 1 reads (its own row shard).
    d = layout.step_dir(root, 2)
    victim = os.path.join(d, next(n for n in sorted(os.listdir(d)) if n.startswith("r1_")))
    with open(victim, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    results = run_workers(_fallback_body, 2, backend="gloo", timeout=90, args=(root, "load"))
    for r in results:
        # without fallback, both ranks fail (naming rank 1), neither loads step 2 alone
        assert "rank 1" in r["plain"] and "step 2" in r["plain"], r["plain"]
        assert r["fallback"] == (1, 1, True), r


def _error_at_call_body(rank, world, root):
    ck = AsyncCheckpointer(root, writer_threads=1, commit_timeout_s=300)
    ck.save(1, {"w": torch.ones(10)}).wait()
    state = {"w": torch.ones(10)}
    if rank == 1:
        state["bad"] = object()            # refused at the call on rank 1 only
    try:
        ck.save(2, state).wait()
        out = "committed"
    except (CheckpointError, TypeError) as e:
        out = f"{type(e).__name__}: {e}"
    ck.save(3, {"w": torch.ones(10) * 3}).wait()   # the group goes on saving
    steps = ck.steps()
    ck.close()
    return out, steps


def test_error_at_the_call_reaches_every_rank_at_once(tmp_path):
    # commit_timeout_s is 300 s and the workers get 90 s: hearing of the error by a timeout fails.
    results = run_workers(_error_at_call_body, 2, backend="gloo", timeout=90, args=(str(tmp_path),))
    assert results[1][0].startswith("TypeError") and "state[bad]" in results[1][0], results[1]
    assert results[0][0].startswith("CheckpointError") and "rank 1" in results[0][0], results[0]
    assert results[0][1] == results[1][1] == [1, 3]


def _slow_rank_body(rank, world, root, min_rate):
    import ichiban_comm.checkpoint.checkpointer as cp

    if rank == 1:  # this rank's writes take 2.5 s longer than commit_timeout_s alone allows
        attach = cp._attach_chunks

        def slow(*a, **k):
            time.sleep(2.5)
            return attach(*a, **k)

    ck = AsyncCheckpointer(root, writer_threads=1, commit_min_bytes_per_s=min_rate)
    ck.save(0, {"x": 1}).wait()   # start-up (group, root lock) under the default wait
    ck.commit_timeout_s = 1.0
    state = {"w": torch.randn(100_000)}   # 400 kB
    if rank == 1:
        cp._attach_chunks = slow
    try:
        ck.save(1, state).wait(timeout=60)
        out = "committed"
    except CheckpointError as e:
        out = str(e)
    return out


def test_commit_wait_scales_with_the_bytes(tmp_path):
    # 400 kB at 100 kB/s: 1 + 4 s of commit wait covers the slow rank ...
    ok = run_workers(_slow_rank_body, 2, backend="gloo", timeout=90, args=(str(tmp_path / "a"), 1e5))
    assert ok == ["committed", "committed"], ok
    # ... and at an unbounded rate the wait is the bare 1 s: the same save fails, it does not hang.
    bad = run_workers(_slow_rank_body, 2, backend="gloo", timeout=90, args=(str(tmp_path / "b"), 1e15))
    assert all("coordination failed" in r or "not committed" in r for r in bad), bad
