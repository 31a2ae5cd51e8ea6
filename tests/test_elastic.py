"""The per-attempt store (ichiban_comm/elastic.py) against the records an earlier attempt leaves.

torchrun's store is played by a TCPStore in this process; the ranks of one attempt are threads.
The full restarts run under real torchrun in tests/test_train_resilient.py.

    python -m pytest -q tests/test_elastic.py
"""

from __future__ import annotations

import datetime
import json
import threading
import time

import pytest
import torch.distributed as dist

from ichiban_comm import elastic

T = datetime.timedelta(seconds=20)


@pytest.fixture
def agent(monkeypatch):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=T)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    yield store
    elastic._server = None


def _attempt(ranks, delay_rank0=0.0):
    """Run _attempt_store for each rank on its own thread; rank 0 starts after delay_rank0."""
    got, errors = {}, []

    def run(r):
        try:
            if r == 0:
                time.sleep(delay_rank0)
            store, attempt = elastic._attempt_store(r, T)
            got[r] = (store, attempt)
        except Exception as e:  # noqa: BLE001
            errors.append((r, e))

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return got


def test_first_attempt_shares_one_fresh_store(agent):
    got = _attempt([0, 1, 2])
    assert {a for _, a in got.values()} == {1}
    got[0][0].set("from_rank0", "x")
    assert got[1][0].get("from_rank0") == b"x" and got[2][0].get("from_rank0") == b"x"


def test_a_record_left_by_a_dead_attempt_is_skipped(agent):
    # attempt 1's record names a server that is gone (its rank 0 died with it)
    dead = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=T)
    dead_port = dead.port
    del dead
    agent.add(elastic.KEY_ATTEMPT, 1)
    agent.set(elastic.KEY_STORE, json.dumps({"addr": "127.0.0.1", "port": dead_port,
                                             "nonce": "old", "attempt": 1}))
    got = _attempt([0, 1], delay_rank0=1.5)   # rank 1 reads the stale record first
    assert got[0][1] == got[1][1] == 2
    got[1][0].set("k", "v")
    assert got[0][0].get("k") == b"v"


def test_a_live_server_with_another_nonce_is_not_joined(agent):
    # the stale record's port now belongs to some other live store: the nonce tells them apart
    other = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=T)
    other.set(elastic._NONCE, "someone-else")
    agent.add(elastic.KEY_ATTEMPT, 1)
    agent.set(elastic.KEY_STORE, json.dumps({"addr": "127.0.0.1", "port": other.port,
                                             "nonce": "old", "attempt": 1}))
    got = _attempt([0, 1], delay_rank0=1.0)
    assert got[1][1] == 2 and got[1][0].port != other.port


def test_no_rank0_is_a_clear_timeout(agent, monkeypatch):
    agent.set(elastic.KEY_STORE, json.dumps({"addr": "127.0.0.1", "port": 1, "nonce": "n",
                                             "attempt": 7}))
    with pytest.raises(TimeoutError, match=r"rank 1: no store of this attempt .*\(attempt 7\).*rank 0 may have failed"):
        elastic._attempt_store(1, datetime.timedelta(seconds=1.5))


def test_process_start_time_is_in_the_past():
    assert time.time() - 3600 * 24 < elastic.process_start_time() <= time.time()
