"""The staging pool: the first save stages into fresh pages and the pool is pinned behind it;
a grown state grows the pool in place; pinning that fails warns once and saves stay correct.
Checked through the pool's own counters, never through timing.

    python -m pytest -q tests/checkpoint/test_staging_pool.py
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ichiban_comm.checkpoint import AsyncCheckpointer, StorageReader, StorageWriter
from ichiban_comm.checkpoint import _stager

from _states import assert_same, make_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(seed, rows=64):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(rows, 1000, generator=g), "b": torch.randn(777, generator=g).to(torch.bfloat16),
            "t": torch.randn(30, 50, generator=g).t(), "step": seed}


def test_first_save_stages_fresh_then_pool_is_reused(tmp_path):
    with AsyncCheckpointer(tmp_path, writer_threads=2, chunk_bytes=4096) as ck:
        state = make_state(3)
        h = ck.save(1, state)
        assert h.staged_fresh
        h.wait()
        assert_same(state, ck.load(1))          # the first save's files load bit-exact
        ck._pool.wait_ready()
        s = ck.stats()
        assert s["fresh_saves"] == 1 and s["pooled_saves"] == 0 and s["allocations"] == 1
        assert s["ready_bytes"] >= s["pool_bytes"] > 0
        # Pinned here with mlock (root, or a memlock limit that allows it), else one reasoned failure.
        assert s["pinned_bytes"] == s["pool_bytes"] or s["pin_error"]
        state2 = make_state(4)
        h2 = ck.save(2, state2)
        assert not h2.staged_fresh
        h2.wait()
        assert_same(state2, ck.load(2))
        s = ck.stats()
        assert s["fresh_saves"] == 1 and s["pooled_saves"] == 1 and s["allocations"] == 1


def test_reserve_makes_the_first_save_a_pooled_one(tmp_path):
    with AsyncCheckpointer(tmp_path, writer_threads=2) as ck:
        state = make_state(5)
        n = ck.reserve(state, rank_state={"rng": torch.get_rng_state()})
        assert n >= ck.stats()["ready_bytes"] > 0
        h = ck.save(1, state, rank_state={"rng": torch.get_rng_state()})
        assert not h.staged_fresh
        h.wait()
        assert ck.stats()["fresh_saves"] == 0 and ck.stats()["allocations"] == 1
        assert_same(state, ck.load(1))


def test_growing_state_grows_the_pool_in_place(tmp_path):
    with AsyncCheckpointer(tmp_path, writer_threads=2, chunk_bytes=4096, keep_last=5) as ck:
        small = _state(0, rows=400)
        ck.reserve(small)
        before = ck.stats()["pool_bytes"]
        addr = ck._pool.arena.address
        ck.save(1, small).wait()
        # 10 % more state (e.g. more layers): the pool grows by about that, at the same address.
        big = _state(1, rows=440)
        big["extra"] = torch.randn(100, 1000)
        h = ck.save(2, big)
        assert h.staged_fresh
        h.wait()
        ck._pool.wait_ready()
        s = ck.stats()
        assert s["allocations"] == 1 and s["grows"] == 1
        assert ck._pool.arena.address == addr
        grown = s["pool_bytes"] - before
        need = (40 + 100) * 1000 * 4
        assert need <= grown <= need + (4 << 20), (grown, need)   # whole huge pages at most
        assert s["ready_bytes"] == s["pool_bytes"]
        assert_same(small, ck.load(1))
        assert_same(big, ck.load(2))
        # and a state that shrinks again stages into the pool without fresh pages
        assert not ck.save(3, small).staged_fresh
        ck.wait()
        assert_same(small, ck.load(3))


def test_pinning_refused_warns_once_and_saves_stay_correct(tmp_path, monkeypatch):
    calls = []

    def refuse(offset, length):
        calls.append((offset, length))
        return "injected: RLIMIT_MEMLOCK exceeded"

    monkeypatch.setattr(_stager, "PIN_FAULT", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AsyncCheckpointer(tmp_path, writer_threads=2, keep_last=4) as ck:
            states = [_state(i, rows=50 + 30 * i) for i in range(3)]   # grows twice
            for i, st in enumerate(states):
                ck.save(i, st).wait()
                ck._pool.wait_ready()
            for i, st in enumerate(states):
                assert_same(st, ck.load(i))
            s = ck.stats()
    pin = [w for w in caught if "pinning" in str(w.message)]
    assert len(pin) == 1, [str(w.message) for w in caught]
    assert "injected: RLIMIT_MEMLOCK exceeded" in str(pin[0].message)
    assert "pin_memory=False" in str(pin[0].message)
    assert len(calls) == 1          # given up after the first refusal, not retried per save
    assert s["pinned_bytes"] == 0 and s["pin_error"].startswith("injected") and s["pin_failures"] == 1


def test_pin_memory_false_never_pins_or_warns(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AsyncCheckpointer(tmp_path, pin_memory=False) as ck:
            ck.save(1, _state(0)).wait()
            ck._pool.wait_ready()
            assert ck.stats()["pin"] == "off" and ck.stats()["pinned_bytes"] == 0


_MEMLOCK_CHILD = textwrap.dedent("""
    import resource, sys, warnings, torch
    from ichiban_comm.checkpoint import AsyncCheckpointer
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))
    # root keeps CAP_IPC_LOCK, which ignores the limit: drop it from this process
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    hdr, data = Hdr(0x20080522, 0), (Data * 2)()
    libc.capget(ctypes.byref(hdr), data)
    data[0].effective &= ~(1 << 14)
    data[0].permitted &= ~(1 << 14)
    libc.capset(ctypes.byref(hdr), data)
    state = {"w": torch.randn(300, 1000)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AsyncCheckpointer(sys.argv[1], writer_threads=2) as ck:
            for step in range(3):
                ck.save(step, state).wait()
                ck._pool.wait_ready()
            back = ck.load(2)
            s = ck.stats()
    assert torch.equal(back["w"], state["w"])
    msgs = [str(w.message) for w in caught if "pinning" in str(w.message)]
    print(s["pin"], s["pinned_bytes"], len(msgs), msgs[0] if msgs else "")
""")


def test_rlimit_memlock_in_a_subprocess_warns_once(tmp_path):
    r = subprocess.run([sys.executable, "-c", _MEMLOCK_CHILD, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    mode, pinned, n, msg = r.stdout.strip().split(" ", 3)
    if mode != "mlock":
        pytest.skip(f"pinning here goes through {mode}, not mlock")
    if pinned != "0":
        pytest.skip("this process may lock memory regardless of RLIMIT_MEMLOCK")
    assert n == "1", r.stdout
    assert "mlock" in msg and "RLIMIT_MEMLOCK is 64 KiB" in msg, msg


# ---------------------------------------------------------------- StorageWriter under dcp.async_save
def _result(fut):
    return fut.result() if hasattr(fut, "result") else fut.upload_completion.result()


def test_async_save_first_call_fresh_then_one_pool_reused(tmp_path):
    writer = StorageWriter(tmp_path / "x", writer_threads=2, chunk_bytes=4096)
    states = [_state(i) for i in range(3)]
    for i, st in enumerate(states):
        _result(dcp.async_save(st, storage_writer=writer, checkpoint_id=str(tmp_path / f"s{i}")))
    pools = writer.stats()["pools"]
    assert len(pools) == 1, pools
    p = pools[0]
    assert p["allocations"] == 1 and p["fresh_saves"] == 1 and p["pooled_saves"] == 2 and p["leases"] == 0
    writer.close()
    for i, st in enumerate(states):
        target = {"w": torch.zeros(64, 1000), "b": torch.zeros(777, dtype=torch.bfloat16),
                  "t": torch.zeros(30, 50).t(), "step": -1}
        dcp.load(target, storage_reader=StorageReader(tmp_path / f"s{i}"))
        assert torch.equal(target["w"], st["w"]) and torch.equal(target["t"], st["t"])
        assert torch.equal(target["b"].view(torch.int16), st["b"].view(torch.int16))
