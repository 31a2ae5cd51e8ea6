"""``patch_model``: swap the norms, MLP activation, rotary embedding, residual add and loss of a
transformers causal LM for the fused versions, in place — only for model families known to
match, and only where each part is checked against the model's own code.

Which models: an allowlist keyed by ``config.model_type`` (``SUPPORTED``). Any other type
(Qwen3-Next, Cohere, GPT-J, GLM, a model without a config, ...) is left untouched with one
warning that names it; the fused ops are not a drop-in for a norm with another formula, an
interleaved or partial rotary embedding, or a rotary helper with another signature.

Inside a supported model every swap is checked before it is made:
  * norms (``*RMSNorm`` of the family, ``nn.LayerNorm`` for GPT-2) -> ``RMSNorm`` (weight offset
    0, or 1 for the Gemma ``(1 + w)`` norms) / ``LayerNorm``, sharing the Parameters; the module's
    own output on a random probe must equal the fused formula, else it is kept.
  * gated MLPs (``gate_proj``/``up_proj``/``down_proj`` + ``act_fn``, Phi-3's ``gate_up_proj``)
    -> ``FusedGatedMLP`` / ``FusedGateUpMLP`` (SwiGLU / GeGLU); GPT-2's ``Conv1D`` MLP ->
    ``FusedBiasGeLUMLP``; each probed against the original module. Mixture-of-experts blocks are
    kept (reported).
  * rotary: the modeling module's ``apply_rotary_pos_emb`` must have the signature
    ``(q, k, cos, sin, unsqueeze_dim=1)`` and equal the fused ``rope`` on a probe; then it is
    replaced module-wide (every model of that family in the process; ``unpatch_rotary()``
    restores it).
  * decoder layers whose ``forward`` is, statement by statement, the pre-norm (Llama) or the
    sandwich-norm (Gemma-2/3) block get a forward that feeds the attention output into the
    next norm as ``residual=``: the add and the norm are one kernel. The attention is called with
    exactly the arguments the original passes it. Other layouts (OLMo-2's post-norm, GPT-2's
    block) keep their forward (reported).
  * ``model.loss_function`` (causal LM) -> ``causal_lm_loss`` (fused cross-entropy on the logits
    transformers built, after its soft-capping / scaling; no float32 copy of the logits).
  * opt-in ``fused_linear_loss=True``: the causal LM's ``forward`` (this instance), when called
    with ``labels``, feeds the last hidden states and ``lm_head.weight`` to
    ``fused_linear_cross_entropy`` (with the family's logit scaling and soft-capping) and returns
    ``logits=None``; without ``labels`` it is the original forward.
Parameters are shared, never copied: the state dict and any optimizer stay valid.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import warnings
from typing import Optional

import torch
from torch import nn

from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .layer_norm import layer_norm_reference
from .modules import FusedBiasGeLUMLP, FusedGatedMLP, FusedGateUpMLP, LayerNorm, RMSNorm
from .rms_norm import rms_norm_reference
from .rope import rope, rope_reference

__all__ = ["patch_model", "unpatch_rotary", "causal_lm_loss", "SUPPORTED"]

_ORIGINAL_ROTARY: dict = {}  # modeling module name -> the original apply_rotary_pos_emb


@dataclasses.dataclass(frozen=True)
class _Family:
    norm: str  # "rms" or "layer"
    norm_offset: float = 0.0  # 1.0: (1 + w) RMSNorm
    rotary: bool = True
    # config attributes applied to the logits before the loss: divide by / soft-cap with
    logits_divide: Optional[str] = None
    logits_softcap: Optional[str] = None


_LLAMA = _Family("rms")
_GEMMA = _Family("rms", norm_offset=1.0)
_GEMMA_CAPPED = _Family("rms", norm_offset=1.0, logits_softcap="final_logit_softcapping")

SUPPORTED = {
    "llama": _LLAMA, "mistral": _LLAMA, "mixtral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "phi3": _LLAMA, "olmo2": _LLAMA,
    "granite": _Family("rms", logits_divide="logits_scaling"),
    "gemma": _GEMMA, "gemma2": _GEMMA_CAPPED, "gemma3_text": _GEMMA_CAPPED,
    "gpt2": _Family("layer", rotary=False),
}


# ----------------------------------------------------------------------------- probes
def _close(a, b) -> bool:
    a, b = a.detach().double(), b.detach().double()
    return a.shape == b.shape and bool(((a - b).abs() <= 1e-4 * (1 + b.abs())).all())


def _probe_input(features: int, like: torch.Tensor, rows: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(rows, features, generator=g).to(device=like.device, dtype=torch.float32)


def _pick_norm(m: nn.Module, fam: _Family, why: list):
    if isinstance(m, (RMSNorm, LayerNorm)):
        return None
    name = type(m).__name__
    if fam.norm == "layer":
        if type(m) is not nn.LayerNorm:
            return None
        if len(m.normalized_shape) != 1:
            why.append(f"{name} over {tuple(m.normalized_shape)}: only the last dim is fused")
            return None
        new = LayerNorm.from_module(m)
        x = _probe_input(m.normalized_shape[0], m.weight if m.weight is not None else
                         torch.empty(0))
        w = m.weight.float() if m.weight is not None else None
        b = m.bias.float() if m.bias is not None else None
        want = layer_norm_reference(x, w, b, new.eps)
    else:
        w = getattr(m, "weight", None)
        is_rms = name.endswith("RMSNorm") or isinstance(m, getattr(nn, "RMSNorm", ()))
        if not is_rms:
            return None
        if not isinstance(w, nn.Parameter) or w.dim() != 1:
            why.append(f"{name}: no 1-D weight")
            return None
        new = RMSNorm.from_module(m, offset=fam.norm_offset)
        x = _probe_input(w.shape[0], w)
        want = rms_norm_reference(x, w.detach().float(), new.eps, offset=fam.norm_offset)
    try:
        with torch.no_grad():
            got = m(x)
    except Exception as exc:  # noqa: BLE001 - e.g. weights on the meta device: cannot check
        why.append(f"{name}: could not be checked ({type(exc).__name__}), kept")
        return None
    if not _close(got.float(), want):
        why.append(f"{name}: its output differs from the fused formula (kept)")
        return None
    return new


def _act_kind(act: Optional[nn.Module]) -> Optional[str]:
    """None for SiLU, "tanh"/"none" for GELU flavours, "" when not fusable."""
    if act is None:
        return ""
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


def _gate(kind):
    if kind is None:
        return nn.functional.silu
    return lambda g: nn.functional.gelu(g, approximate=kind)


def _pick_mlp(m: nn.Module, fam: _Family, why: list):
    new = None
    lin = all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj",
                                                                   "down_proj"))
    if lin:
        kind = _act_kind(getattr(m, "act_fn", None))
        if kind == "":
            why.append(f"{type(m).__name__}: activation {type(m.act_fn).__name__} not fused")
            return None
        new = FusedGatedMLP(m.gate_proj, m.up_proj, m.down_proj, kind)

        def want(x):
            return m.down_proj(_gate(kind)(m.gate_proj(x)) * m.up_proj(x))
    elif isinstance(getattr(m, "gate_up_proj", None), nn.Linear) and \
            isinstance(getattr(m, "down_proj", None), nn.Linear):
        kind = _act_kind(getattr(m, "activation_fn", None))
        if kind == "":
            why.append(f"{type(m).__name__}: activation not fused")
            return None
        new = FusedGateUpMLP(m.gate_up_proj, m.down_proj, kind)

        def want(x):
            g, u = m.gate_up_proj(x).chunk(2, dim=-1)
            return m.down_proj(_gate(kind)(g) * u)
    else:
        c_fc, c_proj = getattr(m, "c_fc", None), getattr(m, "c_proj", None)
        if type(c_fc).__name__ == "Conv1D" and type(c_proj).__name__ == "Conv1D" and \
                hasattr(m, "act") and isinstance(getattr(m, "dropout", None), nn.Dropout):
            kind = _act_kind(m.act)
            if kind not in ("tanh", "none") or c_fc.bias is None:
                why.append(f"{type(m).__name__}: activation {type(m.act).__name__} not fused")
                return None
            new = FusedBiasGeLUMLP(c_fc, c_proj, m.dropout, kind)

            def want(x):
                return m.dropout(c_proj(nn.functional.gelu(c_fc(x), approximate=kind)))
        elif type(m).__name__.endswith(("SparseMoeBlock", "MoeBlock", "Experts")):
            why.append(f"{type(m).__name__}: mixture-of-experts MLP kept (not fused)")
            return None
        else:
            return None
    # probe against the module itself (eval: dropout off), in float32 on the weights' device
    w = next(m.parameters())
    x = _probe_input(w.shape[-1] if not lin else m.gate_proj.in_features, w)
    if type(new) is FusedBiasGeLUMLP:
        x = _probe_input(new.c_fc.weight.shape[0], w)
    training = m.training
    m.eval()
    try:
        with torch.no_grad():
            ref = m(x.to(w.dtype)).float()
            alt = want(x.to(w.dtype)).float()
    except Exception as exc:  # noqa: BLE001 - e.g. weights on the meta device: cannot check
        why.append(f"{type(m).__name__}: could not be checked ({type(exc).__name__}), kept")
        return None
    finally:
        m.train(training)
    if not _close(ref, alt):
        why.append(f"{type(m).__name__}: its output differs from the fused formula (kept)")
        return None
    return new


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


# ----------------------------------------------------------------------------- rotary
def _fused_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # other layouts and partial rotary (cos narrower than the head: Phi-3 variants) keep
        # the original
        if unsqueeze_dim != 1 or q.dim() != 4 or cos.dim() not in (2, 3) or \
                cos.shape[-1] != q.shape[-1]:
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return rope(q, k, cos, sin)

    apply_rotary_pos_emb.ichiban_original = original
    return apply_rotary_pos_emb


_ROTARY_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


def _plain_function(fn):
    """The Python function behind ``fn``: transformers may wrap its rotary helper in a callable
    ``nn.Module`` (hub-kernel dispatch) whose ``forward`` closes over the function."""
    if isinstance(fn, nn.Module):
        for cell in getattr(type(fn).forward, "__closure__", None) or ():
            inner = cell.cell_contents
            if inspect.isfunction(inner) and inner.__name__ == "apply_rotary_pos_emb":
                return inner
    return fn


def _rotary_ok(fn) -> str:
    """"" when ``fn`` is the rotate-half rotary helper the fused ``rope`` replaces, else why not."""
    try:
        params = list(inspect.signature(_plain_function(fn)).parameters)
    except (TypeError, ValueError):
        return "its signature cannot be read"
    if params != _ROTARY_PARAMS:
        return f"signature ({', '.join(params)}) is not ({', '.join(_ROTARY_PARAMS)})"
    g = torch.Generator().manual_seed(99)
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g)
    ang = torch.randn(1, 3, 4, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    try:
        got = fn(q, k, cos, sin)
    except Exception as exc:  # noqa: BLE001 - any failure means "not this convention"
        return f"it fails on a probe ({type(exc).__name__})"
    want = rope_reference(q, k, cos, sin)
    if not (isinstance(got, tuple) and len(got) == 2 and all(map(_close, got, want))):
        return "its result differs from rotate-half RoPE on a probe"
    return ""


def _patch_rotary(model: nn.Module, why: list) -> list:
    patched = []
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        is_attn = hasattr(m, "q_proj") or hasattr(m, "qkv_proj")
        if fn is None or not is_attn or hasattr(fn, "ichiban_original"):
            continue
        bad = _rotary_ok(fn)
        if bad:
            msg = f"{mod.__name__}.apply_rotary_pos_emb: {bad}"
            if msg not in why:
                why.append(msg)
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


# ----------------------------------------------------------------------------- decoder layers
# The statements a decoder layer's forward must consist of (after its docstring), with
# ATTN for the self-attention call and BRANCH for "hidden_states", "self.<dropout>(hidden_states)"
# or "hidden_states * self.<multiplier>". "pre": Llama-style; "sandwich": Gemma-2/3.
_PRE = ["residual = hidden_states",
        "hidden_states = self.input_layernorm(hidden_states)",
        "ATTN",
        "hidden_states = residual + BRANCH",
        "residual = hidden_states",
        "hidden_states = self.post_attention_layernorm(hidden_states)",
        "hidden_states = self.mlp(hidden_states)",
        "hidden_states = residual + BRANCH",
        "return hidden_states"]
_SANDWICH = ["residual = hidden_states",
             "hidden_states = self.input_layernorm(hidden_states)",
             "ATTN",
             "hidden_states = self.post_attention_layernorm(hidden_states)",
             "hidden_states = residual + hidden_states",
             "residual = hidden_states",
             "hidden_states = self.pre_feedforward_layernorm(hidden_states)",
             "hidden_states = self.mlp(hidden_states)",
             "hidden_states = self.post_feedforward_layernorm(hidden_states)",
             "hidden_states = residual + hidden_states",
             "return hidden_states"]


def _branch(expr: ast.expr):
    """The residual branch ``f(hidden_states)`` of ``residual + <expr>``, or None if unknown."""
    src = ast.unparse(expr)
    if src == "hidden_states":
        return lambda layer, h: h
    if isinstance(expr, ast.Call) and len(expr.args) == 1 and not expr.keywords and \
            ast.unparse(expr.args[0]) == "hidden_states" and isinstance(expr.func, ast.Attribute) \
            and ast.unparse(expr.func.value) == "self":
        attr = expr.func.attr
        return lambda layer, h: getattr(layer, attr)(h)
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mult) and \
            ast.unparse(expr.left) == "hidden_states" and isinstance(expr.right, ast.Attribute) \
            and ast.unparse(expr.right.value) == "self":
        attr = expr.right.attr
        return lambda layer, h: h * getattr(layer, attr)
    return None


def _attn_call(stmt: ast.stmt, params: list, varkw: Optional[str]):
    """Names of the arguments the layer passes to ``self.self_attn`` (each as ``name=name``, plus
    ``**varkw``), or None unless ``stmt`` is ``hidden_states, _ = self.self_attn(...)``."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
        return None
    tgt, call = stmt.targets[0], stmt.value
    if not (isinstance(tgt, ast.Tuple) and tgt.elts and ast.unparse(tgt.elts[0]) ==
            "hidden_states" and isinstance(call, ast.Call) and not call.args and
            ast.unparse(call.func) == "self.self_attn"):
        return None
    names, seen_h = [], False
    for kw in call.keywords:
        value = ast.unparse(kw.value)
        if kw.arg is None:
            if value != varkw:
                return None
        elif kw.arg == "hidden_states":
            seen_h = value == "hidden_states"
        elif kw.arg == value and value in params:
            names.append(value)
        else:
            return None
    return names if seen_h else None


def _layer_plan(layer: nn.Module):
    """(layout, attention argument names, branches, signature) if the layer's forward matches
    a template exactly, else None."""
    fn = inspect.unwrap(type(layer).forward)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        sig = inspect.signature(fn)
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    params = list(sig.parameters)
    varkw = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    if params[:2] != ["self", "hidden_states"]:
        return None
    for layout, template in (("pre", _PRE), ("sandwich", _SANDWICH)):
        if len(body) != len(template):
            continue
        attn, branches, ok = None, [], True
        for stmt, want in zip(body, template):
            if want == "ATTN":
                attn = _attn_call(stmt, params, varkw)
                ok = attn is not None
            elif "BRANCH" in want:
                ok = (isinstance(stmt, ast.Assign) and ast.unparse(stmt.targets[0]) ==
                      "hidden_states" and isinstance(stmt.value, ast.BinOp) and
                      isinstance(stmt.value.op, ast.Add) and
                      ast.unparse(stmt.value.left) == "residual")
                b = _branch(stmt.value.right) if ok else None
                ok = b is not None
                branches.append(b)
            else:
                ok = ast.unparse(stmt) == want
            if not ok:
                break
        if ok:
            return layout, attn, branches, sig, varkw
    return None


def _fused_layer_forward(layer, plan):
    """The fused forward, bound to ``layer`` (a bound method: ``copy.deepcopy`` of the model
    rebinds it to the copied layer)."""
    layout, attn_names, branches, sig, varkw = plan

    def forward(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:  # a call this plan does not cover: the original forward
            return type(self).forward(self, *args, **kwargs)
        bound.apply_defaults()  # the attention gets the layer's defaults, as in the original
        a = bound.arguments
        attn_kw = {n: a[n] for n in attn_names}
        attn_kw.update(a.get(varkw, {}) if varkw else {})
        residual = a["hidden_states"]
        h = self.input_layernorm(residual)
        h = self.self_attn(hidden_states=h, **attn_kw)[0]
        if layout == "pre":
            # residual + branch(attn), normalised: one kernel; the sum is the next residual
            h, residual = self.post_attention_layernorm(branches[0](self, h), residual=residual)
            return residual + branches[1](self, self.mlp(h))
        h = self.post_attention_layernorm(h)
        h, residual = self.pre_feedforward_layernorm(h, residual=residual)
        return residual + self.post_feedforward_layernorm(self.mlp(h))

    forward.ichiban_original = type(layer).forward
    return types.MethodType(forward, layer)


def _fuse_residuals(model: nn.Module, why: list) -> int:
    count, kept = 0, set()
    for m in model.modules():
        if not (hasattr(m, "self_attn") and hasattr(m, "mlp") and hasattr(m, "input_layernorm")):
            continue
        if hasattr(m.forward, "ichiban_original"):
            continue
        plan = _layer_plan(m)
        norms = ("post_attention_layernorm",) if plan and plan[0] == "pre" else \
            ("pre_feedforward_layernorm",)
        if plan is None or not all(isinstance(getattr(m, n, None), RMSNorm) for n in norms):
            kept.add(type(m).__name__)
            continue
        m.forward = _fused_layer_forward(m, plan)
        count += 1
    for name in sorted(kept):
        why.append(f"{name}: forward is not a pre-norm / sandwich-norm block (or its norms were "
                   "not swapped): residual add not fused")
    return count


# ----------------------------------------------------------------------------- loss
def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs):
    """transformers' causal-LM loss contract (shift by one, mean or sum / num_items_in_batch)
    on the fused cross-entropy. The logits are read in their own dtype (the kernel computes in
    float32; no float32 copy of the logits is made); the loss is float32, as transformers'."""
    if shift_labels is None:
        shift_labels = _shift_labels(labels, ignore_index)
    logits = logits.reshape(-1, vocab_size)  # (tokens, vocab), a view
    target = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                         loss_dtype=torch.float32)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _shift_labels(labels, ignore_index):
    # (B, T) -> (B, T): position t is scored against token t + 1, the last one is ignored
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _logit_transform(model, fam: _Family):
    cfg = model.config
    scale = 1.0
    if fam.logits_divide and getattr(cfg, fam.logits_divide, None):
        scale = 1.0 / float(getattr(cfg, fam.logits_divide))
    cap = getattr(cfg, fam.logits_softcap, None) if fam.logits_softcap else None
    return scale, (float(cap) if cap else None)


def _fused_linear_forward(model, scale, softcap):
    """A causal-LM forward that never builds the logits when given labels (a bound method:
    ``copy.deepcopy`` of the model rebinds it to the copy)."""

    def forward(self, *args, labels=None, **kwargs):
        if labels is None or args or kwargs.get("return_dict") is False:
            return type(self).forward(self, *args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        shift = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        out = self.base_model(**kwargs)
        h = out.last_hidden_state  # (B, T, H)
        head = self.lm_head
        target = shift if shift is not None else _shift_labels(labels, ignore_index)
        loss = fused_linear_cross_entropy(
            h, head.weight, target.to(h.device), bias=head.bias, ignore_index=ignore_index,
            reduction="sum" if num_items is not None else "mean", logit_scale=scale,
            softcap=softcap)
        loss = loss.float()
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        extra = {k: getattr(out, k, None) for k in ("past_key_values", "cache", "hidden_states",
                                                     "attentions")}
        fields = CausalLMOutputWithPast.__dataclass_fields__
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      **{k: v for k, v in extra.items() if k in fields})

    forward.ichiban_original = type(model).forward
    return types.MethodType(forward, model)


# ----------------------------------------------------------------------------- entry point
def patch_model(model: nn.Module, norms: bool = True, mlp: bool = True, rotary: bool = True,
                loss: bool = True, fused_linear_loss: bool = False,
                residual: bool = True) -> dict:
    """Swap the fusable parts of a supported transformers model in place (see the module
    docstring); returns what was done, e.g. ``{"model_type": "llama", "norms": 5, "mlp": 2,
    "rotary": ["transformers.models.llama.modeling_llama"], "residual": 2, "loss": True,
    "fused_linear_loss": False, "kept": [...]}`` where ``kept`` says what was left as it was and
    why. An unsupported model is not touched: one ``UserWarning`` names it."""
    report = {"model_type": None, "norms": 0, "mlp": 0, "rotary": [], "residual": 0,
              "loss": False, "fused_linear_loss": False, "kept": []}
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    report["model_type"] = mt
    fam = SUPPORTED.get(mt)
    if fam is None:
        what = f"model_type {mt!r}" if mt else "a model without a transformers config"
        reason = (f"patch_model: {type(model).__name__} ({what}) is not a supported family "
                  f"({', '.join(sorted(SUPPORTED))}); nothing was patched — its norms, rotary "
                  "embedding or loss may differ from the fused ops' formulas")
        report["kept"].append(reason)
        warnings.warn(reason, UserWarning, stacklevel=2)
        if fused_linear_loss:
            raise ValueError("fused_linear_loss=True needs a supported transformers causal LM "
                             f"({', '.join(sorted(SUPPORTED))}); got {what}")
        return report
    why = report["kept"]
    if norms:
        report["norms"] = _swap(model, lambda m: _pick_norm(m, fam, why))
    if mlp:
        report["mlp"] = _swap(model, lambda m: _pick_mlp(m, fam, why))
    if rotary and fam.rotary:
        report["rotary"] = _patch_rotary(model, why)
    if residual and norms:
        report["residual"] = _fuse_residuals(model, why)
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
            model.forward = _fused_linear_forward(model, *_logit_transform(model, fam))
        report["fused_linear_loss"] = True
    report["kept"] = list(dict.fromkeys(why))
    if report["kept"]:
        warnings.warn(f"patch_model ({mt}): kept as they were: " + "; ".join(report["kept"]),
                      UserWarning, stacklevel=2)
    return report
