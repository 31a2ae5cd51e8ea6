"""Errors raised by ichiban_comm.checkpoint."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A save or a load failed (I/O error, failed commit, missing step)."""


class CheckpointCorruptError(CheckpointError):
    """Stored bytes do not match their checksum, or a file is truncated or malformed.

    ``step``, ``file`` and ``tensor`` name what was being read (None when unknown).
    """

    def __init__(self, message: str, *, step=None, file=None, tensor=None):
        super().__init__(message)
        self.step, self.file, self.tensor = step, file, tensor
