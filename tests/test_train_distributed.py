"""The main job under two processes: DDP over "ichiban" follows the same curve as over "gloo".

Run: python -m pytest -q tests/test_train_distributed.py
"""

import json
import os

import pytest

from spawn import run_workers

TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--steps", "12", "--batch-size", "4",
        "--seq-len", "32", "--data-bytes", "200000", "--log-every", "4", "--warmup", "2",
        "--eval-batches", "1", "--threads", "1"]


def _train(rank, world_size, out_dir, backend, extra):
    from ichiban_comm import train

    os.environ["ICHIBAN_KERNELS"] = "reference"  # the interpreter is too slow for training
    assert train.main(TINY + ["--out-dir", out_dir, "--backend", backend] + list(extra)) == 0
    if rank == 0:
        with open(os.path.join(out_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return summary, [r["loss"] for r in map(json.loads, f) if "event" not in r]
    return None


def test_ddp_on_ichiban_matches_gloo_and_checkpoints(tmp_path):
    ours = run_workers(_train, 2, backend=None, timeout=240,
                       args=(str(tmp_path / "ichiban"), "ichiban",
                             ["--ckpt-every", "6", "--ckpt-dir", str(tmp_path / "ckpt")]))[0]
    ref = run_workers(_train, 2, backend=None, timeout=240,
                      args=(str(tmp_path / "gloo"), "gloo", []))[0]
    (summary, losses), (ref_summary, ref_losses) = ours, ref
    assert summary["world_size"] == 2 and summary["checkpoints"] == 2
    assert len(losses) == len(ref_losses) == 12
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert summary["last_loss"] < summary["first_loss"]
