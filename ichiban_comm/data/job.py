"""The main job's data: a TokenLoader over the user's shards (``--data DIR``) or
over the built-in standard-library shards, prepared on first use and cached."""

from __future__ import annotations

import time

import torch

from .loader import TokenDataset, TokenLoader
from .prepare import prepare_builtin

HOLDOUT_FRACTION = 0.05  # of the samples, kept out of training for the validation loss


class JobData:
    """``loader`` yields the training batches of this rank; ``val_batch(i)`` is
    held-out batch i (the same on every rank); ``vocab_size`` sizes the model."""

    def __init__(self, train: TokenDataset, val: TokenDataset, loader: TokenLoader, source: str,
                 seconds: float):
        self.train, self.val, self.loader = train, val, loader
        self.vocab_size, self.source, self.seconds = train.vocab_size, source, seconds

    def val_batch(self, i: int):
        b, n = self.loader.batch_size, len(self.val)
        rows = [self.val[(i * b + j) % n] for j in range(b)]
        return torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows])

    def describe(self) -> str:
        return (f"{self.train.num_tokens / 1e6:.2f}M tokens of {self.source} (vocab "
                f"{self.vocab_size}, {len(self.train):,} training samples, {self.seconds:.1f} s "
                f"to open)")


def job_data(data_dir: str | None, data_bytes: int | None, seq_len: int, batch_size: int,
             seed: int, rank: int, world_size: int) -> JobData:
    t0 = time.perf_counter()
    if data_dir is None:
        data_dir = prepare_builtin(max_bytes=data_bytes or None)
        source = "standard-library source"
    else:
        source = data_dir
    full = TokenDataset(data_dir, seq_len=seq_len, seed=seed)
    holdout = max(batch_size, int(HOLDOUT_FRACTION * len(full)))
    if len(full) <= holdout + batch_size * world_size:
        raise ValueError(f"--seq-len {seq_len}: {data_dir} has {len(full)} samples of {seq_len + 1} "
                         f"tokens, too few for a held-out set and a global batch of "
                         f"{batch_size * world_size}: use more data or a shorter --seq-len")
    train, val = full.split(holdout)
    loader = TokenLoader(train, batch_size=batch_size, rank=rank, world_size=world_size,
                         prefetch=4, num_threads=1, pin_memory=torch.cuda.is_available())
    return JobData(train, val, loader, source, time.perf_counter() - t0)
