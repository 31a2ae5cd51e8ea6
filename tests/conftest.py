"""Test-suite setup.

Triton's interpreter must be switched on before any kernel is decorated
(set later, Triton finds "0 active drivers"), so it is set here, before any
test module imports ichiban_comm.triton_kernels. On a GPU machine, run the
GPU-marked tests with ICHIBAN_TEST_GPU=1, which leaves the interpreter off.
"""

import os
import sys

if os.environ.get("ICHIBAN_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core machine")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
