"""Which host each member of a process group lives on, as the backend sees it.

Read from the job's one :class:`~ichiban_comm.topology.Topology`
(``topology.job_topology()``): members that it places on one host share
memory; members on different hosts never do, even when they run on one
machine (that is how a declared 2 hosts x 2 ranks topology exercises the
inter-host path on one box). When the topology's exchange told which machine
each rank runs on, two ranks that a declared file wrongly put together but
that run on different machines are kept apart too. No exchange happens here.
"""

from __future__ import annotations

from ..topology import Topology


def host_assignment(topo: Topology, global_ranks: list[int]) -> tuple[list[int], list[str]]:
    """(host index of every group rank, host names), hosts numbered in order of first rank."""
    keys = []
    for g in global_ranks:
        host = topo.host_of(g)
        machine = topo.machines[g] if topo.machines is not None else ""
        keys.append(f"{host}@{machine}" if machine else host)
    order: dict[str, int] = {}
    host_of = [order.setdefault(k, len(order)) for k in keys]
    return host_of, list(order)
