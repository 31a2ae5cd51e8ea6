"""Choosing the all-reduce algorithm: an alpha-beta cost model, refined by a
measured table.

Per link class: alpha = seconds per synchronisation step, beta = seconds per
byte of memory traffic, gamma = seconds per byte reduced. Inside a host every
algorithm is a sequence of barriers (alpha) and copies/reductions through
shared memory; the ranks share the memory bus, so beta applies to the traffic
of all ranks together, while each rank reduces on its own core:

    one-shot  1 barrier;  each rank writes S, reads n*S, writes S: (n+2)*S;
              reduces (n-1)*S
    two-shot  1 barrier, then per chunk 2 waits for the peers' stages; each
              rank copies in the (n-1)/n of S its peers reduce, reduces its
              own S/n from its buffer and the peers' slots (reads S, writes
              2S/n), copies the other (n-1)/n of S out: (5-2/n)*S; reduces
              (n-1)*S/n
    ring      n barriers, ~5*S per rank

A stage wait only waits for a peer that is behind. With a core per rank the
peers run the same stages at once and the waits cost about nothing (on the
2-core VM two-shot beat one-shot at 4 KiB, where counting the waits as
barriers predicted the opposite); when ranks
outnumber cores each wait hands the core over and costs alpha like a barrier.
So with a core per rank two-shot wins at every size the page floor below
leaves it (one-shot does more reduction work and moves as much or more), and
when oversubscribed above S* = 2*alpha / (beta*(n-1)(n-2) + gamma*(n-1)^2/n),
where ``predict_us`` crosses.
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
# one socket's memory bandwidth, and of one core's rate of reducing two
# cached float streams.
ALPHA_S = {"shm": 5e-6, "shm_oversubscribed": 5e-5, "net": 5e-5}
BETA_S_PER_BYTE = {"shm": 1 / 10e9, "net": 1 / 1e9}
GAMMA_S_PER_BYTE = 1 / 10e9

# Never below a page (one-shot is always right for tiny messages) and never
# above 64 MiB (two-shot is always right there).
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


def traffic_per_rank(algo: str, nbytes: int, n: int) -> float:
    """Bytes one rank reads plus writes in memory for an all-reduce of nbytes."""
    if n <= 1:
        return 0.0
    if algo == "oneshot":
        return (n + 2) * nbytes
    if algo == "twoshot":
        return (5 - 2 / n) * nbytes
    if algo == "ring":
        return 5 * nbytes
    if algo == "inplace":  # on host-shared tensors: read every rank's segment, write it to every rank
        return 2 * nbytes
    raise ValueError(f"unknown algorithm {algo!r}")


def _reduced_per_rank(algo: str, nbytes: int, n: int) -> float:
    return {"oneshot": (n - 1) * nbytes, "twoshot": (n - 1) * nbytes / n, "ring": (n - 1) * nbytes / n}[algo]


def _sync_s(algo: str, n: int) -> float:
    """Seconds one op spends synchronising (module docstring)."""
    over = oversubscribed(n)
    alpha = ALPHA_S["shm_oversubscribed" if over else "shm"]
    # two-shot: an opening barrier, then per chunk a wait for the peers'
    # copy-in and one for their reductions, which cost only when oversubscribed
    return {"oneshot": 1, "twoshot": 3 if over else 1, "ring": n}[algo] * alpha


def predict_us(algo: str, nbytes: int, local_size: int) -> float:
    """Model time of one all-reduce (microseconds), for the debug log and the tuner."""
    n = max(local_size, 1)
    traffic = traffic_per_rank(algo, nbytes, n)  # raises on an unknown name
    t = (_sync_s(algo, n) + BETA_S_PER_BYTE["shm"] * n * traffic
         + GAMMA_S_PER_BYTE * _reduced_per_rank(algo, nbytes, n))
    return t * 1e6


def model_oneshot_max_bytes(local_size: int) -> int:
    """Largest message for which one-shot beats two-shot under the model.

    one-shot minus two-shot = -(extra sync of two-shot) + S * (beta*(n-1)(n-2)
    + gamma*(n-1)^2/n), which grows with S, so the crossover is where it is
    zero: 2*alpha / (...) when ranks outnumber cores, else nothing, and the
    page floor keeps one-shot for the smallest messages.
    """
    n = local_size
    if n <= 1:
        return ALWAYS
    per_byte = BETA_S_PER_BYTE["shm"] * (n - 1) * (n - 2) + GAMMA_S_PER_BYTE * (n - 1) ** 2 / n
    s = (_sync_s("twoshot", n) - _sync_s("oneshot", n)) / per_byte
    return int(min(max(s, _MIN_ONESHOT), _MAX_ONESHOT))


def choose_oneshot_max_bytes(local_size: int) -> tuple[int, str]:
    """(threshold, source): the measured table when present, else the model.

    A threshold set in IchibanOptions (or ICHIBAN_ONESHOT_MAX_BYTES, which fills
    its default) wins over both; the backend checks that before asking here."""
    tuned = load_tuned(local_size)
    if tuned and "oneshot_max_bytes" in tuned:
        return int(tuned["oneshot_max_bytes"]), tune_file()
    return model_oneshot_max_bytes(local_size), "model"
