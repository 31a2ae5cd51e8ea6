"""The cost model and tuned-table plumbing of the "ichiban" backend (no processes).

    python -m pytest -q tests/distributed/test_ichiban_cost.py
"""

from __future__ import annotations

import pytest

from ichiban_comm.distributed import cost


def test_model_never_picks_two_shot_for_two_ranks():
    assert cost.model_oneshot_max_bytes(2) == cost.ALWAYS


def test_model_crossover_is_where_predictions_cross(monkeypatch):
    monkeypatch.setattr(cost, "oversubscribed", lambda n: False)
    s = cost.model_oneshot_max_bytes(4)
    assert 4096 < s < 64 << 20
    assert cost.predict_us("oneshot", s // 2, 4) < cost.predict_us("twoshot", s // 2, 4)
    assert cost.predict_us("oneshot", s * 2, 4) > cost.predict_us("twoshot", s * 2, 4)


def test_tuned_table_overrides_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ICHIBAN_TUNE_FILE", str(tmp_path / "tune.json"))
    monkeypatch.delenv("ICHIBAN_ONESHOT_MAX_BYTES", raising=False)
    assert cost.choose_oneshot_max_bytes(4)[1] == "model"
    cost.save_tuned(4, {"oneshot_max_bytes": 12345})
    assert cost.choose_oneshot_max_bytes(4) == (12345, str(tmp_path / "tune.json"))
    assert cost.choose_oneshot_max_bytes(3)[1] == "model"  # keyed by size
    monkeypatch.setenv("ICHIBAN_ONESHOT_MAX_BYTES", "777")
    assert cost.choose_oneshot_max_bytes(4) == (777, "ICHIBAN_ONESHOT_MAX_BYTES")


def test_unknown_algorithm_is_rejected():
    with pytest.raises(ValueError, match="unknown algorithm"):
        cost.predict_us("tree", 10, 2)
