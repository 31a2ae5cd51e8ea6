"""The loader on a GPU: pinned buffers, non-blocking copies on a side stream,
batches equal to the CPU loader's. Run on a GPU machine:
ICHIBAN_TEST_GPU=1 python -m pytest -q tests/data/test_loader_cuda.py
"""

import pytest
import torch

from _shards import random_docs, write_ours
from ichiban_comm.data import TokenDataset, TokenLoader


@pytest.mark.gpu
def test_device_batches_equal_host_batches_and_buffers_are_pinned(tmp_path):
    write_ours(tmp_path / "s", random_docs(80, 1000, seed=5, eod=999), 1000, eod=999)
    ds = TokenDataset(tmp_path, seq_len=32, seed=1)
    host = TokenLoader(ds, batch_size=4, pin_memory=True)
    x, _ = next(host)
    assert x.is_pinned()
    host = TokenLoader(ds, batch_size=4, pin_memory=False, documents=True)
    dev = TokenLoader(ds, batch_size=4, device="cuda", documents=True)
    kept = []
    for _ in range(20):
        want, got = next(host), next(dev)
        assert all(g.is_cuda for g in got)
        kept.append(got)
        torch.cuda.current_stream().synchronize()
        for w, g in zip(want, got):
            assert torch.equal(w, g.cpu())
    state = dev.state_dict()
    assert state["samples_consumed"] == 20 * 4  # the batch staged ahead is not counted
    again = TokenLoader(ds, batch_size=4, device="cuda", documents=True)
    again.load_state_dict(state)
    assert torch.equal(next(again)[0].cpu(), next(host)[0])
