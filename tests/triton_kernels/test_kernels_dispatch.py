"""The dispatch rule: CPU without the interpreter runs the reference (no launches), the
interpreter runs the kernels, ICHIBAN_KERNELS=reference forces the reference, and importing
the package needs no GPU or driver.

Run: python -m pytest -q tests/triton_kernels/test_kernels_dispatch.py
"""

import os
import subprocess
import sys

import torch

from ichiban_comm.triton_kernels import launch_counts, rms_norm, swiglu, use_triton
from ichiban_comm.triton_kernels.rms_norm import rms_norm_reference


def test_interpreter_runs_the_kernels():
    x = torch.randn(3, 20)
    assert use_triton(x)
    before = launch_counts().get("swiglu_fwd", 0)
    swiglu(x, x)
    assert launch_counts().get("swiglu_fwd", 0) == before + 1


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    x, w = torch.randn(3, 20), torch.randn(20)
    for env in ({"TRITON_INTERPRET": "0"}, {"ICHIBAN_KERNELS": "reference"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert not use_triton(x)
            before = launch_counts()
            y = rms_norm(x, w)
            assert launch_counts() == before, "a kernel ran on the reference path"
            torch.testing.assert_close(y, rms_norm_reference(x, w))


def test_import_needs_no_gpu_or_driver():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import torch, ichiban_comm.triton_kernels as tk; x = torch.randn(2, 8); "
            "y = tk.rms_norm(x, torch.ones(8)); assert not tk.use_triton(x); "
            "assert tk.launch_counts() == {}; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_eager_calls_skip_the_dispatcher_and_traced_calls_keep_it(monkeypatch):
    """run_op: eager calls go straight to the launcher (the dispatcher costs tens of us per
    call); fake tensors (as torch.compile and export trace with) go through torch.ops, whose
    fake implementation gives the shapes without launching anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ichiban_comm.triton_kernels import _dispatch

    calls = []
    real = _dispatch._LAUNCHERS["rms_norm_fwd"]
    monkeypatch.setitem(_dispatch._LAUNCHERS, "rms_norm_fwd",
                        lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 24, generator=g), torch.randn(24, generator=g)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [1]

    before = launch_counts().get("rms_norm_fwd", 0)
    with FakeTensorMode():
        y = rms_norm(torch.empty(7, 24), torch.empty(24))
    assert y.shape == (7, 24) and calls == [1]
    assert launch_counts().get("rms_norm_fwd", 0) == before


def test_module_weights_take_the_direct_path_too(monkeypatch):
    """A norm module's weight is an nn.Parameter: it must not send eager calls to the
    dispatcher (only tensor subclasses with a dispatch of their own do)."""
    from ichiban_comm.triton_kernels import _dispatch

    calls = []
    real = _dispatch._LAUNCHERS["rms_norm_fwd"]
    monkeypatch.setitem(_dispatch._LAUNCHERS, "rms_norm_fwd",
                        lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 24, generator=g), torch.nn.Parameter(torch.randn(24, generator=g))
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w.detach()), rtol=1e-5,
                               atol=1e-5)
    assert calls == [1]
