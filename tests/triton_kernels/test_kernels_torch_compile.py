"""torch.compile traces through the registered ops without a graph break (fullgraph=True).

The aot_eager backend is used: it runs Dynamo and AOTAutograd (where a graph break or an
untraceable op would fail) without compiling C++ on this CPU-only machine.

Run: python -m pytest -q tests/triton_kernels/test_kernels_torch_compile.py
"""

import torch

from ichiban_comm.triton_kernels import (bias_dropout_add, bias_gelu, cross_entropy,
                                         fused_linear_cross_entropy, geglu, layer_norm, rms_norm,
                                         rope, swiglu)
from kernels_testlib import expect_launches


def _block(x, w, g, t):
    h = rms_norm(x, w)
    a = swiglu(h, g)
    return cross_entropy(a, t)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 40, generator=gen)
    w = torch.randn(40, generator=gen)
    g = torch.randn(4, 40, generator=gen)
    t = torch.randint(0, 40, (4,), generator=gen)
    eager_in = [a.clone().requires_grad_() for a in (x, w, g)]
    comp_in = [a.clone().requires_grad_() for a in (x, w, g)]
    loss_e = _block(*eager_in, t)
    loss_e.backward()
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)
    # the cross-entropy gradient is made in the forward kernel; a traced backward scales it
    # out of place (no kernel of its own)
    with expect_launches("rms_norm_fwd", "swiglu_fwd", "cross_entropy_fwd", "rms_norm_bwd",
                         "swiglu_bwd"):
        loss_c = compiled(*comp_in, t)
        loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


def _block2(x, r, w, b, g, u, q, k, head, cos, sin, t):
    y, h = layer_norm(x, w, b, residual=r)
    a = geglu(g, u) + bias_gelu(y, b)
    z = bias_dropout_add(a, b, h, 0.1, True, 5)
    qr, kr = rope(q, k, cos, sin)
    return fused_linear_cross_entropy(z, head, t, chunk_size=2) + (qr * kr).sum()


def test_compile_fullgraph_other_ops():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    leaves = [r(3, 16), r(3, 16), r(16), r(16), r(3, 16), r(3, 16), r(1, 2, 3, 8), r(1, 1, 3, 8),
              r(20, 16) * 0.3]
    rest = [r(3, 8), r(3, 8), torch.randint(0, 20, (3,), generator=gen)]
    eager_in = [a.clone().requires_grad_() for a in leaves]
    comp_in = [a.clone().requires_grad_() for a in leaves]
    loss_e = _block2(*eager_in, *rest)
    loss_e.backward()
    compiled = torch.compile(_block2, backend="aot_eager", fullgraph=True)
    with expect_launches("layer_norm_fwd", "geglu_fwd", "bias_gelu_fwd", "bias_dropout_add_fwd",
                         "rope_fwd", "cross_entropy_fwd", "layer_norm_bwd", "geglu_bwd",
                         "bias_gelu_bwd", "bias_dropout_add_bwd", "rope_bwd"):
        loss_c = compiled(*comp_in, *rest)
        loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


def _losses(x, y, h, w, t):
    a = cross_entropy(x, t, reduction="none", inplace=True)  # inplace is dropped when traced
    b = cross_entropy(y * 2.0, t, reduction="sum", label_smoothing=0.1)
    c = fused_linear_cross_entropy(h, w, t, chunk_size=3, softcap=2.0)
    # vocabulary blocks: statistics merged over blocks, dhidden summed over them
    d = fused_linear_cross_entropy(h * 0.5, w, t, chunk_size=2, vocab_chunk_size=7,
                                   label_smoothing=0.1)
    e = fused_linear_cross_entropy(h, w, t, reduction="none", vocab_chunk_size=8)
    return (a * torch.arange(1.0, 6.0)).sum() + b + c + d + (e * torch.arange(1.0, 6.0)).sum()


def test_compile_cross_entropy_gradients_are_not_zero():
    """Compiled cross-entropy (every reduction, inplace=True, fused linear, fused linear in
    vocabulary blocks) gives the eager gradients, which are not zero: the compiled backward
    scales the gradient made in the forward out of place, never through a buffer the graph
    aliases."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(5, 30, generator=gen), torch.randn(5, 30, generator=gen),
              torch.randn(5, 16, generator=gen), torch.randn(30, 16, generator=gen) * 0.3]
    t = torch.randint(0, 30, (5,), generator=gen)
    t[3] = -100
    eager_in = [a.clone().requires_grad_() for a in leaves]
    comp_in = [a.clone().requires_grad_() for a in leaves]
    _losses(*eager_in, t).backward()
    compiled = torch.compile(_losses, backend="aot_eager", fullgraph=True)
    with expect_launches("cross_entropy_fwd"):
        loss = compiled(*comp_in, t)
    loss.backward()
    torch.testing.assert_close(loss, _losses(*[a.detach() for a in leaves], t))
    for a, b in zip(comp_in, eager_in):
        assert a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad)
