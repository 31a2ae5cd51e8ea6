"""Shared plumbing for every fused op: where it runs, how it is registered, how it is checked.

Dispatch rule (one place, used by every op):
  * CUDA tensor                      -> Triton kernels.
  * CPU tensor, ``TRITON_INTERPRET=1`` -> the same Triton kernels through Triton's interpreter
                                         (slow; this is how the kernels are tested without a GPU).
  * CPU tensor otherwise             -> the plain-torch reference of the op.
  ``ICHIBAN_KERNELS=reference`` forces the reference everywhere (debugging a numerical difference).

Every kernel launch bumps a per-op counter (``launch_counts()``), so a test can prove that the
Triton path really ran instead of silently falling back to the reference.

Nothing here touches a GPU driver at import: Triton is imported lazily-safe (a missing Triton only
disables the fast path, loudly, once).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import types
import warnings

from typing import Optional

import torch

from ._launch import launch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_ERROR = ""
except Exception as exc:  # noqa: BLE001 - any import failure only disables the fast path
    HAS_TRITON = False
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    def _cdiv(a, b):
        return -(-a // b)

    def _next_power_of_2(n):
        return 1 << max(0, int(n) - 1).bit_length()

    triton = types.SimpleNamespace(jit=_jit, cdiv=_cdiv, next_power_of_2=_next_power_of_2)
    tl = types.SimpleNamespace(constexpr=lambda v=None: v)

__all__ = ["triton", "tl", "HAS_TRITON", "use_triton", "launch_counts", "reset_launch_counts",
           "count_launch", "custom_op", "check_float", "check_same", "LIB"]

LIB = "ichiban_tk"  # torch.library namespace of every op: torch.ops.ichiban_tk.<name>

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LAUNCHES: collections.Counter = collections.Counter()
_LAUNCHERS: dict = {}  # op name -> the undecorated launcher (see run_op)
# Tensor types run_op hands straight to a launcher: a module's weight is an nn.Parameter, which
# adds no dispatch of its own; any other subclass (fake, functional, DTensor) goes via torch.ops.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_WARNED: set = set()


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on ``t`` should run the Triton kernels (see the module docstring)."""
    if os.environ.get("ICHIBAN_KERNELS", "") == "reference":
        return False
    if t.is_cuda:
        if not HAS_TRITON:
            _warn_once("no-triton", "ichiban_comm.triton_kernels: Triton could not be imported "
                       f"({_TRITON_ERROR}); CUDA tensors use the plain-torch reference ops. "
                       "HINT: pip install triton")
            return False
        return True
    return t.device.type == "cpu" and HAS_TRITON and interpreter_on()


def count_launch(name: str) -> None:
    _LAUNCHES[name] += 1


def launch_counts() -> dict:
    """Number of Triton kernel launches per kernel name since the last reset."""
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()


@contextlib.contextmanager
def expect_launches(*names: str):
    """Fail unless every kernel named was launched at least once inside the block (tests)."""
    before = launch_counts()
    yield
    after = launch_counts()
    missing = [n for n in names if after.get(n, 0) <= before.get(n, 0)]
    if missing:
        raise AssertionError(f"Triton kernels {missing} were not launched (the op fell back to "
                             f"the reference); launches now: {after}")


def custom_op(name: str, fake, mutates=()):
    """Register the decorated launcher as ``torch.ops.ichiban_tk.<name>`` with a fake (meta) impl.

    With Triton, the op is a ``torch.library.triton_op``: traced by torch.compile on CUDA
    tensors, it decomposes into its Triton kernels (``launch`` records each through
    ``wrap_triton``), so Inductor schedules them in the graph and CUDA graphs capture them. On
    any other device it stays opaque, exactly like a ``custom_op``: the interpreter cannot run
    on fake tensors, so there torch.compile traces through the op with ``fake`` for shapes and
    calls the launcher at run time. ``fake`` also replaces triton_op's own fake impl (which
    would run the launcher on fake tensors) on every device.

    ``mutates``: the arguments the launcher writes into (declared, so functionalization sees
    the write); every other argument is read-only and no output may alias an input —
    ``tests/triton_kernels/test_kernels_opcheck.py`` checks each op against its declaration
    with ``torch.library.opcheck``.
    """

    def deco(fn):
        qualname = f"{LIB}::{name}"
        if HAS_TRITON:
            op = torch.library.triton_op(qualname, mutates_args=tuple(mutates))(fn)
            _decompose_on_cuda_only(op)
            _declare_kernels(qualname, fn)
        else:
            op = torch.library.custom_op(qualname, mutates_args=tuple(mutates))(fn)
        op.register_fake(fake)
        _LAUNCHERS[name] = fn
        return op

    return deco


def _decompose_on_cuda_only(op) -> None:
    """Keep triton_op's decomposition (into ``wrap_triton`` kernel calls, under the functional
    tensor mode of AOT autograd) for CUDA tensors; anything else is dispatched as the opaque op
    (the path triton_op itself takes for torch.export)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    decompose = getattr(op, "_torch_dispatch_fns", {}).get(FunctionalTensorMode)
    if decompose is None:  # a torch whose triton_op works otherwise: its own rule stays
        _warn_once("triton-op-rule", "ichiban_comm.triton_kernels: this torch's triton_op has "
                   "no functional-tensor rule to restrict to CUDA; torch.compile of the ops on "
                   "CPU tensors may fail under TRITON_INTERPRET=1")
        return

    def dispatch(mode, func, types, args, kwargs):
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda
                      for a in (*args, *kwargs.values()))
        if on_cuda:
            return decompose(mode, func, types, args, kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, dispatch)


def _declare_kernels(qualname: str, fn) -> None:
    """Name the kernels an op may launch: every compiled Triton kernel of its module and of
    this one (``finish_partials``). triton_op finds kernels by reading the launcher's source,
    which does not see through ``launch`` and helper functions; AOTAutograd's on-disk cache
    keys a compiled graph on these kernels' sources, so a missing one could let a graph built
    with an older kernel be reused. A superset only makes that key stricter. Interpreted
    kernels (TRITON_INTERPRET=1) have no compiled source and are left out."""
    from torch._library.triton import triton_ops_to_kernels
    try:
        from triton.runtime.jit import JITFunction
    except Exception:  # noqa: BLE001
        return
    found = list(triton_ops_to_kernels.get(qualname, []))
    for v in (*fn.__globals__.values(), *globals().values()):
        if type(v) is JITFunction and all(v is not k for k in found):
            found.append(v)
    triton_ops_to_kernels[qualname] = found


def is_triton_op(name: str) -> bool:
    """True when ``torch.ops.ichiban_tk.<name>`` is registered as a ``triton_op``."""
    from torch._library.triton import triton_ops_to_kernels
    return f"{LIB}::{name}" in triton_ops_to_kernels


def run_op(name: str, *args):
    """Call the op ``name``: through ``torch.ops.ichiban_tk`` while torch.compile / export trace
    (or on tensor subclasses such as fake tensors), else the launcher itself.

    In eager mode the dispatcher adds nothing the launcher needs (the autograd Functions that
    call it already run without grad) but costs tens of microseconds per call, paid twice per
    forward+backward of every fused op."""
    if torch.compiler.is_compiling() or any(
            isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS for a in args):
        return getattr(torch.ops.ichiban_tk, name)(*args)
    return _LAUNCHERS[name](*args)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor,
               shape: bool = True) -> None:
    """``t`` must live on ``ref``'s device (and have its shape when ``shape``)."""
    check_float(name, t)
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "move both to the same device")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (rows, last_dim) with unit stride on the last dim (copies only if needed)."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() != 2 else x
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (asked once per device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, rows: int, per_sm: int = 2) -> int:
    """Programs for a persistent row-loop kernel: one or two per SM on a GPU, a handful elsewhere.

    2 per SM: enough resident programs to keep the loads in flight, while the (programs, N)
    float32 partial sums of a weight gradient, finished by ``finish_partials``, stay small."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(rows, sm_count(index) * per_sm))
    return max(1, min(rows, 4))  # interpreter: few programs keeps the Python loop short


@triton.jit
def _finish_partials_kernel(P1, P2, O1, O2, progs, N, TWO: tl.constexpr, BLOCK: tl.constexpr):
    # O[c] = sum over programs of P[p, c] (float32 sums, rounded once to O's dtype)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    a = tl.zeros([BLOCK], dtype=tl.float32)
    b = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(0, progs):
        a += tl.load(P1 + p * N + c, mask=mask, other=0.0)
        if TWO:
            b += tl.load(P2 + p * N + c, mask=mask, other=0.0)
    tl.store(O1 + c, a.to(O1.dtype.element_ty), mask=mask)
    if TWO:
        tl.store(O2 + c, b.to(O2.dtype.element_ty), mask=mask)


def finish_partials(p1: torch.Tensor, dtype1: torch.dtype, p2: Optional[torch.Tensor] = None,
                    dtype2: Optional[torch.dtype] = None):
    """Column sums of one or two (programs, N) float32 partial buffers, in one launch, each in
    its own output dtype (a weight / bias gradient): replaces sum + cast kernels per buffer."""
    progs, n = p1.shape
    o1 = p1.new_empty(n, dtype=dtype1)
    o2 = p2.new_empty(n, dtype=dtype2) if p2 is not None else None
    if n:
        count_launch("finish_partials")
        block = 256 if p1.is_cuda else max(16, triton.next_power_of_2(n))
        launch(_finish_partials_kernel, (triton.cdiv(n, block),), p1, p2 if p2 is not None else p1,
               o1, o2 if o2 is not None else o1, progs, n, TWO=p2 is not None, BLOCK=block,
               num_warps=4)
    return (o1, o2) if p2 is not None else o1


def row_block(n: int, what: str, limit: int = 1 << 16) -> int:
    """Power-of-two block holding a whole row of ``n`` elements (one program per row)."""
    if n > limit:
        # A row lives in registers; beyond this it would spill (64Ki fp32 = 256 KiB per row).
        raise ValueError(f"{what} of size {n} is larger than the supported {limit}")
    return max(16, triton.next_power_of_2(n))  # >= 16: the smallest block worth a program


def rows_per_program(block: int) -> int:
    """Rows per program of a row-wise forward: 1, or for rows of at most 256 columns enough to
    fill a 2048-element tile (one narrow row per program would leave most lanes idle)."""
    return 1 if block > 256 else 2048 // block


def check_rows(name: str, x: torch.Tensor) -> None:
    """Row-wise ops need a float tensor with at least one dim (the normalised / vocab dim)."""
    check_float(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


def check_approximate(approximate: str) -> bool:
    """GELU flavour: True for "tanh", False for "none" (the exact erf form)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f'approximate must be "tanh" or "none", got {approximate!r}')
    return approximate == "tanh"


def col_block(device: torch.device, cols: int) -> int:
    """Columns per program of a (rows, column-blocks) elementwise grid."""
    return max(16, min(triton.next_power_of_2(max(cols, 1)), elementwise_block(device)))


def elementwise_block(device: torch.device) -> int:
    # 1024 columns per program keeps loads wide on a GPU; the interpreter runs one program per
    # Python iteration, so a bigger block there just means fewer iterations.
    return 1024 if device.type == "cuda" else 4096


def row_warps(block: int) -> int:
    # One row per program: ~8 fp32 values per thread keeps registers low without idle lanes.
    return max(1, min(16, block // 256))
