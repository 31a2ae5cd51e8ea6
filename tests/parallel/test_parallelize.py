"""parallelize() at tp=2 and tp=4 against the unsplit model: logits, loss and gathered gradients
of the project's GPT and tiny transformers Llama (GQA), Mistral, Qwen2 and GPT-2; sequence
parallel on equals off; a full state dict loads into the split model; our layers give torch's
DTensor ``parallelize_module`` numbers; bad plans are clear errors.

    .venv/bin/python -m pytest tests/parallel/test_parallelize.py -q

The unsplit reference runs in every worker (one process's model, the same seed everywhere).
Workers run the kernels' plain-torch CPU path (TRITON_INTERPRET=0): the Triton kernels have
their own tests; here the subject is the split.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from spawn import run_workers

import tiny_models as tm
from ichiban_comm.parallel import PlanError, parallelize

# float32 through a different summation order (split matmuls, all-reduce): a few ulps of the
# values involved, far below any real mistake (a wrong slice or a missing sum is O(1e-2)).
TOL = dict(rtol=1e-4, atol=2e-5)
ENV = {"TRITON_INTERPRET": "0"}


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}


def _check_family(family, dims, vocab=tm.VOCAB, **options):
    from ichiban_comm.parallel import gather_state_dict

    g = dims.tp_group
    ids, labels = tm.batch(vocab=vocab)
    ref = tm.build(family, vocab=vocab)
    models = {sp: copy.deepcopy(ref) for sp in (False, True)}
    ref_logits, ref_loss = tm.logits_and_loss(family, ref, ids, labels)
    ref_loss.backward()
    ref_grads = _grads(ref)
    ref_params = {n: p.detach() for n, p in ref.named_parameters(remove_duplicate=False)}
    out = {}
    for sp, model in models.items():
        report = parallelize(model, dims, plan="auto", sequence_parallel=sp, **options)
        # the same parameters as the unsplit model: the split is tp-size invariant
        full = gather_state_dict(model, g)
        assert full.keys() == ref_params.keys(), (family, set(full) ^ set(ref_params))
        for n in full:
            torch.testing.assert_close(full[n], ref_params[n], rtol=0, atol=0, msg=n)
        logits, loss = tm.logits_and_loss(family, model, ids, labels)
        torch.testing.assert_close(logits, ref_logits, **TOL, msg=f"{family} sp={sp} logits")
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"{family} sp={sp} loss")
        loss.backward()
        grads = gather_state_dict(model, g, grads=True)
        for n, gr in ref_grads.items():
            torch.testing.assert_close(grads[n], gr, **TOL, msg=f"{family} sp={sp} grad {n}")
        out[sp] = (loss.item(), str(report))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)  # sequence parallel on == off
    # a full (unsplit) state dict of other weights loads into the split model, sliced
    other = tm.build(family, seed=7, vocab=vocab).state_dict()
    model = models[False]
    model.load_state_dict(other)
    full = gather_state_dict(model, g)
    for n, t in other.items():
        if n in full:
            torch.testing.assert_close(full[n], t, rtol=0, atol=0, msg=f"loaded {n}")
    return {sp: r for sp, (_, r) in out.items()}


def _against_dtensor(dims):
    """Our split of a Llama (GQA) and torch's parallelize_module Colwise/Rowwise: same numbers."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    ids, labels = tm.batch()
    ref = tm.build("llama")
    ours, theirs = ref, copy.deepcopy(ref)
    parallelize(ours, dims, plan="auto")
    mesh = dims.device_mesh("cpu")["tp"]
    parallelize_module(theirs, mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    lo = ours(input_ids=ids, labels=labels).loss
    lt = theirs(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(lo, lt, **TOL)
    lo.backward()
    lt.backward()
    from ichiban_comm.parallel import gather_state_dict

    mine = gather_state_dict(ours, dims.tp_group, grads=True)
    n_dtensor = 0
    for n, p in theirs.named_parameters():
        gt = p.grad
        if isinstance(gt, DTensor):
            gt, n_dtensor = gt.full_tensor(), n_dtensor + 1
        torch.testing.assert_close(mine[n], gt, **TOL, msg=f"grad {n} against DTensor")
    assert n_dtensor >= 15  # the comparison really ran against split DTensor parameters
    return lo.item()


def _count_all_reduces(dims):
    """All-reduces of one Llama forward + backward without SP: the embedding, o_proj and
    down_proj forward, the loss (max, sums, dh), and one per norm for the shared input
    gradient of q|k|v and gate|up (not one per column-parallel layer)."""
    import torch.distributed as dist

    model = tm.build("llama")
    parallelize(model, dims, plan="auto")
    ids, labels = tm.batch()
    calls, real = [], dist.all_reduce

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)
    dist.all_reduce = counting
    try:
        model(input_ids=ids, labels=labels).loss.backward()
    finally:
        dist.all_reduce = real
    layers = model.config.num_hidden_layers
    assert len(calls) == 1 + 2 * layers + 3 + 2 * layers, calls


def _tp_body(rank, world, families, dtensor):
    from ichiban_comm.parallel import init_parallel

    dims = init_parallel(tp=world)
    _count_all_reduces(dims)
    out = {f: _check_family(f, dims) for f in families}
    if dtensor:
        out["dtensor_loss"] = _against_dtensor(dims)
    return out


def test_tp2_matches_one_process_and_dtensor():
    res = run_workers(_tp_body, 2, backend="ichiban", timeout=240, env=ENV,
                      args=(tm.FAMILIES, True))
    for fam in tm.FAMILIES:
        report = res[0][fam][True]
        assert "tp=2" in report and "colwise" in report and "vocab" in report
        assert "sequence parallel on" in report
    assert "tied to the embedding" in res[0]["gpt2"][False]


@pytest.mark.slow
def test_tp4_matches_one_process_gloo():
    run_workers(_tp_body, 4, backend="gloo", timeout=300, env=ENV, args=(tm.FAMILIES, False))


# ---- errors (no processes: the checks run before anything is split) ----------------------------

def _dims(tp):
    return SimpleNamespace(tp=tp, tp_group=None)


def test_heads_not_divisible_names_both_numbers():
    with pytest.raises(PlanError, match=r"num_key_value_heads=4 is not divisible by tp=8"):
        parallelize(tm.build("llama"), _dims(8))
    with pytest.raises(PlanError, match=r"n_head=8 is not divisible by tp=3"):
        parallelize(tm.build("gpt2"), _dims(3))


def test_unknown_model_under_auto_lists_known_ones():
    with pytest.raises(PlanError, match=r"does not know .*Sequential.*LlamaForCausalLM"):
        parallelize(torch.nn.Sequential(torch.nn.Linear(4, 4)), _dims(2))


def test_plan_glob_matching_nothing():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    with pytest.raises(PlanError, match=r"plan glob 'layers\.\*\.q' matches no module"):
        parallelize(m, _dims(2), plan={"0": "colwise", "layers.*.q": "rowwise"})
    with pytest.raises(PlanError, match=r"style must be one of"):
        parallelize(m, _dims(2), plan={"0": "columnwise"})
