"""StorageWriter / StorageReader under torch.distributed.checkpoint.

    python -m pytest -q tests/checkpoint/test_dcp_storage.py
"""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torch.distributed.checkpoint.api import CheckpointException

from ichiban_comm.checkpoint import StorageReader, StorageWriter
from spawn import run_workers

from _states import bits_equal

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(33, 17, generator=g), "b": torch.randn(17, generator=g).to(torch.bfloat16),
            "t": torch.randn(20, 30, generator=g).t(), "step": 5, "extra": {"lr": 0.1, "name": "x"}}


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_dcp_save_load_single_process(tmp_path, compression):
    state = _model_state(0)
    dcp.save(state, storage_writer=StorageWriter(tmp_path, compression=compression, chunk_bytes=4096))
    target = _model_state(1)
    dcp.load(target, storage_reader=StorageReader(tmp_path))
    for k in ("w", "b", "t"):
        assert bits_equal(target[k], state[k]), k
    assert target["step"] == 5 and target["extra"] == {"lr": 0.1, "name": "x"}


def test_dcp_async_save(tmp_path):
    state = _model_state(2)
    fut = dcp.async_save(state, storage_writer=StorageWriter(tmp_path))
    fut.result(timeout=60)
    target = _model_state(3)
    dcp.load(target, storage_reader=StorageReader(tmp_path))
    assert bits_equal(target["w"], state["w"])


def test_dcp_corruption_detected(tmp_path):
    state = _model_state(4)
    dcp.save(state, storage_writer=StorageWriter(tmp_path, writer_threads=1))
    path = os.path.join(tmp_path, "r0_w0.bin")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x08
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointException, match=r"r0_w0.bin: tensor '.*' chunk \d+: crc32c mismatch"):
        dcp.load(_model_state(5), storage_reader=StorageReader(tmp_path))


def _dcp_body(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.randn(10, 6, generator=torch.Generator().manual_seed(9))
    state = {"w": distribute_tensor(full, mesh, [Shard(0)]), "r": full[:3].clone()}
    # async_save: the writer stages the DTensor's local shard through its pool and hands DCP a
    # DTensor with the same spec
    f = dcp.async_save(state, storage_writer=StorageWriter(root, chunk_bytes=4096))
    (f.result(timeout=60) if hasattr(f, "result") else f.upload_completion.result(timeout=60))
    return sorted(f for f in os.listdir(root) if f.endswith(".bin"))


def test_dcp_two_ranks_then_one(tmp_path):
    files = run_workers(_dcp_body, 2, backend="gloo", timeout=120, args=(str(tmp_path),))
    assert any(f.startswith("r1_") for f in files[0])
    full = torch.randn(10, 6, generator=torch.Generator().manual_seed(9))
    target = {"w": torch.randn(10, 6), "r": torch.randn(3, 6)}
    dcp.load(target, storage_reader=StorageReader(tmp_path))
    assert torch.equal(target["w"], full) and torch.equal(target["r"], full[:3])


def test_dcp_async_save_stages_through_the_writer_pool(tmp_path):
    state = _model_state(6)
    expect = {k: state[k].clone() for k in ("w", "b", "t")}
    writer = StorageWriter(tmp_path / "a", chunk_bytes=4096)
    resp = dcp.async_save(state, storage_writer=writer)
    state["w"].add_(1)                 # training goes on: must not leak into the checkpoint
    state["t"].mul_(3)
    (resp.result(timeout=60) if hasattr(resp, "result") else resp.upload_completion.result(timeout=60))
    target = _model_state(7)
    dcp.load(target, storage_reader=StorageReader(tmp_path / "a"))
    for k in expect:
        assert bits_equal(target[k], expect[k]), k
    # the same writer reuses its pool for the next save
    fut = dcp.async_save(state, storage_writer=writer, checkpoint_id=str(tmp_path / "b"))
    (fut.result(timeout=60) if hasattr(fut, "result") else fut.upload_completion.result(timeout=60))
    pools = writer.stats()["pools"]
    assert len(pools) == 1 and pools[0]["allocations"] == 1 and pools[0]["pooled_saves"] == 1
    dcp.load(target, storage_reader=StorageReader(tmp_path / "b"))
    assert bits_equal(target["w"], state["w"]) and bits_equal(target["t"], state["t"])
    writer.close()


class _SlowWriter(StorageWriter):
    """Writes start only after a delay, so the next async_save stages while this one is pending."""

    def write_data(self, plan, planner):
        import time

        time.sleep(0.4)
        return super().write_data(plan, planner)


def test_overlapping_async_saves_each_load_their_own_bytes(tmp_path):
    writer = _SlowWriter(tmp_path / "x", chunk_bytes=4096, writer_threads=2)
    state = _model_state(10)
    expect, futures = [], []
    for i in range(4):
        futures.append(dcp.async_save(state, storage_writer=writer, checkpoint_id=str(tmp_path / f"s{i}")))
        expect.append({k: state[k].clone() for k in ("w", "b", "t")})
        for k in ("w", "b", "t"):   # training goes on between the saves
            state[k].add_(1)
    for f in futures:
        (f.result(timeout=60) if hasattr(f, "result") else f.upload_completion.result(timeout=60))
    pools = writer.stats()["pools"]
    assert len(pools) >= 2, pools              # the overlapping saves took different pools
    assert all(p["leases"] == 0 for p in pools), pools
    for i in range(4):
        target = _model_state(99)
        dcp.load(target, storage_reader=StorageReader(tmp_path / f"s{i}"))
        for k in ("w", "b", "t"):
            assert bits_equal(target[k], expect[i][k]), (i, k)
    writer.close()


_PROCESS_EXECUTOR = """
import os, sys
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from ichiban_comm.checkpoint import StorageReader, StorageWriter
sys.path.insert(0, sys.argv[2])
from test_dcp_storage import _model_state
from _states import bits_equal
root = sys.argv[1]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=0, world_size=1)
writer = StorageWriter(os.path.join(root, "x"), chunk_bytes=4096, writer_threads=2)
state = _model_state(20)
expect = []
for i in range(3):
    f = dcp.async_save(state, storage_writer=writer, checkpoint_id=os.path.join(root, f"s{i}"),
                       async_checkpointer_type=AsyncCheckpointerType.PROCESS)
    expect.append({k: state[k].clone() for k in ("w", "b", "t")})
    for k in ("w", "b", "t"):
        state[k].add_(1)
    (f.result(timeout=120) if hasattr(f, "result") else f.upload_completion.result(timeout=120))
pools = writer.stats()["pools"]
for i in range(3):
    target = _model_state(99)
    dcp.load(target, storage_reader=StorageReader(os.path.join(root, f"s{i}")))
    for k in ("w", "b", "t"):
        assert bits_equal(target[k], expect[i][k]), (i, k)
writer.close()
print("POOLS", [(p["allocations"], p["fresh_saves"], p["pooled_saves"]) for p in pools])
os._exit(0)   # the checkpoint daemon process ends with this one
"""


@pytest.mark.slow
def test_process_executor_reuses_one_pool(tmp_path):
    import subprocess
    import sys

    from spawn import free_port

    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _PROCESS_EXECUTOR, str(tmp_path), here, str(free_port())],
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)])))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "POOLS [(1, 1, 2)]" in r.stdout, r.stdout
