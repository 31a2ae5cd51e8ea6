"""patch_model on tiny randomly initialised transformers models, one per supported family
(built from_config, nothing downloaded): logits, loss and every parameter gradient of the patched
float32 model stay within the kernel test bound of the unpatched model run in float64, and the
fused kernels really ran. Unsupported families are left untouched with one warning.

Run: python -m pytest -q tests/triton_kernels/test_patch_model.py
"""

import copy
import sys
import warnings

import pytest
import torch

from ichiban_comm.triton_kernels import (FusedBiasGeLUMLP, FusedGatedMLP, FusedGateUpMLP,
                                         LayerNorm, RMSNorm, launch_counts, patch_model,
                                         reset_launch_counts, unpatch_rotary)
from ichiban_comm.triton_kernels.patch import SUPPORTED
from kernels_testlib import assert_bound

transformers = pytest.importorskip("transformers")

V = 96
# one decoder layer per family (the interpreter's time grows with the launches), two for Llama
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, extra config); head_dim 8 = hidden 32 / 4 heads
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=2,
                                                          num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8,
                                                                  final_logit_softcapping=3.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0,
                                                            residual_multiplier=0.5,
                                                            embedding_multiplier=2.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}
# what each family must report: norms, mlp, rotary, residual-fused layers, kernels that ran
EXPECT = {
    "llama": (5, 2, True, 2, ("rms_norm_fwd", "swiglu_fwd", "rope_fwd", "rope_bwd")),
    "mistral": (3, 1, True, 1, ("rms_norm_bwd", "swiglu_bwd", "rope_fwd")),
    "mixtral": (3, 0, True, 1, ("rms_norm_fwd", "rope_fwd")),
    "qwen2": (3, 1, True, 1, ("rms_norm_fwd", "swiglu_fwd", "rope_bwd")),
    "qwen3": (5, 1, True, 1, ("rms_norm_fwd", "swiglu_fwd", "rope_fwd")),  # + q/k norms
    "gemma": (3, 1, True, 1, ("rms_norm_fwd", "geglu_fwd", "rope_fwd", "geglu_bwd")),
    "gemma2": (5, 1, True, 1, ("rms_norm_fwd", "geglu_fwd", "rope_fwd")),
    "gemma3_text": (7, 1, True, 1, ("rms_norm_bwd", "geglu_fwd", "rope_fwd")),
    "phi3": (3, 1, True, 1, ("rms_norm_fwd", "swiglu_fwd", "swiglu_bwd", "rope_fwd")),
    "olmo2": (5, 1, True, 0, ("rms_norm_fwd", "swiglu_fwd", "rope_fwd")),
    "granite": (3, 1, True, 1, ("rms_norm_fwd", "swiglu_fwd", "rope_fwd")),
    "gpt2": (3, 1, False, 0, ("layer_norm_fwd", "bias_gelu_bwd")),
}


def build(family):
    cfg_name, model_name, extra = FAMILIES[family]
    if extra is None:  # GPT-2 names its sizes differently
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4,
                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    else:
        cfg = getattr(transformers, cfg_name)(**{**_COMMON, **extra})
    cfg._attn_implementation = "eager"
    if family == "mixtral":  # the grouped-GEMM experts take no float64 (the reference)
        cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():  # zero-initialised norms (Gemma's 1 + w) would hide a wrong offset
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 7), generator=gen)
    labels = ids.clone()
    labels[0, 2] = -100
    return ids, labels


def _run(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logits = out.logits.detach() if out.logits is not None else None
    return logits, out.loss.detach(), grads


def _assert_same(got, lowp, ref, what=""):
    if got[0] is not None:
        assert_bound(f"{what}logits", got[0], lowp[0], ref[0], torch.float32)
    assert got[1].dtype == torch.float32
    assert_bound(f"{what}loss", got[1], lowp[1], ref[1], torch.float32)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_bound(f"{what}grad of {name}", got[2][name], lowp[2][name], ref[2][name],
                     torch.float32)


def test_every_supported_family_is_tested():
    assert set(FAMILIES) == set(SUPPORTED)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patch_model_keeps_logits_loss_and_grads(family):
    model = build(family)
    assert model.config.model_type == family
    reference = copy.deepcopy(model).double()
    patched = copy.deepcopy(model)
    ids, labels = _batch()
    norms, mlps, rotary, residual, kernels = EXPECT[family]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = patch_model(patched)
        assert (report["norms"], report["mlp"], bool(report["rotary"]), report["residual"]) == \
            (norms, mlps, rotary, residual), report
        assert report["loss"] is True and report["model_type"] == family
        # only the mixture-of-experts MLP may be kept in a supported family
        assert all("mixture-of-experts" in k for k in report["kept"]), report["kept"]
        assert len(caught) == (1 if report["kept"] else 0), [str(w.message) for w in caught]
        assert patched.state_dict().keys() == model.state_dict().keys()
        kinds = {type(m) for m in patched.modules()}
        assert RMSNorm in kinds or LayerNorm in kinds
        if mlps:
            assert kinds & {FusedGatedMLP, FusedGateUpMLP, FusedBiasGeLUMLP}
        reset_launch_counts()
        got = _run(patched, ids, labels)
        ran = launch_counts()
    finally:
        unpatch_rotary()
    lowp = _run(model, ids, labels)
    ref = _run(reference, ids, labels)
    missing = [k for k in kernels + ("cross_entropy_fwd", "cross_entropy_bwd") if not ran.get(k)]
    assert not missing, f"fused kernels {missing} did not run: {ran}"
    _assert_same(got, lowp, ref)


def test_gemma_norm_uses_one_plus_weight():
    """The (1 + w) offset is applied (a plain RMSNorm swap would be wrong by a factor)."""
    model = build("gemma")
    patch_model(model, mlp=False, rotary=False, loss=False, residual=False)
    norm = model.model.norm
    assert isinstance(norm, RMSNorm) and norm.offset == 1.0
    x = torch.randn(3, 32)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)


def test_residual_fused_layer_uses_the_residual_kernel(monkeypatch):
    """The patched decoder layer hands the attention output to the norm as residual=."""
    from ichiban_comm.triton_kernels import modules

    model = build("llama")
    patch_model(model, rotary=False)
    calls = []
    real = modules.rms_norm
    monkeypatch.setattr(modules, "rms_norm",
                        lambda x, w, eps, residual=None, offset=0.0:
                        calls.append(residual is not None) or real(x, w, eps, residual, offset))
    ids, labels = _batch()
    model(input_ids=ids, labels=labels)
    assert calls.count(True) == 2  # one fused add + norm per layer


@pytest.mark.parametrize("family", ["qwen3_next", "cohere", "gptj"])
def test_unsupported_family_is_untouched_with_one_warning(family):
    cfgs = {"qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
            "cohere": ("CohereConfig", "CohereForCausalLM"),
            "gptj": ("GPTJConfig", "GPTJForCausalLM")}
    cfg_name, model_name = cfgs[family]
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"this transformers has no {cfg_name}")
    kw = dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4, rotary_dim=4) if family == "gptj" \
        else dict(_COMMON, num_hidden_layers=1)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw))
    before = {n: type(m) for n, m in model.named_modules()}
    forward = model.forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = patch_model(model)
    assert len(caught) == 1 and f"'{family}'" in str(caught[0].message)
    assert "nothing was patched" in str(caught[0].message)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert model.forward == forward and "loss_function" not in vars(model)
    assert report["norms"] == report["mlp"] == 0 and not report["rotary"] and not report["loss"]
    with pytest.raises(ValueError, match="supported"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch_model(model, fused_linear_loss=True)


def test_rotary_with_another_convention_is_not_replaced(monkeypatch):
    """A rotary helper that is not rotate-half (here: interleaved pairs, as Cohere's) fails the
    probe and is kept, with the reason in the report and the warning."""
    mod = sys.modules[transformers.LlamaForCausalLM.__module__]

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        def rot(x):
            x1, x2 = x[..., ::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)
        c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * c + rot(q) * s, k * c + rot(k) * s

    monkeypatch.setattr(mod, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    with pytest.warns(UserWarning, match="differs from rotate-half"):
        report = patch_model(build("llama"))
    assert report["rotary"] == [] and mod.apply_rotary_pos_emb is apply_rotary_pos_emb


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "granite"])
def test_patch_model_fused_linear_loss_never_builds_logits(family):
    """fused_linear_loss=True: same loss and gradients, with Gemma-2's soft-capping and
    Granite's logit scaling applied inside the fused loss."""
    model = build(family)
    reference = copy.deepcopy(model).double()
    patched = copy.deepcopy(model)
    ids, labels = _batch(2)
    try:
        report = patch_model(patched, fused_linear_loss=True)
        assert report["fused_linear_loss"] is True
        got = _run(patched, ids, labels)
        assert got[0] is None
        no_labels = patched(input_ids=ids)  # the original forward: logits, no loss
        assert no_labels.logits.shape == (2, 7, V) and no_labels.loss is None
    finally:
        unpatch_rotary()
    _assert_same(got, _run(model, ids, labels), _run(reference, ids, labels))


def test_unpatch_rotary_restores_the_original():
    mod = pytest.importorskip("transformers.models.llama.modeling_llama")
    original = mod.apply_rotary_pos_emb
    patch_model(build("llama"), norms=False, mlp=False, loss=False)
    assert mod.apply_rotary_pos_emb is not original
    unpatch_rotary()
    assert mod.apply_rotary_pos_emb is original


def test_causal_lm_loss_makes_no_float32_copy_of_the_logits():
    """The fused loss reads bf16 logits as they are: nothing float32 of the logits' size is
    kept for the backward (transformers' own loss upcasts them first)."""
    from ichiban_comm.triton_kernels import causal_lm_loss

    logits = torch.randn(2, 5, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (2, 5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = causal_lm_loss(logits, labels, V)
    assert loss.dtype == torch.float32
    big = [(t.dtype, tuple(t.shape)) for t in saved if t.numel() >= logits.numel()]
    assert big and all(d == torch.bfloat16 for d, _ in big), big
    want = torch.nn.functional.cross_entropy(logits.float()[:, :-1].reshape(-1, V),
                                             labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_patch_model_fused_linear_loss_needs_a_causal_lm():
    with pytest.raises(ValueError, match="supported transformers causal LM"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), fused_linear_loss=True)


def test_deepcopy_of_a_patched_model_uses_its_own_parameters():
    """The patched forwards are bound methods: a deepcopy (e.g. for an EMA copy) runs its own
    modules and leaves the original's gradients alone."""
    model = build("llama")
    try:
        patch_model(model, fused_linear_loss=True)
        twin = copy.deepcopy(model)
        ids, labels = _batch(3)
        got = _run(twin, ids, labels)
        assert all(p.grad is None for p in model.parameters())
        want = _run(model, ids, labels)
    finally:
        unpatch_rotary()
    torch.testing.assert_close(got[1], want[1])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name])
