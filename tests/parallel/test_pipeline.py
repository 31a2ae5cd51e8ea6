"""pp=2 through torch.distributed.pipelining equals the unsplit GPT (loss and gradients).

    python -m pytest -q tests/parallel/test_pipeline.py
"""

import pytest
import torch

from spawn import run_workers

from _util import pack, unpack

BATCH, SEQ = 4, 16


def _cfg():
    from ichiban_comm.models.gpt import GPTConfig

    return GPTConfig(vocab_size=64, seq_len=SEQ, n_layer=3, n_head=2, d_model=32)


def _batch(step=0):
    g = torch.Generator().manual_seed(7 + step)
    idx = torch.randint(0, 64, (BATCH, SEQ), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def _reference(clip=None):
    from ichiban_comm.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(_cfg())
    idx, tgt = _batch()
    loss = model(idx, tgt)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if clip is None:
        return float(loss.detach()), grads
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    torch.optim.AdamW(model.parameters(), lr=0.01).step()
    return float(loss.detach()), norm, {n: p.detach().clone() for n, p in model.named_parameters()}


def _pp_body(rank, world, schedules):
    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel import init_parallel
    from ichiban_comm.parallel.pipeline import pipeline_gpt

    dims = init_parallel(tp=1, pp=2, dp=1)
    torch.manual_seed(0)
    model = GPT(_cfg())
    out = {}
    for sched, n_mb in schedules:
        pipe = pipeline_gpt(model, dims, n_microbatches=n_mb, schedule=sched)
        idx, tgt = _batch()
        loss = pipe.step(idx if dims.pp_rank == 0 else None, tgt if dims.pp_rank == 1 else None)
        grads = {n: p.grad.clone() for n, p in pipe.module.named_parameters()}
        model.zero_grad()
        out[sched] = (None if loss is None else float(loss), grads, sorted(pipe.module.blocks))
    with pytest.raises(ValueError, match="n_microbatches"):
        pipeline_gpt(model, dims, n_microbatches=1, schedule="1f1b")
    with pytest.raises(ValueError, match="schedule"):
        pipeline_gpt(model, dims, n_microbatches=2, schedule="zb")
    return pack(out)


def test_pp2_equals_pp1():
    schedules = [("gpipe", 2), ("1f1b", 4)]
    results = [unpack(r) for r in run_workers(_pp_body, 2, backend="ichiban", timeout=120,
                                              args=(schedules,))]
    ref_loss, ref_grads = _reference()
    for sched, _ in schedules:
        first, last = results[0][sched], results[1][sched]
        assert first[0] is None
        assert last[0] == pytest.approx(ref_loss, rel=1e-5)
        assert first[2] == ["0", "1"] and last[2] == ["2"]   # 3 layers: 2 + 1
        names = set(first[1]) | set(last[1])
        assert names == set(ref_grads) and not set(first[1]) & set(last[1])
        for n, g in {**first[1], **last[1]}.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=f"{sched} {n}")


def _pp_dp_body(rank, world, clip):
    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel import init_parallel
    from ichiban_comm.parallel.optim import ShardedOptimizer
    from ichiban_comm.parallel.pipeline import pipeline_gpt

    dims = init_parallel(tp=1, pp=2, dp=2)
    torch.manual_seed(0)
    model = GPT(_cfg())
    pipe = pipeline_gpt(model, dims, n_microbatches=2, schedule="1f1b")
    opt = ShardedOptimizer(torch.optim.AdamW, pipe.module.parameters(), dims, lr=0.01)
    pipe.optimizer = opt
    idx, tgt = (t.chunk(dims.dp)[dims.dp_rank] for t in _batch())
    loss = pipe.step(idx if dims.pp_rank == 0 else None, tgt if dims.pp_rank == 1 else None)
    norm = float(opt.clip_grad_norm_(clip))
    opt.step()
    return pack((dims.pp_rank, None if loss is None else float(loss), norm,
                 dict(pipe.module.named_parameters())))


def test_pp2_dp2_sharded_optimizer_step_gloo():
    """pp=2 x dp=2 over Gloo: one clipped ShardedOptimizer step equals one-process AdamW."""
    clip = 0.05
    results = [unpack(r) for r in run_workers(_pp_dp_body, 4, backend="gloo", timeout=120,
                                              args=(clip,))]
    ref_loss, ref_norm, ref_params = _reference(clip)
    assert ref_norm > clip
    losses = [r[1] for r in results if r[0] == 1]
    assert sum(losses) / len(losses) == pytest.approx(ref_loss, rel=1e-5)
    seen = set()
    for pp_rank, _, norm, params in results:
        assert norm == pytest.approx(ref_norm, rel=1e-5)   # over both stages and both dp shards
        for n, p in params.items():
            # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, float32 summation
            # order (dp reduce-scatter against one process) moves it by a small fraction of lr.
            torch.testing.assert_close(p, ref_params[n], rtol=1e-5, atol=1e-3 * 0.01,
                                       msg=lambda m, n=n: f"{n}: {m}")
            seen.add(n)
    assert seen == set(ref_params)


def _pp_tp_body(rank, world):
    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel import gather_full, init_parallel, parallelize
    from ichiban_comm.parallel.pipeline import pipeline_gpt

    dims = init_parallel(tp=2, pp=2, dp=1)
    torch.manual_seed(0)
    model = GPT(_cfg())
    parallelize(model, dims, plan="auto")
    pipe = pipeline_gpt(model, dims, n_microbatches=2, schedule="1f1b")
    idx, tgt = _batch()
    loss = pipe.step(idx if dims.pp_rank == 0 else None, tgt if dims.pp_rank == 1 else None)
    grads = {n: gather_full(p.grad, getattr(p, "tp_shard", None), dims.tp_group)
             for n, p in pipe.module.named_parameters()}
    return pack((None if loss is None else float(loss), grads))


@pytest.mark.slow
def test_pp2_tp2_equals_one_process():
    """Stages made of tensor-parallel layers (the last one's loss vocabulary-parallel)."""
    results = [unpack(r) for r in run_workers(_pp_tp_body, 4, backend="ichiban", timeout=150)]
    ref_loss, ref_grads = _reference()
    losses = [r[0] for r in results if r[0] is not None]
    assert len(losses) == 2 and losses == pytest.approx([ref_loss] * 2, rel=1e-5)
    seen = set()
    for _, grads in results:
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=n: f"{n}: {m}")
            seen.add(n)
    assert seen == set(ref_grads)


def test_split_layers():
    from ichiban_comm.parallel.pipeline import split_layers

    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="n_layer=1 layers into pp=2"):
        split_layers(1, 2)
