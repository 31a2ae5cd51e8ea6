"""Every Triton kernel compiles (Triton -> PTX -> cubin) for an H100 (sm_90), without a GPU.

The interpreter checks what the kernels compute; this checks that the real compiler accepts
them (types, loop-carried values, constexpr branches). Runs kernels_aot_check.py in a fresh
process because the test run has the interpreter switched on.

Run: python -m pytest -q tests/triton_kernels/test_kernels_aot_compile.py
"""

import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels_aot_check.py")


@pytest.mark.parametrize("dtype", ["bf16"])
def test_kernels_compile_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, SCRIPT, "--arch", "90", "--dtype", dtype], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    done = re.search(r"compiled (\d+)/(\d+) kernel variants", out.stdout)
    assert done and done.group(1) == done.group(2) and int(done.group(2)) >= 30, out.stdout
