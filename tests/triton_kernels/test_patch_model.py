"""patch_model on tiny randomly initialised transformers Llama, Qwen2, Mistral and GPT-2 models:
logits, loss and gradients are unchanged, and the fused kernels really ran.

Run: python -m pytest -q tests/triton_kernels/test_patch_model.py
"""

import copy

import pytest
import torch

from ichiban_comm.triton_kernels import (FusedBiasGeLUMLP, FusedGatedMLP, LayerNorm, RMSNorm,
                                         launch_counts, patch_model, reset_launch_counts,
                                         unpatch_rotary)

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=40,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=1, max_position_embeddings=64)
    return transformers.MistralForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _run(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("build,expect", [
    (_llama, {"norms": 5, "mlp": 2, "rotary": True, "kernels": ("rms_norm_fwd", "swiglu_fwd",
                                                                  "rope_fwd", "rope_bwd")}),
    (_qwen2, {"norms": 3, "mlp": 1, "rotary": True, "kernels": ("rms_norm_bwd", "swiglu_bwd",
                                                                  "rope_fwd")}),
    (_mistral, {"norms": 3, "mlp": 1, "rotary": True, "kernels": ("rms_norm_fwd", "swiglu_fwd",
                                                                    "rope_bwd")}),
    (_gpt2, {"norms": 5, "mlp": 2, "rotary": False, "kernels": ("layer_norm_fwd",
                                                                  "bias_gelu_bwd")}),
])
def test_patch_model_keeps_logits_loss_and_grads(build, expect):
    torch.manual_seed(0)
    model = build().float().eval()
    patched = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 7), generator=gen)
    labels = ids.clone()
    labels[0, 2] = -100
    try:
        report = patch_model(patched)
        assert report["norms"] == expect["norms"] and report["mlp"] == expect["mlp"]
        assert bool(report["rotary"]) == expect["rotary"] and report["loss"] is True
        assert patched.state_dict().keys() == model.state_dict().keys()
        kinds = {type(m) for m in patched.modules()}
        assert (RMSNorm in kinds or LayerNorm in kinds)
        assert (FusedGatedMLP in kinds or FusedBiasGeLUMLP in kinds)
        reset_launch_counts()
        got = _run(patched, ids, labels)
        ran = launch_counts()
    finally:
        unpatch_rotary()
    want = _run(model, ids, labels)
    missing = [k for k in expect["kernels"] + ("cross_entropy_fwd", "cross_entropy_bwd")
               if not ran.get(k)]
    assert not missing, f"fused kernels {missing} did not run: {ran}"
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


def test_unpatch_rotary_restores_the_original():
    mod = pytest.importorskip("transformers.models.llama.modeling_llama")
    original = mod.apply_rotary_pos_emb
    patch_model(_llama(), norms=False, mlp=False, loss=False)
    assert mod.apply_rotary_pos_emb is not original
    unpatch_rotary()
    assert mod.apply_rotary_pos_emb is original


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_patch_model_fused_linear_loss_never_builds_logits(build):
    torch.manual_seed(0)
    model = build().float().eval()
    patched = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 96, (2, 7), generator=gen)
    labels = ids.clone()
    labels[1, 3] = -100
    try:
        report = patch_model(patched, fused_linear_loss=True)
        assert report["fused_linear_loss"] is True
        out = patched(input_ids=ids, labels=labels)
        assert out.logits is None
        out.loss.backward()
        got = {n: p.grad.clone() for n, p in patched.named_parameters() if p.grad is not None}
        no_labels = patched(input_ids=ids)  # the original forward: logits, no loss
        assert no_labels.logits.shape == (2, 7, 96) and no_labels.loss is None
    finally:
        unpatch_rotary()
    _, want_loss, want = _run(model, ids, labels)
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_patch_model_fused_linear_loss_needs_a_causal_lm():
    with pytest.raises(ValueError, match="needs a transformers causal LM"):
        patch_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), fused_linear_loss=True)
