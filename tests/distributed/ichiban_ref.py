"""Plain references and tolerances for the ichiban backend tests.

Every rank can rebuild every other rank's input from (seed, rank), so each
rank checks its result against a reference computed locally with torch in
float64 / complex128 / int64.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
COMPLEX = [torch.complex64, torch.complex128]
INTS = [torch.int8, torch.uint8, torch.int32, torch.int64]
ALL_DTYPES = FLOATS + COMPLEX + INTS + [torch.bool]

R = dist.ReduceOp
FLOAT_OPS = [R.SUM, R.AVG, R.PRODUCT, R.MIN, R.MAX]
INT_OPS = [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]
BOOL_OPS = [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]
COMPLEX_OPS = [R.SUM, R.AVG]


def ops_for(dtype):
    if dtype in FLOATS:
        return FLOAT_OPS
    if dtype in COMPLEX:
        return COMPLEX_OPS
    if dtype == torch.bool:
        return BOOL_OPS
    return INT_OPS


def make(seed: int, rank: int, shape, dtype, op=None) -> torch.Tensor:
    """Random, never all-zero input of rank `rank`. Products stay bounded (values near 1)."""
    g = torch.Generator().manual_seed(seed * 1009 + rank * 7919 + 17)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype in INTS:
        lo, hi = (1, 9) if dtype == torch.uint8 else (-6, 7)
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)
    if dtype in COMPLEX:
        real = torch.randn(shape, generator=g, dtype=torch.float64)
        imag = torch.randn(shape, generator=g, dtype=torch.float64)
        return torch.complex(real, imag).to(dtype)
    if op == R.PRODUCT:
        return (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def wide(dtype):
    if dtype in FLOATS:
        return torch.float64
    if dtype in COMPLEX:
        return torch.complex128
    if dtype == torch.bool:
        return torch.bool
    return torch.int64


def reduce_ref(tensors: list[torch.Tensor], op) -> torch.Tensor:
    """Reference reduction of per-rank tensors, computed wide and cast back."""
    dtype = tensors[0].dtype
    xs = [t.to(wide(dtype)) for t in tensors]
    if dtype == torch.bool:
        fn = {R.SUM: torch.logical_or, R.MAX: torch.logical_or, R.BOR: torch.logical_or,
              R.PRODUCT: torch.logical_and, R.MIN: torch.logical_and, R.BAND: torch.logical_and,
              R.BXOR: torch.logical_xor}[op]
        return functools.reduce(fn, xs)
    if op == R.AVG:
        return (functools.reduce(torch.add, xs) / len(xs)).to(dtype)
    fn = {R.SUM: torch.add, R.PRODUCT: torch.mul, R.MIN: torch.minimum, R.MAX: torch.maximum,
          R.BAND: torch.bitwise_and, R.BOR: torch.bitwise_or, R.BXOR: torch.bitwise_xor}[op]
    out = functools.reduce(fn, xs)
    if dtype in INTS and dtype != torch.int64:
        # Integer sums/products wrap in the narrow type exactly as the wide
        # result reduced modulo 2^bits does.
        bits = torch.iinfo(dtype).bits
        out = out & ((1 << bits) - 1)
        if dtype != torch.uint8:
            out = torch.where(out >= (1 << (bits - 1)), out - (1 << bits), out)
    return out.to(dtype)


def _eps(dtype) -> float:
    return {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -23,
            torch.float64: 2 ** -52, torch.complex64: 2 ** -23, torch.complex128: 2 ** -52}[dtype]


def mismatch(got: torch.Tensor, tensors: list[torch.Tensor], op, what: str) -> str | None:
    """None when got matches the reference of reducing `tensors` with op, else a message.

    Floating tolerance: 4 roundings of the result's dtype, relative to the sum of
    magnitudes (the bound for a sum accumulated in any order and rounded once
    more at the end); exact for integers, bool, MIN and MAX.
    """
    ref = reduce_ref(tensors, op)
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{what}: got {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
    if ref.dtype in INTS or ref.dtype == torch.bool or op in (R.MIN, R.MAX):
        if not torch.equal(got, ref):
            bad = (got != ref).nonzero()[:3].tolist()
            return f"{what}: not equal to the reference at {bad}"
        return None
    w = wide(ref.dtype)
    if op == R.PRODUCT:
        scale = functools.reduce(torch.mul, [t.to(w).abs() for t in tensors])
    else:
        scale = functools.reduce(torch.add, [t.to(w).abs() for t in tensors])
        if op == R.AVG:
            scale = scale / len(tensors)
    tol = 4 * _eps(ref.dtype) * (scale.abs() + 1e-30) * len(tensors)
    err = (got.to(w) - ref.to(w)).abs()
    if bool((err > tol).any()):
        i = int((err - tol).argmax())
        return f"{what}: max excess error {float((err - tol).flatten()[i]):.3g} at flat index {i}"
    return None


def shm_entries(pids) -> list[str]:
    """/dev/shm names created by ichiban jobs whose rank 0 had one of these pids."""
    uid = os.getuid()
    marks = [f"ichiban_{uid}_{p}_" for p in pids]
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return [n for n in names if any(n.startswith(m) for m in marks)]
