"""Registration of the "ichiban" torch.distributed backend."""


def _entry_point() -> None:
    raise RuntimeError("the ichiban backend is not available in this build")
