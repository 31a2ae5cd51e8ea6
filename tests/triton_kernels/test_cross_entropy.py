"""Cross-entropy (ignore_index, label smoothing, z-loss, reductions) through the Triton
interpreter vs a float64 reference. The vocabulary-parallel path is in
test_parallel_cross_entropy.py.

Run: python -m pytest -q tests/triton_kernels/test_cross_entropy.py
"""

import pytest
import torch

from ichiban_comm.triton_kernels import cross_entropy
from ichiban_comm.triton_kernels.cross_entropy import cross_entropy_reference
from kernels_testlib import DTYPES, expect_launches, noncontig, randn, run_case

LAUNCHES = ("cross_entropy_fwd", "cross_entropy_bwd")
CONFIGS = [(0.0, 0.0, "mean"), (0.1, 1e-3, "sum"), (0.2, 0.0, "none")]


def lowp_cross_entropy(x, t, eps, z, reduction, ignore_index=-100):
    """Plain torch, every step in x's dtype (the low-precision baseline of the bound)."""
    x2, t1 = x.reshape(-1, x.shape[-1]), t.reshape(-1)
    valid = t1 != ignore_index
    lse = torch.logsumexp(x2, -1)
    xt = x2.gather(1, torch.where(valid, t1, 0)[:, None])[:, 0]
    loss = (1 - eps) * (lse - xt) + eps * (lse - x2.mean(-1)) + z * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.view(t.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def targets(shape, vocab, seed, ignore=(1,)):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, shape, generator=gen)
    flat = t.view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    return t


def _case(x, t, eps, z, red, dtype, transform=None):
    run_case(lambda x: cross_entropy(x, t, label_smoothing=eps, z_loss=z, reduction=red),
             lambda x: lowp_cross_entropy(x, t, eps, z, red),
             lambda x: cross_entropy_reference(x, t, -100, eps, z, red), [x], dtype, grad=(0,),
             launches=LAUNCHES, transform=transform)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps,z,red", CONFIGS)
def test_cross_entropy(dtype, eps, z, red):
    x = randn(7, 123, seed=1, scale=3)
    _case(x, targets((7,), 123, 2), eps, z, red, dtype)


def test_cross_entropy_one_row_3d_and_noncontiguous():
    _case(randn(1, 50, seed=3), targets((1,), 50, 4, ignore=()), 0.0, 0.0, "mean",
          torch.float32)
    _case(randn(2, 3, 37, seed=5), targets((2, 3), 37, 6), 0.1, 1e-2, "none", torch.float32)
    _case(randn(5, 40, seed=7), targets((5,), 40, 8), 0.05, 0.0, "mean", torch.float32,
          transform=noncontig)


def test_cross_entropy_vocab_larger_than_one_block():
    # 17000 > the 16384-wide interpreter block: the online max / sum-exp loop runs twice
    _case(randn(2, 17000, seed=9, scale=4), targets((2,), 17000, 10, ignore=()), 0.1, 1e-3,
          "mean", torch.float32)


def test_cross_entropy_all_ignored_and_empty():
    x = torch.randn(3, 10, requires_grad=True)
    t = torch.full((3,), -100)
    loss = cross_entropy(x, t)
    assert torch.isnan(loss) and torch.isnan(torch.nn.functional.cross_entropy(x, t))
    assert cross_entropy(x, t, reduction="sum").item() == 0.0
    e = cross_entropy(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), reduction="none")
    assert e.shape == (0,)


def test_cross_entropy_bad_arguments():
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="target must be an int64 or int32"):
        cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="target must hold one id per row"):
        cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="reduction must be"):
        cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(TypeError, match="logits must be a float16"):
        cross_entropy(x.double(), t)
    with pytest.raises(RuntimeError, match="outside"):
        cross_entropy(x, torch.tensor([0, 1, 10, 2]))


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_cross_entropy_inplace_writes_the_gradient_over_the_logits(red):
    """inplace=True: same loss and gradient, the gradient living in the logits' buffer; a plain
    loss.backward() (incoming gradient 1) leaves the forward's gradient as it is."""
    x = randn(6, 123, seed=21, scale=3).float()
    t = targets((6,), 123, 22)
    want_x = x.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(want_x, t, reduction=red, label_smoothing=0.1)
    (want.sum() if red == "none" else want).backward()
    base = x.clone().requires_grad_()
    logits = base * 1.0  # a non-leaf, as a model's logits are
    with expect_launches("cross_entropy_fwd"):
        loss = cross_entropy(logits, t, reduction=red, label_smoothing=0.1, inplace=True)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.detach(), want_x.grad, rtol=1e-5, atol=1e-6)  # overwritten
    with expect_launches("cross_entropy_bwd"):
        (loss.sum() if red == "none" else loss).backward()
    torch.testing.assert_close(base.grad, want_x.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_backward_twice_raises():
    x = randn(3, 20, seed=23).float().requires_grad_()
    loss = cross_entropy(x, targets((3,), 20, 24))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_cross_entropy_inplace_on_logits_saved_elsewhere_fails_loudly():
    """exp() saves its output for its backward: overwriting it with the gradient must raise
    in backward, not give a wrong gradient."""
    x = randn(4, 30, seed=25).float().requires_grad_()
    y = x.exp()
    loss = cross_entropy(y, targets((4,), 30, 26, ignore=()), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("bad", [10, -5])
def test_cross_entropy_target_range_is_checked_in_the_kernel(bad):
    """Without a group the one-pass kernel checks the ids itself (a flag and one device-side
    assert, no torch-op chain): an id outside [0, V) that is not ignore_index raises."""
    x = torch.randn(4, 10)
    with expect_launches("cross_entropy_fwd"), pytest.raises(RuntimeError, match="outside"):
        cross_entropy(x, torch.tensor([0, -100, bad, 2]))
    cross_entropy(x, torch.tensor([0, -100, 9, 2]))  # in range, and ignore_index: fine
