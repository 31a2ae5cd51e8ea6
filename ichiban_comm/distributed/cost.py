"""Choosing the all-reduce algorithm: an alpha-beta cost model, refined by a
measured table.

Per link class: alpha = seconds per synchronisation step, beta = seconds per
byte of memory traffic. Inside a host every algorithm is a sequence of
barriers (alpha) and copies/reductions through shared memory; the ranks share
the memory bus, so beta applies to the traffic of all ranks together:

    one-shot  1 barrier,  each rank: write S, read n*S, write S   -> n*(n+2)*S
    two-shot  2 barriers, each rank: write S, read S, write S/n,
                          read S, write S                          -> n*(4+1/n)*S
    ring      n barriers, ~5*S per rank                            -> 5*n*S

so two-shot wins above S* = alpha / (beta * (n^2 - 2n - 1)) (never for n = 2).
``benchmarks/collectives.py --tune`` measures the real crossover on a machine
and writes it to the table (keyed by host and world size) that overrides the
model. Rank 0 of each group decides and shares its choice through the store,
so all ranks agree.
"""

from __future__ import annotations

import json
import os
import socket

# Seeds for the model when nothing was measured. A futex wake-up round trip
# costs ~5 us when every rank has a core and ~50 us when ranks outnumber cores
# (a barrier then waits for the scheduler); 10 GB/s is a conservative share of
# one socket's memory bandwidth.
ALPHA_S = {"shm": 5e-6, "shm_oversubscribed": 5e-5, "net": 5e-5}
BETA_S_PER_BYTE = {"shm": 1 / 10e9, "net": 1 / 1e9}

# Never below a page (one-shot is always right for tiny messages) and never
# above 64 MiB for n > 2 (two-shot is always right there); for n <= 2 the
# model never prefers two-shot.
_MIN_ONESHOT, _MAX_ONESHOT = 4096, 64 << 20
ALWAYS = 1 << 62


def tune_file() -> str:
    return os.environ.get("ICHIBAN_TUNE_FILE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ichiban_comm", "tune.json")


def tune_key(world_size: int, host: str | None = None) -> str:
    return f"{host or socket.gethostname()}/{world_size}"


def load_tuned(local_size: int) -> dict | None:
    """The measured entry for this host and local group size, if any."""
    try:
        with open(tune_file()) as f:
            table = json.load(f)
    except (OSError, ValueError):
        return None
    entry = table.get(tune_key(local_size))
    return entry if isinstance(entry, dict) else None


def save_tuned(local_size: int, entry: dict) -> str:
    path = tune_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table[tune_key(local_size)] = entry
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def oversubscribed(local_size: int) -> bool:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return local_size > cores


def model_oneshot_max_bytes(local_size: int) -> int:
    """Largest message for which one-shot beats two-shot under the model."""
    n = local_size
    denom = n * n - 2 * n - 1
    if n <= 2 or denom <= 0:
        return ALWAYS
    alpha = ALPHA_S["shm_oversubscribed" if oversubscribed(n) else "shm"]
    s = alpha / (BETA_S_PER_BYTE["shm"] * denom)
    return int(min(max(s, _MIN_ONESHOT), _MAX_ONESHOT))


def predict_us(algo: str, nbytes: int, local_size: int) -> float:
    """Model time of one all-reduce (microseconds), for the debug log and the tuner."""
    n = max(local_size, 1)
    alpha = ALPHA_S["shm_oversubscribed" if oversubscribed(n) else "shm"]
    beta = BETA_S_PER_BYTE["shm"]
    if algo == "oneshot":
        t = alpha + beta * n * (n + 2) * nbytes
    elif algo == "twoshot":
        t = 2 * alpha + beta * n * (4 + 1 / n) * nbytes
    elif algo == "ring":
        t = n * alpha + beta * 5 * n * nbytes
    else:
        raise ValueError(f"unknown algorithm {algo!r}")
    return t * 1e6


def choose_oneshot_max_bytes(local_size: int) -> tuple[int, str]:
    """(threshold, source): the measured table when present, else the model."""
    env = os.environ.get("ICHIBAN_ONESHOT_MAX_BYTES")
    if env:
        return int(env), "ICHIBAN_ONESHOT_MAX_BYTES"
    tuned = load_tuned(local_size)
    if tuned and "oneshot_max_bytes" in tuned:
        return int(tuned["oneshot_max_bytes"]), tune_file()
    return model_oneshot_max_bytes(local_size), "model"
