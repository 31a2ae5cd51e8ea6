"""CUDA tensors: snapshot on a side stream into the pinned pool; load into device tensors.

    ICHIBAN_TEST_GPU=1 python -m pytest -q tests/checkpoint/test_cuda.py
"""

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer

from _states import bits_equal

pytestmark = pytest.mark.gpu


def test_cuda_snapshot_is_consistent_and_pinned(tmp_path):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(1024, 1024, device=dev, generator=g)
    state = {"a": a, "view": a.t()[::3], "bf16": torch.randn(333, 77, device=dev, generator=g).to(torch.bfloat16),
             "cpu": torch.randn(100), "step": 1}
    expect = {k: v.detach().cpu().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    expect["a"] *= 2                 # exact in float32
    expect["view"] = expect["a"].t()[::3].clone()
    with AsyncCheckpointer(tmp_path) as ck:
        ck.reserve(state)            # grown, prefaulted and pinned before the first save
        # Work still queued on the current stream when save() is called must be in the snapshot.
        torch.cuda._sleep(50_000_000)
        state["a"].mul_(2)
        h = ck.save(1, state)
        assert ck._pool.pinned
        state["a"].add_(1)           # after save() returns the tensors may change
        state["bf16"].zero_()
        h.wait()
        out = ck.load()
        for k, v in expect.items():
            assert bits_equal(out[k], v), k
        target = {k: (torch.empty_like(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        target.pop("view")
        target = dict(target, view=torch.empty(expect["view"].shape, device=dev))
        ck.load(into=target)
        for k, v in expect.items():
            assert bits_equal(target[k].cpu(), v), k
