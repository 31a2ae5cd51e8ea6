"""Distributed saves (Gloo, real processes) and loading at other world sizes.

    python -m pytest -q tests/checkpoint/test_distributed.py
"""

import os
import resource
import signal

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer, CheckpointError
from ichiban_comm.checkpoint import _layout as layout
from spawn import run_workers

from _states import bits_equal

SPECS = {  # name: (shape, dtype, mesh, placements) ; mesh "1d" = (world,), "2d" = (2, world // 2)
    "tp_rows": ((13, 10), torch.float32, "1d", ("S0",)),
    "tp_cols": ((6, 11), torch.bfloat16, "1d", ("S1",)),
    "dt_rep": ((5, 4), torch.float32, "1d", ("R",)),
    "dp_tp": ((9, 6), torch.float32, "2d", ("R", "S0")),
}


def global_tensor(name):
    shape, dtype, *_ = SPECS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=g).to(dtype)


def _placements(codes):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if c == "R" else Shard(int(c[1])) for c in codes]


def _meshes(world):
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {"1d": init_device_mesh("cpu", (world,))}
    if world % 2 == 0 and world >= 4:
        meshes["2d"] = init_device_mesh("cpu", (2, world // 2))
    return meshes


def _dstate(world, fill=None):
    from torch.distributed.tensor import distribute_tensor

    meshes = _meshes(world)
    model = {}
    for name, (shape, dtype, mesh, pl) in SPECS.items():
        mesh = meshes.get(mesh, meshes["1d"])
        pl = pl if mesh.ndim == len(pl) else pl[-1:]
        src = global_tensor(name) if fill is None else torch.randn(shape).to(dtype)
        model[name] = distribute_tensor(src, mesh, _placements(pl))
    plain = torch.arange(20, dtype=torch.float64) * 1.5 + 0.25
    return {"model": model, "plain": plain, "plain2": plain * 3, "step": 7}


def _save_body(rank, world, root):
    ck = AsyncCheckpointer(root, writer_threads=2, chunk_bytes=4096, commit_timeout_s=30)
    rank_state = {"loader": {"position": 100 + rank}, "rng": torch.full((3,), float(rank) + 0.5)}
    path = ck.save(7, _dstate(world), rank_state=rank_state).wait()
    ck.close()
    mine = [f for f in os.listdir(path) if f.startswith(f"r{rank}_")]
    return path, sum(os.path.getsize(os.path.join(path, f)) for f in mine)


def _load_body(rank, world, root):
    state = _dstate(world, fill="random")
    out = AsyncCheckpointer(root).load(into=state)
    for name, dt in out["model"].items():
        assert dt is state["model"][name]
        assert bits_equal(dt.full_tensor(), global_tensor(name)), name
    assert out["step"] == 7
    assert torch.equal(out["plain"], torch.arange(20, dtype=torch.float64) * 1.5 + 0.25)
    return rank


@pytest.fixture(scope="module")
def saved_by_four(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist4"))
    results = run_workers(_save_body, 4, backend="gloo", timeout=120, args=(root,))
    return root, results


def test_four_ranks_write_their_shards_once(saved_by_four):
    root, results = saved_by_four
    assert len({p for p, _ in results}) == 1 and results[0][0] == layout.step_dir(root, 7)
    assert all(nbytes > 0 for _, nbytes in results), "every rank writes part of the state"
    m = layout.read_manifest(root, 7)
    by = {e["name"]: e for e in m["tensors"]}
    assert sorted(s["offsets"][0] for s in by["model.tp_rows"]["shards"]) == [0, 4, 8, 12]
    assert sorted(s["offsets"][1] for s in by["model.tp_cols"]["shards"]) == [0, 3, 6, 9]
    assert len(by["model.dt_rep"]["shards"]) == 1          # replicated: written once
    assert len(by["model.dp_tp"]["shards"]) == 2           # 2 tp shards, dp copies written once
    assert len(by["plain"]["shards"]) == 1
    total = sum(n for _, n in results)
    expect = sum(global_tensor(n).numel() * global_tensor(n).element_size() for n in SPECS) + 2 * 20 * 8 + 4 * 3 * 4  # + rank_state rng
    assert total == expect


def test_load_saved_by_four_in_one_process(saved_by_four):
    root, _ = saved_by_four
    ck = AsyncCheckpointer(root)
    for r in range(4):
        rs = ck.load_rank_state(rank=r)
        assert rs["loader"] == {"position": 100 + r} and torch.equal(rs["rng"], torch.full((3,), r + 0.5))
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\)"):
        ck.load_rank_state(rank=4)
    out = ck.load()
    for name in SPECS:
        assert bits_equal(out["model"][name], global_tensor(name)), name
    assert out["step"] == 7


@pytest.mark.parametrize("world", [2, 3])
def test_load_saved_by_four_resharded(saved_by_four, world):
    root, _ = saved_by_four
    assert run_workers(_load_body, world, backend="gloo", timeout=120, args=(root,)) == list(range(world))


def _failing_rank_body(rank, world, root):
    ck = AsyncCheckpointer(root, writer_threads=1, chunk_bytes=65536, commit_timeout_s=30)
    state = {"w": torch.randn(256, 256), "r": torch.randn(256, 256)}
    ck.save(1, {"ok": torch.ones(3) * 2}).wait()
    try:
        ck.save(2, {"lr": 0.1 * (rank + 1)}).wait()   # plain values that differ between ranks
        mismatch = "committed"
    except CheckpointError as e:
        mismatch = str(e)
    assert "differ from rank 0's" in mismatch and "rank_state" in mismatch, mismatch
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
    h = ck.save(2, state)
    try:
        h.wait()
        return "committed"
    except CheckpointError as e:
        return str(e)
    finally:
        ck.close()


def test_one_rank_failing_fails_the_commit_everywhere(tmp_path):
    results = run_workers(_failing_rank_body, 2, backend="gloo", timeout=120, args=(str(tmp_path),))
    for r in results:
        assert "step 2" in r and "rank 1" in r and "File too large" in r, r
    assert layout.committed_steps(str(tmp_path)) == [1]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def _dead_rank_body(rank, world, root):
    ck = AsyncCheckpointer(root, commit_timeout_s=4)
    if rank == 1:
        os._exit(3)  # dies before its part of the save
    h = ck.save(1, {"w": torch.randn(100)})
    try:
        h.wait(timeout=60)
        return "committed"
    except CheckpointError as e:
        return str(e)


def test_dead_rank_fails_the_commit_instead_of_hanging(tmp_path):
    results = run_workers(_dead_rank_body, 2, backend="gloo", timeout=90, args=(str(tmp_path),),
                          expect_failure_ranks=(1,))
    assert "commit coordination failed" in results[0], results[0]
    assert layout.committed_steps(str(tmp_path)) == []
