"""The torch.distributed backend ``"ichiban"``.

Importing this package registers the backend (idempotently), so that

    import ichiban_comm
    dist.init_process_group("ichiban")

works; unmodified scripts also get it through the ``torch.distributed.backends``
entry point that torch loads on ``init_process_group("ichiban")``.

CPU tensors move through shared memory inside a host and hierarchically
(through Gloo) across hosts; CUDA tensors go to a NCCL group the backend wraps.
"""

from .backend import ICHIBAN, IchibanOptions, register, is_registered  # noqa: F401
from .shared_tensors import (enable_from_env, enable_shared_tensors, is_shared,  # noqa: F401
                             shared_tensor_stats, shared_tensors_enabled, trim_shared_tensors)

register()
enable_from_env()

__all__ = ["ICHIBAN", "IchibanOptions", "register", "is_registered", "enable_shared_tensors", "shared_tensors_enabled",
           "is_shared", "shared_tensor_stats", "trim_shared_tensors"]
