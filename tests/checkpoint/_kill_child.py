"""A process that saves checkpoints back to back until it is killed (see test_failures.py)."""

import torch


def kill_state(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    base = torch.randn(96, 64, generator=g)
    return {
        "w": torch.randn(128, 96, generator=g),
        "b": torch.randn(300, 7, generator=g).to(torch.bfloat16),
        "view": base, "rows": base[10:20],
        "t": torch.randn(50, 40, generator=g).t(),
        "step": step,
    }


def save_forever(root: str, conn, compression):
    from ichiban_comm.checkpoint import AsyncCheckpointer

    ck = AsyncCheckpointer(root, keep_last=3, chunk_bytes=4096, writer_threads=2, compression=compression)
    step = (ck.latest_step() or 0) + 1
    conn.send(("ready", step))
    while True:
        ck.save(step, kill_state(step)).wait()
        conn.send(("committed", step))
        step += 1
