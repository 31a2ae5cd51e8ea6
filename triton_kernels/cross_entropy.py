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
``lse``, so it is written in the forward and the backward has no collective.

Without ``group`` one kernel does a row in one program: statistics (block-wise running max, one
``exp`` per element), loss and gradient, the gradient written into a buffer saved in place of
the logits, or over the logits themselves (``inplace=True``). The backward multiplies it by the
incoming gradient in place — on the device, returning at once when that is 1. The same kernels
serve ``fused_linear_cross_entropy`` chunk by chunk (in place on each chunk's logits).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._dispatch import count_launch, custom_op, rows_2d, run_op, tl, triton, use_triton
from ._launch import launch

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
def _row_stats_pass(base, V, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a row of V logits in blocks with a running max: (max, sum exp(x - max),
    row sum when SMOOTH), one exp per element plus one per block."""
    cols = tl.arange(0, BLOCK)
    m = tl.full((), _NEG_BIG, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    sx = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK):
        mask = v0 + cols < V
        x = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if SMOOTH:
            sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
    return m, s, sx


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGET, LOSS, LSE, GRAD, NVALID, BAD, stride, gstride, V,
                   ignore_index, inv_vocab, smoothing, z_loss, SMOOTH: tl.constexpr,
                   WRITE_GRAD: tl.constexpr, MEAN: tl.constexpr, CHECK: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One row, whole vocabulary: statistics, loss and (WRITE_GRAD) the gradient, one program.

    Pass 1 keeps a running max per block (one exp per element plus one per block); pass 2
    re-reads the row (mostly from L2: a row is at most a few hundred KiB) and writes
    d loss / d logits, already multiplied by 1 / (valid rows) for a mean. GRAD may be LOGITS
    itself (in place: each element is read before it is overwritten, by the same program).
    CHECK: a target outside [0, V) that is not ignore_index sets BAD (an atomic only then)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    tgt = tl.load(TARGET + row).to(tl.int64)
    valid = tgt != ignore_index
    if CHECK:
        if valid & ((tgt < 0) | (tgt >= V)):
            tl.atomic_max(BAD, 1)
    m, s, sx = _row_stats_pass(base, V, SMOOTH, BLOCK)
    lse = m + tl.log(s)
    inside = valid & (tgt >= 0) & (tgt < V)
    xt = tl.load(base + tl.where(inside, tgt, 0), mask=inside, other=0.0).to(tl.float32)
    loss = (1.0 - smoothing) * (lse - xt) + z_loss * lse * lse
    if SMOOTH:
        loss += smoothing * (lse - sx * inv_vocab)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        coef = tl.where(valid, 1.0, 0.0)
        if MEAN:  # (a valid row implies NVALID >= 1)
            coef = tl.where(valid, 1.0 / tl.maximum(tl.load(NVALID).to(tl.float32), 1.0), 0.0)
        scale = (1.0 + 2.0 * z_loss * lse) * coef
        off = smoothing * inv_vocab * coef
        hit = (1.0 - smoothing) * coef
        for v0 in range(0, V, BLOCK):
            idx = v0 + cols
            mask = idx < V
            x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * scale - off - tl.where(idx == tgt, hit, 0.0)
            tl.store(GRAD + row * gstride + idx, g.to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _ce_stats_kernel(LOGITS, TARGET, STATS, stride, N, V, vocab_start, SMOOTH: tl.constexpr,
                     BLOCK: tl.constexpr):
    """This rank's slice of a row -> (max, sum exp(x - max), target logit, row sum): block-wise
    running max, one exp per element. The global lse needs the group's numbers first."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    m, s, sx = _row_stats_pass(base, V, SMOOTH, BLOCK)
    local = tl.load(TARGET + row).to(tl.int64) - vocab_start
    inside = (local >= 0) & (local < V)
    xt = tl.load(base + tl.where(inside, local, 0), mask=inside, other=0.0).to(tl.float32)
    tl.store(STATS + row, m)
    tl.store(STATS + N + row, s)
    tl.store(STATS + 2 * N + row, tl.where(inside, xt, 0.0))
    tl.store(STATS + 3 * N + row, sx)


@triton.jit
def _ce_grad_kernel(LOGITS, TARGET, LSE, COEF, DLOGITS, stride, dstride, V, vocab_start,
                    inv_vocab_total, smoothing, z_loss, BLOCK: tl.constexpr):
    # The slice's gradient once the global lse is known (vocabulary-parallel path); DLOGITS may
    # be LOGITS (in place).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    lse = tl.load(LSE + row)
    coef = tl.load(COEF + row)
    local = tl.load(TARGET + row).to(tl.int64) - vocab_start
    scale = (1.0 + 2.0 * z_loss * lse) * coef
    off = smoothing * inv_vocab_total * coef
    hit = (1.0 - smoothing) * coef
    for v0 in range(0, V, BLOCK):
        idx = v0 + cols
        mask = idx < V
        x = tl.load(LOGITS + row * stride + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * scale - off - tl.where(idx == local, hit, 0.0)
        tl.store(DLOGITS + row * dstride + idx, g.to(DLOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(SRC, DST, G, n, ALWAYS: tl.constexpr, BLOCK: tl.constexpr):
    """DST = SRC * g for a device scalar g, flat. In place (SRC is DST) with ALWAYS=False the
    programs return at once when g == 1 (the usual loss.backward()): no pass, no host sync."""
    g = tl.load(G).to(tl.float32)
    if ALWAYS or g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(SRC + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DST + offs, (x * g).to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(X, G, stride, V, BLOCK: tl.constexpr):
    # X[row, :] *= g[row] in place (reduction="none": one incoming gradient per row)
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(G + row).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        idx = v0 + cols
        mask = idx < V
        x = tl.load(X + row * stride + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + row * stride + idx, (x * g).to(X.dtype.element_ty), mask=mask)


def _vocab_block(v: int, device: torch.device) -> int:
    # 4096 fp32 lanes per loop step on a GPU (with 8 warps: 16 per thread, enough loads in
    # flight, no register spill); the interpreter just wants few iterations.
    return max(16, min(triton.next_power_of_2(v), 4096 if device.type == "cuda" else 1 << 14))


def _fwd_launch(logits, target, n_valid, ignore_index, smoothing, z_loss, mean, grad, check):
    # logits (N, V) unit last stride, target (N,), n_valid () int64 -> loss, lse (N,) float32;
    # the gradient goes to ``grad`` (a (N, V) buffer, possibly logits itself) when given.
    # check: the target range is checked inside the kernel (one flag, one device-side assert:
    # three launches instead of the seven of the same check in torch ops)
    n, v = logits.shape
    loss = logits.new_empty(n, dtype=torch.float32)
    lse = logits.new_empty(n, dtype=torch.float32)
    if n:
        count_launch("cross_entropy_fwd")
        g = grad if grad is not None else logits
        bad = logits.new_zeros(1, dtype=torch.int32) if check else lse
        launch(_ce_fwd_kernel, (n,), logits, target, loss, lse, g, n_valid, bad, logits.stride(0),
               g.stride(0), v, ignore_index, 1.0 / v, smoothing, z_loss, SMOOTH=smoothing > 0,
               WRITE_GRAD=grad is not None, MEAN=mean, CHECK=check,
               BLOCK=_vocab_block(v, logits.device), num_warps=8)
        if check:
            torch._assert_async(bad[0] == 0, f"cross_entropy: a target id is outside [0, {v}) "
                                             "and is not ignore_index")
    return loss, lse


def _ce_fwd_fake(logits, target, n_valid, ignore_index, smoothing, z_loss, mean, want_grad,
                 check):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            torch.empty_like(logits) if want_grad else logits.new_empty(0))


@custom_op("ce_fwd", _ce_fwd_fake)
def _ce_fwd(logits: torch.Tensor, target: torch.Tensor, n_valid: torch.Tensor, ignore_index: int,
            smoothing: float, z_loss: float, mean: bool, want_grad: bool, check: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # -> per-row loss (N,), lse (N,), and a new (N, V) gradient buffer (empty unless want_grad)
    grad = torch.empty_like(logits) if want_grad else logits.new_empty(0)
    loss, lse = _fwd_launch(logits, target, n_valid, ignore_index, smoothing, z_loss, mean,
                            grad if want_grad else None, check)
    return loss, lse, grad


def _ce_fwd_inplace_fake(logits, target, n_valid, ignore_index, smoothing, z_loss, mean, check):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@custom_op("ce_fwd_inplace", _ce_fwd_inplace_fake, mutates=("logits",))
def _ce_fwd_inplace(logits: torch.Tensor, target: torch.Tensor, n_valid: torch.Tensor,
                    ignore_index: int, smoothing: float, z_loss: float, mean: bool, check: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    # as ce_fwd, the gradient overwriting the logits (declared: the op mutates ``logits``)
    return _fwd_launch(logits, target, n_valid, ignore_index, smoothing, z_loss, mean, logits,
                       check)


@custom_op("ce_stats", lambda logits, target, vocab_start, smooth:
           logits.new_empty((4, logits.shape[0]), dtype=torch.float32))
def _ce_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, smooth: bool
              ) -> torch.Tensor:
    # logits (N, Vl) unit last stride, target (N,) -> (4, N) float32
    n, v = logits.shape
    stats = logits.new_empty((4, n), dtype=torch.float32)
    if n:
        count_launch("cross_entropy_fwd")
        launch(_ce_stats_kernel, (n,), logits, target, stats, logits.stride(0), n, v, vocab_start,
               SMOOTH=smooth, BLOCK=_vocab_block(v, logits.device), num_warps=8)
    return stats


def _grad_launch(logits, target, lse, coef, vocab_start, vocab_total, smoothing, z_loss, out):
    n, v = logits.shape
    if n:
        count_launch("cross_entropy_grad")
        launch(_ce_grad_kernel, (n,), logits, target, lse, coef, out, logits.stride(0),
               out.stride(0), v, vocab_start, 1.0 / vocab_total, smoothing, z_loss,
               BLOCK=_vocab_block(v, logits.device), num_warps=8)


@custom_op("ce_grad", lambda logits, target, lse, coef, vocab_start, vocab_total, smoothing,
           z_loss: torch.empty_like(logits))
def _ce_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
             vocab_start: int, vocab_total: int, smoothing: float, z_loss: float
             ) -> torch.Tensor:
    # logits (N, Vl), target/lse/coef (N,) -> dlogits (N, Vl) in logits' dtype
    dlogits = torch.empty_like(logits)
    _grad_launch(logits, target, lse, coef, vocab_start, vocab_total, smoothing, z_loss, dlogits)
    return dlogits


@custom_op("ce_grad_inplace", lambda logits, target, lse, coef, vocab_start, vocab_total,
           smoothing, z_loss: None, mutates=("logits",))
def _ce_grad_inplace(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                     coef: torch.Tensor, vocab_start: int, vocab_total: int, smoothing: float,
                     z_loss: float) -> None:
    _grad_launch(logits, target, lse, coef, vocab_start, vocab_total, smoothing, z_loss, logits)


@custom_op("scale_inplace", lambda x, g: None, mutates=("x",))
def _scale_inplace(x: torch.Tensor, g: torch.Tensor) -> None:
    # x (contiguous) *= g (a 0-dim or 1-element tensor); returns at once on the device if g == 1
    if x.numel():
        block = 4096
        launch(_scale_kernel, (triton.cdiv(x.numel(), block),), x, x, g, x.numel(), ALWAYS=False,
               BLOCK=block, num_warps=8)


@custom_op("scale_cast", lambda src, g, dtype: torch.empty_like(src, dtype=dtype))
def _scale_cast(src: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (contiguous) src * g as a new tensor of ``dtype``: the float32 accumulator of a weight
    # gradient, scaled and rounded in the one pass the rounding needs anyway
    out = torch.empty_like(src, dtype=dtype)
    if src.numel():
        count_launch("scale")
        block = 4096
        launch(_scale_kernel, (triton.cdiv(src.numel(), block),), src, out, g, src.numel(),
               ALWAYS=True, BLOCK=block, num_warps=8)
    return out


@custom_op("scale_rows_inplace", lambda x, g: None, mutates=("x",))
def _scale_rows_inplace(x: torch.Tensor, g: torch.Tensor) -> None:
    n, v = x.shape
    if n:
        count_launch("cross_entropy_bwd")
        launch(_scale_rows_kernel, (n,), x, g, x.stride(0), v, BLOCK=_vocab_block(v, x.device),
               num_warps=8)


def scale_grad(x, g, triton_path, counter="scale"):
    """``x * g`` for a gradient ``x`` this op owns and the incoming scalar gradient ``g``.

    Eager Triton path: in place, and a no-op on the device when ``g == 1`` (no host sync).
    Traced (torch.compile) or torch path: a new tensor — a traced backward never mutates a
    saved buffer nor returns one that a graph input aliases."""
    g = g.reshape(())
    if triton_path and not torch.compiler.is_compiling() and x.is_contiguous():
        count_launch(counter)
        run_op("scale_inplace", x, g.float())
        return x
    return (x * g).to(x.dtype)


def row_stats(logits, target, vocab_start, smooth, triton_path):
    if triton_path:
        return run_op("ce_stats", logits, target, vocab_start, smooth)
    return _stats_torch(logits, target, vocab_start, smooth)


def row_grad(logits, target, lse, coef, vocab_start, vocab_total, smoothing, z_loss,
             triton_path, inplace=False):
    """d loss / d logits of a (slice of) rows once the global lse is known. ``inplace``: into
    ``logits`` (eager only; a traced call always gets a new buffer)."""
    if triton_path:
        if inplace and not torch.compiler.is_compiling():
            run_op("ce_grad_inplace", logits, target, lse, coef, vocab_start, vocab_total,
                   smoothing, z_loss)
            return logits
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
    """The gradient is made in the forward, while the logits are being read anyway: one kernel
    (statistics, loss, gradient) without ``group``; with ``group`` the slice statistics, the two
    all-reduces, then the gradient kernel. Only the gradient buffer is saved (``inplace=True``:
    the logits' own buffer), and the backward multiplies it by the incoming gradient in place —
    a no-op on the device when that is 1. Hence backward through one loss works once."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, smoothing, z_loss, reduction, group,
                triton_path, loss_dtype, inplace):
        lg = rows_2d(logits)  # (N, V/tp)
        t = target.reshape(-1)  # (N,)
        start, total = vocab_layout(lg.shape[1], group)
        valid = t != ignore_index
        one_kernel = group is None and triton_path  # it checks the target range itself
        if not one_kernel:
            assert_targets_in_range(t, valid, total)
        n_valid = valid.sum()  # stays on the device
        want_grad = ctx.needs_input_grad[0]
        mean = reduction == "mean"
        # a traced graph never writes into its input: inplace is an eager-mode memory saving
        inplace = inplace and want_grad and not torch.compiler.is_compiling()
        grad = None
        if one_kernel:
            if inplace:
                loss, _ = run_op("ce_fwd_inplace", lg, t, n_valid, ignore_index, smoothing,
                                 z_loss, mean, True)
                grad = lg
            else:
                loss, _, grad = run_op("ce_fwd", lg, t, n_valid, ignore_index, smoothing,
                                       z_loss, mean, want_grad, True)
        else:
            stats = row_stats(lg, t, start, smoothing > 0, triton_path)
            lse, xt, sx = combine_stats(stats, group, smoothing > 0)
            loss = row_loss(lse, xt, sx, valid, total, smoothing, z_loss)
            if want_grad:
                coef = valid.float()
                if mean:
                    coef = coef / n_valid.clamp(min=1)
                grad = row_grad(lg, t, lse, coef, start, total, smoothing, z_loss, triton_path,
                                inplace)
        if inplace and grad is not None and grad.data_ptr() == logits.data_ptr():
            # the logits' buffer now holds the gradient: bump its version so that autograd
            # refuses (loudly) any other use of the old values that it saved for a backward
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad)
        ctx.args = (reduction, triton_path, logits.shape)
        ctx.used = False
        if reduction == "none":
            out = loss.view(target.shape)
        else:
            out = loss.sum() / n_valid if mean else loss.sum()  # all ignored: nan, as torch
        return out.to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        reduction, triton_path, shape = ctx.args
        if ctx.used:
            raise RuntimeError("cross_entropy: backward through the same loss twice is not "
                               "supported (its gradient is made in the forward and scaled in "
                               "place)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if reduction == "none":
            g = grad_out.reshape(-1).float().contiguous()  # (N,); may arrive expanded
            if triton_path and not torch.compiler.is_compiling():
                run_op("scale_rows_inplace", grad, g)
            else:
                grad = (grad * g[:, None]).to(grad.dtype)
        else:
            grad = scale_grad(grad, grad_out, triton_path, "cross_entropy_bwd")
        return grad.view(shape), None, None, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                  group: Optional[dist.ProcessGroup] = None,
                  loss_dtype: Optional[torch.dtype] = None, inplace: bool = False
                  ) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(..., V)`` (or ``(..., V/tp)`` with ``group``) against
    ``target`` ``(...)`` of global ids; see the module docstring. Returns the loss in logits'
    dtype, or ``loss_dtype`` (``reduction="none"``: target's shape, ignored rows 0).

    ``inplace=True`` (eager mode): the gradient is written over ``logits`` during the forward,
    so no second logits-sized buffer exists; ``logits`` must not be used afterwards (it holds
    the gradient). Under torch.compile it is ignored (a traced graph never writes its input).
    Backward through the returned loss works once (the gradient is scaled in place)."""
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
                                 float(z_loss), reduction, group, triton_path, loss_dtype,
                                 bool(inplace))
