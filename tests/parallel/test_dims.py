"""Placement and process groups of ichiban_comm.parallel.init_parallel.

    .venv/bin/python -m pytest tests/parallel/test_dims.py -q
"""

import json

import pytest
import torch
import torch.distributed as dist

from spawn import run_workers

from ichiban_comm.parallel import ParallelDimsError, plan_layout
from ichiban_comm.parallel.__main__ import main as cli_main
from ichiban_comm.topology import Topology


def _topo(hosts_of_ranks):
    """A declared topology: hosts_of_ranks[r] is the host name of global rank r."""
    names = list(dict.fromkeys(hosts_of_ranks))
    ranks, seen = [], {}
    for r, h in enumerate(hosts_of_ranks):
        ranks.append({"rank": r, "host": h, "local_rank": seen.get(h, 0)})
        seen[h] = seen.get(h, 0) + 1
    return {"hosts": [{"name": n} for n in names], "ranks": ranks}


def test_tp_groups_stay_inside_hosts_when_hosts_interleave():
    # ranks 0,2 on h0 and 1,3 on h1: tp pairs must be {0,2} and {1,3}, dp crosses hosts
    lay = plan_layout(tp=2, dp=2, topology=Topology.from_dict(_topo(["h0", "h1", "h0", "h1"])))
    assert lay.tp_groups() == [[0, 2], [1, 3]]
    assert lay.dp_groups() == [[0, 1], [2, 3]]
    assert lay.split_tp_groups() == []


def test_pp_between_tp_and_dp():
    lay = plan_layout(tp=2, pp=2, dp=2, topology=Topology.from_dict(_topo(["a"] * 4 + ["b"] * 4)))
    assert lay.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.pp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.coords(6) == (1, 1, 0)


def test_uneven_hosts_keep_whole_groups_inside_and_say_which_span():
    # 3 ranks on a, 1 on b: one tp pair fits in a, the leftover rank of a pairs with b's
    lay = plan_layout(tp=2, topology=Topology.from_dict(_topo(["a", "a", "a", "b"])))
    assert lay.tp_groups() == [[0, 1], [2, 3]]
    assert lay.split_tp_groups() == [[2, 3]]
    assert "span hosts" in lay.describe()


@pytest.mark.parametrize("tp,pp,dp,words", [
    (3, 1, -1, ["tp=3", "pp=1", "world size 4"]),
    (2, 1, 3, ["tp=2", "pp=1", "dp=3", "world size is 4"]),
    (0, 1, -1, ["tp must be a positive integer", "got 0"]),
    (2, 2, -2, ["dp must be a positive integer or -1"]),
])
def test_sizes_that_do_not_fit_name_each_factor(tp, pp, dp, words):
    with pytest.raises(ParallelDimsError) as e:
        plan_layout(tp, pp, dp, world_size=4)
    for w in words:
        assert w in str(e.value)


def test_cli_prints_hosts(tmp_path, capsys):
    f = tmp_path / "topo.json"
    f.write_text(json.dumps(_topo(["h0", "h1", "h0", "h1"])))
    assert cli_main(["--tp", "2", "--dp", "2", "--topology", str(f)]) == 0
    out = capsys.readouterr().out
    assert "host h0: rank 0 (dp 0, pp 0, tp 0), rank 2 (dp 0, pp 0, tp 1)" in out
    assert "host h1: rank 1 (dp 1, pp 0, tp 0), rank 3 (dp 1, pp 0, tp 1)" in out
    assert cli_main(["--tp", "3", "--topology", str(f)]) == 2
    assert "tp=3" in capsys.readouterr().err


def _groups_of(dims, rank):
    out = {"tp_ranks": dims.tp_ranks, "dp_ranks": dims.dp_ranks, "pp_ranks": dims.pp_ranks,
           "coords": (dims.dp_rank, dims.pp_rank, dims.tp_rank), "describe": dims.describe()}
    for kind in ("tp", "pp", "dp"):
        g = getattr(dims, f"{kind}_group")
        # the group really holds those ranks: sum of (global rank + 1) over it, and its size
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t, group=g)
        out[f"{kind}_sum"] = t.item()
        out[f"{kind}_size"] = dist.get_world_size(g)
        assert dist.get_rank(g) == getattr(dims, f"{kind}_rank")
    return out


def _groups_body(rank, world):
    from ichiban_comm.parallel import init_parallel

    from ichiban_comm import topology

    dims = init_parallel(tp=2, pp=1, dp=-1)
    out = {"tp2dp2": _groups_of(dims, rank),
           "tp2pp2": _groups_of(init_parallel(tp=2, pp=2, dp=1), rank),
           # one topology per job: the object the backend's exchange built, not a second one
           "same_topology": dims.topology is topology.job_topology()}
    try:
        init_parallel(tp=3)
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_init_parallel_groups_follow_declared_topology(tmp_path):
    # ranks 0,2 on h0 and 1,3 on h1; the "ichiban" backend reads the same declared hosts
    f = tmp_path / "topo.json"
    f.write_text(json.dumps(_topo(["h0", "h1", "h0", "h1"])))
    res = run_workers(_groups_body, 4, backend="ichiban", timeout=120,
                      env={"ICHIBAN_TOPOLOGY": str(f)})
    tp_of = {0: [0, 2], 2: [0, 2], 1: [1, 3], 3: [1, 3]}
    dp_of = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    for r, o in enumerate(res):
        assert o["same_topology"]
        a = o["tp2dp2"]
        assert a["tp_ranks"] == tp_of[r] and a["dp_ranks"] == dp_of[r] and a["pp_ranks"] == [r]
        assert a["tp_sum"] == sum(x + 1 for x in tp_of[r]) and a["tp_size"] == 2
        assert a["dp_sum"] == sum(x + 1 for x in dp_of[r]) and a["dp_size"] == 2
        assert a["pp_sum"] == r + 1 and a["pp_size"] == 1
        b = o["tp2pp2"]  # the same tp pairs; the two pairs are the stages of one replica
        assert b["tp_ranks"] == tp_of[r] and b["pp_ranks"] == dp_of[r] and b["dp_ranks"] == [r]
        assert b["pp_sum"] == sum(x + 1 for x in dp_of[r]) and b["dp_size"] == 1
        assert "tp=3" in o["error"] and "world size 4" in o["error"]
    assert [o["tp2pp2"]["coords"] for o in res] == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]
    assert "host h1: rank 1 (dp 1, pp 0, tp 0)" in res[0]["tp2dp2"]["describe"]
