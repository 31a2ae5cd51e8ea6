"""A vocabulary that tp does not divide (GPT-2's 50257, odd tokenizer sizes): the vocabulary-
parallel embedding and head are padded to a multiple of tp, and the model still gives the
unsplit model's logits (unpadded), loss and gradients; a full unpadded state dict loads into
it. The project's GPT, transformers' GPT-2 (head tied to the embedding) and Llama.

    .venv/bin/python -m pytest tests/parallel/test_vocab_padding.py -q

Checkpoints of a padded model at another tp: tests/parallel/test_reshard.py.
"""

import pytest
import torch

from spawn import run_workers

from test_parallelize import ENV, _check_family


def _padding_is_inert(family, model, vocab, tp, rank):
    """The zero rows exist (the split really padded), stay zero and get zero gradients."""
    head = model.lm_head
    spec = head.weight.tp_shard
    assert spec.padded == -(-vocab // tp) and head.weight.shape[0] == spec.padded, family
    real = spec.real
    assert real == min(spec.padded, vocab - rank * spec.padded)
    pad = head.weight.detach()[real:]
    assert torch.count_nonzero(pad) == 0, f"{family}: padded rows are not zero"
    if head.weight.grad is not None and real < spec.padded:
        assert torch.count_nonzero(head.weight.grad[real:]) == 0, family


def _body(rank, world, cases):
    from ichiban_comm.parallel import init_parallel, parallelize
    import tiny_models as tm

    dims = init_parallel(tp=world)
    out = {}
    for family, vocab in cases:
        out[family] = _check_family(family, dims, vocab=vocab)
        model = tm.build(family, vocab=vocab)
        parallelize(model, dims, plan="auto")
        ids, labels = tm.batch(vocab=vocab)
        loss = model(ids, labels) if family == "gpt" else model(input_ids=ids, labels=labels).loss
        loss.backward()
        _padding_is_inert(family, model, vocab, world, rank)
    # Megatron's option: pad further, to a multiple of 8 * tp; the same numbers.
    _check_family("gpt", dims, vocab=cases[0][1], make_vocab_size_divisible_by=8)
    return out


def test_tp2_odd_vocab_matches_one_process():
    res = run_workers(_body, 2, backend="ichiban", timeout=240, env=ENV,
                      args=((("gpt", 257), ("gpt2", 257), ("llama", 1001)),))
    assert "padded to 129 rows per rank" in res[0]["gpt"][False]
    assert "tied to the embedding" in res[0]["gpt2"][False]


@pytest.mark.slow
def test_tp4_vocab_not_divisible_by_4_gloo():
    # 1001 = 4 * 250 + 1: chunks of 251, the last rank holds 248 real rows and 3 zero rows
    run_workers(_body, 4, backend="gloo", timeout=300, env=ENV,
                args=((("gpt", 1001), ("gpt2", 1001)),))


def test_vocab_too_small_for_tp_is_a_clear_error():
    from ichiban_comm.parallel.layers import vocab_spec

    with pytest.raises(ValueError, match=r"vocabulary size 5 is too small for tp=4"):
        vocab_spec(5, 8, 4, 0)
    with pytest.raises(ValueError, match=r"make_vocab_size_divisible_by must be a positive int"):
        vocab_spec(50, 8, 2, 0, make_vocab_size_divisible_by=0)
    spec = vocab_spec(50257, 8, 8, 7, make_vocab_size_divisible_by=128)
    assert spec.padded * 8 == 51200 and spec.real == 50257 - 7 * 6283 and spec.start == 7 * 6283
