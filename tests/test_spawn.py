"""The spawn helper itself: results come back, failures and hangs fail fast."""

import time

import pytest
import torch
import torch.distributed as dist

from spawn import WorkerError, run_workers


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def _hang(rank, world_size):
    time.sleep(60)


def test_results_in_rank_order():
    assert run_workers(_sum_ranks, 3, timeout=60) == [6.0, 6.0, 6.0]


def test_worker_error_is_reported():
    with pytest.raises(WorkerError, match="boom from rank 1"):
        run_workers(_raise_on_one, 2, backend=None, timeout=30)


def test_hang_is_killed_within_timeout():
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="did not finish"):
        run_workers(_hang, 2, backend=None, timeout=3)
    assert time.monotonic() - t0 < 20
