"""Vocabulary-parallel cross-entropy and fused linear cross-entropy over 2 and 4 CPU processes
(Gloo) equal the unsharded loss and gradients, on the Triton (interpreter) path and on the
plain-torch path.

Run: python -m pytest -q tests/triton_kernels/test_parallel_cross_entropy.py
"""

import os

import pytest
import torch

from spawn import run_workers

N, V, H = 6, 24, 16  # V divisible by 2 and 4: equal vocabulary slices in rank order
CE_CONFIGS = [(0.0, 0.0, "mean"), (0.1, 1e-3, "none")]
# "sum": gradients made in the forward; "none": logits recomputed in the backward
FLCE_CONFIGS = [(0.1, 1e-3, "sum"), (0.0, 1e-3, "none")]


def _inputs():
    gen = torch.Generator().manual_seed(123)
    logits = torch.randn(N, V, generator=gen) * 3
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.3
    bias = torch.randn(V, generator=gen)
    target = torch.randint(0, V, (N,), generator=gen)
    target[1] = -100
    return logits, hidden, weight, bias, target


def _np(*tensors):
    # numpy arrays travel through the result queue by value (tensors would share memory with a
    # process that has exited)
    return tuple(t.detach().numpy().copy() for t in tensors)


def _body(rank, world_size):
    """Each rank computes its slice; returns loss and gradient slices per path and config."""
    import torch.distributed as dist

    from ichiban_comm.triton_kernels import (cross_entropy, fused_linear_cross_entropy,
                                             launch_counts)

    logits, hidden, weight, bias, target = _inputs()
    vs = V // world_size
    sl = slice(rank * vs, (rank + 1) * vs)
    group = dist.group.WORLD
    out = {}
    for path in ("triton", "torch"):
        os.environ["ICHIBAN_KERNELS"] = "reference" if path == "torch" else ""
        for eps, z, red in CE_CONFIGS:
            x = logits[:, sl].clone().requires_grad_()
            loss = cross_entropy(x, target, label_smoothing=eps, z_loss=z, reduction=red,
                                 group=group)
            loss.backward(torch.ones_like(loss) * 0.7)
            out[(path, "ce", eps, z, red)] = _np(loss, x.grad)
        for eps, z, red in FLCE_CONFIGS:
            for vb in (None, 5):  # 5: the local slice in vocabulary blocks (last one short)
                h = hidden.clone().requires_grad_()
                w = weight[sl].clone().requires_grad_()
                b = bias[sl].clone().requires_grad_()
                loss = fused_linear_cross_entropy(h, w, target, b, label_smoothing=eps,
                                                  z_loss=z, reduction=red, group=group,
                                                  chunk_size=4, vocab_chunk_size=vb)
                loss.backward(torch.ones_like(loss) * 0.7)
                out[(path, "flce" if vb is None else "flce_vb", red)] = _np(loss, h.grad,
                                                                           w.grad, b.grad)
        # Unequal slices (vocab_start / vocab_total): the first V - 1 ids in torch.chunk's
        # layout, as a vocabulary that the group size does not divide is split.
        vu = V - 1
        c = -(-vu // world_size)
        lo, hi = min(rank * c, vu), min((rank + 1) * c, vu)
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        b = bias[lo:hi].clone().requires_grad_()
        tu = target.masked_fill(target >= vu, 3)
        loss = fused_linear_cross_entropy(h, w, tu, b, label_smoothing=0.1, z_loss=1e-3,
                                          reduction="sum", group=group, chunk_size=4,
                                          vocab_start=lo, vocab_total=vu)
        loss.backward(torch.ones_like(loss) * 0.7)
        out[(path, "flce_uneven")] = _np(loss, h.grad, w.grad, b.grad)
    out["launches"] = launch_counts()
    return out


def _full_reference():
    from ichiban_comm.triton_kernels.cross_entropy import cross_entropy_reference

    logits, hidden, weight, bias, target = (t.double() if t.is_floating_point() else t
                                            for t in _inputs())
    ref = {}
    for eps, z, red in CE_CONFIGS:
        x = logits.clone().requires_grad_()
        loss = cross_entropy_reference(x, target, -100, eps, z, red)
        loss.backward(torch.ones_like(loss) * 0.7)
        ref[("ce", eps, z, red)] = (loss.detach(), x.grad)
    for eps, z, red in FLCE_CONFIGS:
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = cross_entropy_reference(h @ w.t() + b, target, -100, eps, z, red)
        loss.backward(torch.ones_like(loss) * 0.7)
        ref[("flce", red)] = (loss.detach(), h.grad, w.grad, b.grad)
    vu = V - 1
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight[:vu], bias[:vu]))
    tu = target.masked_fill(target >= vu, 3)
    loss = cross_entropy_reference(h @ w.t() + b, tu, -100, 0.1, 1e-3, "sum")
    loss.backward(torch.ones_like(loss) * 0.7)
    ref["flce_uneven"] = (loss.detach(), h.grad, w.grad, b.grad)
    return ref


def _close(what, got, want):
    got = torch.as_tensor(got)
    # float32 sharded vs float64 unsharded: a few float32 ulps of the magnitude
    tol = 2e-6 * max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


# 4 processes on 2 cores through the interpreter: ~40 s, so marked slow (2 processes: ~20 s)
@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_vocab_parallel_equals_unsharded(world_size):
    results = run_workers(_body, world_size, backend="gloo", timeout=180)
    results = [{k: tuple(torch.from_numpy(a) for a in v) if isinstance(v, tuple) else v
                for k, v in res.items()} for res in results]
    ref = _full_reference()
    for path in ("triton", "torch"):
        for eps, z, red in CE_CONFIGS:
            want_loss, want_grad = ref[("ce", eps, z, red)]
            for r, res in enumerate(results):
                loss, grad = res[(path, "ce", eps, z, red)]
                _close(f"{path} ce{eps, z, red} loss rank {r}", loss, want_loss)
            grad = torch.cat([res[(path, "ce", eps, z, red)][1] for res in results], dim=1)
            _close(f"{path} ce{eps, z, red} dlogits", grad, want_grad)
        for (_, _, red), kind in ((c, k) for c in FLCE_CONFIGS for k in ("flce", "flce_vb")):
            want, key = ref[("flce", red)], (path, kind, red)
            for r, res in enumerate(results):
                loss, dh, _, _ = res[key]
                _close(f"{path} {kind} {red} loss rank {r}", loss, want[0])
                _close(f"{path} {kind} {red} dhidden rank {r}", dh, want[1])
            _close(f"{path} {kind} {red} dweight", torch.cat([res[key][2] for res in results]),
                   want[2])
            _close(f"{path} {kind} {red} dbias", torch.cat([res[key][3] for res in results]),
                   want[3])
        want, key = ref["flce_uneven"], (path, "flce_uneven")
        for r, res in enumerate(results):
            _close(f"{path} flce uneven loss rank {r}", res[key][0], want[0])
            _close(f"{path} flce uneven dhidden rank {r}", res[key][1], want[1])
        _close(f"{path} flce uneven dweight", torch.cat([res[key][2] for res in results]),
               want[2])
        _close(f"{path} flce uneven dbias", torch.cat([res[key][3] for res in results]), want[3])
    for r, res in enumerate(results):
        launched = res["launches"]
        assert launched.get("cross_entropy_fwd", 0) > 0 and \
            launched.get("cross_entropy_bwd", 0) > 0, f"rank {r}: Triton path did not run"
