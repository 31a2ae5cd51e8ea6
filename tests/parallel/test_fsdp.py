"""FSDP2's fully_shard over dp composes with our tensor-parallel layers (2-D: tp=2 x dp=2) and
matches the one-process model.

    python -m pytest -q tests/parallel/test_fsdp.py
"""

import pytest
import torch

from spawn import run_workers

from _util import pack, unpack

STEPS, BATCH, SEQ = 3, 4, 8


def _cfg():
    from ichiban_comm.models.gpt import GPTConfig

    return GPTConfig(vocab_size=32, seq_len=SEQ, n_layer=2, n_head=2, d_model=16)


def _batch(step):
    g = torch.Generator().manual_seed(300 + step)
    idx = torch.randint(0, 32, (BATCH, SEQ), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def _reference():
    from ichiban_comm.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        loss = model(*_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def _body(rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel import gather_full, init_parallel, parallelize

    dims = init_parallel(tp=2, pp=1, dp=2)
    torch.manual_seed(0)
    model = GPT(_cfg())
    parallelize(model, dims, plan="auto")
    specs = {n: getattr(p, "tp_shard", None) for n, p in model.named_parameters()}
    dp_mesh = dims.device_mesh("cpu")["dp"]
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"
               or type(p.data).__name__ == "DTensor"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        idx, tgt = (t.chunk(dims.dp)[dims.dp_rank] for t in _batch(step))
        loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=dims.dp_group)
        losses.append(float(mean) / dims.dp)
    params = {}
    for n, p in model.named_parameters():
        local = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()   # whole over dp
        params[n] = gather_full(local.detach(), specs[n], dims.tp_group)        # whole over tp
    return pack((losses, params, len(sharded), len(specs)))


def test_fully_shard_with_tensor_parallel_layers_matches_one_process():
    results = [unpack(r) for r in run_workers(_body, 4, backend="ichiban", timeout=150)]
    ref_losses, ref_params = _reference()
    for losses, params, n_sharded, n_params in results:
        assert n_sharded == n_params   # every parameter is held by FSDP as a dp-sharded DTensor
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert set(params) == set(ref_params)
        for n, p in ref_params.items():
            torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=n: f"{n}: {m}")
