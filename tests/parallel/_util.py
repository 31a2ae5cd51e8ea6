"""Helpers shared by the model-parallel tests."""

import io

import torch


def pack(obj) -> bytes:
    """Tensors leave a worker as bytes: a tensor sent through the result queue is shared memory
    that vanishes when the worker exits before the parent reads it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)
