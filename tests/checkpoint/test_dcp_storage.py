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
    dcp.save(state, storage_writer=StorageWriter(root, chunk_bytes=4096))
    return sorted(f for f in os.listdir(root) if f.endswith(".bin"))


def test_dcp_two_ranks_then_one(tmp_path):
    files = run_workers(_dcp_body, 2, backend="gloo", timeout=120, args=(str(tmp_path),))
    assert any(f.startswith("r1_") for f in files[0])
    full = torch.randn(10, 6, generator=torch.Generator().manual_seed(9))
    target = {"w": torch.randn(10, 6), "r": torch.randn(3, 6)}
    dcp.load(target, storage_reader=StorageReader(tmp_path))
    assert torch.equal(target["w"], full) and torch.equal(target["r"], full[:3])
