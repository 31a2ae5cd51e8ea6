"""Exact and elastic resume: interrupted runs see the same batches as an
uninterrupted one; a different number of ranks continues the global stream with
no repeat and no gap.

Run: python -m pytest -q tests/data/test_loader_resume.py
"""

import hashlib

import numpy as np
import pytest

from _shards import write_ours
from ichiban_comm.data import TokenDataset, TokenLoader

SEQ = 4


@pytest.fixture
def ds(tmp_path):
    # tokens 0..N-1, so sample s's first input token is s*SEQ: rows name their sample
    n = 4 * 157 + 1  # 157 samples: a prime, so epochs end mid-batch
    write_ours(tmp_path / "ids", [np.arange(n)], vocab=n)
    return TokenDataset(tmp_path, seq_len=SEQ, seed=11)


def digest(batch):
    h = hashlib.sha256()
    for t in batch:
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def run(ds, steps, batch, state=None, **kw):
    loader = TokenLoader(ds, batch_size=batch, **kw)
    if state is not None:
        loader.load_state_dict(state)
    hashes = [digest(next(loader)) for _ in range(steps)]
    return hashes, loader.state_dict()


def test_resume_at_several_points_matches_uninterrupted(ds):
    batch = 6
    steps = 70  # 420 samples: epoch boundaries after step 26.2 and 52.3
    full, _ = run(ds, steps, batch)
    epoch_step = len(ds) // batch  # the step whose batch straddles the first boundary
    for cut in (1, 13, epoch_step, epoch_step + 1, 2 * len(ds) // batch):
        first, state = run(ds, cut, batch)
        assert state["samples_consumed"] == cut * batch
        assert state["epoch"] == cut * batch // len(ds)
        rest, _ = run(ds, steps - cut, batch, state)
        assert first + rest == full, cut


def test_resume_twice_in_one_epoch_and_exactly_at_a_boundary(ds):
    full, _ = run(ds, 3 * 157, 1)
    a, s1 = run(ds, 50, 1)
    b, s2 = run(ds, 60, 1, s1)
    c, s3 = run(ds, 47, 1, s2)  # ends exactly at the epoch boundary (157 samples)
    assert s3["epoch"] == 1 and s3["samples_in_epoch"] == 0
    d, _ = run(ds, 3 * 157 - 157, 1, s3)
    assert a + b + c + d == full


def samples(batch_x):
    return (batch_x[:, 0] // SEQ).tolist()


def global_stream(ds, n_batches, global_batch):
    loader = TokenLoader(ds, batch_size=global_batch)
    return [s for _ in range(n_batches) for s in samples(next(loader)[0])]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 4), (4, 2)])
def test_elastic_resume_continues_the_global_stream(ds, before, after):
    gb = 8
    steps_before, steps_after = 23, 30  # crosses an epoch boundary after resuming
    want = global_stream(ds, steps_before + steps_after, gb)
    ranks = [TokenLoader(ds, batch_size=gb // before, rank=r, world_size=before) for r in range(before)]
    seen = []
    for _ in range(steps_before):
        for r in ranks:
            seen += samples(next(r)[0])
    states = [r.state_dict() for r in ranks]
    assert all(s == states[0] for s in states)  # every rank saves the same few integers
    ranks = [TokenLoader(ds, batch_size=gb // after, rank=r, world_size=after) for r in range(after)]
    for r in ranks:
        r.load_state_dict(states[0])
    for _ in range(steps_after):
        for r in ranks:
            seen += samples(next(r)[0])
    assert seen == want  # same order: no repeat, no gap
    epoch_len = len(ds)
    first_epoch = seen[:epoch_len]
    assert sorted(first_epoch) == list(range(epoch_len))  # every sample once per epoch


def test_state_is_small_and_json_friendly(ds):
    import json

    loader = TokenLoader(ds, batch_size=3)
    next(loader)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert set(state) == {"version", "seed", "epoch", "samples_consumed", "samples_in_epoch",
                          "global_batch", "seq_len", "fingerprint"}
