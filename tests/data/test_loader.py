"""The C++ loader against a plain numpy reference: sample order, packing, rank
split, document boundaries, and batches never overwritten while held.

Run: python -m pytest -q tests/data/test_loader.py
"""

import numpy as np
import pytest
import torch

from _shards import random_docs, write_ours
from ichiban_comm import _C
from ichiban_comm.data import TokenDataset, TokenLoader


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_sample_order_is_a_permutation_keyed_by_seed_and_epoch(n):
    a = _C.data.sample_order(n, 0, 0)
    assert sorted(a.tolist()) == list(range(n))
    assert torch.equal(a, _C.data.sample_order(n, 0, 0))  # deterministic
    assert torch.equal(_C.data.sample_order(n, 5, 2, shuffle=False), torch.arange(n))
    if n >= 64:
        b, c = _C.data.sample_order(n, 1, 0), _C.data.sample_order(n, 0, 1)
        assert sorted(b.tolist()) == list(range(n)) and sorted(c.tolist()) == list(range(n))
        # different keys give different orders that look unrelated (few fixed points)
        assert not torch.equal(a, b) and not torch.equal(a, c)
        assert int((a == b).sum()) < max(8, n // 20)


@pytest.fixture
def corpus(tmp_path):
    docs = random_docs(60, 500, seed=1, eod=499)
    write_ours(tmp_path / "a", docs[:25], 500, eod=499)
    write_ours(tmp_path / "b", docs[25:], 500, eod=499)
    return tmp_path, np.concatenate(docs), docs


def reference_batches(stream, seq_len, seed, n_samples, batch, rank, world, steps, start=0):
    """What rank `rank` of `world` should see: plain numpy over the token stream."""
    out = []
    for k in range(steps):
        rows_x, rows_y = [], []
        for i in range(batch):
            p = start + k * batch * world + rank * batch + i
            s = int(_C.data.sample_order(n_samples, seed, p // n_samples)[p % n_samples])
            window = stream[s * seq_len: s * seq_len + seq_len + 1]
            rows_x.append(window[:-1])
            rows_y.append(window[1:])
        out.append((np.stack(rows_x), np.stack(rows_y)))
    return out


@pytest.mark.parametrize("threads,prefetch", [(0, 1), (1, 1), (2, 4), (3, 2)])
def test_batches_match_reference_across_epochs(corpus, threads, prefetch):
    path, stream, _ = corpus
    ds = TokenDataset(path, seq_len=24, seed=7)
    loader = TokenLoader(ds, batch_size=5, prefetch=prefetch, num_threads=threads)
    steps = 3 * len(ds) // 5 + 2  # crosses two epoch boundaries, mid-batch
    ref = reference_batches(stream, 24, 7, len(ds), 5, 0, 1, steps)
    for k, (x, y) in zip(range(steps), loader):
        assert x.dtype == torch.long and x.shape == (5, 24) and x.is_contiguous()
        assert np.array_equal(x.numpy(), ref[k][0]) and np.array_equal(y.numpy(), ref[k][1]), k
    assert loader.epoch == (steps * 5) // len(ds)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_consecutive_slices_of_the_global_batch(corpus, world):
    path, stream, _ = corpus
    ds = TokenDataset(path, seq_len=16, seed=3)
    one = TokenLoader(ds, batch_size=2 * world)
    parts = [TokenLoader(ds, batch_size=2, rank=r, world_size=world) for r in range(world)]
    for _ in range(7):
        gx, gy = next(one)
        xs, ys = zip(*[next(p) for p in parts])
        assert torch.equal(torch.cat(xs), gx) and torch.equal(torch.cat(ys), gy)
    ref = reference_batches(stream, 16, 3, len(ds), 2, 1, world, 3)
    p = TokenLoader(ds, batch_size=2, rank=1, world_size=world)
    for k in range(3):
        assert np.array_equal(next(p)[0].numpy(), ref[k][0])


def test_returned_batches_are_never_refilled_while_held(corpus):
    path, stream, _ = corpus
    ds = TokenDataset(path, seq_len=8, seed=0)
    loader = TokenLoader(ds, batch_size=4, prefetch=2, num_threads=2)
    ref = reference_batches(stream, 8, 0, len(ds), 4, 0, 1, 40)
    held = [next(loader) for _ in range(20)]  # 10x the ring: every slot refilled many times
    for k, (x, y) in enumerate(held):
        assert np.array_equal(x.numpy(), ref[k][0]) and np.array_equal(y.numpy(), ref[k][1]), k
    ptrs = {t.data_ptr() for b in held for t in b}
    assert len(ptrs) == 2 * len(held)  # no two held batches share a buffer
    views = [held[-1][0][:, 2:]]       # a view alone keeps the buffer too
    del held
    for k in range(20, 40):
        x, y = next(loader)
        assert np.array_equal(x.numpy(), ref[k][0]), k
        del x, y  # dropped: the ring reuses its buffers
    assert np.array_equal(views[0].numpy(), ref[19][0][:, 2:])
    # after the caller let go, the ring stopped allocating (a few at the switch-over)
    allocs = loader._native.fresh_allocations
    for _ in range(30):
        next(loader)
    assert loader._native.fresh_allocations == allocs


def test_document_positions_and_cu_seqlens(corpus):
    path, stream, docs = corpus
    ds = TokenDataset(path, seq_len=32, seed=2)
    starts = set(np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]]).tolist())
    loader = TokenLoader(ds, batch_size=3, documents=True)
    for _ in range(10):
        x, y, pos, cu = next(loader)
        assert pos.shape == x.shape and cu.dtype == torch.int32
        want_pos, want_cu = [], [0]
        for i in range(3):
            # row i starts at the token the first input equals; find its global offset
            s = None
            for cand in range(len(ds)):
                if np.array_equal(stream[cand * 32: cand * 32 + 32], x[i].numpy()):
                    s = cand
                    break
            a = s * 32
            doc_start = max(t for t in starts if t <= a)
            p = a - doc_start
            row = []
            for j in range(32):
                if a + j in starts:
                    p = 0
                    if j:
                        want_cu.append(i * 32 + j)
                row.append(p)
                p += 1
            want_pos.append(row)
            want_cu.append((i + 1) * 32)
        assert pos.tolist() == want_pos and cu.tolist() == want_cu


def test_argument_errors_name_the_argument(corpus):
    path, _, _ = corpus
    ds = TokenDataset(path, seq_len=8)
    for kwargs, msg in [({"batch_size": 0}, "batch_size must be an int >= 1"),
                        ({"batch_size": 2, "rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\)"),
                        ({"batch_size": 2, "prefetch": 0}, "prefetch must be an int >= 1")]:
        with pytest.raises(ValueError, match=msg):
            TokenLoader(ds, **kwargs)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        TokenDataset(path, seq_len=0)
