"""What torch.compile's AOTAutograd makes of the ops on CUDA tensors, without a GPU: each op is
traced with fake CUDA tensors (TRITON_INTERPRET unset, so the kernels are compiled-kernel
objects) and the forward graph must hold the op's Triton kernels as
``triton_kernel_wrapper_functional`` nodes (triton_op's decomposition through ``wrap_triton``),
not the opaque op; the same op on fake CPU tensors must stay one opaque op node.

Without a driver Triton cannot build the kernels' TTIR, so torch assumes every tensor argument
is written (a warning, extra clones in the graph); on a GPU the analysis is exact.

    python tests/triton_kernels/kernels_trace_check.py
"""

from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET unset"
    logging.disable(logging.WARNING)  # the no-driver mutation-analysis warning, once per kernel
    import torch
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ichiban_comm.triton_kernels  # noqa: F401 - registers torch.ops.ichiban_tk

    ops = torch.ops.ichiban_tk

    def cases(dev):
        with FakeTensorMode():
            x = torch.empty(8, 64, device=dev, dtype=torch.bfloat16)
            w = torch.empty(64, device=dev, dtype=torch.bfloat16)
            t = torch.zeros(8, device=dev, dtype=torch.int64)
            nv = torch.zeros((), device=dev, dtype=torch.int64)
            g = torch.ones((), device=dev)
        return {
            "rms_norm_fwd": (lambda x, w: ops.rms_norm_fwd(x, w, None, 1e-6, 0.0)[0], (x, w)),
            "swiglu_fwd": (lambda a, b: ops.swiglu_fwd(a, b), (x, x)),
            "ce_fwd": (lambda lg, t, nv: ops.ce_fwd(lg, t, nv, -100, 0.0, 0.0, True, True,
                                                    True)[0], (x, t, nv)),
            "scale_inplace": (_scaled, (x, g)),
        }

    def _scaled(x, g):  # a mutating op: the written buffer is the graph's output
        y = x.clone()
        ops.scale_inplace(y, g)
        return y

    failures = []
    for dev, want in (("cuda", "triton_kernel_wrapper_functional"), ("cpu", "ichiban_tk.")):
        for name, (fn, args) in cases(dev).items():
            graphs = []

            def keep(gm, _inputs):
                graphs.append(gm)
                return gm

            try:
                aot_function(fn, fw_compiler=keep)(*args)
                code = graphs[0].code
            except Exception as exc:  # noqa: BLE001 - reported below
                code = f"{type(exc).__name__}: {exc}"
            ok = want in code and (dev == "cpu" or "ichiban_tk." not in code)
            print(f"{dev:4s} {name:14s} {'ok' if ok else 'FAILED'}")
            if not ok:
                failures.append(f"{dev} {name}:\n{code}")
    # every op names its kernels (AOTAutograd's cache keys a compiled graph on their sources)
    from torch._library.triton import triton_ops_to_kernels
    from triton.runtime.jit import JITFunction

    from ichiban_comm.triton_kernels import _dispatch
    for name in _dispatch._LAUNCHERS:
        kernels = triton_ops_to_kernels.get(f"ichiban_tk::{name}", [])
        if not kernels or not all(isinstance(k, JITFunction) for k in kernels):
            failures.append(f"{name}: kernels declared {kernels}")
    for f in failures:
        print(f)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
