"""Pipeline parallelism for the project's GPT through ``torch.distributed.pipelining``.

    dims = init_parallel(tp=1, pp=2, dp=-1)
    pipe = pipeline_gpt(model, dims, n_microbatches=4, schedule="1f1b")
    loss = pipe.step(idx, targets)     # mean loss on the last stage, None on the others
    opt.step()                         # an optimizer over pipe.module.parameters()

The model is cut by layers into ``pp`` contiguous stages (:func:`split_layers`); each rank keeps
the :class:`GPTStage` of its ``pp_rank`` (the embedding on the first stage, the final norm and
the head on the last) and the modules are the model's own (no copy: the parameter names inside
a stage are the full model's names, so a stage's ``state_dict`` keys match the unsplit model).
Torch's own ``PipelineStage`` and ``ScheduleGPipe`` / ``Schedule1F1B`` run the schedule; the
activations and their gradients travel with ``isend``/``irecv`` on ``dims.pp_group``, whatever its
backend ("ichiban" sends over its Gloo fallback group).

With a :class:`~ichiban_comm.parallel.optim.ShardedOptimizer` pass it as ``optimizer=``: the
micro-batches then accumulate under ``no_sync()`` and the dp reduction runs once after the
schedule (it does not overlap the pipeline's backward).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["GPTStage", "Pipeline", "pipeline_gpt", "split_layers"]

_SCHEDULES = ("gpipe", "1f1b")


def split_layers(n_layer: int, pp: int) -> list[range]:
    """Contiguous layer ranges of near-equal size, earlier stages taking the remainder (the last
    stage also runs the head and the loss)."""
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp must be a positive integer, got {pp!r}")
    if n_layer < pp:
        raise ValueError(f"cannot split n_layer={n_layer} layers into pp={pp} stages: every stage "
                         f"needs at least one layer")
    base, extra = divmod(n_layer, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class GPTStage(nn.Module):
    """One pipeline stage of a GPT: the layers in ``layers`` plus the embedding (first stage)
    or the final norm and head (last stage). forward: token ids (B, T) on the first stage,
    hidden states (B, T, C) otherwise; returns hidden states (B, T, C), normed on the last."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int, layers: range):
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.cfg, self.ops = model.cfg, model.ops
        self.embed = model.embed if self.is_first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.register_buffer("cos", model.cos, persistent=False)
        self.register_buffer("sin", model.sin, persistent=False)

    def forward(self, x):
        if self.is_first:
            if x.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"the first stage takes token ids (B, T), got a {x.dtype} tensor")
            if x.size(1) > self.cfg.seq_len:
                raise ValueError(f"sequence of {x.size(1)} tokens is longer than "
                                 f"seq_len={self.cfg.seq_len}")
            x = self.embed(x)                                   # (B, T, C)
        T = x.size(1)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for block in self.blocks.values():
            x = block(x, cos, sin)
        return self.norm(x) if self.is_last else x

    def loss(self, h, targets):
        """Mean cross-entropy of the last stage's hidden states h (B, T, C) against targets
        (B, T); the (B*T, vocab) logits are left to the ops (chunked or fused)."""
        if not self.is_last:
            raise RuntimeError(f"stage {self.stage} of {self.num_stages} has no head; the loss "
                               "is computed on the last stage")
        head = self.lm_head
        if hasattr(head, "loss"):   # a tensor-parallel head computes its own (vocab-parallel) loss
            return head.loss(h.reshape(-1, h.size(-1)), targets.reshape(-1))
        return self.ops.linear_cross_entropy(h.reshape(-1, h.size(-1)), head.weight,
                                             targets.reshape(-1))


class Pipeline:
    """A stage module and the torch schedule that drives it on this rank."""

    def __init__(self, module: GPTStage, stage, schedule, n_microbatches: int, optimizer=None):
        self.module, self.stage, self.schedule = module, stage, schedule
        self.n_microbatches = n_microbatches
        self.optimizer = optimizer

    def step(self, idx=None, targets=None):
        """One forward and backward over the batch, split into micro-batches. The first stage
        needs idx (B, T), the last targets (B, T); B must be a multiple of n_microbatches.
        Gradients accumulate in the stage's parameters (already divided by n_microbatches, so
        they equal the full batch's mean loss gradients). Returns the mean loss on the last
        stage, None on the others."""
        m = self.module
        if m.is_first and idx is None:
            raise ValueError("the first pipeline stage needs idx (the token ids)")
        if m.is_last and targets is None:
            raise ValueError("the last pipeline stage needs targets")
        batch = idx if idx is not None else targets
        if batch is not None and batch.size(0) % self.n_microbatches:
            raise ValueError(f"batch size {batch.size(0)} is not a multiple of "
                             f"n_microbatches={self.n_microbatches}")
        args = (idx,) if m.is_first else ()
        losses = [] if m.is_last else None
        sync = (self.optimizer.no_sync() if hasattr(self.optimizer, "no_sync")
                else contextlib.nullcontext())
        with sync:
            self.schedule.step(*args, target=targets if m.is_last else None, losses=losses,
                               return_outputs=False)
        if m.is_last:
            return torch.stack([l.detach() for l in losses]).mean()
        return None


def pipeline_gpt(model: nn.Module, dims, *, n_microbatches: int, schedule: str = "1f1b",
                 layers: list[range] | None = None, optimizer=None) -> Pipeline:
    """Cut model (the project's GPT) into dims.pp stages and build this rank's stage and schedule.

    dims: a ``ParallelDims`` (its ``pp_group`` and ``pp_rank``). schedule: "gpipe" or "1f1b".
    layers: the layer range of every stage (default :func:`split_layers`).
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be a positive integer, got {n_microbatches!r}")
    for attr in ("embed", "blocks", "norm", "lm_head", "cfg", "ops"):
        if not hasattr(model, attr):
            raise TypeError(f"pipeline_gpt splits the project's GPT (ichiban_comm.models.GPT); "
                            f"{type(model).__name__} has no {attr!r}")
    pp, rank = dims.pp, dims.pp_rank
    if schedule == "1f1b" and n_microbatches < pp:
        raise ValueError(f"schedule '1f1b' needs n_microbatches >= pp, got n_microbatches="
                         f"{n_microbatches} with pp={pp}")
    n_layer = len(model.blocks)
    if layers is None:
        layers = split_layers(n_layer, pp)
    if len(layers) != pp or sorted(i for r in layers for i in r) != list(range(n_layer)):
        raise ValueError(f"layers must give each of the pp={pp} stages a range, covering the "
                         f"{n_layer} layers once in order, got {layers}")
    module = GPTStage(model, rank, pp, layers[rank])
    device = next(model.parameters()).device
    stage = PipelineStage(module, rank, pp, device, group=dims.pp_group)
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    # Every stage passes the loss: torch's schedules run backward only when a loss_fn is given
    # (only the last stage calls it).
    sched = cls(stage, n_microbatches, loss_fn=module.loss)
    return Pipeline(module, stage, sched, n_microbatches, optimizer)
