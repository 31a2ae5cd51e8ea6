"""Shared checks for the fused-kernel tests (imported by the test files of this folder).

Error bound, in the style of flash-attention's tests: against a float64 reference,
    err(ours) <= 2 * err(plain torch computed in the low-precision dtype) + atol * scale
where ``scale`` is the reference's magnitude. The Triton path is proven to have run by the
launch counters (``expect_launches``), so a silent fallback to the reference fails.
"""

from __future__ import annotations

import torch

from ichiban_comm.triton_kernels._dispatch import expect_launches  # noqa: F401 (re-export)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Slack on top of 2x torch's own error: a few units in the last place of each dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values as ``t`` but with a non-unit last stride (every other element of a buffer)."""
    u = t.new_empty(*t.shape, 2)[..., 0]
    u.copy_(t)
    assert not u.is_contiguous() or u.numel() <= 1
    return u


def row_strided(t: torch.Tensor) -> torch.Tensor:
    """Same values as ``t``, unit last stride but rows twice as far apart (like one half of
    ``gate_up(x).chunk(2, -1)``)."""
    u = torch.cat([t, torch.zeros_like(t)], dim=-1)[..., :t.shape[-1]]
    assert u.stride(-1) == 1 and (u.dim() < 2 or u.stride(-2) == 2 * t.shape[-1])
    return u


def assert_bound(what, ours, lowp, ref, dtype):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    ref = ref.detach().double()
    err = (ours.detach().cpu().double() - ref).abs().max().item()
    base = (lowp.detach().cpu().double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    atol = ATOL[dtype] * scale
    assert err == err, f"{what}: result has NaN"
    assert err <= 2 * base + atol, (f"{what} ({dtype}): max error {err:.3e} > 2 x torch's "
                                    f"{base:.3e} + {atol:.1e}")


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def run_case(ours, lowp, ref, inputs, dtype, grad=(), launches=(), transform=None, seed=0,
             device="cpu"):
    """Compare ``ours`` (inputs in ``dtype``), ``lowp`` (plain torch in ``dtype``) and ``ref``
    (float64) on the same values: forward outputs and gradients of the inputs in ``grad``.

    ``inputs``: float64 master tensors (non-tensors passed through). ``transform``: applied to
    the low-precision inputs of ``ours`` (e.g. ``noncontig``).
    """
    def make(dt, tf=None, dev=device):
        out = []
        for i, t in enumerate(inputs):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.to(device=dev, dtype=dt)
                if tf is not None and t.dim() > 0:
                    t = tf(t)
                if i in grad:
                    t = t.detach().requires_grad_()
            out.append(t)
        return out

    # the float64 reference runs on the CPU; ours and torch's low precision on ``device``
    a_ours, a_lowp, a_ref = make(dtype, transform), make(dtype), make(torch.float64, dev="cpu")
    with expect_launches(*[n for n in launches if not n.endswith("bwd")]):
        y_ours = _as_tuple(ours(*a_ours))
    y_lowp, y_ref = _as_tuple(lowp(*a_lowp)), _as_tuple(ref(*a_ref))
    gen = torch.Generator().manual_seed(seed + 1)
    dys = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in y_ref]
    for k, (yo, yl, yr) in enumerate(zip(y_ours, y_lowp, y_ref)):
        assert yo.dtype == dtype, f"output {k}: dtype {yo.dtype}, expected {dtype}"
        assert_bound(f"output {k}", yo, yl, yr, dtype)
    if not grad:
        return
    g = {}
    for name, args, ys in (("ours", a_ours, y_ours), ("lowp", a_lowp, y_lowp),
                           ("ref", a_ref, y_ref)):
        leaves = [args[i] for i in grad]
        outs = [y for y in ys if y.requires_grad]
        douts = [dy.to(device=y.device, dtype=y.dtype) for dy, y in zip(dys, ys)
                 if y.requires_grad]
        ctx = expect_launches(*[n for n in launches if n.endswith("bwd")]) \
            if name == "ours" else _null()
        with ctx:
            g[name] = torch.autograd.grad(outs, leaves, douts, allow_unused=False)
    for i, go, gl, gr in zip(grad, g["ours"], g["lowp"], g["ref"]):
        assert_bound(f"grad of input {i}", go, gl, gr, dtype)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def randn(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
