"""The launch layer (``_launch``): the specialisation key of the cached-kernel path, the plain
path through the interpreter, and the ``triton_op`` registration of every op.

The cached path itself needs a GPU (test_kernels_gpu.py::test_gpu_cached_launch_*); here the
key is checked on its own (it decides when a compiled kernel may be reused) and the launches
are checked to give the same results as before.

Run: python -m pytest -q tests/triton_kernels/test_kernels_launch.py
"""

import pytest
import torch

import ichiban_comm.triton_kernels as tk
from ichiban_comm.triton_kernels import _dispatch, _launch
from ichiban_comm.triton_kernels._launch import launch_key
from kernels_testlib import expect_launches


def _buf(dtype=torch.float32, offset=0):
    # a view `offset` elements into a 16-byte aligned buffer
    return torch.zeros(64, dtype=dtype)[offset:]


def test_launch_key_same_inputs_same_key():
    a, b = _buf(), _buf()
    k1 = launch_key((a, b, 7, 0.5, None, True), {"BLOCK": 128, "num_warps": 4})
    # (keywords in the order of the call site: the key does not sort them, which at worst
    # costs one more first launch for another order)
    k2 = launch_key((b, a, 7, 0.25, None, True), {"BLOCK": 128, "num_warps": 4})
    assert k1 is not None and k1 == k2 and hash(k1) == hash(k2)
    # ints that Triton specialises alike (not 1, not a multiple of 16, i32) share a key
    assert launch_key((a, 7), {}) == launch_key((a, 9), {})
    assert launch_key((a, 32), {}) == launch_key((a, 48), {})


def test_launch_key_separates_every_specialisation():
    a = _buf()
    base = launch_key((a, 7), {"BLOCK": 128, "num_warps": 4})
    different = {
        "dtype": launch_key((_buf(torch.bfloat16), 7), {"BLOCK": 128, "num_warps": 4}),
        "unaligned pointer": launch_key((_buf(offset=1), 7), {"BLOCK": 128, "num_warps": 4}),
        "int == 1": launch_key((a, 1), {"BLOCK": 128, "num_warps": 4}),
        "int % 16 == 0": launch_key((a, 16), {"BLOCK": 128, "num_warps": 4}),
        "int64": launch_key((a, 2 ** 31 + 7), {"BLOCK": 128, "num_warps": 4}),
        "uint64": launch_key((a, 2 ** 63 + 7), {"BLOCK": 128, "num_warps": 4}),
        "constexpr": launch_key((a, 7), {"BLOCK": 256, "num_warps": 4}),
        "num_warps": launch_key((a, 7), {"BLOCK": 128, "num_warps": 8}),
        "extra keyword": launch_key((a, 7), {"BLOCK": 128, "num_warps": 4, "num_stages": 2}),
        "float for int": launch_key((a, 7.0), {"BLOCK": 128, "num_warps": 4}),
        "None for pointer": launch_key((None, 7), {"BLOCK": 128, "num_warps": 4}),
        "bool constexpr": launch_key((a, 7), {"BLOCK": 128, "num_warps": 4, "HAS_B": True}),
    }
    keys = [base] + list(different.values())
    assert all(k is not None for k in keys), different
    assert len(set(keys)) == len(keys), different
    # True and 1 compare equal in Python; the key must not confuse them
    assert launch_key((a, True), {}) != launch_key((a, 1), {})
    assert launch_key((a,), {"F": True}) != launch_key((a,), {"F": 1})


def test_launch_key_refuses_what_it_does_not_model():
    a = _buf()
    assert launch_key((a, (1, 2)), {}) is None  # a tuple argument
    assert launch_key((a,), {"X": a}) is None  # a tensor keyword
    assert launch_key((a, torch.nn.Parameter(a.clone())), {}) is not None  # a module weight

    class Sub(torch.Tensor):
        pass

    assert launch_key((a.as_subclass(Sub),), {}) is None


def test_interpreter_uses_the_plain_path_with_identical_results():
    """Under the interpreter every launch is the plain one (nothing is cached), and the ops
    give bit-identical results with the cached path switched on or off."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 48, generator=gen), torch.randn(48, generator=gen)
    g, u = torch.randn(6, 48, generator=gen), torch.randn(6, 48, generator=gen)
    t = torch.randint(0, 48, (6,), generator=gen)
    outs = []
    for enabled in (True, False):
        _launch.set_cached_launch(enabled)
        try:
            xi = x.clone().requires_grad_()
            with expect_launches("rms_norm_fwd", "swiglu_fwd", "cross_entropy_fwd"):
                loss = tk.cross_entropy(tk.swiglu(tk.rms_norm(xi, w), g) * u, t)
                loss.backward()
            outs.append((loss.detach(), xi.grad))
        finally:
            _launch.set_cached_launch(True)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    from ichiban_comm.triton_kernels.rms_norm import _rms_norm_fwd_kernel
    assert _launch.cached_kernels(_rms_norm_fwd_kernel) == 0  # interpreted: never cached


OPS = sorted(_dispatch._LAUNCHERS)  # every registered op of the package


@pytest.mark.parametrize("name", OPS)
def test_every_op_is_a_triton_op(name):
    """Every op is registered through torch.library.triton_op (so torch.compile on CUDA traces
    into its kernels), with the CPU path kept opaque: the functional-tensor dispatch rule is
    ours, not triton_op's decomposition (which cannot run the interpreter on fake tensors)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    assert len(OPS) >= 21
    assert _dispatch.is_triton_op(name)
    op = getattr(torch.ops.ichiban_tk, name).default
    assert op._schema.name == f"ichiban_tk::{name}"
    from torch._library.custom_ops import OPDEFS
    rule = OPDEFS[f"ichiban_tk::{name}"]._torch_dispatch_fns[FunctionalTensorMode]
    assert rule.__qualname__.startswith("_decompose_on_cuda_only")


def test_cuda_ops_trace_into_their_kernels_cpu_ops_stay_opaque():
    """torch.compile's AOTAutograd on fake CUDA tensors (no GPU needed) turns each op into its
    Triton kernels (wrap_triton nodes that Inductor launches and CUDA graphs capture); on CPU
    tensors the op stays one opaque node (the interpreter cannot run on fake tensors). Runs
    kernels_trace_check.py in a fresh process with the interpreter off."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels_trace_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "0 failures" in out.stdout, out.stdout[-4000:] + \
        out.stderr[-2000:]
    assert out.stdout.count(" ok") == 8, out.stdout


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records the direct launches."""

    def __init__(self):
        self.calls = []
        self.function, self.packed_metadata = "fn-handle", "packed"

    def run(self, *a):
        self.calls.append(a)


class _FakeKernel:
    """Stands in for a JITFunction (the cached path needs a GPU): a kernel
    ``k(X, Y, n, scale, FLAG: constexpr, BLOCK: constexpr = 64)``; its plain launches are
    recorded and each new specialisation "compiles" a _FakeCompiled."""

    def __init__(self):
        import inspect

        def k(X, Y, n, scale, FLAG, BLOCK=64):
            pass

        self.signature = inspect.signature(k)
        self.pre_run_hooks, self.debug, self.used_global_vals = [], None, {}
        self.plain, self.compiled = [], []

    def __getitem__(self, grid):
        def runner(*args, **kwargs):
            self.plain.append((grid, args, kwargs))
            self.compiled.append(_FakeCompiled())
            return self.compiled[-1]
        return runner


def test_cached_path_mechanics(monkeypatch):
    """The cached path's bookkeeping, with a stand-in kernel and driver: the first launch of a
    key is the plain one; later launches of that key call the compiled kernel's launcher
    directly with the grid padded to 3-D, the current stream, no hooks, and every parameter
    in the kernel's order (defaults filled in); another key, a launch hook, a changed global,
    a callable grid or the switch turned off take the plain path."""
    import types

    from triton import knobs

    kern = _FakeKernel()
    monkeypatch.setattr(_launch, "_JITFunction", _FakeKernel)
    monkeypatch.setattr(_launch, "_driver", types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda dev: 777)))
    _launch.clear_launch_cache()
    x, y = _buf(), _buf()

    def go(*args, grid=(5,), **kw):
        return _launch.launch(kern, grid, *args, **kw)

    go(x, y, 33, 0.5, FLAG=True, num_warps=4)
    assert len(kern.plain) == 1 and _launch.cached_kernels(kern) == 1
    go(x, y, 35, 0.25, FLAG=True, num_warps=4)  # same specialisation: direct
    assert len(kern.plain) == 1
    (call,) = kern.compiled[0].calls
    assert call == (5, 1, 1, 777, "fn-handle", "packed", None, None, None,
                    x, y, 35, 0.25, True, 64)
    go(x, y, 35, 0.25, grid=(2, 3), FLAG=True, BLOCK=128, num_warps=4)  # a new constexpr
    assert len(kern.plain) == 2 and _launch.cached_kernels(kern) == 2
    go(x, y, 35, 0.25, grid=(2, 3), FLAG=True, BLOCK=128, num_warps=4)
    assert kern.compiled[1].calls[-1][:3] == (2, 3, 1) and kern.compiled[1].calls[-1][-1] == 128
    go(_buf(offset=1), y, 35, 0.25, FLAG=True, num_warps=4)  # misaligned: its own entry
    assert len(kern.plain) == 3 and _launch.cached_kernels(kern) == 3

    plain = len(kern.plain)
    hook = lambda *a: None  # noqa: E731 - a profiler's launch hook
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        go(x, y, 35, 0.25, FLAG=True, num_warps=4)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    go(x, y, 35, 0.25, grid=lambda meta: (1,), FLAG=True, num_warps=4)
    _launch.set_cached_launch(False)
    try:
        go(x, y, 35, 0.25, FLAG=True, num_warps=4)
    finally:
        _launch.set_cached_launch(True)
    env = {"G": 1}
    kern.used_global_vals = {("G", id(env)): (1, env)}
    go(x, y, 35, 0.25, FLAG=True, num_warps=4)  # unchanged global: direct
    env["G"] = 2
    go(x, y, 35, 0.25, FLAG=True, num_warps=4)  # changed: plain (Triton raises there)
    assert len(kern.plain) == plain + 4
    assert len(kern.compiled[0].calls) == 2
    _launch.clear_launch_cache()
