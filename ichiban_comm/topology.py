"""What the machine and the cluster look like: one object every decision reads.

``detect()`` builds a :class:`Topology` from torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK) and a probe of this host
(NUMA nodes, GPUs and their links, NICs). Given a c10d store, the per-host facts
of every rank are exchanged through it once, so every rank holds the same
picture. ``ICHIBAN_TOPOLOGY=path`` (or ``Topology.from_json(path)``) declares a
topology instead: that is how one machine pretends to be a cluster — ranks
declared on different hosts never share memory, even on one box.

    python -m ichiban_comm.topology          # a readable tree of this machine
    python -m ichiban_comm.topology --json   # the same as JSON

Declared JSON::

    {"hosts": [{"name": "h0", "numa": [...], "gpus": [...], "gpu_links": {...}, "nics": [...]}, ...],
     "ranks": [{"rank": 0, "host": "h0", "local_rank": 0, "gpu": null, "numa": 0}, ...]}

Only ``hosts[].name`` and ``ranks[].{rank, host, local_rank}`` are required.

One job, one topology: :func:`job_topology` is what the ``"ichiban"`` backend
(which ranks share memory) and the parallel layouts read. The backend
establishes it when the default process group is created, through that
group's store: one exchange, which also carries each rank's machine identity,
so ranks that a declared file puts on one host but that run on different
machines are kept apart.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass

from . import _probe

ENV_TOPOLOGY = "ICHIBAN_TOPOLOGY"
_STORE_PREFIX = "ichiban/topology/"


class TopologyError(ValueError):
    """A topology file or environment that does not describe a valid layout."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str
    local_rank: int
    gpu: int | None = None   # index on its host, None without GPUs
    numa: int | None = None  # NUMA node its memory should come from


class Topology:
    def __init__(self, hosts: list[dict], ranks: list[RankInfo], source: str = "declared"):
        self._hosts = {h["name"]: h for h in hosts}
        self._host_order = [h["name"] for h in hosts]
        self._ranks = sorted(ranks, key=lambda r: r.rank)
        self.source = source
        # rank -> the machine it really runs on ("<hostname>:<boot id>"), when
        # an exchange told; not part of the declared format.
        self.machines: list[str] | None = None
        self._validate()

    def shares_memory(self, a: int, b: int) -> bool:
        """Whether ranks a and b may talk through shared memory: the same host and,
        when the machines are known, the same machine."""
        if not self.same_host(a, b):
            return False
        return self.machines is None or self.machines[a] == self.machines[b]

    # ---- queries -----------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self._ranks)

    @property
    def hosts(self) -> list[str]:
        """Host names in the order of their first rank."""
        seen: list[str] = []
        for r in self._ranks:
            if r.host not in seen:
                seen.append(r.host)
        return seen + [h for h in self._host_order if h not in seen]

    @property
    def ranks(self) -> list[RankInfo]:
        return list(self._ranks)

    def rank_info(self, rank: int) -> RankInfo:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} is outside the topology's world of {self.world_size}")
        return self._ranks[rank]

    def host_of(self, rank: int) -> str:
        return self.rank_info(rank).host

    def host(self, name: str) -> dict:
        """The facts of one host: numa, gpus, gpu_links, nics (as detected or declared)."""
        return self._hosts[name]

    def ranks_on(self, host: str) -> list[int]:
        return [r.rank for r in self._ranks if r.host == host]

    def local_rank_of(self, rank: int) -> int:
        return self.rank_info(rank).local_rank

    def same_host(self, a: int, b: int) -> bool:
        return self.host_of(a) == self.host_of(b)

    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @property
    def is_uniform(self) -> bool:
        """Every host runs the same number of ranks."""
        return len({len(self.ranks_on(h)) for h in self.hosts}) <= 1

    def gpu_link(self, host: str, i: int, j: int) -> dict | None:
        """``{"kind": "nvlink"|"pcie"|"cross-socket", "nvlinks": n}`` between GPUs i and j of host."""
        if i == j:
            return {"kind": "self", "nvlinks": 0}
        a, b = min(i, j), max(i, j)
        return self._hosts[host].get("gpu_links", {}).get(f"{a},{b}")

    # ---- serialisation ----------------------------------------------------
    def to_dict(self) -> dict:
        return {"hosts": [self._hosts[h] for h in self._host_order],
                "ranks": [asdict(r) for r in self._ranks]}

    def to_json(self, path: str | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data, where: str = "<dict>", source: str = "declared") -> "Topology":
        return cls(*_parse(data, where), source=source)

    @classmethod
    def from_json(cls, path: str) -> "Topology":
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise TopologyError(f"topology file {path}: cannot be read ({e.strerror})") from e
        except json.JSONDecodeError as e:
            raise TopologyError(f"topology file {path}: not valid JSON ({e.msg} at line {e.lineno}, "
                                f"column {e.colno})") from e
        return cls.from_dict(data, where=f"topology file {path}", source=f"declared ({path})")

    # ---- rendering -----------------------------------------------------------
    def format_tree(self) -> str:
        lines = [f"topology ({self.source}): {self.world_size} rank(s) on {self.num_hosts} host(s)"]
        for hname in self.hosts:
            h = self._hosts.get(hname, {"name": hname})
            ranks = [r for r in self._ranks if r.host == hname]
            lines.append(f"host {hname}: ranks {[r.rank for r in ranks]}")
            for node in h.get("numa", []):
                mem = f", {node['mem_mib'] / 1024:.1f} GiB" if node.get("mem_mib") else ""
                lines.append(f"  numa {node['id']}: cpus {_compact(node.get('cpus', []))}{mem}")
                for g in h.get("gpus", []):
                    if g.get("numa") == node["id"] or (g.get("numa") is None and node is h["numa"][0]):
                        lines.append(f"    gpu {g['index']}: {g.get('name', '?')} "
                                     f"({g.get('pci_bus_id', '?')})")
                for n in h.get("nics", []):
                    if n.get("numa") == node["id"] or (n.get("numa") is None and node is h["numa"][0]):
                        speed = f", {n['speed_mbps'] / 1000:g} Gb/s" if n.get("speed_mbps") else ""
                        virt = ", virtual" if n.get("virtual") else ""
                        lines.append(f"    nic {n['name']}: {n.get('kind', '?')}{speed}{virt}")
                for r in ranks:
                    if r.numa == node["id"]:
                        gpu = f" -> gpu {r.gpu}" if r.gpu is not None else ""
                        lines.append(f"    rank {r.rank} (local {r.local_rank}){gpu}")
            for r in ranks:
                if r.numa is None or not any(n["id"] == r.numa for n in h.get("numa", [])):
                    gpu = f" -> gpu {r.gpu}" if r.gpu is not None else ""
                    lines.append(f"  rank {r.rank} (local {r.local_rank}){gpu}")
            gpus = h.get("gpus", [])
            if gpus:
                lines.append("  gpu links: " + ("" if len(gpus) > 1 else "(one gpu)"))
                header = "       " + "".join(f"{'gpu' + str(g['index']):>8}" for g in gpus)
                if len(gpus) > 1:
                    lines.append(header)
                    for a in gpus:
                        row = f"    {'gpu' + str(a['index']):<4}"
                        for b in gpus:
                            link = self.gpu_link(hname, a["index"], b["index"]) or {"kind": "?"}
                            cell = {"self": "X", "pcie": "PCIe", "cross-socket": "SYS"}.get(
                                link["kind"], f"NV{link.get('nvlinks', 0)}")
                            row += f"{cell:>8}"
                        lines.append(row)
            else:
                lines.append(f"  gpus: none ({h.get('gpu_source', 'declared')})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Topology(world_size={self.world_size}, hosts={self.hosts}, "
                f"source={self.source!r})")

    # ---- checks ------------------------------------------------------------
    def _validate(self, where: str = "topology") -> None:
        for r in self._ranks:
            if r.host not in self._hosts:
                raise TopologyError(f"{where}: rank {r.rank} is on host {r.host!r}, which is not in "
                                    f"'hosts' (hosts: {self._host_order})")


def _compact(cpus: list[int]) -> str:
    if not cpus:
        return "none"
    out, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(out)


def _parse(data, where: str) -> tuple[list[dict], list[RankInfo]]:
    """Validate a declared topology; every error names the place, field and expectation."""
    if not isinstance(data, dict):
        raise TopologyError(f"{where}: expected a JSON object with 'hosts' and 'ranks', "
                            f"got {type(data).__name__}")
    for key in ("hosts", "ranks"):
        if key not in data:
            raise TopologyError(f"{where}: missing field '{key}' (expected a list)")
        if not isinstance(data[key], list) or not data[key]:
            raise TopologyError(f"{where}: field '{key}' must be a non-empty list")
    hosts = []
    for i, h in enumerate(data["hosts"]):
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) or not h["name"]:
            raise TopologyError(f"{where}: hosts[{i}].name must be a non-empty string")
        if any(h["name"] == o["name"] for o in hosts):
            raise TopologyError(f"{where}: hosts[{i}].name {h['name']!r} appears twice")
        host = {"numa": [], "gpus": [], "gpu_links": {}, "nics": []}
        host.update(h)
        for field, kind in (("numa", list), ("gpus", list), ("gpu_links", dict), ("nics", list)):
            if not isinstance(host[field], kind):
                raise TopologyError(f"{where}: hosts[{i}].{field} must be a {kind.__name__}")
        hosts.append(host)
    names = {h["name"] for h in hosts}
    ranks = []
    for i, r in enumerate(data["ranks"]):
        if not isinstance(r, dict):
            raise TopologyError(f"{where}: ranks[{i}] must be an object")
        for field in ("rank", "local_rank"):
            v = r.get(field)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TopologyError(f"{where}: ranks[{i}].{field} must be a non-negative integer, "
                                    f"got {v!r}")
        if r.get("host") not in names:
            raise TopologyError(f"{where}: ranks[{i}].host {r.get('host')!r} is not one of the "
                                f"declared hosts {sorted(names)}")
        for field in ("gpu", "numa"):
            v = r.get(field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise TopologyError(f"{where}: ranks[{i}].{field} must be an integer or null")
        unknown = set(r) - {"rank", "host", "local_rank", "gpu", "numa"}
        if unknown:
            raise TopologyError(f"{where}: ranks[{i}] has unknown field(s) {sorted(unknown)}")
        ranks.append(RankInfo(r["rank"], r["host"], r["local_rank"], r.get("gpu"), r.get("numa")))
    seen = sorted(r.rank for r in ranks)
    if len(set(seen)) != len(seen):
        dup = sorted({x for x in seen if seen.count(x) > 1})
        raise TopologyError(f"{where}: ranks {dup} appear more than once in 'ranks'")
    missing = sorted(set(range(max(seen) + 1)) - set(seen))
    if missing:
        raise TopologyError(f"{where}: ranks must be numbered 0..N-1 without gaps; rank(s) {missing} "
                            f"missing from 'ranks' (found {seen})")
    for name in names:
        local = sorted(r.local_rank for r in ranks if r.host == name)
        if local != list(range(len(local))):
            raise TopologyError(f"{where}: local_rank values on host {name!r} must be 0..{len(local) - 1}"
                                f" with no repeats, got {local}")
    return hosts, ranks


# ---- detection ---------------------------------------------------------------

def _env_int(name: str, default: int | None) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise TopologyError(f"environment variable {name}={v!r} is not an integer") from None


def _rank_placement(host: dict, local_rank: int) -> tuple[int | None, int | None]:
    """This rank's GPU and NUMA node: GPU by local rank, NUMA from the GPU or CPU affinity."""
    gpus = host.get("gpus", [])
    gpu = local_rank % len(gpus) if gpus else None
    if gpu is not None and gpus[gpu].get("numa") is not None:
        return gpu, gpus[gpu]["numa"]
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    best, best_n = None, -1
    for node in host.get("numa", []):
        n = len(allowed.intersection(node.get("cpus", [])))
        if n > best_n:
            best, best_n = node["id"], n
    return gpu, best


def detect(store=None, rank: int | None = None, world_size: int | None = None, *,
           sys_root: str = "/sys", nvml=None, hostname: str | None = None,
           timeout: float = 300.0) -> Topology:
    """The topology of this job.

    ``ICHIBAN_TOPOLOGY=path`` loads a declared topology (checked against
    WORLD_SIZE). Otherwise: ranks from the arguments or torchrun's environment
    (a single process when neither is set); this host is probed; with a c10d
    ``store`` and more than one rank, every rank's facts are exchanged through
    it so each rank knows every host. Without a store, other hosts are known
    only by their GROUP_RANK (``node<k>``) and the torchrun layout.
    """
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise TopologyError(f"rank {rank} is not in a world of size {world_size} "
                            "(check RANK and WORLD_SIZE)")

    path = os.environ.get(ENV_TOPOLOGY)
    if path:
        topo = Topology.from_json(path)
        if topo.world_size != world_size:
            raise TopologyError(f"topology file {path} ({ENV_TOPOLOGY}) declares {topo.world_size} "
                                f"rank(s) but the job has WORLD_SIZE={world_size}")
        return topo

    local_world = _env_int("LOCAL_WORLD_SIZE", None)
    local_rank = _env_int("LOCAL_RANK", None)
    if local_world is None:  # not under torchrun: assume one host until a store says otherwise
        local_world = world_size
    if local_rank is None:
        local_rank = rank % local_world
    group_rank = _env_int("GROUP_RANK", rank // local_world)

    me = _probe.probe_host(sys_root=sys_root, nvml=nvml, hostname=hostname)
    if world_size == 1:
        gpu, numa = _rank_placement(me, local_rank)
        return Topology([me], [RankInfo(0, me["name"], 0, gpu, numa)], source="detected")

    if store is not None:
        return _exchange(store, rank, world_size, local_rank, me, timeout)

    # No store: this host is probed, the others follow torchrun's uniform layout.
    if world_size % local_world:
        raise TopologyError(f"WORLD_SIZE={world_size} is not a multiple of "
                            f"LOCAL_WORLD_SIZE={local_world}")
    n_hosts = world_size // local_world
    single = n_hosts == 1
    hosts, ranks = [], []
    for g in range(n_hosts):
        name = me["name"] if single else f"node{g}"
        if g == group_rank:
            hosts.append(dict(me, name=name, hostname=me["name"]))
        else:
            hosts.append({"name": name, "numa": [], "gpus": [], "gpu_links": {}, "nics": [],
                          "gpu_source": "not probed (another host; pass a store to exchange)"})
        for lr in range(local_world):
            r = g * local_world + lr
            gpu, numa = _rank_placement(hosts[-1], lr) if g == group_rank else (None, None)
            ranks.append(RankInfo(r, name, lr, gpu, numa))
    return Topology(hosts, ranks, source="detected (environment)")


def machine_id() -> str:
    """This machine: hostname and boot id (two containers of one machine share the boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}:{boot}"


def _publish_and_gather(store, rank, world_size, mine: dict, timeout) -> list[dict]:
    import datetime

    store.set(f"{_STORE_PREFIX}{rank}", json.dumps(mine))
    keys = [f"{_STORE_PREFIX}{r}" for r in range(world_size)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except Exception as e:  # noqa: BLE001 - report which ranks never arrived
        missing = [r for r in range(world_size) if not store.check([keys[r]])]
        raise TopologyError(f"topology exchange: rank(s) {missing} did not publish their host "
                            f"facts within {timeout:.0f} s ({e})") from e
    return [json.loads(store.get(k)) for k in keys]


def _exchange(store, rank, world_size, local_rank, me, timeout) -> Topology:
    gpu, numa = _rank_placement(me, local_rank)
    mine = {"rank": rank, "local_rank": local_rank, "gpu": gpu, "numa": numa, "host": me,
            "machine": machine_id()}
    entries = _publish_and_gather(store, rank, world_size, mine, timeout)
    hosts: dict[str, dict] = {}
    ranks = []
    for e in entries:
        hosts.setdefault(e["host"]["name"], e["host"])
    # Local ranks are re-derived per host so that they are dense even when the
    # launcher did not set LOCAL_RANK.
    for e in entries:
        name = e["host"]["name"]
        lr = sum(1 for x in entries[: e["rank"]] if x["host"]["name"] == name)
        ranks.append(RankInfo(e["rank"], name, lr, e["gpu"], e["numa"]))
    topo = Topology(list(hosts.values()), ranks, source="detected (store exchange)")
    topo.machines = [e.get("machine", "") for e in entries]
    return topo


_JOB: Topology | None = None


def job_topology(store=None, rank: int | None = None, world_size: int | None = None, *,
                 timeout: float = 300.0, refresh: bool = False) -> Topology:
    """The topology of this job, established once per process and then shared.

    The first call with a ``store`` (the ``"ichiban"`` backend makes it when
    the default process group is created; every rank calls it) runs the one
    exchange: detected facts, or the declared file plus each rank's machine
    identity. Later calls return that object. Without a store and before any
    exchange, the topology is detected from torchrun's environment and this
    host alone. ``refresh=True`` (a new default group) runs the exchange again.
    """
    global _JOB
    if _JOB is not None and not refresh and (world_size is None or _JOB.world_size == world_size):
        return _JOB
    if store is None:
        return detect(rank=rank, world_size=world_size)
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    if os.environ.get(ENV_TOPOLOGY):
        topo = detect(rank=rank, world_size=world_size)  # the declared file, checked
        if world_size > 1:
            entries = _publish_and_gather(store, rank, world_size, {"machine": machine_id()}, timeout)
            topo.machines = [e["machine"] for e in entries]
    else:
        topo = detect(store, rank, world_size, timeout=timeout)
    _JOB = topo
    return topo


def forget_job_topology() -> None:
    """Drop the cached job topology (tests that build several jobs in one process)."""
    global _JOB
    _JOB = None


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ichiban_comm.topology",
                                description="Print the topology of this machine (or of "
                                            f"${ENV_TOPOLOGY} when set).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    p.add_argument("--file", help="read a declared topology file instead of detecting")
    args = p.parse_args(argv)
    try:
        topo = Topology.from_json(args.file) if args.file else detect()
    except TopologyError as e:
        print(f"error: {e}")
        return 2
    print(topo.to_json() if args.json else topo.format_tree())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
