"""Probing one host: NUMA nodes, GPUs and their links, NICs.

Reads Linux sysfs (``/sys/devices/system/node``, ``/sys/class/net``,
``/sys/class/infiniband``) and NVML through ``nvidia-ml-py`` where it is
installed. Every probe takes the root it reads from, so tests run it on canned
trees and a fake NVML. Nothing here raises on a machine that lacks a piece:
a missing piece is reported as absent.
"""

from __future__ import annotations

import os
import socket


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def probe_numa(sys_root: str = "/sys") -> list[dict]:
    """NUMA nodes with their CPUs and memory; one node with every CPU when sysfs has none."""
    base = os.path.join(sys_root, "devices", "system", "node")
    nodes = []
    try:
        names = sorted((n for n in os.listdir(base) if n.startswith("node") and n[4:].isdigit()),
                       key=lambda n: int(n[4:]))
    except OSError:
        names = []
    for name in names:
        cpulist = _read(os.path.join(base, name, "cpulist"))
        mem_kb = None
        meminfo = _read(os.path.join(base, name, "meminfo")) or ""
        for line in meminfo.splitlines():
            if "MemTotal:" in line:
                try:
                    mem_kb = int(line.split("MemTotal:")[1].split()[0])
                except (IndexError, ValueError):
                    pass
        nodes.append({"id": int(name[4:]), "cpus": parse_cpulist(cpulist or ""),
                      "mem_mib": mem_kb // 1024 if mem_kb is not None else None})
    if not nodes:
        nodes.append({"id": 0, "cpus": list(range(os.cpu_count() or 1)), "mem_mib": None})
    return nodes


def probe_nics(sys_root: str = "/sys") -> list[dict]:
    """Network interfaces (loopback left out) and InfiniBand/RoCE devices."""
    nics = []
    net = os.path.join(sys_root, "class", "net")
    try:
        names = sorted(os.listdir(net))
    except OSError:
        names = []
    for name in names:
        if name == "lo":
            continue
        d = os.path.join(net, name)
        arptype = _read_int(os.path.join(d, "type"))
        kind = "infiniband" if arptype == 32 else ("ethernet" if arptype == 1 else "other")
        speed = _read_int(os.path.join(d, "speed"))
        nics.append({"name": name, "kind": kind,
                     "speed_mbps": speed if speed is not None and speed > 0 else None,
                     "numa": _numa_of_device(os.path.join(d, "device")),
                     "virtual": not os.path.exists(os.path.join(d, "device"))})
    ib = os.path.join(sys_root, "class", "infiniband")
    try:
        ib_names = sorted(os.listdir(ib))
    except OSError:
        ib_names = []
    for name in ib_names:
        d = os.path.join(ib, name)
        rates = []
        ports = os.path.join(d, "ports")
        try:
            for port in sorted(os.listdir(ports)):
                rate = _read(os.path.join(ports, port, "rate"))  # e.g. "400 Gb/sec (4X NDR)"
                if rate:
                    try:
                        rates.append(int(float(rate.split()[0]) * 1000))
                    except ValueError:
                        pass
        except OSError:
            pass
        nics.append({"name": name, "kind": "rdma", "speed_mbps": max(rates) if rates else None,
                     "numa": _numa_of_device(os.path.join(d, "device")), "virtual": False})
    return nics


def _numa_of_device(device_dir: str) -> int | None:
    node = _read_int(os.path.join(device_dir, "numa_node"))
    return node if node is not None and node >= 0 else None


def _load_nvml():
    try:
        import pynvml  # from the nvidia-ml-py package
    except ImportError:
        return None, "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver is a normal state here
        return None, f"NVML unavailable ({e})"
    return pynvml, "nvml"


def probe_gpus(nvml=None) -> tuple[list[dict], dict, str]:
    """GPUs, the link between each pair, and where the facts came from.

    Links: ``{"i,j": {"kind": "nvlink"|"pcie"|"cross-socket", "nvlinks": n}}``.
    ``nvml`` may be a stand-in object with the pynvml functions used below.
    """
    source = "nvml"
    if nvml is None:
        nvml, source = _load_nvml()
        if nvml is None:
            return [], {}, source
    count = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    gpus = []
    bus_ids = []
    for i, h in enumerate(handles):
        name = nvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
        pci = nvml.nvmlDeviceGetPciInfo(h)
        bus = pci.busId.decode() if isinstance(pci.busId, bytes) else str(pci.busId)
        bus_ids.append(bus.lower())
        numa = None
        getter = getattr(nvml, "nvmlDeviceGetNumaNodeId", None)
        if getter is not None:
            try:
                numa = int(getter(h))
            except Exception:  # noqa: BLE001 - older drivers lack it
                numa = None
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        gpus.append({"index": i, "name": name, "pci_bus_id": bus, "numa": numa,
                     "mem_mib": int(mem.total) // 2**20})
    links: dict[str, dict] = {}
    max_links = getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)
    nvlink_count = {}
    for i, h in enumerate(handles):
        for link in range(max_links):
            try:
                if not nvml.nvmlDeviceGetNvLinkState(h, link):
                    continue
                remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link)
            except Exception:  # noqa: BLE001 - link absent or not supported
                continue
            rbus = remote.busId.decode() if isinstance(remote.busId, bytes) else str(remote.busId)
            if rbus.lower() in bus_ids:
                j = bus_ids.index(rbus.lower())
                nvlink_count[(i, j)] = nvlink_count.get((i, j), 0) + 1
    system_level = getattr(nvml, "NVML_TOPOLOGY_SYSTEM", 50)
    for i in range(count):
        for j in range(i + 1, count):
            n = max(nvlink_count.get((i, j), 0), nvlink_count.get((j, i), 0))
            if n:
                links[f"{i},{j}"] = {"kind": "nvlink", "nvlinks": n}
                continue
            try:
                level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
            except Exception:  # noqa: BLE001
                level = None
            kind = "cross-socket" if level is not None and level >= system_level else "pcie"
            links[f"{i},{j}"] = {"kind": kind, "nvlinks": 0}
    return gpus, links, source


def probe_host(sys_root: str = "/sys", nvml=None, hostname: str | None = None) -> dict:
    gpus, links, gpu_source = probe_gpus(nvml)
    return {
        "name": hostname or socket.gethostname(),
        "numa": probe_numa(sys_root),
        "gpus": gpus,
        "gpu_links": links,
        "gpu_source": gpu_source,
        "nics": probe_nics(sys_root),
    }
