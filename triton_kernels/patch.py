"""``patch_model``: swap the norms, gated-MLP activation, rotary embedding and loss of a
transformers Llama/Mistral/Qwen2-family or GPT-2 model for the fused versions, in place.

Modules are matched by type and structure, not by model name:
  * ``*RMSNorm`` with a 1-D ``weight`` and ``variance_epsilon``/``eps`` (not the Gemma ``1 + w``
    variant), and ``torch.nn.RMSNorm``                     -> ``RMSNorm`` (same Parameter)
  * ``torch.nn.LayerNorm`` over the last dim               -> ``LayerNorm`` (same Parameters)
  * a module with ``gate_proj``/``up_proj``/``down_proj`` and a SiLU or GELU ``act_fn``
                                                           -> ``FusedGatedMLP`` (swiglu / geglu)
  * a GPT-2 MLP (``c_fc``/``c_proj`` ``Conv1D``, tanh-GELU ``act``) -> ``FusedBiasGeLUMLP``
  * attention whose modeling module defines ``apply_rotary_pos_emb`` -> that function is replaced
    by the fused ``rope`` (module-wide: every model of that family in the process is affected;
    ``unpatch_rotary()`` restores it)
  * ``model.loss_function`` (causal LM)                    -> the fused ``cross_entropy``
  * opt-in ``fused_linear_loss=True``: the causal LM's ``forward`` (this instance only), when
    called with ``labels``, feeds the last hidden states and ``lm_head.weight`` to
    ``fused_linear_cross_entropy`` and returns ``logits=None`` — the ``(tokens, vocab)`` logits
    are never built. Without ``labels`` it is the original forward.
Parameters are shared, never copied: the state dict and any optimizer stay valid.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .modules import FusedBiasGeLUMLP, FusedGatedMLP, LayerNorm, RMSNorm
from .rope import rope

__all__ = ["patch_model", "unpatch_rotary", "causal_lm_loss"]

_ORIGINAL_ROTARY: dict = {}  # modeling module name -> the original apply_rotary_pos_emb


def _act_kind(act: nn.Module) -> Optional[str]:
    """None for SiLU, "tanh"/"none" for GELU flavours, "" when not fusable."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name in ("SiLUActivation", "SiLU"):
        return None
    if isinstance(act, nn.GELU):
        return act.approximate
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return "tanh"
    if name == "GELUActivation":
        return "none"
    return ""


def _is_rms_norm(m: nn.Module) -> bool:
    if isinstance(m, RMSNorm):
        return False
    if isinstance(m, getattr(nn, "RMSNorm", ())):
        return len(m.normalized_shape) == 1 and m.weight is not None
    name = type(m).__name__
    w = getattr(m, "weight", None)
    return (name.endswith("RMSNorm") and "Gemma" not in name and isinstance(w, nn.Parameter)
            and w.dim() == 1 and (hasattr(m, "variance_epsilon") or hasattr(m, "eps")))


def _swap(model: nn.Module, pick) -> int:
    """Replace every submodule for which ``pick(m)`` returns a module; returns the count."""
    todo = []
    for parent in model.modules():
        for name, child in parent.named_children():
            new = pick(child)
            if new is not None:
                todo.append((parent, name, new))
    for parent, name, new in todo:
        setattr(parent, name, new)
    return len(todo)


def _pick_norm(m):
    if _is_rms_norm(m):
        return RMSNorm.from_module(m)
    if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1:
        return LayerNorm.from_module(m)
    return None


def _pick_mlp(m):
    if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj",
                                                                 "down_proj")):
        kind = _act_kind(getattr(m, "act_fn", None) or nn.Identity())
        if kind != "":
            return FusedGatedMLP(m.gate_proj, m.up_proj, m.down_proj, kind)
    c_fc, c_proj = getattr(m, "c_fc", None), getattr(m, "c_proj", None)
    if type(c_fc).__name__ == "Conv1D" and type(c_proj).__name__ == "Conv1D" and \
            hasattr(m, "act") and isinstance(getattr(m, "dropout", None), nn.Dropout):
        kind = _act_kind(m.act)
        if kind in ("tanh", "none") and c_fc.bias is not None:
            return FusedBiasGeLUMLP(c_fc, c_proj, m.dropout, kind)
    return None


def _fused_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, **kwargs):
        if unsqueeze_dim != 1 or kwargs or q.dim() != 4 or cos.dim() not in (2, 3):
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, **kwargs)
        return rope(q, k, cos, sin)

    apply_rotary_pos_emb.ichiban_original = original
    return apply_rotary_pos_emb


def _patch_rotary(model: nn.Module) -> list:
    patched = []
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None or not hasattr(m, "q_proj") or hasattr(fn, "ichiban_original"):
            continue
        _ORIGINAL_ROTARY[mod.__name__] = fn
        mod.apply_rotary_pos_emb = _fused_rotary(fn)
        patched.append(mod.__name__)
    return patched


def unpatch_rotary() -> None:
    """Put back every ``apply_rotary_pos_emb`` that ``patch_model`` replaced."""
    for name, fn in _ORIGINAL_ROTARY.items():
        sys.modules[name].apply_rotary_pos_emb = fn
    _ORIGINAL_ROTARY.clear()


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs):
    """transformers' causal-LM loss contract (shift by one, mean or sum / num_items_in_batch)
    on the fused cross-entropy. Logits are upcast to float32 as transformers does."""
    if shift_labels is None:
        shift_labels = _shift_labels(labels, ignore_index)
    logits = logits.float().reshape(-1, vocab_size)  # (tokens, vocab)
    target = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _shift_labels(labels, ignore_index):
    # (B, T) -> (B, T): position t is scored against token t + 1, the last one is ignored
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _fused_linear_forward(model):
    """A causal-LM forward that never builds the logits when given labels."""
    original = model.forward
    base = model.base_model
    head = model.lm_head

    def forward(*args, labels=None, **kwargs):
        if labels is None or args or kwargs.get("return_dict") is False:
            return original(*args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        shift = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        out = base(**kwargs)
        h = out.last_hidden_state  # (B, T, H)
        target = shift if shift is not None else _shift_labels(labels, ignore_index)
        loss = fused_linear_cross_entropy(
            h, head.weight, target.to(h.device), bias=head.bias, ignore_index=ignore_index,
            reduction="sum" if num_items is not None else "mean")
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    forward.ichiban_original = original
    return forward


def patch_model(model: nn.Module, norms: bool = True, mlp: bool = True, rotary: bool = True,
                loss: bool = True, fused_linear_loss: bool = False) -> dict:
    """Swap fusable parts of ``model`` in place; returns what was swapped, e.g.
    ``{"norms": 5, "mlp": 2, "rotary": ["transformers.models.llama.modeling_llama"],
    "loss": True, "fused_linear_loss": False}``."""
    report = {"norms": 0, "mlp": 0, "rotary": [], "loss": False, "fused_linear_loss": False}
    if norms:
        report["norms"] = _swap(model, _pick_norm)
    if mlp:
        report["mlp"] = _swap(model, _pick_mlp)
    if rotary:
        report["rotary"] = _patch_rotary(model)
    is_causal_lm = hasattr(model, "loss_function") and isinstance(
        getattr(model, "lm_head", None), nn.Linear)
    if loss and is_causal_lm:
        model.loss_function = causal_lm_loss
        report["loss"] = True
    if fused_linear_loss:
        if not is_causal_lm or getattr(model, "base_model", model) is model:
            raise ValueError("fused_linear_loss=True needs a transformers causal LM (a model "
                             "with a base model, an nn.Linear lm_head and loss_function)")
        if not hasattr(model.forward, "ichiban_original"):
            model.forward = _fused_linear_forward(model)
        report["fused_linear_loss"] = True
    return report
