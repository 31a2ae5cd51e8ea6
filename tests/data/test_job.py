"""The main job on the loader: --data DIR, and --resume continues the exact token
stream (per-step losses equal the uninterrupted run's, across an epoch boundary).

Run: python -m pytest -q tests/data/test_job.py
"""

import json

import pytest

from _shards import random_docs, write_ours
from ichiban_comm import train

TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--steps", "30", "--batch-size", "8",
        "--seq-len", "16", "--log-every", "10", "--warmup", "3", "--eval-batches", "1",
        "--threads", "1", "--ops", "plain"]


@pytest.fixture
def shards(tmp_path):
    # ~3300 tokens: ~200 samples, ~190 after the held-out part: an epoch is ~24 steps
    (tmp_path / "data").mkdir()
    write_ours(tmp_path / "data" / "s", random_docs(110, 64, seed=3, eod=63), 64, eod=63)
    return str(tmp_path / "data")


def losses(out):
    rows = [r for r in map(json.loads, open(f"{out}/metrics.jsonl")) if "event" not in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def test_resume_gives_the_uninterrupted_losses(tmp_path, shards, capsys):
    full = str(tmp_path / "full")
    assert train.main(TINY + ["--data", shards, "--out-dir", full]) == 0
    assert "(vocab 64," in capsys.readouterr().out
    split, ckpt = str(tmp_path / "split"), str(tmp_path / "ckpt")
    common = ["--data", shards, "--out-dir", split, "--ckpt-every", "9", "--ckpt-dir", ckpt]
    assert train.main(TINY + common + ["--stop-at", "18"]) == 0
    assert train.main(TINY + common + ["--resume"]) == 0  # resumes at 18; the epoch ends at ~24
    steps, resumed = losses(split)
    assert steps == list(range(30))
    assert resumed == losses(full)[1]  # bit-exact: the same tokens at every step


def test_missing_data_dir_is_named(tmp_path):
    from ichiban_comm.data import ShardError

    with pytest.raises(ShardError, match="nope: no such shard"):
        train.main(TINY + ["--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")])
