"""The built-in corpus: the Python standard library's own source.

Every machine with Python has it, so nothing is downloaded. Files are read in
sorted path order, so the corpus is identical wherever the same Python version
runs. The main job tokenizes it into shards (``prepare.prepare_builtin``, one
document per file); ``ByteBatches`` reads it as raw bytes (vocabulary 256).
"""

from __future__ import annotations

import os
import sysconfig

import torch


def stdlib_paths() -> list[str]:
    """The .py sources under the standard library directory (site-packages left out), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages",
                                                                "__pycache__"))
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not paths:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}")
    return sorted(paths)


def stdlib_documents(max_bytes: int | None = None):
    """(path, bytes) of each standard-library source file, in sorted path order,
    until ``max_bytes`` (the last file cut at the limit)."""
    total = 0
    for p in stdlib_paths():
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[:max_bytes - total]
        total += len(data)
        if data:
            yield p, data
        if max_bytes is not None and total >= max_bytes:
            return


def stdlib_corpus(max_bytes: int | None = None) -> bytes:
    """The standard-library sources concatenated (see stdlib_documents)."""
    return b"".join(data for _, data in stdlib_documents(max_bytes))


class ByteBatches:
    """Random windows of a byte corpus, deterministic in (seed, step).

    ``batch(step)`` depends on nothing but the step, so a run resumed at step N
    sees exactly the batches the uninterrupted run saw. A held-out tail of the
    corpus (``val_fraction``) gives the validation batches.
    """

    def __init__(self, corpus: bytes, seq_len: int, batch_size: int, seed: int = 0,
                 val_fraction: float = 0.05):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        n_val = max(seq_len + 1, int(len(data) * val_fraction))
        if len(data) - n_val < seq_len + 1:
            raise ValueError(f"corpus of {len(data)} bytes is too small for seq_len={seq_len}")
        self.train, self.val = data[:-n_val], data[-n_val:]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def _window(self, data, gen):
        starts = torch.randint(0, len(data) - self.seq_len - 1, (self.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)   # (B, T+1)
        tokens = data[idx].long()
        return tokens[:, :-1], tokens[:, 1:]                     # inputs, targets: (B, T)

    def batch(self, step: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self._window(self.train, gen)

    def val_batch(self, i: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983 * (i + 1) + 7)
        return self._window(self.val, gen)
