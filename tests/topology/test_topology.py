"""Topology detection on canned sysfs trees and a fake NVML, declared layouts, bad input.

Run: python -m pytest -q tests/topology
"""

import json
import os
import threading
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from ichiban_comm import _probe, topology
from ichiban_comm.topology import Topology, TopologyError


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def two_socket_sysfs(tmp_path):
    """A 2-socket box: 2 NUMA nodes x 4 CPUs, an ethernet NIC, an IB HCA, a bridge."""
    root = tmp_path / "sys"
    node = root / "devices" / "system" / "node"
    _write(str(node / "node0" / "cpulist"), "0-3\n")
    _write(str(node / "node0" / "meminfo"), "Node 0 MemTotal:       65536000 kB\n")
    _write(str(node / "node1" / "cpulist"), "4-5,6,7\n")
    _write(str(node / "node1" / "meminfo"), "Node 1 MemTotal:       65536000 kB\n")
    _write(str(node / "possible"), "0-1\n")  # not a node directory: ignored
    net = root / "class" / "net"
    _write(str(net / "lo" / "type"), "772\n")
    _write(str(net / "eth0" / "type"), "1\n")
    _write(str(net / "eth0" / "speed"), "25000\n")
    _write(str(net / "eth0" / "device" / "numa_node"), "1\n")
    _write(str(net / "ib0" / "type"), "32\n")
    _write(str(net / "ib0" / "speed"), "-1\n")
    _write(str(net / "ib0" / "device" / "numa_node"), "0\n")
    _write(str(net / "docker0" / "type"), "1\n")  # virtual: no device/
    ib = root / "class" / "infiniband"
    _write(str(ib / "mlx5_0" / "ports" / "1" / "rate"), "400 Gb/sec (4X NDR)\n")
    _write(str(ib / "mlx5_0" / "device" / "numa_node"), "0\n")
    return str(root)


class FakeNVML:
    """Four GPUs: 0-1 and 2-3 joined by 4 NVLinks each, 0/1 to 2/3 across sockets."""

    NVML_NVLINK_MAX_LINKS = 6
    NVML_TOPOLOGY_SYSTEM = 50
    NVML_TOPOLOGY_HOSTBRIDGE = 30
    _bus = ["0000:07:00.0", "0000:0f:00.0", "0000:87:00.0", "0000:8f:00.0"]
    _peer = {0: 1, 1: 0, 2: 3, 3: 2}

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self._bus[h].encode())

    def nvmlDeviceGetNumaNodeId(self, h):
        return 0 if h < 2 else 1

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 * 2**30)

    def nvmlDeviceGetNvLinkState(self, h, link):
        if link >= 4:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return SimpleNamespace(busId=self._bus[self._peer[h]])

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return self.NVML_TOPOLOGY_SYSTEM if (a < 2) != (b < 2) else self.NVML_TOPOLOGY_HOSTBRIDGE


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              topology.ENV_TOPOLOGY):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_parse_cpulist():
    assert _probe.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert _probe.parse_cpulist("") == []


def test_numa_and_nics_from_sysfs(two_socket_sysfs):
    numa = _probe.probe_numa(two_socket_sysfs)
    assert [n["id"] for n in numa] == [0, 1]
    assert numa[1]["cpus"] == [4, 5, 6, 7]
    assert numa[0]["mem_mib"] == 64000
    nics = {n["name"]: n for n in _probe.probe_nics(two_socket_sysfs)}
    assert "lo" not in nics
    assert nics["eth0"] == {"name": "eth0", "kind": "ethernet", "speed_mbps": 25000, "numa": 1,
                            "virtual": False}
    assert nics["ib0"]["kind"] == "infiniband" and nics["ib0"]["speed_mbps"] is None
    assert nics["docker0"]["virtual"] is True
    assert nics["mlx5_0"] == {"name": "mlx5_0", "kind": "rdma", "speed_mbps": 400000, "numa": 0,
                              "virtual": False}


def test_missing_sysfs_falls_back_to_one_node(tmp_path):
    numa = _probe.probe_numa(str(tmp_path / "nothing"))
    assert len(numa) == 1 and numa[0]["cpus"] == list(range(os.cpu_count()))
    assert _probe.probe_nics(str(tmp_path / "nothing")) == []


def test_gpu_links_from_fake_nvml():
    gpus, links, source = _probe.probe_gpus(FakeNVML())
    assert source == "nvml" and len(gpus) == 4
    assert gpus[2]["numa"] == 1 and gpus[0]["mem_mib"] == 80 * 1024
    assert links["0,1"] == {"kind": "nvlink", "nvlinks": 4}
    assert links["2,3"] == {"kind": "nvlink", "nvlinks": 4}
    assert links["0,2"] == {"kind": "cross-socket", "nvlinks": 0}
    assert links["1,3"]["kind"] == "cross-socket"


def test_gpus_absent_without_nvml_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *a, **k):
        if name == "pynvml":
            raise ImportError("no pynvml")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    gpus, links, source = _probe.probe_gpus()
    assert gpus == [] and links == {} and "not installed" in source


def test_detect_single_process(clean_env, two_socket_sysfs):
    topo = topology.detect(sys_root=two_socket_sysfs, nvml=FakeNVML(), hostname="boxA")
    assert topo.world_size == 1 and topo.hosts == ["boxA"]
    r = topo.rank_info(0)
    assert r.gpu == 0 and r.numa == 0  # GPU 0 sits on NUMA node 0
    assert topo.gpu_link("boxA", 1, 0)["kind"] == "nvlink"
    tree = topo.format_tree()
    assert "host boxA" in tree and "NV4" in tree and "SYS" in tree and "mlx5_0" in tree


def test_detect_torchrun_env_places_rank_on_its_gpu(clean_env, two_socket_sysfs):
    clean_env.setenv("RANK", "6")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "2")
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    clean_env.setenv("GROUP_RANK", "1")
    topo = topology.detect(sys_root=two_socket_sysfs, nvml=FakeNVML(), hostname="boxB")
    assert topo.world_size == 8 and topo.num_hosts == 2
    assert topo.host_of(6) == topo.host_of(4) != topo.host_of(3)
    assert topo.ranks_on(topo.host_of(0)) == [0, 1, 2, 3]
    me = topo.rank_info(6)
    assert (me.local_rank, me.gpu, me.numa) == (2, 2, 1)
    assert topo.host(topo.host_of(6))["hostname"] == "boxB"


def test_store_exchange_gives_every_rank_the_same_picture(clean_env, two_socket_sysfs):
    store = dist.HashStore()
    hostnames = ["alpha", "alpha", "beta", "beta"]
    out = [None] * 4
    errors = []

    def run(rank):
        try:
            out[rank] = topology.detect(store, rank=rank, world_size=4, sys_root=two_socket_sysfs,
                                        hostname=hostnames[rank], timeout=20)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    dicts = [t.to_dict() for t in out]
    assert all(d == dicts[0] for d in dicts)
    topo = out[3]
    assert topo.hosts == ["alpha", "beta"]
    assert [topo.local_rank_of(r) for r in range(4)] == [0, 1, 0, 1]
    assert topo.same_host(2, 3) and not topo.same_host(1, 2)


def test_store_exchange_names_missing_ranks(clean_env, two_socket_sysfs):
    store = dist.HashStore()
    with pytest.raises(TopologyError, match=r"rank\(s\) \[1, 2\] did not publish"):
        topology.detect(store, rank=0, world_size=3, sys_root=two_socket_sysfs, timeout=1)


def _declared(hosts=2, per_host=4):
    return {
        "hosts": [{"name": f"h{h}"} for h in range(hosts)],
        "ranks": [{"rank": h * per_host + i, "host": f"h{h}", "local_rank": i}
                  for h in range(hosts) for i in range(per_host)],
    }


def test_declared_two_hosts_by_four(clean_env, tmp_path):
    path = tmp_path / "topo.json"
    path.write_text(json.dumps(_declared()))
    clean_env.setenv(topology.ENV_TOPOLOGY, str(path))
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("RANK", "5")
    topo = topology.detect()
    assert topo.hosts == ["h0", "h1"] and topo.world_size == 8
    assert topo.ranks_on("h1") == [4, 5, 6, 7]
    assert topo.local_rank_of(5) == 1
    assert not topo.same_host(3, 4) and topo.same_host(4, 7)
    assert topo.is_uniform


def test_json_round_trip(clean_env, two_socket_sysfs, tmp_path):
    topo = topology.detect(sys_root=two_socket_sysfs, nvml=FakeNVML(), hostname="boxA")
    path = str(tmp_path / "t.json")
    topo.to_json(path)
    back = Topology.from_json(path)
    assert back.to_dict() == topo.to_dict()
    assert back.gpu_link("boxA", 0, 1) == {"kind": "nvlink", "nvlinks": 4}


def _bad(mutate):
    d = _declared(2, 2)
    mutate(d)
    return d


@pytest.mark.parametrize("data, message", [
    ([1, 2], "expected a JSON object"),
    ({"ranks": []}, "missing field 'hosts'"),
    (_bad(lambda d: d.update(ranks=[])), "'ranks' must be a non-empty list"),
    (_bad(lambda d: d["hosts"].append({"name": "h0"})), r"hosts\[2\].name 'h0' appears twice"),
    (_bad(lambda d: d["hosts"][1].pop("name")), r"hosts\[1\].name must be a non-empty string"),
    (_bad(lambda d: d["ranks"].pop(1)), r"rank\(s\) \[1\] missing from 'ranks'"),
    (_bad(lambda d: d["ranks"][2].update(rank=0)), r"ranks \[0\] appear more than once"),
    (_bad(lambda d: d["ranks"][0].update(host="h9")), r"ranks\[0\].host 'h9' is not one of"),
    (_bad(lambda d: d["ranks"][1].update(local_rank=-1)), r"ranks\[1\].local_rank must be"),
    (_bad(lambda d: d["ranks"][1].update(local_rank=0)), "local_rank values on host 'h0'"),
    (_bad(lambda d: d["ranks"][1].update(gpu="0")), r"ranks\[1\].gpu must be an integer"),
    (_bad(lambda d: d["ranks"][1].update(colour=1)), r"unknown field\(s\) \['colour'\]"),
    (_bad(lambda d: d["hosts"][0].update(gpus={})), r"hosts\[0\].gpus must be a list"),
])
def test_bad_declared_topology_names_file_and_field(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TopologyError, match=message) as e:
        Topology.from_json(str(path))
    assert str(path) in str(e.value)


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"hosts": [')
    with pytest.raises(TopologyError, match=r"broken.json: not valid JSON .*line 1"):
        Topology.from_json(str(path))
    with pytest.raises(TopologyError, match="cannot be read"):
        Topology.from_json(str(tmp_path / "absent.json"))


def test_world_size_disagreeing_with_env(clean_env, tmp_path):
    path = tmp_path / "topo.json"
    path.write_text(json.dumps(_declared(2, 2)))
    clean_env.setenv(topology.ENV_TOPOLOGY, str(path))
    clean_env.setenv("WORLD_SIZE", "3")
    clean_env.setenv("RANK", "0")
    with pytest.raises(TopologyError, match=r"declares 4 rank\(s\) but the job has WORLD_SIZE=3"):
        topology.detect()


def test_bad_env(clean_env):
    clean_env.setenv("WORLD_SIZE", "four")
    with pytest.raises(TopologyError, match="WORLD_SIZE='four' is not an integer"):
        topology.detect()
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "2")
    with pytest.raises(TopologyError, match="rank 2 is not in a world of size 2"):
        topology.detect()


def test_cli_prints_tree_and_json(clean_env, capsys):
    assert topology.main([]) == 0
    out = capsys.readouterr().out
    assert "topology (detected): 1 rank(s) on 1 host(s)" in out and "numa 0" in out
    assert topology.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ranks"][0]["rank"] == 0
