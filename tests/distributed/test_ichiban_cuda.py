"""CUDA tensors on an "ichiban" group go to the NCCL group the backend wraps; CPU tensors on
the same group keep the shared-memory path. Needs a CUDA GPU (run with ICHIBAN_TEST_GPU=1).

One GPU cannot hold two NCCL ranks (NCCL refuses two ranks on one device), so these run at
world size 1 unless the machine has more GPUs; the ops still go through NCCL's kernels.

    ICHIBAN_TEST_GPU=1 python -m pytest -q tests/distributed/test_ichiban_cuda.py
"""

import pytest
import torch

from spawn import run_workers

pytestmark = pytest.mark.gpu


def _world() -> int:
    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _ops_body(rank, world_size):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    g = torch.Generator(device=dev).manual_seed(100 + rank)
    x = torch.randn(4099, device=dev, generator=g)
    xs = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(xs, x)  # every rank's input, to build the references
    total = torch.stack(xs).sum(0)

    y = x.clone()
    dist.all_reduce(y)
    torch.testing.assert_close(y, total, rtol=1e-5, atol=1e-5)

    out = torch.empty(world_size * x.numel(), device=dev)
    dist.all_gather_into_tensor(out, x)
    torch.testing.assert_close(out, torch.cat(xs))

    n = 64 * world_size
    big = torch.randn(n, device=dev, generator=g)
    bigs = [torch.empty_like(big) for _ in range(world_size)]
    dist.all_gather(bigs, big)
    shard = torch.empty(64, device=dev)
    dist.reduce_scatter_tensor(shard, big)
    torch.testing.assert_close(shard, torch.stack(bigs).sum(0)[rank * 64:(rank + 1) * 64],
                               rtol=1e-5, atol=1e-5)

    b = x.clone() if rank == 0 else torch.empty_like(x)
    dist.broadcast(b, src=0)
    torch.testing.assert_close(b, xs[0])

    a2a = torch.empty_like(big)
    dist.all_to_all_single(a2a, big)
    torch.testing.assert_close(a2a, torch.cat([t[rank * 64:(rank + 1) * 64] for t in bigs]))

    # The same group still serves CPU tensors through shared memory.
    c = torch.arange(10, dtype=torch.float64) + rank
    dist.all_reduce(c)
    assert torch.equal(c, sum(torch.arange(10, dtype=torch.float64) + r for r in range(world_size)))

    # The CUDA all_reduce really runs NCCL's kernel on the device (not a copy through the host).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        dist.all_reduce(y)
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if "nccl" in e.name.lower()})


def test_cuda_collectives_go_to_nccl():
    world = _world()
    res = run_workers(_ops_body, world_size=world, backend="ichiban", timeout=120,
                      env={"ICHIBAN_DEBUG": "1"})
    assert all(names for names in res), f"no NCCL kernel in the profile of a CUDA all_reduce: {res}"


def _ddp_body(rank, world_size):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    ref = [p.detach().clone() for p in model.parameters()]
    ddp = DDP(model.cuda(), device_ids=[rank])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g))
               for _ in range(3)]
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x[rank::world_size].cuda()),
                                            y[rank::world_size].cuda())
        loss.backward()
        opt.step()
    # The same steps on one process over the whole batch: gradients averaged over ranks give
    # the mean over the full batch when every rank holds the same number of rows.
    torch.manual_seed(0)
    local = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    for p, r in zip(local.parameters(), ref):
        p.data.copy_(r)
    local = local.cuda()
    lopt = torch.optim.SGD(local.parameters(), lr=0.1)
    for x, y in batches:
        lopt.zero_grad()
        torch.nn.functional.mse_loss(local(x.cuda()), y.cuda()).backward()
        lopt.step()
    for p, q in zip(ddp.module.parameters(), local.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    return True


def test_ddp_on_cuda_matches_single_process():
    world = _world()
    assert all(run_workers(_ddp_body, world_size=world, backend="ichiban", timeout=120))
