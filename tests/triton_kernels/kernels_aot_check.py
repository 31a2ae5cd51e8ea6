"""Compile every Triton kernel of ichiban_comm.triton_kernels ahead of time for a CUDA target
(default sm_90, H100) — no GPU or driver needed — so compile-only errors (types, loop-carried
values, constexpr use) show up on a CPU machine. The interpreter does not catch those.

    python tests/triton_kernels/kernels_aot_check.py [--arch 90] [--dtype bf16]

Must run with TRITON_INTERPRET unset (the kernels are then real JIT functions).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import time

FP32_PTRS = {"RSTD", "MEAN", "DWP", "DBP", "STATS", "LSE", "COEF", "W", "B", "LOSS", "G", "SRC",
             "P1", "P2"}
INT_PTRS = {"TARGET", "NVALID"}
I32_PTRS = {"BAD"}
FLOATS = {"eps", "p", "smoothing", "z_loss", "inv_vocab_total", "inv_vocab", "offset"}
INT64 = {"seed", "vocab_start", "ignore_index", "n", "quads_per_row"}
SCALAR_UPPER = {"N", "V", "S", "HALF"}  # upper-case names that are sizes, not pointers
SCALAR_UPPER_IN = {"_rope_kernel": {"H"}}  # (H is the head count there, a buffer elsewhere)

# module -> [(kernel name, {constexpr: values to try}, num_warps)]
KERNELS = {
    "rms_norm": [("_rms_norm_fwd_kernel", {"HAS_RES": [True, False], "ROWS": [1],
                                           "BLOCK": [4096]}, 16),
                 ("_rms_norm_fwd_kernel", {"HAS_RES": [True], "ROWS": [16], "BLOCK": [128]}, 8),
                 ("_rms_norm_bwd_kernel", {"HAS_DHO": [True, False], "BLOCK": [4096]}, 16)],
    "layer_norm": [("_layer_norm_fwd_kernel", {"HAS_RES": [True, False], "HAS_W": [True],
                                               "HAS_B": [True, False], "ROWS": [1],
                                               "BLOCK": [1024]}, 4),
                   ("_layer_norm_fwd_kernel", {"HAS_RES": [False], "HAS_W": [True],
                                               "HAS_B": [True], "ROWS": [8], "BLOCK": [256]}, 8),
                   ("_layer_norm_bwd_kernel", {"HAS_DHO": [True, False], "HAS_W": [True, False],
                                               "BLOCK": [1024]}, 4)],
    "swiglu": [("_swiglu_fwd_kernel", {"BLOCK": [1024]}, 4),
               ("_swiglu_bwd_kernel", {"BLOCK": [1024]}, 4)],
    "geglu": [("_geglu_fwd_kernel", {"APPROX_TANH": [True, False], "BLOCK": [1024]}, 4),
              ("_geglu_bwd_kernel", {"APPROX_TANH": [True, False], "BLOCK": [1024]}, 4)],
    "bias_gelu": [("_bias_gelu_fwd_kernel", {"HAS_B": [True, False], "APPROX_TANH": [True, False],
                                             "BLOCK": [1024]}, 4),
                  ("_bias_gelu_bwd_kernel", {"HAS_B": [True, False], "HAS_DB": [True, False],
                                             "APPROX_TANH": [True, False], "BLOCK": [1024]}, 4)],
    "bias_dropout_add": [("_bda_fwd_kernel", {"HAS_B": [True, False], "DROP": [True, False],
                                              "BLOCK": [1024]}, 4),
                         ("_bda_bwd_kernel", {"DROP": [True, False], "HAS_DB": [True, False],
                                              "BLOCK": [1024]}, 4)],
    "rope": [("_rope_kernel", {"BACKWARD": [True, False], "BLOCK_H": [16], "BLOCK_D": [64]}, 4)],
    "cross_entropy": [("_ce_fwd_kernel", {"SMOOTH": [True, False], "WRITE_GRAD": [True, False],
                                          "MEAN": [True, False], "CHECK": [True, False],
                                          "BLOCK": [4096]}, 8),
                      ("_ce_stats_kernel", {"SMOOTH": [True, False], "BLOCK": [4096]}, 8),
                      ("_ce_grad_kernel", {"BLOCK": [4096]}, 8),
                      ("_scale_kernel", {"ALWAYS": [True, False], "BLOCK": [4096]}, 8),
                      ("_scale_rows_kernel", {"BLOCK": [4096]}, 8)],
    "_dispatch": [("_finish_partials_kernel", {"TWO": [True, False], "BLOCK": [256]}, 4)],
}


def _signature(kname, kernel, act):
    sig, consts = {}, []
    sizes = SCALAR_UPPER | SCALAR_UPPER_IN.get(kname, set())
    for prm in kernel.params:
        name = prm.name
        if prm.is_constexpr:
            sig[name] = "constexpr"
            consts.append(name)
        elif name.isupper() and name not in sizes:
            sig[name] = "*fp32" if name in FP32_PTRS else "*i64" if name in INT_PTRS else \
                "*i32" if name in I32_PTRS else act
        else:
            sig[name] = "fp32" if name in FLOATS else "i64" if name in INT64 else "i32"
    return sig, consts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the JIT functions",
              file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures, n = [], 0
    t0 = time.monotonic()
    for mod_name, kernels in KERNELS.items():
        mod = importlib.import_module(f"ichiban_comm.triton_kernels.{mod_name}")
        for kname, choices, warps in kernels:
            kernel = getattr(mod, kname)
            sig, consts = _signature(kname, kernel, "*" + args.dtype)
            missing = set(consts) - set(choices)
            if missing:
                failures.append(f"{kname}: no values for constexpr {sorted(missing)}")
                continue
            for values in itertools.product(*(choices[c] for c in consts)):
                cx = dict(zip(consts, values))
                n += 1
                try:
                    triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx),
                                   target=target, options={"num_warps": warps})
                except Exception as exc:  # noqa: BLE001 - collect every failure
                    failures.append(f"{kname} {cx}: {type(exc).__name__}: {exc}")
    dt = time.monotonic() - t0
    for f in failures:
        print("FAIL", f)
    print(f"compiled {n - len(failures)}/{n} kernel variants for sm_{args.arch} "
          f"({args.dtype}) in {dt:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
