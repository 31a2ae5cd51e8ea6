"""Cross-entropy of ``hidden @ weight.T (+ bias)`` without ever holding the full logits.

The tokens are processed in chunks: a chunk's logits ``(chunk, V/tp)`` are made by one matmul,
turned into their loss rows and, in place, into ``dlogits`` by the one-pass cross-entropy kernel,
and fed straight into the two gradient matmuls (``dhidden = dlogits @ W`` and
``dW += dlogits.T @ hidden``, summed in float32 for a 16-bit head) before the next chunk. Peak
extra memory is one chunk of logits (plus the float32 ``dW`` accumulator), not ``N x V``.

For a scalar loss (reduction "mean"/"sum") that needs a gradient, this happens in the forward,
while the chunk's logits exist (the backward only multiplies the finished gradients by the
incoming scalar); for reduction "none" the backward recomputes each chunk's logits instead
(one extra matmul per chunk, exact for any per-row incoming gradient). See ``_FusedLinearCEFn``.

With ``group``, ``weight`` (and ``bias``) are this rank's vocabulary slice in rank order, and
``hidden`` is the same on every rank (the input of a column-parallel head). Only the per-row
max / sum-exp / target logit (plus the row sum with label smoothing) cross the group, and
``dhidden`` is all-reduced (the sum of every slice's contribution), exactly as the
identity-forward / all-reduce-backward of a parallel input.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._dispatch import check_float, rows_2d, run_op, use_triton
from .cross_entropy import (assert_targets_in_range, check_ce_args, combine_stats,
                            cross_entropy_reference, grad_coef, row_grad, row_loss, row_stats,
                            scale_grad, vocab_layout, _reduce)

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_reference"]

# Logits bytes per chunk. The gradient overwrites the chunk's logits, so one such buffer is
# alive at a time: 512 MiB is ~2k tokens at a 128k bf16 vocabulary, which makes the reduction
# dimension of the dweight GEMM (dlogits.T @ hidden) 2k deep, while staying far below the
# N x V logits of the unfused loss.
_CHUNK_BYTES = 1 << 29


def fused_linear_cross_entropy_reference(hidden, weight, target, bias=None, ignore_index=-100,
                                         label_smoothing=0.0, z_loss=0.0, reduction="mean",
                                         logit_scale=1.0, softcap=None):
    """Plain torch, unsharded, materialising the logits: the test oracle."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return cross_entropy_reference(logits, target.reshape(-1), ignore_index, label_smoothing,
                                   z_loss, reduction).reshape(
        target.shape if reduction == "none" else ())


def default_chunk_size(rows: int, v_local: int, elem_size: int) -> int:
    return max(1, min(rows, _CHUNK_BYTES // max(1, v_local * elem_size)))


def _logits(h, weight, bias):
    # (c, H) @ (H, V/tp) -> (c, V/tp) in the input dtype
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def _transform(lg, scale, softcap):
    """Logit scaling / soft-capping (Granite, Gemma-2/3): returns the transformed chunk logits and
    d(new)/d(old) per element (None when it is the constant ``scale``)."""
    if scale == 1.0 and softcap is None:
        return lg, None
    if softcap is None:
        return lg * scale, None
    t = torch.tanh(lg.float() * (scale / softcap))  # (c, V/tp) float32, this chunk only
    return (t * softcap).to(lg.dtype), (1.0 - t * t).mul_(scale)


def _chain(dlg, factor, scale):
    if factor is not None:
        return (dlg.float() * factor).to(dlg.dtype)
    return dlg * scale if scale != 1.0 else dlg


def _vocab_slices(v_local, vocab_chunk):
    """Slices of the local vocabulary processed one after the other (one slice: unchunked)."""
    return [slice(v0, min(v_local, v0 + vocab_chunk)) for v0 in range(0, v_local, vocab_chunk)]


def _grad_buffers(h2, weight, bias, need, accum_dtype, summed_dh):
    """Gradient buffers. ``summed_dh``: dhidden is a sum over vocabulary slices (and ranks),
    kept in ``accum_dtype`` and rounded once at the end; else each row is one GEMM output (the
    GEMM sums in float32 itself), written once in the input dtype."""
    need_h, need_w, need_b = need
    dh = None
    if need_h:  # (N, H)
        dh = torch.zeros_like(h2, dtype=accum_dtype) if summed_dh else torch.empty_like(h2)
    dw = torch.zeros_like(weight, dtype=accum_dtype) if need_w else None  # (V/tp, H), summed
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
        if (need_b and bias is not None) else None
    return dh, dw, db


_ADDMM_DTYPE_OUT = [True]  # cuBLAS addmm with a float32 C and bf16/fp16 A, B (until it fails)


def _addmm_acc(acc, a, b):
    """acc += a @ b, summed in acc's dtype (float32 for a bf16 head by default): the products
    of 16-bit operands go into the float32 sum without a 16-bit rounding in between."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _ADDMM_DTYPE_OUT[0] and not torch.compiler.is_compiling():
        try:  # C (float32) += A @ B in one GEMM
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _ADDMM_DTYPE_OUT[0] = False
    if acc.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _accumulate(dlg, hc, w, dh_rows, dw_rows, db_rows, summed_dh):
    """One (token chunk, vocabulary slice): dlg (c, v), hc (c, H), w (v, H). dhidden rows of the
    chunk summed over slices, dweight/dbias rows of the slice summed over chunks."""
    if dh_rows is not None:
        if summed_dh:
            _addmm_acc(dh_rows, dlg, w)
        else:
            torch.mm(dlg, w, out=dh_rows)
    if dw_rows is not None:
        _addmm_acc(dw_rows, dlg.t(), hc)
    if db_rows is not None:
        db_rows += dlg.sum(0, dtype=torch.float32)


def _slice_logits(hc, weight, bias, vs, scale, softcap):
    w = weight[vs] if vs is not None else weight
    b = (bias[vs] if vs is not None else bias) if bias is not None else None
    lg, factor = _transform(_logits(hc, w, b), scale, softcap)
    return lg, factor, w


def _merge_stats(acc, st):
    """(4, c) local statistics of two vocabulary slices of the same rows -> those of both."""
    if acc is None:
        return st
    m = torch.maximum(acc[0], st[0])
    s = acc[1] * torch.exp(acc[0] - m) + st[1] * torch.exp(st[0] - m)
    return torch.stack([m, s, acc[2] + st[2], acc[3] + st[3]])


def _local_stats(hc, t, weight, bias, vslices, start, smooth, scale, softcap, triton_path):
    """(4, c) statistics of a token chunk over the local vocabulary, one slice at a time."""
    st = None
    for vs in vslices:
        lg, _, _ = _slice_logits(hc, weight, bias, vs if len(vslices) > 1 else None, scale,
                                 softcap)
        st = _merge_stats(st, row_stats(lg, t, start + vs.start, smooth, triton_path))
        del lg
    return st


def _grad_pass(hc, t, lse, coef, weight, bias, vslices, start, total, smoothing, z_loss, scale,
               softcap, triton_path, dh_rows, dw, db, summed_dh):
    """Gradient of a token chunk once its global lse is known: per vocabulary slice, the logits
    (again), their gradient in place, and the three gradient sums."""
    for vs in vslices:
        one = len(vslices) == 1
        lg, factor, w = _slice_logits(hc, weight, bias, None if one else vs, scale, softcap)
        lg = row_grad(lg, t, lse, coef, start + vs.start, total, smoothing, z_loss,
                      triton_path, inplace=True)  # (c, v)
        dlg = _chain(lg, factor, scale)
        del lg, factor
        _accumulate(dlg, hc, w, dh_rows, dw[vs] if dw is not None else None,
                    db[vs] if db is not None else None, summed_dh)
        del dlg


class _FusedLinearCEFn(torch.autograd.Function):
    """Two schedules:

    * ``grad_in_forward`` (reduction "mean"/"sum" with a gradient wanted): each chunk's logits
      are turned into their gradient in place by the one-pass cross-entropy kernel (statistics,
      loss and gradient in one program; with ``group`` the statistics cross the group first)
      and folded into the gradient buffers in the forward. The backward multiplies them by the
      incoming scalar, in place and as a no-op on the device when it is 1 (no host sync).
      Two matmuls and one logits-sized buffer per chunk; the collectives run per chunk.
    * otherwise (reduction "none", or no gradient): the forward keeps only per-row statistics
      and the backward recomputes each chunk's logits (one extra matmul per chunk), which keeps
      any per-row incoming gradient exact.

    With ``vocab_chunk`` smaller than the local vocabulary, a token chunk's logits are made one
    vocabulary slice at a time: statistics over all slices first, then each slice's logits
    again for its gradient (one extra matmul per slice in the forward-gradient schedule).

    ``dweight`` (and ``dbias``) are summed over token chunks, ``dhidden`` over vocabulary slices
    and ranks, in ``accum_dtype`` (float32 by default for a 16-bit head) and rounded to the
    input dtype once, at the end of the forward (``grad_in_forward``) or backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, smoothing, z_loss, reduction,
                group, chunk, vocab_chunk, triton_path, need, scale, softcap, accum_dtype, layout):
        h2 = rows_2d(hidden)  # (N, H)
        t = target.reshape(-1)  # (N,)
        n = h2.shape[0]
        start, total = layout if layout is not None else vocab_layout(weight.shape[0], group)
        vslices = _vocab_slices(weight.shape[0], vocab_chunk)
        summed_dh = len(vslices) > 1 or group is not None
        valid = t != ignore_index
        assert_targets_in_range(t, valid, total)
        n_valid = valid.sum()  # on the device
        mean = reduction == "mean"
        smooth = smoothing > 0
        ctx.grad_in_forward = reduction != "none" and any(need)
        ctx.args = (start, total, smoothing, z_loss, reduction, group, chunk, vslices,
                    triton_path, hidden.shape, scale, softcap, accum_dtype, summed_dh)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if ctx.grad_in_forward:
            coef = None
            if group is not None or not triton_path or len(vslices) > 1:
                coef = valid.float()  # d loss / d loss_i before the incoming gradient
                if mean:
                    coef = coef / n_valid.clamp(min=1)
            dh, dw, db = _grad_buffers(h2, weight, bias, need, accum_dtype, summed_dh)
            loss = h2.new_empty(n, dtype=torch.float32)
            for c0 in range(0, n, chunk):
                sl = slice(c0, c0 + chunk)
                hc = h2[sl]
                dh_rows = dh[sl] if dh is not None else None
                if coef is None:  # one kernel: loss rows, and the gradient over lg
                    lg, factor = _transform(_logits(hc, weight, bias), scale, softcap)
                    loss[sl] = _ce_chunk_inplace(lg, t[sl], n_valid, ignore_index, smoothing,
                                                 z_loss, mean)
                    dlg = _chain(lg, factor, scale)
                    del lg, factor
                    _accumulate(dlg, hc, weight, dh_rows, dw, db, summed_dh)
                    del dlg
                    continue
                if len(vslices) == 1:  # the chunk's logits made once, gradient in place
                    lg, factor = _transform(_logits(hc, weight, bias), scale, softcap)
                    lse, xt, sx = combine_stats(row_stats(lg, t[sl], start, smooth,
                                                          triton_path), group, smooth)
                    loss[sl] = row_loss(lse, xt, sx, valid[sl], total, smoothing, z_loss)
                    lg = row_grad(lg, t[sl], lse, coef[sl], start, total, smoothing, z_loss,
                                  triton_path, inplace=True)
                    dlg = _chain(lg, factor, scale)
                    del lg, factor
                    _accumulate(dlg, hc, weight, dh_rows, dw, db, summed_dh)
                    del dlg
                    continue
                st = _local_stats(hc, t[sl], weight, bias, vslices, start, smooth, scale,
                                  softcap, triton_path)
                lse, xt, sx = combine_stats(st, group, smooth)
                loss[sl] = row_loss(lse, xt, sx, valid[sl], total, smoothing, z_loss)
                _grad_pass(hc, t[sl], lse, coef[sl], weight, bias, vslices, start, total,
                           smoothing, z_loss, scale, softcap, triton_path, dh_rows, dw, db,
                           summed_dh)
            if dh is not None and group is not None:
                dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
            if dh is not None and dh.dtype != hidden.dtype:
                dh = dh.to(hidden.dtype)  # the one rounding of the summed gradient
            if dw is not None and dw.dtype != weight.dtype:
                dw = dw.to(weight.dtype)  # the one rounding of the summed gradient
            ctx.save_for_backward(dh, dw, db)
            ctx.used = False
            out = loss.sum() / n_valid if mean else loss.sum()
            return out.to(hidden.dtype)

        stats = h2.new_empty((4, n), dtype=torch.float32)  # local per-row stats, all chunks
        for c0 in range(0, n, chunk):
            stats[:, c0:c0 + chunk] = _local_stats(h2[c0:c0 + chunk], t[c0:c0 + chunk], weight,
                                                   bias, vslices, start, smooth, scale,
                                                   softcap, triton_path)
        lse, xt, sx = combine_stats(stats, group, smooth)  # one exchange, all chunks
        loss = row_loss(lse, xt, sx, valid, total, smoothing, z_loss)
        ctx.save_for_backward(h2, weight, bias, t, lse, valid)
        return _reduce(loss, valid, reduction, target.shape).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (start, total, smoothing, z_loss, reduction, group, chunk, vslices, triton_path, shape,
         scale, softcap, accum_dtype, summed_dh) = ctx.args
        nones = (None,) * 14
        if ctx.grad_in_forward:
            if ctx.used:
                raise RuntimeError("fused_linear_cross_entropy: backward through the same loss "
                                   "twice is not supported (its gradients are scaled in place)")
            ctx.used = True
            dh, dw, db = ctx.saved_tensors
            dh = scale_grad(dh, grad_out, triton_path).view(shape) if dh is not None else None
            dw = scale_grad(dw, grad_out, triton_path) if dw is not None else None
            db = (db * grad_out.float()).to(ctx.bias_dtype) if db is not None else None
            return (dh, dw, db) + nones
        h2, weight, bias, t, lse, valid = ctx.saved_tensors
        coef = grad_coef(grad_out, valid, reduction)  # (N,)
        dh, dw, db = _grad_buffers(h2, weight, bias, ctx.needs_input_grad[:3], accum_dtype,
                                   summed_dh)
        for c0 in range(0, h2.shape[0], chunk):
            sl = slice(c0, c0 + chunk)
            _grad_pass(h2[sl], t[sl], lse[sl], coef[sl], weight, bias, vslices, start, total,
                       smoothing, z_loss, scale, softcap, triton_path,
                       dh[sl] if dh is not None else None, dw, db, summed_dh)
        if dh is not None and group is not None:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        dh = dh.to(h2.dtype).view(shape) if dh is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return (dh, dw, db) + nones


def _ce_chunk_inplace(lg, t, n_valid, ignore_index, smoothing, z_loss, mean):
    """Loss rows of a chunk; its gradient overwrites ``lg`` (eager) — a traced call gets the
    gradient in a new buffer, copied back (functionalization does the same with the mutation)."""
    if torch.compiler.is_compiling():
        loss, _, grad = run_op("ce_fwd", lg, t, n_valid, ignore_index, smoothing, z_loss, mean,
                               True, False)  # targets checked once for all chunks
        lg.copy_(grad)
        return loss
    loss, _ = run_op("ce_fwd_inplace", lg, t, n_valid, ignore_index, smoothing, z_loss, mean,
                     False)
    return loss


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               reduction: str = "mean",
                               group: Optional[dist.ProcessGroup] = None,
                               chunk_size: Optional[int] = None, logit_scale: float = 1.0,
                               softcap: Optional[float] = None,
                               accum_dtype: Optional[torch.dtype] = None,
                               vocab_chunk_size: Optional[int] = None,
                               vocab_start: Optional[int] = None,
                               vocab_total: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden (..., H) @ weight (V or V/tp, H).T + bias`` against ``target
    (...)`` without materialising the logits; arguments as in ``cross_entropy``.

    ``chunk_size``: tokens per chunk (default: ~512 MiB of logits per chunk).
    ``vocab_chunk_size``: vocabulary rows (of the local slice) per logits block (default: all
    of them). Smaller blocks bound the logits buffer to ``chunk_size x vocab_chunk_size`` for
    very large vocabularies, at the price of one more matmul per block (statistics first,
    then the gradient from recomputed logits).
    ``accum_dtype``: dtype in which the gradients are summed — ``dweight``/``dbias`` over token
    chunks, ``dhidden`` over vocabulary blocks and ranks (``group``) — default float32 for a
    float16/bfloat16 head (one rounding at the end instead of one per term), else the weight's
    dtype. With one vocabulary block and no group, ``dhidden`` rows are single GEMM outputs
    (the GEMM sums in float32) written once in the input dtype.
    ``logit_scale`` / ``softcap``: the loss is taken on ``softcap * tanh(scale * z / softcap)``
    (or ``scale * z`` without ``softcap``), ``z = hidden @ weight.T + bias`` — Granite's logit
    scaling and Gemma-2/3's final soft-capping.
    ``vocab_start`` / ``vocab_total`` (with ``group``, both or neither): this rank's ``weight``
    holds ids ``[vocab_start, vocab_start + weight.shape[0])`` of a ``vocab_total`` vocabulary,
    for slices of unequal size (a vocabulary the group size does not divide; the slices must
    tile ``[0, vocab_total)``). Default: equal slices in rank order.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast the matmuls run in the autocast dtype, as nn.Linear's would; the casts
        # are differentiable, so float32 master weights get their gradients.
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, hidden) with hidden = {hidden.shape[-1]} "
                         f"(last dim of hidden), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (0 rows)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype or \
                bias.device != hidden.device:
            raise ValueError(f"bias must be ({weight.shape[0]},) {hidden.dtype} on "
                             f"{hidden.device}, got {tuple(bias.shape)} {bias.dtype} on "
                             f"{bias.device}")
    rows = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    check_ce_args("hidden", hidden, target, ignore_index, label_smoothing, z_loss, reduction,
                  rows)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows, weight.shape[0], hidden.element_size())
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if vocab_chunk_size is None:
        vocab_chunk_size = weight.shape[0]
    elif not isinstance(vocab_chunk_size, int) or vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be a positive int, got {vocab_chunk_size!r}")
    if not (isinstance(logit_scale, (int, float)) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if accum_dtype is None:
        accum_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) \
            else weight.dtype
    elif accum_dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"accum_dtype must be torch.float32 or the weight's dtype "
                         f"{weight.dtype}, got {accum_dtype}")
    layout = None
    if vocab_start is not None or vocab_total is not None:
        if group is None or vocab_start is None or vocab_total is None:
            raise ValueError("vocab_start and vocab_total go together, and only with group= "
                             f"(got vocab_start={vocab_start!r}, vocab_total={vocab_total!r}, "
                             f"group={'set' if group is not None else None})")
        if not (isinstance(vocab_start, int) and isinstance(vocab_total, int)
                and 0 <= vocab_start and vocab_start + weight.shape[0] <= vocab_total):
            raise ValueError(f"vocab_start={vocab_start!r} + weight rows {weight.shape[0]} must "
                             f"lie inside [0, vocab_total={vocab_total!r}]")
        layout = (vocab_start, vocab_total)
    need = (torch.is_grad_enabled() and hidden.requires_grad,
            torch.is_grad_enabled() and weight.requires_grad,
            torch.is_grad_enabled() and bias is not None and bias.requires_grad)
    return _FusedLinearCEFn.apply(hidden, weight, bias, target, ignore_index,
                                  float(label_smoothing), float(z_loss), reduction, group,
                                  chunk_size, vocab_chunk_size, use_triton(hidden), need,
                                  float(logit_scale),
                                  None if softcap is None else float(softcap), accum_dtype,
                                  layout)
