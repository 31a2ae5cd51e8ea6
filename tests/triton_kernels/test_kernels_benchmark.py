"""benchmarks/kernels.py --dry-run: the benchmark's method exercised on the CPU (the kernels run
through Triton's interpreter): interleaved rounds, every column filled, inputs that an
implementation overwrites restored before each timed step, the vocabulary-parallel rows counting
two all-reduces in the forward and none in the backward, the JSON written.

Run: python -m pytest -q tests/triton_kernels/test_kernels_benchmark.py
"""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "kernels_bench", os.path.join(ROOT, "benchmarks", "kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_exercises_the_method(tmp_path, capsys):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")
    out = tmp_path / "k.json"
    rc = _bench().main(["--dry-run", "--ops", "cross_entropy,cross_entropy_tp2", "--reps", "2",
                        "--warmup", "1", "--gpu-samples", "1", "--scale", "0.005",
                        "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    rows = {(r["op"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("cross_entropy", "ichiban"), ("cross_entropy", "ichiban inplace"),
                         ("cross_entropy", "eager"), ("cross_entropy_tp2", "ichiban"),
                         ("cross_entropy_tp2", "eager")}
    for key, r in rows.items():
        assert "error" not in r, (key, r)
        assert r["reps"] == 2 and r["gpu_samples"] == 2 and r["gpu_ms"] > 0, (key, r)
        assert r["host_ms"] > 0 and r["wall_ms"] > 0 and r["pct_copy_bw"] > 0, (key, r)
    # the in-place implementation overwrote its logits every step; each timed step saw them
    # restored (outside the timing)
    inplace = rows[("cross_entropy", "ichiban inplace")]
    assert inplace["mutates_inputs"] and inplace["inputs_restored"]
    assert inplace["max_diff_vs_eager"] < 1e-1 and rows[("cross_entropy", "ichiban")][
        "max_diff_vs_eager"] < 1e-1
    # vocabulary-parallel: two all-reduces per forward, none in the backward
    assert rows[("cross_entropy_tp2", "ichiban")]["max_diff_vs_eager"] < 1e-1
    assert (rows[("cross_entropy_tp2", "ichiban")]["coll_fwd"],
            rows[("cross_entropy_tp2", "ichiban")]["coll_bwd"]) == (2, 0)
    assert "GPU ms" in capsys.readouterr().out


def test_without_a_gpu_it_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _bench().main(["--ops", "rms_norm"]) == 2


def test_dry_run_launch_overhead_row_is_gpu_only(tmp_path, capsys):
    """The cached-vs-plain launch row needs compiled kernels: a dry run says so (no error, no
    number) instead of timing the interpreter."""
    out = tmp_path / "l.json"
    rc = _bench().main(["--dry-run", "--ops", "launch_overhead", "--reps", "1",
                        "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert row["op"] == "launch_overhead" and "GPU only" in row["skipped"]
    assert "host_ms" not in row
