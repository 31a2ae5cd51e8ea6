"""One rank of the two-host test (launched by torchrun inside a network namespace).

    python two_host_worker.py OUT_DIR

On the "ichiban" backend: all_reduce, all_gather and broadcast of random tensors
(every rank's input comes from a seed, so every rank can compute the plain
result itself), each also run on a Gloo group over the same ranks; a mismatch
raises. Then writes OUT_DIR/rank<R>.json: where this rank ran, the default
group's backend counters (every read-only property of IchibanBackend), and the
median time of an all_reduce on both backends (a measurement, never checked).
"""

import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

import ichiban_comm  # noqa: F401  (registers the "ichiban" backend)

SIZES = (7, 1000, 1 << 16, 1 << 18)  # elements of float32: up to 1 MiB, past the one-shot threshold


def _input(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _check(what: str, got: torch.Tensor, want: torch.Tensor, exact: bool = False):
    ok = torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    if not ok:
        err = (got - want).abs().max().item()
        raise AssertionError(f"rank {dist.get_rank()}: {what} differs from the reference (max abs error {err})")


def _median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main(out_dir: str) -> None:
    dist.init_process_group("ichiban", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(backend="gloo")
    for i, n in enumerate(SIZES):
        seed = lambda r: 1000 * i + r  # noqa: E731
        mine = _input(seed(rank), n)
        want = torch.stack([_input(seed(r), n).double() for r in range(world)]).sum(0).float()
        ours, ref = mine.clone(), mine.clone()
        dist.all_reduce(ours)
        dist.all_reduce(ref, group=gloo)
        _check(f"all_reduce of {n} floats", ours, want)
        _check(f"all_reduce of {n} floats vs gloo", ours, ref)
        outs = [torch.empty(n) for _ in range(world)]
        dist.all_gather(outs, mine)
        for r in range(world):
            _check(f"all_gather of {n} floats, part {r}", outs[r], _input(seed(r), n), exact=True)
        for src in (0, world - 1):  # a source on each host
            b = mine.clone() if rank == src else torch.zeros(n)
            dist.broadcast(b, src)
            _check(f"broadcast of {n} floats from {src}", b, _input(seed(src), n), exact=True)

    x = _input(rank, SIZES[-1])
    timing = {"all_reduce_bytes": x.numel() * 4,
              "ichiban_ms": _median_ms(lambda: dist.all_reduce(x.clone())),
              "gloo_ms": _median_ms(lambda: dist.all_reduce(x.clone(), group=gloo))}

    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    counters = {}
    for name, attr in vars(type(backend)).items():  # IchibanBackend's own, not c10d.Backend's
        if not name.startswith("_") and isinstance(attr, property):
            value = getattr(backend, name)
            if isinstance(value, (bool, int, float, str)):
                counters[name] = value
    report = {"rank": rank, "world_size": world, "backend_type": type(backend).__name__,
              "test_host": os.environ.get("ICB_TEST_HOST"), "group_rank": os.environ.get("GROUP_RANK"),
              "local_rank": os.environ.get("LOCAL_RANK"), "master_addr": os.environ.get("MASTER_ADDR"),
              "hostname": socket.gethostname(), "counters": counters, "timing": timing}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
