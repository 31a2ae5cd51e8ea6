"""Loading the compiled core, ``ichiban_comm._C``, with a clear error on mismatch.

The extension is compiled against one torch ABI. Importing it under another
torch fails deep in the dynamic linker ("undefined symbol: _ZN3c10..."), which
says nothing useful; we compare versions first and say how to rebuild.
"""

from __future__ import annotations

import importlib
import os

import torch

_REBUILD_HINT = (
    "reinstall from the source tree with `pip install --no-build-isolation .` "
    "(or `-e .`) in the environment that has the torch you want to use"
)


class NativeModuleError(ImportError):
    """The compiled core is missing or was built for another torch."""


def _build_info_file() -> dict | None:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _torch_base_version() -> str:
    return torch.__version__.split("+")[0]


def load():
    info = _build_info_file()
    if info is not None:
        built, running = info["torch"], _torch_base_version()
        if built != running:
            raise NativeModuleError(
                f"ichiban_comm was built against torch {built}, but torch {running} is running.\n"
                f"---> HINT: {_REBUILD_HINT}."
            )
    try:
        return importlib.import_module("ichiban_comm._C")
    except ImportError as e:
        msg = str(e)
        if info is None and "No module named" in msg:
            raise NativeModuleError(
                "ichiban_comm's compiled core (ichiban_comm._C) is not built.\n"
                f"---> HINT: {_REBUILD_HINT}."
            ) from e
        if "undefined symbol" in msg:
            raise NativeModuleError(
                f"ichiban_comm._C does not match the running torch {torch.__version__} "
                f"({msg.splitlines()[0]}).\n---> HINT: {_REBUILD_HINT}."
            ) from e
        raise


def build_info() -> dict:
    """What this installation of ichiban_comm is and what it was built with."""
    from . import __version__

    info = _build_info_file() or {}
    native = _C.native_build_info()
    return {
        "version": __version__,
        "torch_built": info.get("torch_full", info.get("torch")),
        "torch_running": torch.__version__,
        "cuda": bool(native["cuda"]),
        "cuda_archs": [a for a in info.get("cuda_archs", "").split(";") if a] if native["cuda"] else [],
        "torch_cuda": info.get("torch_cuda"),
        "nvcc": info.get("nvcc"),
        "compiler": info.get("compiler") or native["compiler"],
        "python": info.get("python"),
        "native_threads": _C.num_threads(),
        "location": os.path.dirname(os.path.abspath(__file__)),
    }


_C = load()
