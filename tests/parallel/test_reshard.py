"""A tp=2 x dp=2 run with ShardedOptimizer saved through AsyncCheckpointer loads at tp=1 x dp=4
and into one unsplit process with identical parameters and optimizer state. Also with a
vocabulary that tp does not divide (33: padded to 34 at tp=2, to 36 at tp=4), which is saved
unpadded and loads at tp=1 x dp=4, at tp=4 and in one process.

    python -m pytest -q tests/parallel/test_reshard.py
"""

import pytest
import torch

from spawn import run_workers

from _util import pack, unpack

BATCH, SEQ = 4, 8


VOCAB = [32]   # the vocabulary of this process's models (set by _body)


def _cfg():
    from ichiban_comm.models.gpt import GPTConfig

    return GPTConfig(vocab_size=VOCAB[0], seq_len=SEQ, n_layer=1, n_head=4, d_model=16)


def _batch(step):
    g = torch.Generator().manual_seed(50 + step)
    idx = torch.randint(0, VOCAB[0], (BATCH, SEQ), generator=g)
    idx[0, 0] = VOCAB[0] - 1   # the last id: next to the padding, if any
    return idx, torch.roll(idx, -1, dims=1)


def _train_step(model, opt, dims, step):
    idx, tgt = (t.chunk(dims.dp)[dims.dp_rank] for t in _batch(step))
    model(idx, tgt).backward()
    opt.step()
    opt.zero_grad()


def _full_state(model, opt, dims):
    """{name: full parameter}, {name: {key: full state}} gathered over dp and tp."""
    from ichiban_comm.parallel import gather_full, gather_state_dict

    params = {n: t.clone() for n, t in gather_state_dict(model, dims.tp_group).items()}
    sd = opt.state_dict()   # tp-local, whole over dp
    names = [n for n, _ in model.named_parameters()]
    by_param = dict(model.named_parameters())
    state = {}
    for i, st in sd["state"].items():
        p = by_param[names[i]]
        state[names[i]] = {k: (gather_full(v, getattr(p, "tp_shard", None), dims.tp_group).clone()
                               if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim()
                               else v) for k, v in st.items()}
    return params, state, sd["param_groups"]


def _body(rank, world, root, vocab=32):
    from ichiban_comm.checkpoint import AsyncCheckpointer
    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel import (ShardedOptimizer, gather_full, gather_state_dict,
                                       init_parallel, parallelize)
    from ichiban_comm.parallel import checkpoint as pc

    VOCAB[0] = vocab
    dims = init_parallel(tp=2, pp=1, dp=2)
    torch.manual_seed(0)
    model = GPT(_cfg())
    parallelize(model, dims, plan="auto")
    opt = ShardedOptimizer(torch.optim.AdamW, model.parameters(), dims, lr=1e-2, weight_decay=0.1)
    for step in range(2):
        _train_step(model, opt, dims, step)
    ckpt = AsyncCheckpointer(root)
    pc.save(ckpt, 2, model, opt, dims, extra={"step": 2}).wait()
    ckpt.close()
    params, state, groups = _full_state(model, opt, dims)
    _train_step(model, opt, dims, 2)             # where the run goes on from the checkpoint
    after, _, _ = _full_state(model, opt, dims)

    # The same four processes as tp=1 x dp=4: a different init and lr, then the load.
    dims1 = init_parallel(tp=1, pp=1, dp=4)
    torch.manual_seed(1)
    model1 = GPT(_cfg())
    parallelize(model1, dims1, plan="auto")
    opt1 = ShardedOptimizer(torch.optim.AdamW, model1.parameters(), dims1, lr=0.5)
    ckpt1 = AsyncCheckpointer(root)
    extra = pc.load(ckpt1, model1, opt1, dims1)
    ckpt1.close()
    params1, state1, groups1 = _full_state(model1, opt1, dims1)
    _train_step(model1, opt1, dims1, 2)
    after1, _, _ = _full_state(model1, opt1, dims1)
    if vocab % 2:   # odd: the tp=2 save was padded; at tp=4 (padded differently) too
        dims4 = init_parallel(tp=4, pp=1, dp=1)
        torch.manual_seed(5)
        model4 = GPT(_cfg())
        parallelize(model4, dims4, plan="auto")
        assert model4.lm_head.weight.tp_shard.padded == -(-vocab // 4)
        opt4 = torch.optim.AdamW(model4.parameters(), lr=0.5)
        with AsyncCheckpointer(root) as ckpt4:
            pc.load(ckpt4, model4, opt4, dims4)
        params4 = gather_state_dict(model4, dims4.tp_group)
        _assert_state_equal(params4, params, "tp4 params")
        head = model4.lm_head.weight
        spec = head.tp_shard
        assert torch.count_nonzero(head.detach()[spec.real:]) == 0   # padding stays zero
        st = opt4.state[head]["exp_avg"]
        torch.testing.assert_close(gather_full(st, spec, dims4.tp_group),
                                   state["lm_head.weight"]["exp_avg"], rtol=0, atol=0)
        return pack((params, state, groups, after, extra, params1, state1, groups1, after1))
    with pytest.raises(NotImplementedError, match="pp=2"):
        pc.sharded_state(model1, opt1, init_parallel(tp=1, pp=2, dp=2))
    _bf16_master_roundtrip(root + "_bf16", dims1)
    return pack((params, state, groups, after, extra, params1, state1, groups1, after1))


def _bf16_master_roundtrip(root, dims):
    """bf16 parameters with fp32 master rows: the master rows go through the checkpoint too."""
    from ichiban_comm.checkpoint import AsyncCheckpointer
    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel import ShardedOptimizer, parallelize
    from ichiban_comm.parallel import checkpoint as pc

    def build(seed):
        torch.manual_seed(seed)
        m = GPT(_cfg()).to(torch.bfloat16)
        parallelize(m, dims, plan="auto")
        return m, ShardedOptimizer(torch.optim.AdamW, m.parameters(), dims, lr=1e-4,
                                   master_dtype=torch.float32)
    model, opt = build(3)
    _train_step(model, opt, dims, 0)
    with AsyncCheckpointer(root) as ckpt:
        pc.save(ckpt, 1, model, opt, dims).wait()
        model2, opt2 = build(4)
        pc.load(ckpt, model2, opt2, dims)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert all("master_param" in st for st in sd["state"].values())
    _assert_state_equal({str(k): v for k, v in sd2["state"].items()},
                        {str(k): v for k, v in sd["state"].items()}, "bf16 master state")
    _assert_state_equal(dict(model2.named_parameters()), dict(model.named_parameters()),
                        "bf16 params")


def _assert_state_equal(a, b, what):
    assert set(a) == set(b), what
    for n in a:
        if isinstance(a[n], dict):
            _assert_state_equal(a[n], b[n], f"{what}/{n}")
        elif isinstance(a[n], torch.Tensor):
            torch.testing.assert_close(a[n].reshape(b[n].shape), b[n], rtol=0, atol=0,
                                       msg=lambda m, n=n: f"{what}/{n}: {m}")
        else:
            assert a[n] == b[n], f"{what}/{n}"


@pytest.mark.parametrize("vocab", [32, 33])
def test_reshard_tp2dp2_to_tp1dp4_and_one_process(tmp_path, vocab):
    from ichiban_comm.checkpoint import AsyncCheckpointer
    from ichiban_comm.models.gpt import GPT
    from ichiban_comm.parallel import checkpoint as pc

    VOCAB[0] = vocab
    root = str(tmp_path / "ckpt")
    out = [unpack(r) for r in run_workers(_body, 4, backend="gloo", timeout=150,
                                          args=(root, vocab))]
    params, state, groups, after, extra, params1, state1, groups1, after1 = out[0]
    for r in out[1:]:   # every rank gathered the same whole state
        _assert_state_equal(r[0], params, "params")
    assert extra == {"step": 2}
    # tp=1 x dp=4: bit-identical parameters and optimizer state, the saved hyper-parameters ...
    _assert_state_equal(params1, params, "tp1dp4 params")
    _assert_state_equal(state1, state, "tp1dp4 optimizer state")
    assert groups1 == groups and groups1[0]["lr"] == 1e-2
    # ... and the next step lands where the tp=2 x dp=2 run's did (float32 summation order of
    # tp=1 against tp=2 differs: a tolerance, not bit equality).
    for n in after:
        torch.testing.assert_close(after1[n], after[n], rtol=1e-5, atol=1e-6)

    # One unsplit process: a plain GPT and torch's AdamW.
    torch.manual_seed(2)
    model = GPT(_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=0.3)
    with AsyncCheckpointer(root) as ckpt:
        assert pc.load(ckpt, model, opt) == {"step": 2}
    _assert_state_equal(dict(model.named_parameters()), params, "one-process params")
    names = {id(p): n for n, p in model.named_parameters()}
    _assert_state_equal({names[id(p)]: st for p, st in opt.state.items()}, state,
                        "one-process optimizer state")
    assert opt.param_groups[0]["lr"] == 1e-2
