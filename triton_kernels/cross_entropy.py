"""Cross-entropy over a vocabulary that may be split across a tensor-parallel group.

    loss_i = (1 - eps) * (lse_i - x_i[t_i]) + eps * (lse_i - mean_j x_ij) + z * lse_i^2

(``eps`` = label_smoothing, ``z`` = z_loss, ``lse`` = logsumexp over the whole vocabulary; rows
whose target is ``ignore_index`` give 0 and do not count in the mean.)

With ``group``, ``logits`` is this rank's slice ``(N, V/tp)`` of the vocabulary (rank order) and
``target`` holds global ids. Each rank reduces its slice to four numbers per row — max, sum of
exp, target logit (0 unless the target is in the slice) and, only with label smoothing, the row
sum — and only those cross the group (one MAX all-reduce of ``(N,)``, one SUM all-reduce of
``(2, N)``, ``(3, N)`` with label smoothing).
The gradient of the slice is then local: ``softmax - onehot`` needs nothing more than the global
``lse``.

The same row statistics and gradient are used chunk by chunk by ``fused_linear_cross_entropy``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._dispatch import count_launch, custom_op, rows_2d, run_op, tl, triton, use_triton

__all__ = ["cross_entropy", "cross_entropy_reference"]

# Finite "minus infinity" seeding the running max: exp(_NEG_BIG - m) == 0 without inf - inf.
_NEG_BIG = tl.constexpr(-3.0e38)


# ----------------------------------------------------------------------------- reference
def cross_entropy_reference(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                            reduction="mean", loss_dtype=None):
    """Plain torch, unsharded: the test oracle (float64 in, float64 math)."""
    lf = logits if logits.dtype == torch.float64 else logits.float()
    lf = lf.reshape(-1, lf.shape[-1])
    t = target.reshape(-1)
    lse = torch.logsumexp(lf, dim=-1)
    valid = t != ignore_index
    xt = lf.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - xt) + label_smoothing * (lse - lf.mean(-1))
    loss = torch.where(valid, loss + z_loss * lse * lse, 0.0)
    return _reduce(loss, valid, reduction, target.shape).to(loss_dtype or logits.dtype)


def _reduce(loss, valid, reduction, shape):
    if reduction == "none":
        return loss.view(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()  # all rows ignored -> nan, as torch does


# ----------------------------------------------------------------------------- torch row ops
def _stats_torch(logits, target, vocab_start, smooth):
    # logits (N, Vl) -> (4, N) float32: max, sum exp(x - max), target logit, row sum
    lf = logits.float()
    m = lf.max(dim=1).values
    s = torch.exp(lf - m[:, None]).sum(1)
    local = target - vocab_start
    inside = (local >= 0) & (local < lf.shape[1])
    xt = torch.where(inside, lf.gather(1, torch.where(inside, local, 0)[:, None])[:, 0], 0.0)
    sx = lf.sum(1) if smooth else torch.zeros_like(m)
    return torch.stack([m, s, xt, sx])


def _grad_torch(logits, target, lse, coef, vocab_start, vocab_total, smoothing, z_loss):
    # d loss / d logits for the slice: coef * (p * (1 + 2 z lse) - eps / V - (1 - eps) onehot)
    lf = logits.float()
    p = torch.exp(lf - lse[:, None])
    g = p * (1.0 + 2.0 * z_loss * lse)[:, None] - smoothing / vocab_total
    local = target - vocab_start
    cols = torch.arange(lf.shape[1], device=lf.device)
    g = g - (1.0 - smoothing) * (cols[None, :] == local[:, None])
    return (g * coef[:, None]).to(logits.dtype)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _ce_stats_kernel(LOGITS, TARGET, STATS, stride, N, V, vocab_start, SMOOTH: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    # Per-lane online max / sum-exp, folded into one number per row at the end.
    m = tl.full([BLOCK], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    sx = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        mask = v0 + cols < V
        x = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        if SMOOTH:
            sx += tl.where(mask, x, 0.0)
    mx = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - mx), axis=0)
    local = tl.load(TARGET + row).to(tl.int64) - vocab_start
    inside = (local >= 0) & (local < V)
    xt = tl.load(base + tl.where(inside, local, 0), mask=inside, other=0.0).to(tl.float32)
    tl.store(STATS + row, mx)
    tl.store(STATS + N + row, total)
    tl.store(STATS + 2 * N + row, tl.where(inside, xt, 0.0))
    tl.store(STATS + 3 * N + row, tl.sum(sx, axis=0))


@triton.jit
def _ce_grad_kernel(LOGITS, TARGET, LSE, COEF, DLOGITS, stride, dstride, V, vocab_start,
                    inv_vocab_total, smoothing, z_loss, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    lse = tl.load(LSE + row)
    coef = tl.load(COEF + row)
    local = tl.load(TARGET + row).to(tl.int64) - vocab_start
    scale = 1.0 + 2.0 * z_loss * lse
    for v0 in range(0, V, BLOCK):
        idx = v0 + cols
        mask = idx < V
        x = tl.load(LOGITS + row * stride + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * scale - smoothing * inv_vocab_total
        g = g - tl.where(idx == local, 1.0 - smoothing, 0.0)
        tl.store(DLOGITS + row * dstride + idx, (g * coef).to(DLOGITS.dtype.element_ty),
                 mask=mask)


def _vocab_block(v: int, device: torch.device) -> int:
    # 4096 fp32 lanes per loop step on a GPU (with 8 warps: 16 per thread, enough loads in
    # flight, no register spill); the interpreter just wants few iterations.
    return max(16, min(triton.next_power_of_2(v), 4096 if device.type == "cuda" else 1 << 14))


@custom_op("ce_stats", lambda logits, target, vocab_start, smooth:
           logits.new_empty((4, logits.shape[0]), dtype=torch.float32))
def _ce_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, smooth: bool
              ) -> torch.Tensor:
    # logits (N, Vl) unit last stride, target (N,) -> (4, N) float32
    n, v = logits.shape
    stats = logits.new_empty((4, n), dtype=torch.float32)
    if n:
        count_launch("cross_entropy_fwd")
        _ce_stats_kernel[(n,)](logits, target, stats, logits.stride(0), n, v, vocab_start,
                               SMOOTH=smooth, BLOCK=_vocab_block(v, logits.device), num_warps=8)
    return stats


@custom_op("ce_grad", lambda logits, target, lse, coef, vocab_start, vocab_total, smoothing,
           z_loss: torch.empty_like(logits))
def _ce_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
             vocab_start: int, vocab_total: int, smoothing: float, z_loss: float
             ) -> torch.Tensor:
    # logits (N, Vl), target/lse/coef (N,) -> dlogits (N, Vl) in logits' dtype
    n, v = logits.shape
    dlogits = torch.empty_like(logits)
    if n:
        count_launch("cross_entropy_bwd")
        _ce_grad_kernel[(n,)](logits, target, lse, coef, dlogits, logits.stride(0),
                              dlogits.stride(0), v, vocab_start, 1.0 / vocab_total, smoothing,
                              z_loss, BLOCK=_vocab_block(v, logits.device), num_warps=8)
    return dlogits


def row_stats(logits, target, vocab_start, smooth, triton_path):
    if triton_path:
        return run_op("ce_stats", logits, target, vocab_start, smooth)
    return _stats_torch(logits, target, vocab_start, smooth)


def row_grad(logits, target, lse, coef, vocab_start, vocab_total, smoothing, z_loss,
             triton_path):
    if triton_path:
        return run_op("ce_grad", logits, target, lse, coef, vocab_start, vocab_total,
                      smoothing, z_loss)
    return _grad_torch(logits, target, lse, coef, vocab_start, vocab_total, smoothing, z_loss)


# ----------------------------------------------------------------------------- shared row math
def combine_stats(stats, group, smooth=True):
    """(4, N) local stats -> global (lse, target logit, row sum), all (N,) float32.

    The row sum crosses the group only when ``smooth`` (label smoothing needs it)."""
    m, s, xt, sx = stats
    if group is not None:
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
        parts = [s * torch.exp(m - gm), xt] + ([sx] if smooth else [])
        rest = torch.stack(parts)  # (2 or 3, N)
        dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=group)
        m, s, xt = gm, rest[0], rest[1]
        sx = rest[2] if smooth else sx
    return m + torch.log(s), xt, sx


def row_loss(lse, xt, sx, valid, vocab_total, smoothing, z_loss):
    loss = (1.0 - smoothing) * (lse - xt)
    if smoothing:
        loss = loss + smoothing * (lse - sx / vocab_total)
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def grad_coef(grad_out, valid, reduction):
    """Per-row weight of d loss_i / d logits_i: grad_out (scalar or (N,)), masked, / count."""
    g = grad_out.float().reshape(-1) if reduction == "none" else grad_out.float()
    if reduction == "mean":
        g = g / valid.sum()
    return torch.where(valid, g, 0.0)  # (N,)


def vocab_layout(v_local, group):
    """(vocab_start, vocab_total) of this rank's slice; slices are equal and in rank order."""
    if group is None:
        return 0, v_local
    return dist.get_rank(group) * v_local, v_local * dist.get_world_size(group)


def check_ce_args(name, x, target, ignore_index, label_smoothing, z_loss, reduction, rows):
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 or int32 tensor, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but {name} is on {x.device}")
    if target.numel() != rows:
        raise ValueError(f"target must hold one id per row of {name} ({rows}), got shape "
                         f"{tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def assert_targets_in_range(target, valid, vocab_total):
    # Device-side check: no host sync on a GPU; an out-of-range id fails loudly, not silently.
    bad = (valid & ((target < 0) | (target >= vocab_total))).any()
    torch._assert_async(~bad, f"cross_entropy: a target id is outside [0, {vocab_total}) and "
                              "is not ignore_index")


# ----------------------------------------------------------------------------- autograd
class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, smoothing, z_loss, reduction, group,
                triton_path, loss_dtype):
        lg = rows_2d(logits)  # (N, V/tp)
        t = target.reshape(-1)  # (N,)
        start, total = vocab_layout(lg.shape[1], group)
        valid = t != ignore_index
        assert_targets_in_range(t, valid, total)
        stats = row_stats(lg, t, start, smoothing > 0, triton_path)
        lse, xt, sx = combine_stats(stats, group, smoothing > 0)
        loss = row_loss(lse, xt, sx, valid, total, smoothing, z_loss)
        ctx.save_for_backward(lg, t, lse, valid)
        ctx.args = (start, total, smoothing, z_loss, reduction, triton_path, logits.shape)
        return _reduce(loss, valid, reduction, target.shape).to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        lg, t, lse, valid = ctx.saved_tensors
        start, total, smoothing, z_loss, reduction, triton_path, shape = ctx.args
        coef = grad_coef(grad_out, valid, reduction)
        d = row_grad(lg, t, lse, coef, start, total, smoothing, z_loss, triton_path)
        return d.view(shape), None, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                  group: Optional[dist.ProcessGroup] = None,
                  loss_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(..., V)`` (or ``(..., V/tp)`` with ``group``) against
    ``target`` ``(...)`` of global ids; see the module docstring. Returns the loss in logits'
    dtype, or ``loss_dtype`` (``reduction="none"``: target's shape, ignored rows 0)."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        raise TypeError("logits must be a float16, bfloat16 or float32 tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., vocab) with vocab > 0, got {tuple(logits.shape)}")
    rows = logits.numel() // logits.shape[-1]
    check_ce_args("logits", logits, target, ignore_index, label_smoothing, z_loss, reduction,
                  rows)
    loss_dtype = logits.dtype if loss_dtype is None else loss_dtype
    if loss_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"loss_dtype must be a float dtype (16/32-bit), got {loss_dtype}")
    triton_path = use_triton(logits)
    if group is None and not triton_path:
        return cross_entropy_reference(logits, target, ignore_index, label_smoothing, z_loss,
                                       reduction, loss_dtype)
    return _CrossEntropyFn.apply(logits, target, ignore_index, float(label_smoothing),
                                 float(z_loss), reduction, group, triton_path, loss_dtype)
