"""Every Triton kernel launch of the package goes through ``launch(kernel, grid, *args, **kw)``.

Three ways, chosen per call:

* **traced** (an argument is a FunctionalTensor / FakeTensor: torch.compile or make_fx tracing
  a ``triton_op`` on CUDA): ``torch.library.wrap_triton(kernel)[grid](...)``, which records
  the kernel in the graph (Inductor launches it; CUDA graphs capture it).
* **cached** (CUDA, compiled ``JITFunction``): after the first launch of a specialisation the
  compiled kernel is kept, keyed by ``launch_key``, and later calls go straight to its
  launcher: no argument binding, no Triton cache-key string, no option parsing.
* **plain** ``kernel[grid](...)`` otherwise: the interpreter (CPU), the first launch of a
  specialisation, and whenever anything the cached path does not model is on (launch hooks,
  pre-run hooks, Triton debug or instrumentation, a changed global that a kernel read, tensor
  keywords, callable grids), or ``set_cached_launch(False)`` / ``ICHIBAN_KERNELS_CACHED_LAUNCH=0``.

The key must separate everything Triton specialises a compiled kernel on (Triton 3.x,
``native_specialize_impl`` and ``JITFunction.run``): per pointer argument its dtype and whether
its address is 16-byte aligned; per int whether it is 1 (made a constant), divisible by 16,
and its width class (i32 / i64 / u64); floats and bools by type; ``None`` as itself; every
keyword (constexprs, ``num_warps``, ``num_stages``) by value; and the current device. A key
that separates more than Triton does only costs an extra first launch; one that separates less
would reuse a kernel compiled for other arguments, so anything unknown makes no key at all
(the plain path).
"""

from __future__ import annotations

import os

import torch

__all__ = ["launch", "launch_key", "set_cached_launch", "cached_launch_enabled",
           "cached_kernels", "clear_launch_cache"]

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_ENABLED = [os.environ.get("ICHIBAN_KERNELS_CACHED_LAUNCH", "1") != "0"]
# kernel -> {(device, key): (launcher, function, packed_metadata, names of the params after the
# positional ones, their values when not given as keywords)}
_CACHE: dict = {}

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except Exception:  # noqa: BLE001 - without Triton (or an older one) only the plain path
    _knobs = _driver = None
    _JITFunction = None


def set_cached_launch(enabled: bool) -> None:
    """Switch the cached-kernel path on or off (process-wide; default on, or the value of
    ``ICHIBAN_KERNELS_CACHED_LAUNCH``: ``0`` turns it off)."""
    _ENABLED[0] = bool(enabled)


def cached_launch_enabled() -> bool:
    return _ENABLED[0]


def cached_kernels(kernel) -> int:
    """Number of specialisations of ``kernel`` held by the cached path (tests, benchmarks)."""
    return len(_CACHE.get(kernel, ()))


def clear_launch_cache() -> None:
    _CACHE.clear()


def _int_class(v: int) -> int:
    # Triton's width classes: i32, i64, u64 (anything wider fails in Triton itself)
    if -(1 << 31) <= v < (1 << 31):
        return 0
    return 1 if -(1 << 63) <= v < (1 << 63) else 2


def launch_key(args, kwargs):
    """Hashable key of one launch's specialisation, or None when the arguments hold something
    the cached path does not model (then the plain launch is used). Pure: no device needed."""
    key = []
    for a in args:
        tp = type(a)
        if tp in _PLAIN_TENSORS:
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif tp is bool:
            key.append(("u1", a))
        elif tp is int:
            key.append(("int", a == 1, a % 16 == 0, _int_class(a)))
        elif tp is float:
            key.append(("fp",))
        elif a is None:
            key.append(("none",))
        else:
            return None  # tensor subclasses, tuples, constexpr objects: not modelled
    for name, v in kwargs.items():
        tp = type(v)
        if tp not in (int, float, bool, str) and v is not None and not isinstance(v, torch.dtype):
            return None  # a tensor or other object as keyword
        key.append((name, tp, v))
    return tuple(key)


def _hook_set(hook) -> bool:
    # Triton 3.8 keeps launch hooks in a HookChain (always present, empty by default; profilers
    # such as proton add to it); older Triton versions hold None or one function
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if isinstance(calls, list) else True


def _hooks_on(kernel) -> bool:
    rt = _knobs.runtime
    return bool(_hook_set(rt.launch_enter_hook) or _hook_set(rt.launch_exit_hook)
                or rt.debug or rt.add_stages_inspection_hook is not None
                or _knobs.compilation.instrumentation_mode not in (None, "", "none")
                or kernel.pre_run_hooks or kernel.debug)


_MISSING = object()


def _globals_unchanged(kernel) -> bool:
    # Triton's own check on each run: a global a kernel read when compiled (a module-level
    # tl.constexpr) still has that value; if not, the plain launch raises Triton's error.
    for (name, _), (val, env) in kernel.used_global_vals.items():
        if env.get(name, _MISSING) != val:
            return False
    return True


def _entry(kernel, compiled, n_pos, kwargs):
    """What a cached launch needs, from the first (plain) launch's compiled kernel."""
    params = kernel.signature.parameters
    names = list(params)[n_pos:]
    defaults = []
    for name in names:
        if name in kwargs:
            defaults.append(None)
            continue
        d = params[name].default
        if d is params[name].empty:
            return None
        defaults.append(d)
    if any(k not in params for k in kwargs if k not in ("num_warps", "num_stages", "num_ctas",
                                                        "maxnreg")):
        return None
    return (compiled.run, compiled.function, compiled.packed_metadata, tuple(names),
            tuple(defaults))


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, by the cheapest safe way (see the module docstring).
    Runtime arguments positional, constexprs and launch options as keywords."""
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS:
            from torch.library import wrap_triton  # traced: record the kernel in the graph
            return wrap_triton(kernel)[grid](*args, **kwargs)
    if not (_ENABLED[0] and type(kernel) is _JITFunction and type(grid) is tuple) \
            or _hooks_on(kernel):
        return kernel[grid](*args, **kwargs)
    key = launch_key(args, kwargs)
    if key is None:
        return kernel[grid](*args, **kwargs)
    device = _driver.active.get_current_device()
    per_kernel = _CACHE.get(kernel)
    if per_kernel is None:
        per_kernel = _CACHE[kernel] = {}
    entry = per_kernel.get((device, key))
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        entry = _entry(kernel, compiled, len(args), kwargs) if compiled is not None else None
        if entry is not None:
            per_kernel[(device, key)] = entry
        return compiled
    if kernel.used_global_vals and not _globals_unchanged(kernel):
        return kernel[grid](*args, **kwargs)
    run, function, packed, names, defaults = entry
    vals = list(args)
    for name, d in zip(names, defaults):
        vals.append(kwargs[name] if name in kwargs else d)
    stream = _driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    run(grid[0], g1, g2, stream, function, packed, None, None, None, *vals)
    return None
