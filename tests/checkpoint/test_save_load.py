"""Single-process save/load: every kind of leaf, bit-exact, sharing kept, atomic layout.

    python -m pytest -q tests/checkpoint/test_save_load.py
"""

import os

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer, CheckpointError
from ichiban_comm.checkpoint import _layout as layout

from _states import assert_same, bits_equal, make_state


def test_roundtrip_every_leaf_kind(tmp_path):
    state = make_state(1)
    with AsyncCheckpointer(tmp_path, keep_last=2) as ck:
        h = ck.save(5, state)
        path = h.wait()
        assert path == layout.step_dir(str(tmp_path), 5) and os.path.isdir(path)
        assert ck.latest_step() == 5
        loaded = ck.load()
    assert_same(state, loaded)
    # tensors that shared storage still do, and only those
    m, v = loaded["model"], loaded["views"]
    assert m["emb"] is not None and m["emb"].data_ptr() == m["emb_tied"].data_ptr()
    assert v["rows"].untyped_storage().data_ptr() == v["base"].untyped_storage().data_ptr()
    assert v["cols"].untyped_storage().data_ptr() == v["base"].untyped_storage().data_ptr()
    v["base"][4, 6] = 1234.5
    assert v["rows"][1, 6] == 1234.5 and v["cols"][4, 1] == 1234.5
    assert m["w"].untyped_storage().data_ptr() != loaded["optim"]["state"][0]["exp_avg"].untyped_storage().data_ptr()
    assert open(tmp_path / "latest").read().strip() == layout.step_name(5)


def test_save_returns_after_snapshot_mutation_does_not_leak(tmp_path):
    state = {"w": torch.randn(256, 256), "b": torch.randn(1000).to(torch.bfloat16)}
    expect = {k: v.clone() for k, v in state.items()}
    with AsyncCheckpointer(tmp_path, writer_threads=2, chunk_bytes=4096) as ck:
        h = ck.save(1, state)
        for v in state.values():   # training goes on and overwrites the weights at once
            v.add_(1)
        h.wait()
        loaded = ck.load(step=1)
    for k in expect:
        assert bits_equal(loaded[k], expect[k])


def test_keep_last_prunes_after_commit_and_pool_is_reused(tmp_path):
    ck = AsyncCheckpointer(tmp_path, keep_last=2)
    states = {}
    for step in (10, 20, 30, 40):
        states[step] = make_state(step)
        ck.save(step, states[step])
        if step == 10:
            pool = ck._pool.buffer.data_ptr()
    ck.close()
    assert ck._pool.buffer is None
    assert layout.committed_steps(str(tmp_path)) == [30, 40]
    ck = AsyncCheckpointer(tmp_path, keep_last=2)
    assert ck.latest_step() == 40
    assert_same(states[30], ck.load(step=30))
    assert_same(states[40], ck.load())
    assert pool != 0
    with pytest.raises(CheckpointError, match="no committed checkpoint for step 10"):
        ck.load(step=10)
    ck.close()


def test_staging_pool_allocated_once_and_reused(tmp_path):
    with AsyncCheckpointer(tmp_path) as ck:
        s = make_state(3)
        size = ck.reserve(s)
        buf = ck._pool.buffer
        assert size == buf.numel() >= sum(t.numel() * t.element_size() for t in s["model"].values()
                                          if t is not s["model"]["emb_tied"])
        ck.save(1, s).wait()
        assert ck._pool.buffer is buf
        ck.save(2, make_state(4)).wait()
        assert ck._pool.buffer is buf


@pytest.mark.parametrize("budget,compression", [(4096, None), (20000, None), (8192, "zstd")])
def test_waves_when_state_exceeds_budget(tmp_path, budget, compression):
    state = make_state(7, scale=3)
    state["big_view"] = torch.randn(96, 80).t()        # non-contiguous, larger than the budget
    with AsyncCheckpointer(tmp_path, staging_budget_bytes=budget, chunk_bytes=4096, writer_threads=2,
                           compression=compression) as ck:
        ck.save(3, state).wait()
        assert ck._pool.nbytes <= budget
        files = os.listdir(layout.step_dir(str(tmp_path), 3))
        assert any("_v3_" in f for f in files), "expected several staging waves"
        assert_same(state, ck.load())


def test_load_into_fills_in_place(tmp_path):
    state = make_state(11)
    with AsyncCheckpointer(tmp_path) as ck:
        ck.save(1, state).wait()
        target = make_state(12)               # same structure, other values
        w = target["model"]["w"]
        out = ck.load(into=target)
    assert out["model"]["w"] is w and bits_equal(w, state["model"]["w"])
    assert_same(state, out)
    bad = make_state(12)
    bad["model"]["w"] = torch.zeros(3, 3)
    with AsyncCheckpointer(tmp_path) as ck:
        with pytest.raises(ValueError, match=r"into\[model.w\] has shape"):
            ck.load(into=bad)
        bad["model"]["w"] = torch.zeros(64, 48, dtype=torch.float64)
        with pytest.raises(TypeError, match=r"dtype torch.float64"):
            ck.load(into=bad)
        with pytest.raises(KeyError, match="not_saved"):
            ck.load(into={"not_saved": torch.zeros(1)})


def test_load_into_module_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    with AsyncCheckpointer(tmp_path) as ck:
        ck.save(1, {"model": model.state_dict()}).wait()
        other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        ck.load(into={"model": other.state_dict()})
    x = torch.randn(5, 8)
    assert torch.equal(model(x), other(x))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be an integer >= 1"):
        AsyncCheckpointer(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="compression must be None or 'zstd'"):
        AsyncCheckpointer(tmp_path, compression="gzip")
    with pytest.raises(ValueError, match="staging_budget_bytes"):
        AsyncCheckpointer(tmp_path, staging_budget_bytes=10)
    with AsyncCheckpointer(tmp_path) as ck:
        with pytest.raises(TypeError, match=r"state\[a.b\] is a builtins.object"):
            ck.save(1, {"a": {"b": object()}})
        with pytest.raises(ValueError, match="step must be a non-negative integer"):
            ck.save(-1, {})
        with pytest.raises(TypeError, match="sparse"):
            ck.save(1, {"s": torch.eye(3).to_sparse()})
        with pytest.raises(TypeError, match=r"state\[k\] has a key of type Tensor"):
            ck.save(1, {"k": {torch.zeros(1): 1}})
        loop = {}
        loop["self"] = loop
        with pytest.raises(ValueError, match="contains itself"):
            ck.save(1, loop)
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            ck.load()
        with pytest.raises(ValueError, match="step must be None or a non-negative integer"):
            ck.load(step="3")
        assert os.listdir(tmp_path) == [layout.LOCK], "refused saves must leave nothing behind"
    with pytest.raises(CheckpointError, match="closed"):
        ck.save(1, {})


def test_plain_values_only_and_resave_same_step(tmp_path):
    with AsyncCheckpointer(tmp_path) as ck:
        ck.save(1, {"a": 1}).wait()
        ck.save(1, {"a": 2, "t": torch.arange(5), (1, "x"): {3.5: "f", None: 0}}).wait()
        out = ck.load(step=1)
    assert out["a"] == 2 and torch.equal(out["t"], torch.arange(5))
    assert out[(1, "x")] == {3.5: "f", None: 0}
    assert layout.committed_steps(str(tmp_path)) == [1]


def test_stale_tmp_swept_on_start(tmp_path):
    os.makedirs(tmp_path / "step_000000000007.tmp")
    (tmp_path / "step_000000000007.tmp" / "r0_v0_w0.bin").write_bytes(b"junk")
    os.makedirs(tmp_path / "step_000000000003.del")
    AsyncCheckpointer(tmp_path).close()
    assert sorted(os.listdir(tmp_path)) == [layout.LOCK]


def test_rank_state_single_process(tmp_path):
    g = torch.randn(4)
    with AsyncCheckpointer(tmp_path) as ck:
        ck.save(1, {"w": torch.randn(3)}).wait()
        ck.save(2, {"w": torch.randn(3)}, rank_state={"pos": 5, "g": g}).wait()
        assert ck.load_rank_state(step=1) is None
        rs = ck.load_rank_state()
        assert rs["pos"] == 5 and bits_equal(rs["g"], g)
        with pytest.raises(CheckpointError, match="no committed checkpoint for step 9"):
            ck.load_rank_state(step=9)


def test_save_in_flight_at_exit_is_finished(tmp_path):
    import subprocess
    import sys

    code = ("import sys, torch\nfrom ichiban_comm.checkpoint import AsyncCheckpointer\n"
            "ck = AsyncCheckpointer(sys.argv[1])\n"
            "ck.save(3, {'w': torch.arange(1 << 20, dtype=torch.float32)})\n")   # no wait, no close
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with AsyncCheckpointer(tmp_path) as ck:
        assert ck.latest_step() == 3
        assert torch.equal(ck.load()["w"], torch.arange(1 << 20, dtype=torch.float32))


def test_save_in_forked_child_is_refused(tmp_path):
    ck = AsyncCheckpointer(tmp_path)
    ck.reserve({"w": torch.randn(10)})
    pid = os.fork()
    if pid == 0:
        try:
            ck.save(1, {"w": torch.randn(10)})
            code = 3
        except CheckpointError as e:
            code = 0 if "create a new one in process" in str(e) else 4
        except BaseException:  # noqa: BLE001
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    ck.save(1, {"w": torch.randn(10)}).wait()
    ck.close()
