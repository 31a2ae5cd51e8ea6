"""torch.compile traces through the registered ops without a graph break (fullgraph=True).

The aot_eager backend is used: it runs Dynamo and AOTAutograd (where a graph break or an
untraceable op would fail) without compiling C++ on this CPU-only machine.

Run: python -m pytest -q tests/triton_kernels/test_kernels_torch_compile.py
"""

import torch

from ichiban_comm.triton_kernels import cross_entropy, rms_norm, swiglu
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
    with expect_launches("rms_norm_fwd", "swiglu_fwd", "cross_entropy_fwd", "rms_norm_bwd",
                         "swiglu_bwd", "cross_entropy_bwd"):
        loss_c = compiled(*comp_in, t)
        loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)
