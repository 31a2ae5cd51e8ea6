"""ShardedOptimizer (ZeRO-1 over dp) against torch's AdamW in one process; DDP over "ichiban".

    python -m pytest -q tests/parallel/test_optim.py
"""

import pytest
import torch

from ichiban_comm.parallel.layers import ShardSpec

from spawn import run_workers

from _util import pack, unpack

STEPS = 4
BATCH = 8   # global batch; every dp size used here divides it


class Tiny(torch.nn.Module):
    """Awkward shapes: rows that no dp size divides, a 1-row matrix, a vector shorter than dp,
    a 0-dim parameter, a frozen one, and one made of three fused blocks (as a tensor-parallel
    q|k|v is), each sharded over dp on its own."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 7)
        self.b = torch.nn.Linear(7, 3)
        self.row = torch.nn.Parameter(torch.randn(1, 3))
        self.short = torch.nn.Parameter(torch.randn(2))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        self.fused = torch.nn.Parameter(torch.randn(9, 2))
        self.fused.tp_shard = ShardSpec(0, 3, 1, 0, (9, 2))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        y = self.b(h) * self.scale + self.row + self.frozen
        f = (h[:, :2] @ self.fused.t()).sin().sum(-1)
        return (y.pow(2).sum(-1) + self.short.sum() * h[:, :2].sum(-1) + f).mean()


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g)


def _groups(model):
    return [{"params": [model.a.weight, model.b.weight, model.row, model.frozen, model.fused]},
            {"params": [model.a.bias, model.b.bias, model.short, model.scale], "weight_decay": 0.0}]


def _reference(steps, clip, accumulate):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(_groups(model), lr=0.05, weight_decay=0.1)
    norms = []
    for step in range(steps):
        x = _data(step)
        if accumulate:
            for half in x.chunk(2):
                (model(half) / 2).backward()
        else:
            model(x).backward()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
    return model, opt, norms


def _sharded_body(rank, world, steps, clip, accumulate, bucket_mb):
    import torch.distributed as dist
    from ichiban_comm.parallel.optim import ShardedOptimizer

    torch.manual_seed(0)
    model = Tiny()
    if rank:   # the constructor broadcasts dp rank 0's parameters
        with torch.no_grad():
            model.a.weight.add_(1.0)
    opt = ShardedOptimizer(torch.optim.AdamW, _groups(model), None, lr=0.05, weight_decay=0.1,
                           bucket_mb=bucket_mb)
    norms = []
    for step in range(steps):
        x = _data(step).chunk(world)[rank]
        if accumulate:
            first, second = x.chunk(2)
            with opt.no_sync():
                (model(first) / 2).backward()
            (model(second) / 2).backward()
        else:
            model(x).backward()
        if clip:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    numel = opt.local_state_numel()
    # The state reloaded into a fresh ShardedOptimizer steps on exactly like the original.
    opt2 = ShardedOptimizer(torch.optim.AdamW, _groups(model), None, lr=0.05, weight_decay=0.1)
    opt2.load_state_dict(sd)
    assert dist.get_world_size() == world
    return pack((model.state_dict(), sd, numel, norms, len(opt._buckets)))


@pytest.mark.parametrize("world,backend,clip,accumulate", [
    (2, "ichiban", 0.5, True),
    (4, "gloo", None, False),
])
def test_sharded_adamw_matches_torch_adamw(world, backend, clip, accumulate):
    results = [unpack(r) for r in run_workers(_sharded_body, world, backend=backend, timeout=90,
                                              args=(STEPS, clip, accumulate, 0.0002))]
    ref_model, ref_opt, ref_norms = _reference(STEPS, clip, accumulate)
    ref_params = ref_model.state_dict()
    ref_sd = ref_opt.state_dict()
    total_state = sum(v.numel() for st in ref_opt.state.values() for v in st.values())
    n_trained = len(ref_opt.state)
    for rank, (params, sd, numel, norms, nbuckets) in enumerate(results):
        assert nbuckets > 1  # the tiny bucket size splits the model
        for k, v in ref_params.items():
            torch.testing.assert_close(params[k], v, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {k}")
        assert sd["param_groups"] == ref_sd["param_groups"]
        assert sorted(sd["state"]) == sorted(ref_sd["state"])
        for i, st in ref_sd["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(sd["state"][i][k], v, rtol=1e-5, atol=1e-6,
                                           msg=f"rank {rank} state {i} {k}")
        if clip:
            assert norms == pytest.approx(ref_norms, rel=1e-5)
            assert max(ref_norms) > clip  # the clipping was exercised
        # Per-rank state is 1/dp of the whole, up to rounding rows up to a multiple of dp: each
        # rank holds its rows' exp_avg and exp_avg_sq, plus one step counter per parameter.
        bound = 2 * sum(-(-(p.shape[0] if p.dim() else 1) // world)
                        * (p[0].numel() if p.dim() else 1)
                        for p in ref_model.parameters() if p.requires_grad) + 2 * 2 * 3
        assert numel - n_trained <= bound
    assert sum(r[2] - n_trained for r in results) == total_state - n_trained  # nothing duplicated


def _master_body(rank, world, steps):
    from ichiban_comm.parallel.optim import ShardedOptimizer

    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    opt = ShardedOptimizer(torch.optim.AdamW, model.parameters(), None, lr=1e-4,
                           master_dtype=torch.float32, bucket_mb=0.0002)
    for step in range(steps):
        model(_data(step).to(torch.bfloat16).chunk(world)[rank]).backward()
        opt.step()
        opt.zero_grad()
    return pack((model.state_dict(), opt.state_dict()))


def _reference_master(steps, world):
    """bf16 model, fp32 master weights and AdamW state; the gradient of each dp rank's slice
    computed in bf16 and summed in bf16, as the reduce-scatter does."""
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(master, lr=1e-4)
    for step in range(steps):
        grads = None
        for part in _data(step).to(torch.bfloat16).chunk(world):
            model(part).backward()
            g = [p.grad for p in params]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            model.zero_grad()
        for m, g in zip(master, grads):
            m.grad = g.float() / world
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
    return model, master, opt


MASTER_STEPS = 3


def test_fp32_master_weights_for_bf16_parameters(ichiban2):
    results = [r[1] for r in ichiban2]
    model, master, opt = _reference_master(MASTER_STEPS, 2)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    trained = [p for p in model.parameters() if p.requires_grad]
    for params, sd in results:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(params[k], v, rtol=0, atol=0, msg=k)
        moved = 0.0
        for p, m in zip(trained, master):
            st = sd["state"][index[id(p)]]
            torch.testing.assert_close(st["master_param"], m.detach(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(st["exp_avg_sq"], opt.state[m]["exp_avg_sq"],
                                       rtol=1e-5, atol=1e-12)
            assert st["exp_avg"].dtype == torch.float32
            moved = max(moved, float((st["master_param"] - p.detach().float()).abs().max()))
        assert moved > 0   # the master rows keep what bf16 rounds away


def _errors_and_ddp_body(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ichiban_comm.parallel.optim import ShardedOptimizer

    torch.manual_seed(0)
    model = Tiny()
    with pytest.raises(TypeError, match="optimizer_class"):
        ShardedOptimizer(torch.nn.Linear, model.parameters(), None)
    with pytest.raises(TypeError, match="master_dtype"):
        ShardedOptimizer(torch.optim.AdamW, model.parameters(), None, master_dtype=torch.int32)
    with pytest.raises(ValueError, match="bucket_mb"):
        ShardedOptimizer(torch.optim.AdamW, model.parameters(), None, bucket_mb=0)
    with pytest.raises(ValueError, match="params is empty"):
        ShardedOptimizer(torch.optim.AdamW, [], None)
    opt = ShardedOptimizer(torch.optim.AdamW, model.parameters(), None, lr=0.1, bucket_mb=1e-4)
    model(_data(0)).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        model(_data(0)).backward()
    opt.zero_grad()   # finishes the reductions in flight: the next step starts clean
    model(_data(1)).backward()
    # Every bucket was handed to the backend from the hooks, while backward ran: none waits
    # for step().
    assert len(opt._buckets) > 1 and all(b.launched for b in opt._buckets)
    opt.step()
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    # torch's LR schedulers drive it like any optimizer (the groups are the wrapped optimizer's).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(_data(2)).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == opt.optim.param_groups[0]["lr"] == pytest.approx(0.05)

    # DDP over the same backend, unchanged by any of this.
    torch.manual_seed(0)
    ddp = DDP(torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)))
    ddp(_data(0).chunk(world)[rank]).pow(2).mean().backward()
    master = unpack(_master_body(rank, world, MASTER_STEPS))
    return pack(([p.grad for p in ddp.parameters()], master))


@pytest.fixture(scope="module")
def ichiban2():
    """One 2-rank "ichiban" job for the error, DDP and master-weight checks (one start-up)."""
    return [unpack(r) for r in run_workers(_errors_and_ddp_body, 2, backend="ichiban", timeout=120)]


def test_errors_and_ddp_over_ichiban(ichiban2):
    grads = [r[0] for r in ichiban2]
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    ref(_data(0)).pow(2).mean().backward()
    for rank_grads in grads:
        for g, p in zip(rank_grads, ref.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
