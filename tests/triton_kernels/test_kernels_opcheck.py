"""Every ``torch.ops.ichiban_tk`` op against its declaration, with ``torch.library.opcheck``:
the schema (which arguments it mutates; no output aliasing an input), the fake implementation
(shapes, dtypes, strides equal to the real op's), the autograd registration and AOTAutograd's
dynamic-shape dispatch — the contracts torch.compile relies on. An op that writes into an
argument it did not declare, returns an input (or a view of one) or an uninitialised buffer
where its fake promises data would make a compiled graph read stale or zero gradients while
eager looks right; this catches it on any torch, with the kernels run by the interpreter.

Run: python -m pytest -q tests/triton_kernels/test_kernels_opcheck.py
"""

import pytest
import torch

import ichiban_comm.triton_kernels  # noqa: F401 - registers the ops
from ichiban_comm.triton_kernels import _dispatch


def _r(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _samples():
    x, w, r = _r(5, 40, seed=1), _r(40, seed=2), _r(5, 40, seed=3)
    gate, up = _r(4, 24, seed=4), _r(4, 24, seed=5)
    lg = _r(6, 33, seed=6) * 3
    t = torch.tensor([0, 5, -100, 32, 7, 1])
    n_valid = (t != -100).sum()
    lse = torch.logsumexp(lg, -1)
    coef = torch.full((6,), 0.2)
    rstd = torch.rand(5) + 0.5
    mean = _r(5, seed=7)
    q, k = _r(1, 2, 3, 8, seed=8), _r(1, 1, 3, 8, seed=9)
    cos, sin = _r(1, 3, 8, seed=10), _r(1, 3, 8, seed=11)
    return {
        "rms_norm_fwd": [(x, w, r, 1e-6, 0.0), (x, w, None, 1e-6, 1.0)],
        "rms_norm_bwd": [(r, x, w, rstd, None, 0.0), (r, x, w, rstd, x.clone(), 1.0)],
        "layer_norm_fwd": [(x, w, w, r, 1e-5), (x, None, None, None, 1e-5)],
        "layer_norm_bwd": [(r, x, w, mean, rstd, None, torch.float32),
                           (r, x, None, mean, rstd, x.clone(), torch.bfloat16)],
        "swiglu_fwd": [(gate, up)],
        "swiglu_bwd": [(gate.clone(), gate, up)],
        "geglu_fwd": [(gate, up, True), (gate, up, False)],
        "geglu_bwd": [(gate.clone(), gate, up, True)],
        "rope": [(q, k, cos.expand(1, 3, 8), sin, False), (q, k, cos, sin, True)],
        "bias_gelu_fwd": [(gate, up[0], True), (gate, None, False)],
        "bias_gelu_bwd": [(up, gate, up[0], True, True), (up, gate, None, False, False)],
        "bias_dropout_add_fwd": [(gate, up[0], up, 0.25, True, 7), (gate, None, up, 0.0, False, 1)],
        "bias_dropout_add_bwd": [(gate, 0.25, 7, True, True, torch.bfloat16),
                                 (gate, 0.0, 1, False, True, torch.float32),
                                 (gate, 0.25, 7, True, False, torch.float32)],
        "ce_fwd": [(lg, t, n_valid, -100, 0.0, 0.0, True, True, True),
                   (lg, t, n_valid, -100, 0.1, 1e-3, False, False, False)],
        "ce_fwd_inplace": [(lg.clone(), t, n_valid, -100, 0.1, 1e-3, True, True)],
        "ce_stats": [(lg, t, 0, True), (lg, t, 33, False)],
        "ce_grad": [(lg, t, lse, coef, 0, 33, 0.1, 1e-3)],
        "ce_grad_inplace": [(lg.clone(), t, lse, coef, 0, 33, 0.0, 0.0)],
        "scale_inplace": [(lg.clone(), torch.tensor(1.0)), (lg.clone(), torch.tensor(0.5))],
        "scale_cast": [(lg, torch.tensor(0.5), torch.bfloat16)],
        "scale_rows_inplace": [(lg.clone(), torch.rand(6))],
    }


def test_every_op_has_a_sample():
    assert set(_samples()) == set(_dispatch._LAUNCHERS)


@pytest.mark.parametrize("name", sorted(_samples()))
def test_opcheck(name):
    op = getattr(torch.ops.ichiban_tk, name)
    for args in _samples()[name]:
        # fresh copies per check: the mutating ops write into their first argument
        torch.library.opcheck(op, args)


def test_mutating_ops_declare_what_they_write():
    """Only the in-place ops mutate, and each declares exactly its first argument."""
    for name in _dispatch._LAUNCHERS:
        schema = getattr(torch.ops.ichiban_tk, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
        assert written == (["logits"] if name in ("ce_fwd_inplace", "ce_grad_inplace") else
                           ["x"] if name in ("scale_inplace", "scale_rows_inplace") else []), \
            (name, written)
        assert not any(r.alias_info for r in schema.returns), name


def test_opcheck_catches_the_broken_patterns():
    """The check above can fail: an op that writes into an undeclared argument, and one that
    hands back its input, are both refused."""

    @torch.library.custom_op("ichiban_tk_selftest::writes_input", mutates_args=())
    def writes_input(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)  # undeclared write (as a kernel scaling a saved gradient in place would)
        return x.clone()

    writes_input.register_fake(lambda x: torch.empty_like(x))

    @torch.library.custom_op("ichiban_tk_selftest::returns_input", mutates_args=())
    def returns_input(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1)  # an output aliasing the input

    returns_input.register_fake(lambda x: x.new_empty(x.numel()))
    for op in (writes_input, returns_input):
        with pytest.raises(Exception):
            torch.library.opcheck(op, (torch.randn(3, 4),))
