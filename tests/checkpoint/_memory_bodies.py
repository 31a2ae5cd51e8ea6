"""Processes of the memory-tier tests (test_memory_tier.py): a trainer killed after a commit,
and the ranks of a job declared on two hosts."""

import os
import time

import torch

from _states import make_state


def seeded_state(step: int):
    torch.manual_seed(step)  # make_state holds the global RNG state: the same in every process
    return make_state(step)


def save_then_wait(root: str, conn, steps: int):
    """Commit `steps` saves to the memory tier, report, then wait to be SIGKILLed."""
    from ichiban_comm.checkpoint import AsyncCheckpointer

    ck = AsyncCheckpointer(root, keep_last=3, memory=True, memory_keep=2, chunk_bytes=4096,
                           writer_threads=2, keeper_idle_timeout_s=120)
    for step in range(1, steps + 1):
        ck.save(step, seeded_state(step)).wait()
    conn.send(("committed", steps))
    while True:
        time.sleep(1)


def two_host_state(step: int, rank: int):
    """The same tensors on every rank (replicated, so each rank writes some of them) plus a
    per-rank tensor in rank_state."""
    g = torch.Generator().manual_seed(100 + step)
    state = {f"layer{i}": torch.randn(64 + 7 * i, 33, generator=g) for i in range(6)}
    state["bf16"] = torch.randn(300, generator=g).to(torch.bfloat16)
    state["step"] = step
    return state, {"mine": torch.full((5,), float(rank * 1000 + step))}


def two_host_save(rank, world, root, steps):
    from ichiban_comm.checkpoint import AsyncCheckpointer

    # rank 0's replica (the one read back) goes zstd-encoded; rank 1's raw and throttled
    ck = AsyncCheckpointer(root, memory=True, replicas=1, memory_keep=2, chunk_bytes=4096,
                           writer_threads=2, keeper_idle_timeout_s=120,
                           replica_compression="zstd" if rank == 0 else None,
                           replica_bandwidth=None if rank == 0 else 20e6)
    host = ck.memory_tier.host
    peers = list(ck.memory_tier.peers)
    for step in range(1, steps + 1):
        state, mine = two_host_state(step, rank)
        ck.save(step, state, rank_state=mine).wait()
    assert ck.memory_tier.wait_replicated(60), "replicas not sent within 60 s"
    sent = ck.memory_tier.replicated_bytes
    raw = ck.memory_tier.replicated_raw_bytes
    ck.close()
    return {"host": host, "peers": peers, "replicated_bytes": sent, "raw_bytes": raw}


def two_host_load(rank, world, root, step):
    from ichiban_comm.checkpoint import AsyncCheckpointer

    ck = AsyncCheckpointer(root, memory=True, replicas=1, chunk_bytes=4096, writer_threads=2,
                           keeper_idle_timeout_s=120)
    state = ck.load()
    want, _ = two_host_state(step, rank)
    same = all(torch.equal(state[k].view(torch.uint8), want[k].view(torch.uint8))
               for k in want if isinstance(want[k], torch.Tensor)) and state["step"] == want["step"]
    tiers = ck.last_load
    _, mine = two_host_state(step, rank)
    same = same and torch.equal(ck.load_rank_state()["mine"], mine["mine"])
    ck.close()
    return {"same": same, "last_load": tiers, "pid": os.getpid()}
