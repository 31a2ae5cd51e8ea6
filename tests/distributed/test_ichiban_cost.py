"""The cost model and tuned-table plumbing of the "ichiban" backend (no processes).

    python -m pytest -q tests/distributed/test_ichiban_cost.py
"""

from __future__ import annotations

import pytest

from ichiban_comm.distributed import cost


def test_one_rank_never_needs_two_shot():
    assert cost.model_oneshot_max_bytes(1) == cost.ALWAYS


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("oversubscribed", [False, True])
def test_model_crossover_is_where_predictions_cross(monkeypatch, n, oversubscribed):
    monkeypatch.setattr(cost, "oversubscribed", lambda k: oversubscribed)
    s = cost.model_oneshot_max_bytes(n)
    assert 4096 < s < 64 << 20
    assert cost.predict_us("oneshot", s // 2, n) < cost.predict_us("twoshot", s // 2, n)
    assert cost.predict_us("oneshot", s * 2, n) > cost.predict_us("twoshot", s * 2, n)


def test_crossover_never_below_a_page(monkeypatch):
    monkeypatch.setattr(cost, "oversubscribed", lambda k: False)
    assert cost.model_oneshot_max_bytes(8) == 4096  # the model alone would say ~1 KB


def test_traffic_matches_the_algorithms():
    # two ranks: one-shot and two-shot both move 4x the message; four ranks: 6x vs 4.5x
    assert cost.traffic_per_rank("oneshot", 100, 2) == cost.traffic_per_rank("twoshot", 100, 2) == 400
    assert cost.traffic_per_rank("oneshot", 100, 4) == 600
    assert cost.traffic_per_rank("twoshot", 100, 4) == 450


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
