"""The cost model and tuned-table plumbing of the "ichiban" backend (no processes).

    python -m pytest -q tests/distributed/test_ichiban_cost.py
"""

from __future__ import annotations

import pytest

from ichiban_comm.distributed import cost


def test_one_rank_never_needs_two_shot():
    assert cost.model_oneshot_max_bytes(1) == cost.ALWAYS


@pytest.mark.parametrize("n", [2, 3, 4])
def test_oversubscribed_crossover_is_where_predictions_cross(monkeypatch, n):
    # more ranks than cores: two-shot's stage waits cost like barriers
    monkeypatch.setattr(cost, "oversubscribed", lambda k: True)
    s = cost.model_oneshot_max_bytes(n)
    assert 4096 < s < 64 << 20
    assert cost.predict_us("oneshot", s // 2, n) < cost.predict_us("twoshot", s // 2, n)
    assert cost.predict_us("oneshot", s * 2, n) > cost.predict_us("twoshot", s * 2, n)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_with_a_core_per_rank_two_shot_wins_above_a_page(monkeypatch, n):
    # Its stage waits overlap the peers' work, so only the page floor keeps one-shot.
    monkeypatch.setattr(cost, "oversubscribed", lambda k: False)
    assert cost.model_oneshot_max_bytes(n) == 4096
    for size in (4096, 1 << 16, 1 << 24):
        assert cost.predict_us("twoshot", size, n) < cost.predict_us("oneshot", size, n)


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
    # The environment fills the options' default, which the backend checks first.
    from ichiban_comm.distributed import IchibanOptions

    monkeypatch.setenv("ICHIBAN_ONESHOT_MAX_BYTES", "777")
    assert IchibanOptions().oneshot_max_bytes == 777
    assert IchibanOptions(oneshot_max_bytes=5).oneshot_max_bytes == 5


def test_unknown_algorithm_is_rejected():
    with pytest.raises(ValueError, match="unknown algorithm"):
        cost.predict_us("tree", 10, 2)
