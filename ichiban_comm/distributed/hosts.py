"""Which host each member of a process group lives on, as the backend sees it.

The declared or detected topology (``ichiban_comm.topology``) names the host of
every global rank. Members that the topology places on one host share memory;
members on different hosts never do, even when they run on one machine (that
is how a declared 2 hosts x 2 ranks topology exercises the inter-host path on
one box). Each member publishes "<host>@<machine id>" through the group's
store, so two processes that the topology wrongly put together but that run on
different machines are still kept apart.
"""

from __future__ import annotations

import datetime
import os
import socket

from .. import topology


def _machine_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}:{boot}"


def _declared_host(global_rank: int) -> str | None:
    """The host a declared topology (ICHIBAN_TOPOLOGY) gives global_rank; None when none is declared.

    Without a declaration the machine itself names the host, which is what detection would
    say; the topology module validates the file and names what is wrong with it.
    """
    path = os.environ.get(topology.ENV_TOPOLOGY)
    if not path:
        return None
    return topology.Topology.from_json(path).host_of(global_rank)


def host_assignment(store, group_rank: int, group_size: int, global_rank: int,
                    timeout_s: float) -> tuple[list[int], list[str]]:
    """(host index of every group rank, host names), hosts numbered in order of first rank.

    Collective over the group's members (each publishes its own entry).
    """
    declared = _declared_host(global_rank)
    me = f"{declared or socket.gethostname()}@{_machine_id()}"
    store.set(f"ichiban_host/{group_rank}", me)
    keys = [f"ichiban_host/{r}" for r in range(group_size)]
    store.wait(keys, datetime.timedelta(seconds=timeout_s))
    names = [store.get(k).decode() for k in keys]
    order: dict[str, int] = {}
    host_of = [order.setdefault(n, len(order)) for n in names]
    return host_of, list(order)
