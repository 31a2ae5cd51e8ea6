"""Starting the job's process group so that torchrun restarts work: one fresh store per attempt.

Under ``torchrun --max-restarts N`` every worker of every attempt is handed the agent's
rendezvous store (``MASTER_ADDR:MASTER_PORT`` with ``TORCHELASTIC_USE_AGENT_STORE=True``), and
torch's ``env://`` start-up only prefixes its keys with the agent's
``TORCHELASTIC_RESTART_COUNT``. That count is per agent: the agent whose worker failed counts a
restart, the others restart their workers without counting one (pytorch/pytorch#135712,
#167288). Workers of the next attempt therefore meet the failed attempt's keys — Gloo's
``connectFullMesh`` dials dead peers, ``"ichiban"`` maps a dead group's shared-memory name — and
the restart fails.

Here the attempt is agreed through the store itself instead. Rank 0 of each attempt starts a new
store server (``TCPStore``, a free port, on the address it uses to reach the rendezvous host),
counts the attempt in the agent's store and publishes ``{address, port, nonce, attempt}`` there.
Every other rank reads that record and connects; a record left by an earlier attempt names a
server that is gone (torchrun stops every worker before it starts the next attempt, so the
connection is refused) or, if its port was reused, one whose nonce differs: the rank reads again
until the record is this attempt's. The job's process groups all live in that store, so nothing
of an earlier attempt is ever read. The same code runs on a first start; outside torchrun
(``--nproc``, a plain ``env://``) the group is created the ordinary way.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import time

import torch.distributed as dist

KEY_ATTEMPT = "ichiban/train/attempt"
KEY_STORE = "ichiban/train/store"
_NONCE = "ichiban/attempt/nonce"
_ATTEMPT = "ichiban/attempt/number"

_server = None   # rank 0 keeps its attempt's store server alive for the life of the process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    """Whether this process is a torchrun (elastic agent) worker sharing the agent's store."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def process_start_time() -> float:
    """Unix time at which this process started (from /proc; the time of the call elsewhere).

    /proc/self/stat gives the start in clock ticks since boot and /proc/uptime the seconds since
    boot now, both at 10 ms resolution (the boot time in /proc/stat is rounded to a second)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _route_address(host: str, port: int) -> str:
    """The local address this host uses to reach host:port (what the other ranks can dial)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)   # UDP: picks the route and source address, sends nothing
        return s.getsockname()[0]


def _reachable(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=1.0):
            return True
    except OSError:
        return False


def _attempt_store(rank: int, timeout: datetime.timedelta):
    """(store for this attempt's process groups, attempt number starting at 1)."""
    global _server
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if rank == 0:
        me = _route_address(host, port)
        nonce = secrets.token_hex(16)
        _server = dist.TCPStore(me, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        attempt = int(agent.add(KEY_ATTEMPT, 1))
        _server.set(_NONCE, nonce)
        _server.set(_ATTEMPT, str(attempt))
        agent.set(KEY_STORE, json.dumps({"addr": me, "port": _server.port, "nonce": nonce,
                                         "attempt": attempt}))
        return _server, attempt
    deadline = time.monotonic() + timeout.total_seconds()
    last = None
    while True:
        rec = json.loads(agent.get(KEY_STORE))   # waits (agent timeout) for a first record
        last = rec
        if _reachable(rec["addr"], rec["port"]):
            try:
                client = dist.TCPStore(rec["addr"], rec["port"], is_master=False,
                                       timeout=datetime.timedelta(seconds=10))
                if client.get(_NONCE).decode() == rec["nonce"]:
                    client.set_timeout(timeout)
                    return client, int(client.get(_ATTEMPT))
            except (RuntimeError, OSError):   # a server going away under us: read again
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: no store of this attempt after {timeout.total_seconds():.0f} s: the "
                f"newest record in torchrun's store names {last['addr']}:{last['port']} (attempt "
                f"{last['attempt']}), which does not answer; rank 0 may have failed to start")
        time.sleep(0.1)


def init_process_group(backend: str, timeout_s: float) -> dict:
    """Create the default process group on `backend` with op timeout `timeout_s`.

    Returns {"attempt": n (1 on a first start), "init_s": seconds from process start to the group
    being ready, "launch_time": unix time the process started, "time": unix time now}.
    """
    launch = process_start_time()
    timeout = datetime.timedelta(seconds=timeout_s)
    attempt = 1
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store, attempt = _attempt_store(rank, timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    now = time.time()
    return {"attempt": attempt, "init_s": max(0.0, now - launch), "launch_time": launch, "time": now}
