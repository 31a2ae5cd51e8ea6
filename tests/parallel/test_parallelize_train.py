"""The main job's model-parallel flags: `ichiban-train --nproc N --tp/--dp/--zero` starts its own
ranks, prints the layout, and follows the unsplit run's loss curve.

    .venv/bin/python -m pytest tests/parallel/test_parallelize_train.py -q
"""

import json
import os

import pytest

from ichiban_comm import train

TINY = ["--d-model", "32", "--n-layer", "2", "--n-head", "4", "--steps", "6", "--batch-size", "4",
        "--seq-len", "16", "--data-bytes", "100000", "--log-every", "3", "--warmup", "2",
        "--eval-batches", "1", "--threads", "1", "--ops", "plain"]


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "event" not in r]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("ICHIBAN_KERNELS", "reference")  # the ranks inherit it: no interpreter


def _run(tmp_path, name, extra):
    out = str(tmp_path / name)
    assert train.main(TINY + ["--out-dir", out] + extra) == 0
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), _losses(out)


def test_nproc_tp2_follows_one_process_through_a_checkpoint(tmp_path, capfd):
    _, ref = _run(tmp_path, "one", [])
    ckpt = ["--ckpt-dir", str(tmp_path / "ckpt")]
    _run(tmp_path, "tp2", ["--nproc", "2", "--tp", "2", "--stop-at", "3", "--ckpt-every", "3"]
         + ckpt)
    out = capfd.readouterr().out
    assert "parallel layout: tp=2 x pp=1 x dp=1" in out and "tp groups: [[0, 1]]" in out
    assert "parallelize GPT: tp=2" in out
    # the second half resumes from the sharded checkpoint (saved with global shapes)
    summary, losses = _run(tmp_path, "tp2", ["--nproc", "2", "--tp", "2", "--resume"] + ckpt)
    assert "resumed from" in capfd.readouterr().out
    assert summary["tp"] == 2 and summary["world_size"] == 2 and summary["start_step"] == 3
    assert len(losses) == len(ref) == 6
    assert losses == pytest.approx(ref, rel=1e-4)


def test_nproc_without_enough_ranks_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--tp 2 --pp 1 --dp -1 needs several ranks: add "
                                         "--nproc 2"):
        train.main(TINY + ["--out-dir", str(tmp_path), "--tp", "2"])


@pytest.mark.slow
def test_zero_follows_ddp(tmp_path, capfd):
    _, ref = _run(tmp_path, "ddp", ["--nproc", "2", "--dp", "2"])
    summary, losses = _run(tmp_path, "zero", ["--nproc", "2", "--dp", "2", "--zero"])
    out = capfd.readouterr().out
    assert "tp=1 x pp=1 x dp=2" in out
    assert summary["zero"] and summary["dp"] == 2
    assert losses == pytest.approx(ref, rel=1e-4)


@pytest.mark.slow
def test_tp2_pp2_follows_one_process(tmp_path, capfd):
    _, ref = _run(tmp_path, "one", [])
    summary, losses = _run(tmp_path, "tp2pp2", ["--nproc", "4", "--tp", "2", "--pp", "2"])
    out = capfd.readouterr().out
    assert "tp=2 x pp=2 x dp=1" in out and "pp groups: [[0, 2], [1, 3]]" in out
    assert summary["pp"] == 2 and summary["val_loss"] is None
    assert losses == pytest.approx(ref, rel=1e-4)
