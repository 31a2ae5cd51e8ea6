"""torch features on the "ichiban" backend (CPU): DDP (against Gloo), DDP comm
hooks, new_group, DeviceMesh + DTensor tensor parallelism, FSDP2 fully_shard,
functional collectives, and registration through the entry point.

    python -m pytest -q tests/distributed/test_ichiban_torch_integration.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from spawn import run_workers

# torch 2.14 looks up an unknown backend name in the "torch.distributed.backends"
# entry points (Backend._ensure_backend_registered); torch 2.13 has no such lookup,
# so there "import ichiban_comm" must come before init_process_group("ichiban").
# From 2.14 on the test always runs, whatever torch's private helper is called.
_HAS_BACKEND_ENTRY_POINTS = (torch.__version__ >= "2.14"
                             or hasattr(dist.Backend, "_ensure_backend_registered"))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def _train(ddp, steps, rank):
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for s in range(steps):
        x, y = _batch(s, rank)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in ddp.parameters()]


def _ddp_body(rank, ws):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    gloo = dist.new_group(backend="gloo")
    ours = _train(DDP(_mlp()), 5, rank)
    ref = _train(DDP(_mlp(), process_group=gloo), 5, rank)
    hooked = DDP(_mlp())
    hooked.register_comm_hook(None, default_hooks.allreduce_hook)
    with_hook = _train(hooked, 5, rank)
    fp16 = DDP(_mlp())
    fp16.register_comm_hook(None, default_hooks.fp16_compress_hook)
    with_fp16 = _train(fp16, 5, rank)
    close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ours, ref))
    close_hook = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(with_hook, ref))
    close_fp16 = all(torch.allclose(a, b, rtol=1e-2, atol=1e-3) for a, b in zip(with_fp16, ref))
    moved = not all(torch.equal(a, b) for a, b in zip(ours, [p for p in _mlp().parameters()]))
    return close, close_hook, close_fp16, moved


def test_ddp_matches_gloo_and_comm_hooks_work():
    res = run_workers(_ddp_body, 2, backend="ichiban", timeout=120)
    assert res == [(True, True, True, True)] * 2, res


def _subgroup_body(rank, ws):
    # Groups of even and odd ranks; every rank calls new_group for both.
    evens = dist.new_group([0, 2], backend="ichiban")
    odds = dist.new_group([1, 3], backend="ichiban")
    mine = evens if rank % 2 == 0 else odds
    t = torch.full((5,), float(rank))
    dist.all_reduce(t, group=mine)
    want = 2.0 if rank % 2 == 0 else 4.0
    sub = dist.new_subgroups(group_size=2, backend="ichiban")[0]
    u = torch.full((3,), float(rank + 1))
    dist.all_reduce(u, group=sub)
    want_u = float(sum(r + 1 for r in range(ws) if r // 2 == rank // 2))
    return bool((t == want).all()) and bool((u == want_u).all())


def test_new_group_and_subgroups():
    assert run_workers(_subgroup_body, 4, backend="ichiban", timeout=120) == [True] * 4


def _tp_body(rank, ws):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    mesh = init_device_mesh("cpu", (ws,))
    model = _mlp(1)
    ref = copy.deepcopy(model)
    tp = parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x, y = _batch(0, 0)  # same input on every rank (TP)
    out = tp(x)
    nn.functional.mse_loss(out, y).backward()
    ref_out = ref(x)
    nn.functional.mse_loss(ref_out, y).backward()
    ok_fwd = torch.allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    g = tp[0].weight.grad.full_tensor()
    ok_bwd = torch.allclose(g, ref[0].weight.grad, rtol=1e-5, atol=1e-6)
    return ok_fwd, ok_bwd


def test_dtensor_tensor_parallel_matches_single_process():
    assert run_workers(_tp_body, 2, backend="ichiban", timeout=120) == [(True, True)] * 2


def _fsdp_body(rank, ws):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    model = _mlp(2)
    ref = copy.deepcopy(model)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s in range(3):
        x, y = _batch(s, rank)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        # reference: the mean of every rank's loss, on one process
        ref_opt.zero_grad()
        loss = sum(nn.functional.mse_loss(ref(_batch(s, r)[0]), _batch(s, r)[1]) for r in range(ws)) / ws
        loss.backward()
        ref_opt.step()
    full = [p.full_tensor() for p in model.parameters()]
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(full, ref.parameters()))


def test_fsdp2_fully_shard_matches_single_process():
    assert run_workers(_fsdp_body, 2, backend="ichiban", timeout=180) == [True] * 2


def _functional_body(rank, ws):
    import torch.distributed._functional_collectives as fc

    group = dist.group.WORLD
    x = torch.arange(6, dtype=torch.float32) + 10 * rank
    s = fc.all_reduce(x, "sum", group)
    g = fc.all_gather_tensor(x, 0, group)
    r = fc.reduce_scatter_tensor(torch.arange(6 * ws, dtype=torch.float32) + rank, "sum", 0, group)
    s, g, r = (fc.wait_tensor(t) for t in (s, g, r))
    want_s = sum(torch.arange(6, dtype=torch.float32) + 10 * q for q in range(ws))
    want_g = torch.cat([torch.arange(6, dtype=torch.float32) + 10 * q for q in range(ws)])
    want_r = sum(torch.arange(6 * ws, dtype=torch.float32) + q for q in range(ws))[rank * 6:(rank + 1) * 6]
    return torch.equal(s, want_s) and torch.equal(g, want_g) and torch.equal(r, want_r)


@pytest.mark.slow
def test_functional_collectives():
    assert run_workers(_functional_body, 3, backend="ichiban", timeout=120) == [True] * 3


def _entry_point_body(rank, ws):
    # No import of ichiban_comm here: torch finds the backend through the
    # package's torch.distributed.backends entry point.
    import datetime
    import sys

    assert "ichiban_comm" not in sys.modules
    dist.init_process_group("ichiban", rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=30))
    t = torch.ones(3)
    dist.all_reduce(t)
    name = dist.get_backend()
    dist.destroy_process_group()
    return float(t[0]), name


@pytest.mark.skipif(not _HAS_BACKEND_ENTRY_POINTS,
                    reason=f"torch {torch.__version__} does not load torch.distributed.backends "
                    "entry points (torch 2.14 does)")
def test_init_process_group_without_import_uses_the_entry_point():
    res = run_workers(_entry_point_body, 2, backend=None, timeout=60, fresh=True)
    assert res == [(2.0, "ichiban")] * 2


def test_register_is_idempotent_and_entry_point_registers():
    import ichiban_comm.distributed as d
    from ichiban_comm.distributed.backend import _entry_point

    d.register()
    d.register()
    _entry_point()
    assert "ICHIBAN" in dist.Backend._plugins
    assert dist.Backend._plugins["ICHIBAN"].extended_api
    assert "cpu" in dist.Backend.backend_capability["ichiban"]
