"""The main job, small: the loss falls, the run is deterministic, outputs are written."""

import json

import pytest
import torch

from ichiban_comm import train
from ichiban_comm.data import ByteBatches, stdlib_corpus

@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # Multi-step runs use the fused ops' plain-torch references (what the job runs on a CPU);
    # Triton's interpreter is far too slow for training. test_fused_kernels_really_run_in_the_job
    # runs the Triton kernels themselves, on a micro model.
    monkeypatch.setenv("ICHIBAN_KERNELS", "reference")


TINY = ["--d-model", "32", "--n-layer", "2", "--n-head", "2", "--steps", "40", "--batch-size", "8",
        "--seq-len", "32", "--data-bytes", "200000", "--log-every", "10", "--warmup", "5",
        "--eval-batches", "2", "--threads", "1"]


def _run(tmp_path, name, extra=()):
    out = tmp_path / name
    assert train.main(TINY + ["--out-dir", str(out)] + list(extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    return summary, [r["loss"] for r in _steps(out)]


def _steps(out):
    """metrics.jsonl's step records (the others mark a start, a failure, the end)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


def test_loss_falls_and_outputs_are_written(tmp_path, capsys):
    summary, losses = _run(tmp_path, "a")
    assert len(losses) == 40
    assert losses[0] > 7.0  # ~ln(2048), the built-in BPE's vocabulary, at initialisation
    assert summary["last_loss"] < losses[0] - 0.75
    out = capsys.readouterr().out
    assert "step     10/40" in out and "tok/s" in out and out.strip().splitlines()[-1].startswith("done:")


def test_same_seed_same_curve_other_seed_differs(tmp_path):
    _, a = _run(tmp_path, "a")
    _, b = _run(tmp_path, "b")
    _, c = _run(tmp_path, "c", ["--seed", "1"])
    assert a == b
    assert a != c


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--d-model", "30", "--n-head", "4"])
    assert "--d-model (30) must be a multiple of 2 x --n-head (4)" in capsys.readouterr().err


def test_corpus_is_deterministic_and_batches_depend_only_on_step():
    corpus = stdlib_corpus(100_000)
    assert len(corpus) == 100_000 and corpus == stdlib_corpus(100_000)
    data = ByteBatches(corpus, seq_len=16, batch_size=4, seed=3)
    x1, y1 = data.batch(7)
    data.batch(8)
    x2, y2 = data.batch(7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    assert x1.max() < 256 and x1.dtype == torch.long
    with pytest.raises(ValueError, match="too small for seq_len"):
        ByteBatches(corpus[:100], seq_len=64, batch_size=1)


def test_fused_ops_are_the_default_and_match_plain(tmp_path):
    fused, a = _run(tmp_path, "fused")
    plain, b = _run(tmp_path, "plain", ["--ops", "plain"])
    assert fused["ops"].startswith("fused") and plain["ops"] == "plain torch"
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3 * max(1.0, abs(y))


def test_fused_kernels_really_run_in_the_job(tmp_path, monkeypatch):
    from ichiban_comm import triton_kernels as tk

    monkeypatch.delenv("ICHIBAN_KERNELS")
    if not tk.HAS_TRITON or __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")
    micro = ["--d-model", "16", "--n-layer", "1", "--n-head", "2", "--steps", "2",
             "--batch-size", "2", "--seq-len", "8", "--data-bytes", "20000", "--warmup", "1",
             "--eval-batches", "1", "--threads", "1"]
    tk.reset_launch_counts()
    assert train.main(micro + ["--out-dir", str(tmp_path / "f")]) == 0
    launched = tk.launch_counts()
    for kernel in ("rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rope_fwd",
                   "rope_bwd"):
        assert launched.get(kernel, 0) > 0, (kernel, launched)
    assert any("cross_entropy" in k and n > 0 for k, n in launched.items()), launched
    assert train.main(micro + ["--out-dir", str(tmp_path / "p"), "--ops", "plain"]) == 0
    fused = [r["loss"] for r in _steps(tmp_path / "f")]
    plain = [r["loss"] for r in _steps(tmp_path / "p")]
    assert len(fused) == 2 and all(abs(a - b) < 1e-4 * abs(b) for a, b in zip(fused, plain))


def test_resume_continues_the_uninterrupted_curve(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _, full = _run(tmp_path, "full")
    first, _ = _run(tmp_path, "split", ["--ckpt-every", "10", "--ckpt-dir", ckpt, "--stop-at", "20"])
    assert first["checkpoints"] == 2
    second, _ = _run(tmp_path, "split", ["--ckpt-every", "10", "--ckpt-dir", ckpt, "--resume"])
    assert second["start_step"] == 20
    losses = [r["loss"] for r in _steps(tmp_path / "split")]
    assert [r["step"] for r in _steps(tmp_path / "split")] == list(range(40))
    assert losses == full  # bit-exact: model, optimizer, step and RNG all restored
