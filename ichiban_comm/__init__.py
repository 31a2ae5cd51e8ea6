"""ichiban_comm: topology-aware collectives, async checkpointing, fused Triton
kernels and a token data pipeline for PyTorch training.

Importing the package loads the compiled core and registers the
torch.distributed backend ``"ichiban"``. Nothing here needs a GPU or a driver.
"""

__version__ = "0.1.0"

from ._native import NativeModuleError, _C, build_info  # noqa: E402
from . import distributed  # noqa: E402,F401  (registers the "ichiban" backend)


def __getattr__(name):
    # Submodules load on first use, so `python -m ichiban_comm.<module>` runs cleanly.
    if name in ("topology", "train", "triton_kernels", "checkpoint"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["__version__", "build_info", "topology", "NativeModuleError", "_C"]
