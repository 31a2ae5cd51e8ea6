"""The collectives benchmark runs end to end (tiny sizes; no timing is checked)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_benchmark_writes_every_column(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "collectives.py"), "--world-sizes", "2",
           "--ops", "all_reduce,broadcast", "--sizes", "8,4K", "--reps", "2", "--budget-ms", "2",
           "--direct", "--floor", "--no-mpi", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(r["op"], r["bytes"], r["backend"]) for r in rows}
    for op in ("all_reduce", "broadcast"):
        for b in (8, 4096):
            assert {(op, b, "ichiban"), (op, b, "gloo")} <= got
    # the direct column is all_reduce only
    assert {("all_reduce", 8, "ichiban-direct"), ("all_reduce", 4096, "ichiban-direct")} <= got
    assert not any(r["backend"] == "ichiban-direct" and r["op"] != "all_reduce" for r in rows)
    # torch's own cost per call (its fake process group), for every op and size
    assert {(op, b, "torch-floor") for op in ("all_reduce", "broadcast") for b in (8, 4096)} <= got
    for r in rows:
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"], r
    assert next(r for r in rows if r["backend"] == "ichiban" and r["op"] == "all_reduce")["algo"] == "oneshot"
    assert "ichiban-direct" in res.stdout and "torch-floor" in res.stdout and "speedup vs gloo" in res.stdout
