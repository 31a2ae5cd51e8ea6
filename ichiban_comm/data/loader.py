"""TokenDataset (packed samples over memory-mapped shards) and TokenLoader (the
C++ prefetching batch loader with exact, elastic resume).

Sample ``s`` is tokens ``[s*T, s*T + T + 1)`` of the shards read as one stream
(inputs the first ``T``, targets the last ``T``): documents are packed back to
back, separated by their end-of-document token. The order in which samples are
seen is a keyed permutation fixed by ``(seed, epoch)`` alone, so it does not
depend on the number of ranks; a loader's position is one integer, the global
samples consumed, which is all that resuming needs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np
import torch

from .._native import _C
from .format import Shard, ShardError, discover

STATE_VERSION = 1


class DataError(RuntimeError):
    """A failure while loading batches (a shard truncated while open, an id outside the vocabulary)."""


class TokenDataset:
    """Packed ``seq_len + 1``-token samples over every shard at ``path``.

    ``path``: a directory of shards (ours or Megatron's ``.bin``/``.idx``), a
    prefix, a ``.idx``, a flat nanoGPT ``.bin`` (give ``vocab_size``), a glob or
    a list of these. Opening parses and checks every index and maps the token
    files; nothing is built, so it takes milliseconds whatever the size.
    """

    def __init__(self, path, seq_len: int, seed: int = 0, *, vocab_size: int | None = None,
                 shuffle: bool = True):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.path, self.seq_len, self.seed, self.shuffle = path, seq_len, seed, shuffle
        self.shards: list[Shard] = discover(path, vocab_size)
        vocabs = {s.vocab_size for s in self.shards if s.vocab_size is not None}
        if vocab_size is not None:
            too_big = [s for s in self.shards if s.vocab_size is not None and s.vocab_size > vocab_size]
            if too_big:
                raise ShardError(f"{too_big[0].idx_path}: vocabulary {too_big[0].vocab_size} is larger "
                                 f"than vocab_size={vocab_size}")
            self.vocab_size = vocab_size
        elif len(vocabs) > 1:
            raise ShardError(f"{path}: shards disagree on the vocabulary size ({sorted(vocabs)}): "
                             f"pass vocab_size= to use them together")
        elif not vocabs:
            raise ShardError(f"{path}: the index records no vocabulary size (Megatron format): "
                             f"pass vocab_size=")
        else:
            self.vocab_size = vocabs.pop()
        hashes = {s.tokenizer_hash for s in self.shards if s.tokenizer_hash}
        if len(hashes) > 1:
            raise ShardError(f"{path}: shards were made by different tokenizers "
                             f"({', '.join(h[:12] for h in sorted(hashes))})")
        self.tokenizer_hash = hashes.pop() if hashes else ""
        eods = {s.eod_id for s in self.shards}
        self.eod_id = eods.pop() if len(eods) == 1 else -1
        self.num_tokens = sum(s.n_tokens for s in self.shards)
        if self.num_tokens == 0:
            raise ShardError(f"{path}: the shards hold no tokens")
        if self.num_tokens < seq_len + 1:
            raise ValueError(f"seq_len={seq_len} is larger than the data: {path} holds "
                             f"{self.num_tokens} tokens, a sample needs seq_len + 1 = {seq_len + 1}")
        self.first_sample = 0
        self.num_samples = (self.num_tokens - 1) // seq_len
        self._source = _C.data.TokenSource(
            [(s.bin_path, s.type_code, 0, s.n_tokens) for s in self.shards], self.vocab_size)
        self._doc_starts = None

    # -- identity -------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """What a loader state is only valid for: the shards' contents (by their
        index checksums and sizes), the sample length and the sample range."""
        desc = {"shards": [[os.path.basename(s.bin_path), s.format, str(s.dtype), s.n_tokens,
                            s.index_crc32] for s in self.shards],
                "vocab": self.vocab_size, "seq_len": self.seq_len,
                "range": [self.first_sample, self.num_samples]}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path!r}, seq_len={self.seq_len}, seed={self.seed}: "
                f"{len(self.shards)} shard(s), {self.num_tokens:,} tokens, vocab {self.vocab_size}, "
                f"{self.num_samples:,} samples)")

    # -- plain access (tools, tests, torch DataLoader) -------------------------
    def __getitem__(self, i: int):
        """Sample ``i`` of this dataset's range (unshuffled) as (inputs, targets) int64 tensors."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} outside [0, {self.num_samples})")
        i %= self.num_samples
        row = self._source.read((self.first_sample + i) * self.seq_len, self.seq_len + 1)
        return row[:-1], row[1:]

    def tokens(self, start: int, n: int) -> torch.Tensor:
        return self._source.read(start, n)

    def doc_starts(self) -> torch.Tensor:
        """Global token offsets where documents start (int64), from the indexes;
        a flat file without index is one document."""
        if self._doc_starts is None:
            parts, base = [], 0
            for s in self.shards:
                offs = s.doc_offsets if s.doc_offsets is not None else np.array([0, s.n_tokens])
                parts.append(offs[:-1] + base)
                base += s.n_tokens
            self._doc_starts = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts),
                                                                     dtype=np.int64))
        return self._doc_starts

    def split(self, holdout: float | int):
        """(train, held_out): the last ``holdout`` samples (a count, or a fraction
        of the samples) form a separate dataset that training never sees."""
        n = int(round(holdout * self.num_samples)) if isinstance(holdout, float) else int(holdout)
        if not 1 <= n < self.num_samples:
            raise ValueError(f"holdout={holdout!r} leaves {self.num_samples - n} of "
                             f"{self.num_samples} samples for training: need 1 <= held-out < all")
        train, held = self._view(0, self.num_samples - n), self._view(self.num_samples - n, n)
        return train, held

    def _view(self, first: int, count: int) -> "TokenDataset":
        view = object.__new__(TokenDataset)
        view.__dict__.update(self.__dict__)
        view.first_sample, view.num_samples = self.first_sample + first, count
        return view


class TokenLoader:
    """Batches of a TokenDataset for one data-parallel rank, filled ahead by C++ threads.

    Iterating yields ``(inputs, targets)`` int64 ``(batch_size, seq_len)`` tensors
    forever (epochs follow one another; ``epoch`` says which), or with
    ``documents=True`` ``(inputs, targets, position_ids, cu_seqlens)``:
    positions restart at each document start, and ``cu_seqlens`` (int32) are
    the cumulative lengths of the document pieces of the flattened batch.

    Rank ``r`` of ``w`` reads rows ``[r*B, (r+1)*B)`` of each global batch of
    ``B*w`` consecutive samples of the global order.

    num_threads: worker threads packing batches ahead (0: ``next()`` packs each
    batch itself, nothing runs in the background).
    pin_memory: batch buffers in page-locked memory (only when CUDA is
    available). device: ``None`` keeps CPU tensors; a CUDA device gets each
    batch copied there without blocking, on a side stream, one batch ahead.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, prefetch: int = 4, num_threads: int = 1,
                 pin_memory: bool = True, device=None, documents: bool = False):
        if not isinstance(dataset, TokenDataset):
            raise TypeError(f"dataset must be a TokenDataset, got {type(dataset).__name__}")
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("prefetch", prefetch, 1), ("num_threads", num_threads, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.prefetch, self.num_threads, self.documents = prefetch, num_threads, documents
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available")
        self._position = 0        # global samples consumed before the native loader's batch 0
        self._native = None
        self._stream = None
        self._staged = None
        self._held = collections.deque()  # (event, pinned batch) until its copy has finished

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def samples_consumed(self) -> int:
        """Global samples consumed, over all ranks, by the batches returned so far."""
        taken = self._native.batches_taken if self._native is not None else 0
        if self._staged is not None:
            taken -= 1  # staged on the device but not yet returned
        return self._position + taken * self.global_batch

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.dataset.num_samples

    def _start(self):
        ds = self.dataset
        doc = ds.doc_starts() if self.documents else torch.empty(0, dtype=torch.long)
        self._native = _C.data.BatchLoader(
            ds._source, ds.seq_len, self.batch_size, self.rank, self.world_size, ds.first_sample,
            ds.num_samples, ds.seed, ds.shuffle, self._position, self.prefetch, self.num_threads,
            self.pin_memory, self.documents, doc)
        return self._native

    def _next_host(self):
        try:
            return (self._native or self._start()).next()
        except RuntimeError as e:
            raise DataError(str(e)) from None

    def _stage(self):
        batch = self._next_host()
        with torch.cuda.stream(self._stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in batch)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._held.append((event, batch))  # the pinned source stays alive until copied
        self._staged = (event, out)

    def __iter__(self):
        return self

    def __next__(self):
        if self.device is None:  # the common case, kept short: it is on the step's critical path
            try:
                return (self._native or self._start()).next()
            except RuntimeError as e:
                raise DataError(str(e)) from None
        if self.device.type != "cuda":
            return tuple(t.to(self.device) for t in self._next_host())
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        if self._staged is None:
            self._stage()
        event, out = self._staged
        self._staged = None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in out:
            t.record_stream(current)
        while self._held and self._held[0][0].query():
            self._held.popleft()
        self._stage()  # the next batch's copy overlaps the caller's step
        return out

    # -- resume ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """A few integers and the dataset's fingerprint: where the global stream stands."""
        consumed = self.samples_consumed
        return {"version": STATE_VERSION, "seed": self.dataset.seed,
                "epoch": consumed // self.dataset.num_samples, "samples_consumed": consumed,
                "samples_in_epoch": consumed % self.dataset.num_samples,
                "global_batch": self.global_batch, "seq_len": self.dataset.seq_len,
                "fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continues with the global sample after the last one ``state`` saw, at this
        loader's world size (the global batch may differ; the stream is the same)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a TokenLoader state (version {STATE_VERSION}): {state!r}")
        ds = self.dataset
        if state["fingerprint"] != ds.fingerprint:
            raise ValueError(f"loader state fingerprint {state['fingerprint']} does not match the "
                             f"dataset's {ds.fingerprint} ({ds.path!r}, seq_len={ds.seq_len}): the "
                             f"shards, seq_len or split differ from the run that saved it")
        if int(state["seed"]) != ds.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, the dataset has "
                             f"seed {ds.seed}")
        consumed = int(state["samples_consumed"])
        if consumed < 0:
            raise ValueError(f"samples_consumed must be >= 0, got {consumed}")
        self._native = None
        self._staged = None
        self._held.clear()
        self._position = consumed
