"""The package as installed: build facts, the CLI, the version check before loading _C."""

import subprocess
import sys

import pytest
import torch

import ichiban_comm
from ichiban_comm import _native


def test_build_info_fields():
    info = ichiban_comm.build_info()
    assert info["version"] == ichiban_comm.__version__
    assert info["torch_built"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must say which archs it targets"
    assert info["compiler"]


def test_version_cli():
    out = subprocess.run([sys.executable, "-m", "ichiban_comm", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ichiban_comm {ichiban_comm.__version__}")
    assert "built against torch" in out.stdout and "CUDA sources:" in out.stdout


def test_other_torch_version_is_a_clear_error(monkeypatch):
    # A version no supported torch has, so the check fires whichever torch runs the test.
    monkeypatch.setattr(_native, "_build_info_file",
                        lambda: {"torch": "1.99.0", "torch_full": "1.99.0+cu128"})
    with pytest.raises(_native.NativeModuleError) as e:
        _native.load()
    msg = str(e.value)
    assert "built against torch 1.99.0" in msg and torch.__version__.split("+")[0] in msg
    assert "pip install --no-build-isolation" in msg


def test_undefined_symbol_is_translated(monkeypatch):
    def broken(name):
        raise ImportError("/x/_C.so: undefined symbol: _ZN3c106detail14torchCheckFail")

    monkeypatch.setattr(_native, "_build_info_file", lambda: None)
    monkeypatch.setattr(_native.importlib, "import_module", broken)
    with pytest.raises(_native.NativeModuleError, match="does not match the running torch"):
        _native.load()


def test_import_needs_no_gpu_driver():
    code = ("import os; os.environ['CUDA_VISIBLE_DEVICES']=''; import ichiban_comm, "
            "ichiban_comm.triton_kernels, ichiban_comm.topology; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
