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


def _sharded(world, fill):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(fill)
    return {"w": distribute_tensor(torch.randn(64, 300, generator=g), mesh, [Shard(0)])}


def _group_body(rank, world, root):
    """One spawn for three promises (process start-up dominates these tests)."""
    import torch.distributed as dist

    out = {}
    # 1. Per-rank tensors. Declared per rank: saved per rank, each loads its own.
    ck = AsyncCheckpointer(os.path.join(root, "a"), writer_threads=1, chunk_bytes=4096)
    shared = torch.arange(50, dtype=torch.float32)
    mine = torch.full((7,), 10.0 * rank + 1)          # a ZeRO-style flat shard, different per rank
    ck.save(1, {"model": shared}, rank_state={"flat_shard": mine}).wait()
    out["own"] = ck.load_rank_state(1)["flat_shard"].tolist()
    # Put in state (declared replicated) although it differs: the step is refused, naming it.
    try:
        ck.save(2, {"model": shared, "optim_shard": mine}).wait()
        out["refused"] = "committed"
    except CheckpointError as e:
        out["refused"] = str(e)
    ck.save(3, {"model": shared, "same": torch.ones(4)}).wait()   # equal values are fine

    # 2. An error at the call on rank 1 only. commit_timeout_s is 300 s and the workers get
    # 120 s: hearing of it through a timeout fails the test.
    state = {"w": torch.ones(10)}
    if rank == 1:
        state["bad"] = object()
    try:
        ck.save(4, state).wait()
        out["at_call"] = "committed"
    except (CheckpointError, TypeError) as e:
        out["at_call"] = f"{type(e).__name__}: {e}"
    ck.save(5, {"w": torch.ones(10) * 3}).wait()   # the group goes on saving
    out["steps"] = ck.steps()
    ck.close()

    # 3. A chunk of the head that only rank 1 reads is corrupt: the group agrees.
    ck = AsyncCheckpointer(os.path.join(root, "b"), writer_threads=1, chunk_bytes=4096)
    for step in (1, 2):
        ck.save(step, _sharded(world, step)).wait()
    if rank == 1:
        d = layout.step_dir(ck.root, 2)
        victim = os.path.join(d, next(n for n in sorted(os.listdir(d)) if n.startswith("r1_")))
        with open(victim, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
    dist.barrier()
    target = _sharded(world, 99)
    try:
        ck.load(into=target)
        out["plain_load"] = "loaded"
    except CheckpointCorruptError as e:
        out["plain_load"] = str(e)
    step, state = ck.load(into=target, fallback=True, return_step=True)
    expect = _sharded(world, step)["w"].to_local()
    out["fallback"] = (step, ck.loaded_step, bits_equal(state["w"].to_local(), expect))
    ck.close()
    return out


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("group"))
    return run_workers(_group_body, 2, backend="gloo", timeout=120, args=(root,))


def test_per_rank_tensors_are_never_merged(group_results):
    for rank, r in enumerate(group_results):
        assert r["own"] == [10.0 * rank + 1] * 7                 # each rank its own values
        refused = r["refused"]
        assert "'optim_shard'" in refused and "ranks [0]" in refused and "ranks [1]" in refused, refused
        assert "rank_state" in refused


def test_error_at_the_call_reaches_every_rank_at_once(group_results):
    r0, r1 = group_results
    assert r1["at_call"].startswith("TypeError") and "state[bad]" in r1["at_call"], r1
    assert r0["at_call"].startswith("CheckpointError") and "rank 1" in r0["at_call"], r0
    assert r0["steps"] == r1["steps"] == [1, 3, 5]


def test_fallback_is_agreed_by_every_rank(group_results):
    for r in group_results:
        # without fallback both ranks fail, naming rank 1; neither loads step 2 alone
        assert "rank 1" in r["plain_load"] and "step 2" in r["plain_load"], r["plain_load"]
        assert r["fallback"] == (1, 1, True), r


def _slow_rank_body(rank, world, root):
    import ichiban_comm.checkpoint.checkpointer as cp

    attach = cp._attach_chunks

    def slow(*a, **k):   # this rank's writes take 2.5 s longer than commit_timeout_s alone allows
        time.sleep(2.5)
        return attach(*a, **k)

    out = []
    # 400 kB at 100 kB/s: 1 + 4 s of commit wait covers the slow rank; at an unbounded rate the
    # wait is the bare 1 s: the same save fails, it does not hang.
    for name, rate in (("a", 1e5), ("b", 1e15)):
        ck = AsyncCheckpointer(os.path.join(root, name), writer_threads=1, commit_min_bytes_per_s=rate)
        ck.save(0, {"x": 1}).wait()   # start-up (group, root lock) under the default wait
        ck.commit_timeout_s = 1.0
        if rank == 1:
            cp._attach_chunks = slow
        try:
            ck.save(1, {"w": torch.arange(100_000, dtype=torch.float32)}).wait(timeout=60)
            out.append("committed")
        except CheckpointError as e:
            out.append(str(e))
        cp._attach_chunks = attach
        try:
            ck.close()
        except CheckpointError:
            pass
    return out


def test_commit_wait_scales_with_the_bytes(tmp_path):
    results = run_workers(_slow_rank_body, 2, backend="gloo", timeout=90, args=(str(tmp_path),))
    for ok, bad in results:
        assert ok == "committed", ok
        assert "coordination failed" in bad or "not committed" in bad, bad
