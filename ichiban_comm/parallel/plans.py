"""``parallelize(model, dims, plan)``: split an existing model's layers in place.

A plan maps module-name globs (``fnmatch``, matched against ``model.named_modules()``) to a
style, in torch ``parallelize_module``'s words:

=================  ===========================================================================
``"colwise"``      ``nn.Linear`` / Conv1D -> :class:`ColumnParallelLinear` (output split).
                   ``{"style": "colwise", "parts": 3}`` for a fused q|k|v (or ``2``: gate|up).
``"rowwise"``      ``nn.Linear`` / Conv1D -> :class:`RowParallelLinear` (input split, summed).
``"vocab"``        ``nn.Embedding`` -> :class:`VocabParallelEmbedding`; ``nn.Linear`` (the output
                   head) -> :class:`ParallelLMHead` (loss through the vocabulary-parallel fused
                   linear cross-entropy). A head tied to a split embedding stays tied.
``"sequence"``     a norm that runs on this rank's slice of the sequence and hands the whole
                   sequence to the column-parallel layers after it (only with
                   ``sequence_parallel=True``). ``{"style": "sequence", "output":
                   "replicated"}`` for the final norm before a ``"vocab"`` head.
``"sequence_input"`` the module whose first input enters the sequence-parallel region (the
                   first block): the input is sliced along the sequence.
=================  ===========================================================================

A style may carry ``"heads": (name, count)`` so a count the tensor-parallel size does not
divide is an error naming both numbers. ``plan="auto"`` knows the project's GPT and
transformers' Llama, Mistral, Qwen2 and GPT-2 causal LMs.

The split is tensor-parallel-size invariant: every layer is built from the model's full
weights (made once, with one seed, before the split) and sliced, so ``tp=1`` and ``tp=N``
start from identical parameters; ``load_state_dict`` of a full state dict slices it too.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from . import layers as L

__all__ = ["parallelize", "ParallelizeReport", "auto_plan", "KNOWN_MODELS", "PlanError",
           "gather_state_dict", "clip_grad_norm_"]

STYLES = ("colwise", "rowwise", "vocab", "sequence", "sequence_input")


class PlanError(ValueError):
    """A plan that does not fit the model or the tensor-parallel size."""


# ---- auto plans ----------------------------------------------------------------------------------

def _heads_check(name: str, n: int, tp: int) -> None:
    if n % tp:
        raise PlanError(f"{name}={n} is not divisible by tp={tp}: each tensor-parallel rank needs "
                        f"whole heads; pick a tp that divides {n}")


def _gpt_plan(model, tp):
    cfg = model.cfg
    _heads_check("n_head", cfg.n_head, tp)
    heads = ("n_head", cfg.n_head)
    plan = {
        "embed": "vocab",
        "blocks.0": "sequence_input",
        "blocks.*.norm1": "sequence",
        "blocks.*.attn.qkv": {"style": "colwise", "parts": 3, "heads": heads},
        "blocks.*.attn.proj": {"style": "rowwise", "heads": heads},
        "blocks.*.norm2": "sequence",
        "blocks.*.mlp.gate_up": {"style": "colwise", "parts": 2},
        "blocks.*.mlp.down": "rowwise",
        "norm": {"style": "sequence", "output": "replicated"},
        "lm_head": "vocab",
    }

    def fixup(m):
        for b in m.blocks:
            b.attn.n_head = cfg.n_head // tp
    return plan, fixup


def _llama_plan(model, tp):
    cfg = model.config
    _heads_check("num_attention_heads", cfg.num_attention_heads, tp)
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    _heads_check("num_key_value_heads", kv, tp)
    q, k = ("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads", kv)
    plan = {
        "model.embed_tokens": "vocab",
        "model.layers.0": "sequence_input",
        "model.layers.*.input_layernorm": "sequence",
        "model.layers.*.self_attn.q_proj": {"style": "colwise", "heads": q},
        "model.layers.*.self_attn.k_proj": {"style": "colwise", "heads": k},
        "model.layers.*.self_attn.v_proj": {"style": "colwise", "heads": k},
        "model.layers.*.self_attn.o_proj": {"style": "rowwise", "heads": q},
        "model.layers.*.post_attention_layernorm": "sequence",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "model.norm": {"style": "sequence", "output": "replicated"},
        "lm_head": "vocab",
    }
    return plan, None  # the attention reshapes with -1: nothing to adjust


def _gpt2_plan(model, tp):
    cfg = model.config
    _heads_check("n_head", cfg.n_head, tp)
    heads = ("n_head", cfg.n_head)
    plan = {
        "transformer.wte": "vocab",
        "transformer.h.0": "sequence_input",
        "transformer.h.*.ln_1": "sequence",
        "transformer.h.*.attn.c_attn": {"style": "colwise", "parts": 3, "heads": heads},
        "transformer.h.*.attn.c_proj": {"style": "rowwise", "heads": heads},
        "transformer.h.*.ln_2": "sequence",
        "transformer.h.*.mlp.c_fc": "colwise",
        "transformer.h.*.mlp.c_proj": "rowwise",
        "transformer.ln_f": {"style": "sequence", "output": "replicated"},
        "lm_head": "vocab",
    }

    def fixup(m):
        for b in m.transformer.h:
            b.attn.split_size = b.attn.embed_dim // tp  # q|k|v of this rank's heads
            b.attn.num_heads = cfg.n_head // tp
    return plan, fixup


# Auto-plan models with separate q, k, v (and gate, up) projections of one norm's output.
SEPARATE_QKV = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

KNOWN_MODELS = {
    "GPT": _gpt_plan,  # ichiban_comm.models.GPT
    "LlamaForCausalLM": _llama_plan,
    "MistralForCausalLM": _llama_plan,
    "Qwen2ForCausalLM": _llama_plan,
    "GPT2LMHeadModel": _gpt2_plan,
}


def auto_plan(model: nn.Module, tp: int):
    """(plan, fixup) for a known model class; a PlanError listing the known ones otherwise."""
    name = type(model).__name__
    if name == "GPT":
        from ..models import GPT

        if not isinstance(model, GPT):
            name = "?"
    if name not in KNOWN_MODELS:
        raise PlanError(f'plan="auto" does not know {type(model).__module__}.'
                        f'{type(model).__name__}; it knows {sorted(KNOWN_MODELS)}. Pass a plan '
                        f'dict instead, e.g. {{"layers.*.attn.qkv": "colwise", '
                        f'"layers.*.attn.out": "rowwise", ...}}')
    return KNOWN_MODELS[name](model, tp)


# ---- the report ------------------------------------------------------------

class ParallelizeReport:
    """What ``parallelize`` did: one row per module (name, style, what it became)."""

    def __init__(self, model_name, tp, tp_rank, sequence_parallel, rows, plan_source, notes):
        self.model_name, self.tp, self.tp_rank = model_name, tp, tp_rank
        self.sequence_parallel = sequence_parallel
        self.rows = rows  # [(module name, style, detail)]
        self.plan_source, self.notes = plan_source, notes

    def count(self, style: str) -> int:
        return sum(1 for r in self.rows if r[1] == style)

    def __str__(self):
        head = (f"parallelize {self.model_name}: tp={self.tp} (this rank tp {self.tp_rank}), "
                f"plan {self.plan_source}, sequence parallel "
                f"{'on' if self.sequence_parallel else 'off'}; "
                + ", ".join(f"{self.count(s)} {s}" for s in STYLES if self.count(s)))
        w = max([len(r[0]) for r in self.rows] + [6])
        lines = [head] + [f"  {n:<{w}}  {s:<14} {d}" for n, s, d in self.rows]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    __repr__ = __str__


# ---- applying a plan ------------------------------------------------------------

def _normalise(plan: dict) -> list[tuple[str, dict]]:
    if not isinstance(plan, dict) or not plan:
        raise PlanError(f'plan must be "auto" or a non-empty dict of module-name glob -> style, '
                        f"got {plan!r}")
    out = []
    for glob, spec in plan.items():
        if isinstance(spec, str):
            spec = {"style": spec}
        if not isinstance(spec, dict) or spec.get("style") not in STYLES:
            raise PlanError(f"plan[{glob!r}] = {spec!r}: the style must be one of {list(STYLES)} "
                            f'(or a dict {{"style": ..., "parts": ..., "heads": ...}})')
        unknown = set(spec) - {"style", "parts", "heads", "output"}
        if unknown:
            raise PlanError(f"plan[{glob!r}] has unknown option(s) {sorted(unknown)}; known: "
                            "style, parts, heads, output")
        out.append((glob, spec))
    return out


def _set_child(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _scatter_first_input(group):
    def pre_hook(module, args, kwargs):
        if args:
            return (L.scatter_sequence(args[0], group),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = L.scatter_sequence(kwargs["hidden_states"], group)
        return args, kwargs
    return pre_hook


def _shape(p):
    return "x".join(map(str, p.shape))


def parallelize(model: nn.Module, dims, plan="auto", sequence_parallel: bool = False,
                make_vocab_size_divisible_by: int = 1):
    """Split ``model``'s layers over ``dims.tp_group`` in place; returns a
    :class:`ParallelizeReport` (print it).

    ``dims``: a :class:`ParallelDims` (or anything with ``tp_group``). ``plan``: ``"auto"`` or a
    dict (see the module docstring). ``sequence_parallel``: norms and the residual stream between
    the blocks hold a 1/tp slice of the sequence (activation memory / tp); the sequence length
    must then be divisible by tp. A transformers causal LM's ``forward`` with ``labels``
    computes the loss through the vocabulary-parallel fused linear cross-entropy (logits=None).
    ``make_vocab_size_divisible_by``: a ``"vocab"`` table whose size ``tp`` does not divide is
    padded to a multiple of this times ``tp`` (Megatron's option; 1, the default, pads to the
    next multiple of ``tp``). Padded rows never reach the loss, the logits, the state dict or a
    checkpoint: the model keeps the real vocabulary size everywhere a user sees it.
    """
    group = dims.tp_group
    tp = getattr(dims, "tp", None) or L._size(group)
    notes = []
    if plan == "auto":
        plan, fixup = auto_plan(model, tp)
        source = "auto"
    else:
        fixup, source = None, "given"
    entries = _normalise(plan)
    names = [n for n, _ in model.named_modules() if n]
    matched = {}
    for glob, spec in entries:
        hits = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise PlanError(f"plan glob {glob!r} matches no module of {type(model).__name__} "
                            f"(module names look like: {sample})")
        if "heads" in spec:
            _heads_check(spec["heads"][0], int(spec["heads"][1]), tp)
        matched[glob] = hits
    rows = []
    new_params: dict[int, nn.Parameter] = {}  # id(original weight) -> its split replacement
    for glob, spec in entries:
        style = spec["style"]
        for name in matched[glob]:
            mod = model.get_submodule(name)
            try:
                new, detail = _apply(mod, style, spec, group, sequence_parallel, new_params,
                                     make_vocab_size_divisible_by)
            except (ValueError, TypeError) as e:
                raise PlanError(f"{name} ({type(mod).__name__}) as {style!r}: {e}") from e
            if new is None:
                if detail:
                    rows.append((name, style, detail))
                continue
            _set_child(model, name, new)
            rows.append((name, style, detail))
    if fixup is not None:
        fixup(model)
    if source == "auto" and not sequence_parallel and tp > 1 and \
            type(model).__name__ in SEPARATE_QKV:
        _share_column_input_grads(model, entries, matched, group)
        notes.append("column-parallel layers reading one norm's output (q|k|v, gate|up) "
                     "all-reduce their summed input gradient once, at the norm")
    if _is_hf_causal_lm(model) and any(s["style"] == "vocab" for _, s in entries) and \
            isinstance(getattr(model, "lm_head", None), L.ParallelLMHead):
        model.forward = _vocab_parallel_lm_forward(model)
        notes.append("forward(labels=...) computes the loss through the vocabulary-parallel "
                     "fused linear cross-entropy (logits=None)")
    if not sequence_parallel and any(s["style"].startswith("sequence") for _, s in entries):
        notes.append("sequence-parallel entries left as they are (sequence_parallel=False)")
    model.tp_report = ParallelizeReport(type(model).__name__, tp, L._rank(group),
                                        sequence_parallel, rows, source, notes)
    return model.tp_report


def _apply(mod, style, spec, group, sp, new_params, vocab_multiple=1):
    tp = L._size(group)
    if style == "colwise":
        new = L.ColumnParallelLinear.from_module(mod, group, parts=spec.get("parts", 1),
                                                 sequence_parallel=sp)
        full = "x".join(map(str, new.weight.tp_shard.full_shape))
        return new, f"weight {_shape(new.weight)} (of {full})" \
            + (f", {new.parts} fused parts" if new.parts > 1 else "")
    if style == "rowwise":
        new = L.RowParallelLinear.from_module(mod, group, sequence_parallel=sp)
        return new, (f"weight {_shape(new.weight)} (of "
                     f"{'x'.join(map(str, new.weight.tp_shard.full_shape))}), "
                     + ("reduce-scatter" if sp and tp > 1 else "all-reduce"))
    if style == "vocab":
        if isinstance(mod, nn.Embedding):
            new = L.VocabParallelEmbedding.from_module(
                mod, group, make_vocab_size_divisible_by=vocab_multiple)
            new_params[id(mod.weight)] = new.weight
            return new, f"rows {new.vocab_start}..{new.vocab_start + new.per_rank - 1} of " \
                        f"{new.num_embeddings}" + _padding(new.weight)
        tied = new_params.get(id(getattr(mod, "weight", None)))
        new = L.ParallelLMHead.from_module(mod, group, tied_weight=tied,
                                           make_vocab_size_divisible_by=vocab_multiple)
        return new, (f"vocab {new.weight.tp_shard.real} of {new.vocab_size}, fused linear "
                     f"cross-entropy" + (", tied to the embedding" if tied is not None else "")
                     + _padding(new.weight))
    if style == "sequence":
        if not sp:
            return None, ""
        if spec.get("output") == "replicated":
            for p in mod.parameters():
                L.mark_sequence_parallel(p, group)
            mod.register_forward_hook(
                lambda m, i, out: L.gather_sequence_replicated_grad(out, group))
            return None, "on the sequence slice, whole sequence out (gradient already summed)"
        L.sequence_parallel_norm(mod, group)
        return None, "on the sequence slice, all-gather out / reduce-scatter back"
    if style == "sequence_input":
        if not sp:
            return None, ""
        mod.register_forward_pre_hook(_scatter_first_input(group), with_kwargs=True)
        return None, "first input sliced along the sequence"
    raise AssertionError(style)


def _share_column_input_grads(model, entries, matched, group):
    """Without sequence parallelism, one all-reduce of dx per norm instead of one per
    column-parallel layer: the norm's output passes through :func:`copy_to_group` (identity
    forward, all-reduce backward) and the column layers leave their partial dx unreduced;
    autograd sums the partials of q, k and v (gate and up) before the one all-reduce. Only
    for the auto plans, where every column-parallel layer reads a ``"sequence"`` norm's output
    and nothing else reads it (the dataflow that sequence parallelism relies on as well). The
    trade: the per-layer all-reduce overlaps the layer's dW matmul; the shared one does not,
    but there are 2 per block instead of 5. Models whose q|k|v and gate|up are single matmuls
    (GPT-2, the project's GPT) issue 2 either way and keep the overlap."""
    for glob, spec in entries:
        if spec["style"] == "sequence" and spec.get("output") != "replicated":
            for name in matched[glob]:
                model.get_submodule(name).register_forward_hook(
                    lambda m, i, out: L.copy_to_group(out, group))
    for m in model.modules():
        if isinstance(m, L.ColumnParallelLinear):
            m.input_reduced = True


def _padding(p):
    spec = p.tp_shard
    return f", padded to {spec.padded} rows per rank" if spec.padded else ""


def _is_hf_causal_lm(model):
    return hasattr(model, "loss_function") and hasattr(model, "base_model") and \
        model.base_model is not model


def _vocab_parallel_lm_forward(model):
    """transformers' causal-LM contract (shift by one; mean, or sum / num_items_in_batch) with
    the loss from the vocabulary-parallel head, never building the logits."""
    original = model.forward
    base, head = model.base_model, model.lm_head

    def forward(input_ids=None, *args, labels=None, **kwargs):
        if labels is None or args or kwargs.get("return_dict") is False:
            return original(input_ids, *args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        shift = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        out = base(input_ids=input_ids, **kwargs)
        h = out.last_hidden_state  # (B, T, H), whole sequence
        if shift is None:
            shift = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        loss = head.loss(h, shift.to(h.device), ignore_index=ignore_index,
                         reduction="sum" if num_items is not None else "mean")
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    forward.ichiban_original = original
    return forward


def gather_state_dict(model: nn.Module, group, grads: bool = False) -> dict:
    """``{name: full tensor}`` of every parameter, split ones gathered over ``group`` through
    their ``tp_shard`` (``grads=True``: their gradients, None where there is none). Collective
    over the group; tied parameters appear under each name."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        t = p.grad if grads else p.detach()
        if t is None:
            out[name] = None
            continue
        out[name] = L.gather_full(t, getattr(p, "tp_shard", None), group)
    return out


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, dims=None, norm_type: float = 2.0):
    """``torch.nn.utils.clip_grad_norm_`` for a tensor- (and pipeline-) parallel model whose
    gradients are already equal over dp: split parameters count every rank's piece, parameters
    whole on every tensor rank count once, stages add up. Returns the total norm (the same on
    every rank). For ZeRO use ``ShardedOptimizer.clip_grad_norm_``."""
    import torch.distributed as dist

    params = [p for p in parameters if p.grad is not None]
    tp_rank = getattr(dims, "tp_rank", 0)
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        raise ValueError("norm_type=inf is not supported here; use 2.0")
    mine = [p.grad for p in params if getattr(p, "tp_shard", None) is not None or tp_rank == 0]
    total = torch.zeros((), dtype=torch.float32)
    for g in mine:
        total += torch.linalg.vector_norm(g.float(), norm_type).pow(norm_type).cpu()
    if dims is not None:
        t = total.reshape(1)
        for size, group in ((dims.tp, dims.tp_group), (dims.pp, dims.pp_group)):
            if size > 1:
                dist.all_reduce(t, group=group)
        total = t[0]
    total = total.pow(1.0 / norm_type)
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
