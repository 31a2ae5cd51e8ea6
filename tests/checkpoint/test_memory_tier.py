"""The in-memory tier: keeper processes, replicas on another host, load before disk.

    python -m pytest -q tests/checkpoint/test_memory_tier.py
"""

import glob
import json
import mmap
import multiprocessing as mp
import os
import signal
import shutil
import socket
import time

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer
from ichiban_comm.checkpoint import keeper as kp
from ichiban_comm.checkpoint.memory import KeeperClient, ensure_keeper, stop_keepers
from spawn import run_workers

from _memory_bodies import save_then_wait, seeded_state
from _states import assert_same, make_state


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """The process exited (and is not left as a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "\nState:\tZ" in f.read():
                    return True  # exited; its parent (not us) reaps it
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _keeper_files(root):
    return glob.glob(os.path.join(kp.runtime_dir(), f"keeper-{kp.job_id(root)}-*"))


def _memfds(pid):
    out = []
    for f in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            link = os.readlink(f)
        except OSError:
            continue
        if link.startswith("/memfd:"):
            out.append(link)
    return out


def _shm():
    return set(os.listdir("/dev/shm"))


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "ckpt")
    yield r
    for pid in stop_keepers(r):
        _gone(pid)


def _memfd_with(data: bytes) -> int:
    fd = kp.new_memfd("test", len(data))
    with mmap.mmap(fd, len(data)) as m:
        m[:] = data
    kp.seal(fd)
    return fd


def test_sigkilled_trainer_leaves_snapshot_new_trainer_loads_it_from_memory(root):
    shm_before = _shm()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=save_then_wait, args=(root, child, 3))
    p.start()
    try:
        assert parent.poll(90), "the trainer did not commit its saves"
        assert parent.recv() == ("committed", 3)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    assert p.exitcode == -signal.SIGKILL
    infos = [json.load(open(f)) for f in _keeper_files(root) if f.endswith(".json")]
    assert len(infos) == 1, infos
    keeper_pid = infos[0]["pid"]
    assert not _gone(keeper_pid, 0.2), "the keeper died with the trainer"
    for s in (2, 3):  # the newest steps' files are gone from disk: only memory has them
        shutil.rmtree(os.path.join(root, f"step_{s:012d}"))
    ck = AsyncCheckpointer(root, memory=True)
    state = ck.load()
    assert ck.last_load == {"step": 3, "tiers": ["memory"]}
    assert_same(state, seeded_state(3))
    assert_same(ck.load(step=2), seeded_state(2))            # memory_keep=2: steps 2 and 3
    assert ck.last_load["tiers"] == ["memory"]
    assert_same(ck.load(step=1), seeded_state(1))            # evicted from memory, still on disk
    assert ck.last_load["tiers"] == ["disk"]
    ck.close()
    assert _memfds(os.getpid()) == [], "the loading trainer kept snapshot descriptors open"
    held = _memfds(keeper_pid)
    assert any("ichiban-snapshot" in h for h in held), held       # the snapshots: anonymous memfds
    keeper_links = [os.readlink(f) for f in glob.glob(f"/proc/{keeper_pid}/fd/*")]
    assert not any(link.startswith("/dev/shm") for link in keeper_links), keeper_links
    assert stop_keepers(root) == [keeper_pid]
    assert _gone(keeper_pid), "the keeper did not exit when stopped"
    assert _keeper_files(root) == []
    new = _shm() - shm_before
    assert not any(kp.job_id(root) in n or str(keeper_pid) in n for n in new), new


@pytest.mark.slow
def test_two_hosts_host_a_loses_keeper_and_disk_recovers_from_host_b_replica(root, tmp_path):
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps({"hosts": [{"name": "hostA"}, {"name": "hostB"}],
                                "ranks": [{"rank": 0, "host": "hostA", "local_rank": 0},
                                          {"rank": 1, "host": "hostB", "local_rank": 0}]}))
    env = {"ICHIBAN_TOPOLOGY": str(topo)}
    from _memory_bodies import two_host_load, two_host_save

    saved = run_workers(two_host_save, 2, env=env, args=(root, 2), timeout=120)
    assert [s["host"] for s in saved] == ["hostA", "hostB"]
    assert [s["peers"] for s in saved] == [["hostB"], ["hostA"]]
    assert all(s["replicated_bytes"] > 0 for s in saved)
    assert saved[0]["replicated_bytes"] < saved[0]["raw_bytes"]           # zstd on rank 0's stream
    assert saved[1]["replicated_bytes"] == saved[1]["raw_bytes"]
    infos = {json.load(open(f))["host"]: json.load(open(f)) for f in _keeper_files(root) if f.endswith(".json")}
    assert set(infos) == {"hostA", "hostB"}
    assert all(i["tcp"][0] == "127.0.0.1" for i in infos.values())
    os.kill(infos["hostA"]["pid"], signal.SIGKILL)               # host A's keeper is gone ...
    assert _gone(infos["hostA"]["pid"])
    shutil.rmtree(root)                                          # ... and so is the disk
    os.makedirs(root)
    loaded = run_workers(two_host_load, 2, env=env, args=(root, 2), timeout=120)
    assert [r["same"] for r in loaded] == [True, True]
    # rank 0 (host A) read its own snapshot from host B's replica, rank 1 from its own keeper
    assert loaded[0]["last_load"] == {"step": 2, "tiers": ["peer", "memory"]}


def test_connection_without_the_token_gets_nothing(root):
    client, info, token = ensure_keeper(root, "h0", keep=2, budget_bytes=1 << 20, idle_timeout=60,
                                        tcp="127.0.0.1")
    fd = _memfd_with(b"secret" * 100)
    client.put(0, 5, {"world": 1, "files": ["r0.f0"]}, [fd], [600])
    os.close(fd)
    assert [s["step"] for s in client.list()] == [5]
    addr = tuple(info["tcp"])
    base = kp.keeper_base(root, "h0")
    for family, where, hello in [
            (socket.AF_INET, addr, None),                                  # no hello at all
            (socket.AF_INET, addr, {"op": "hello", "token": "0" * 48}),    # wrong token
            (socket.AF_INET, addr, {"op": "hello"}),                       # no token
            (socket.AF_UNIX, base + ".sock", {"op": "hello", "token": token[:-1] + "x"})]:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(where)
        if hello is not None:
            kp.send_msg(s, hello)
        try:
            kp.send_msg(s, {"op": "get", "rank": 0, "step": 5})
            kp.send_msg(s, {"op": "list"})
        except OSError:
            pass  # closed already
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
        assert received == b"", f"{family} {hello}: got {received[:80]!r}"
    assert os.stat(base + ".sock").st_mode & 0o777 == 0o600
    assert os.stat(kp.runtime_dir()).st_mode & 0o777 == 0o700
    # with the token, over TCP: the bytes come back
    tcp = KeeperClient(addr, token)
    meta, fds = tcp.get(0, 5)
    with mmap.mmap(fds[0], 600, prot=mmap.PROT_READ) as m:
        assert m[:] == b"secret" * 100
    os.close(fds[0])
    tcp.close()
    client.close()


def test_keeper_holds_newest_steps_within_budget_and_exits_when_idle(root):
    client, info, _ = ensure_keeper(root, "h0", keep=2, budget_bytes=10_000, idle_timeout=1.0, tcp=None)
    other, info2, _ = ensure_keeper(root, "h0", keep=2, budget_bytes=10_000, idle_timeout=1.0, tcp=None)
    assert info2["pid"] == info["pid"]          # the host's second rank attaches, no second keeper
    other.close()
    for step in range(1, 5):
        fd = _memfd_with(bytes([step]) * 1000)
        client.put(0, step, {"world": 1}, [fd], [1000])
        os.close(fd)
    assert sorted(s["step"] for s in client.list()) == [3, 4]           # memory_keep
    for rank in (1, 2, 3, 4):
        fd = _memfd_with(b"x" * 3000)
        client.put(rank, 4, {"world": 5}, [fd], [3000])
        os.close(fd)
    held = client.list()
    assert sum(s["nbytes"] for s in held) <= 10_000                       # budget: oldest went first
    assert (4, 4) in {(s["rank"], s["step"]) for s in held}
    fd = _memfd_with(b"y" * 20_000)
    with pytest.raises(Exception, match="budget"):
        client.put(0, 9, {"world": 1}, [fd], [20_000])
    os.close(fd)
    with pytest.raises(Exception, match="bytes, not"):                   # size lie is refused
        fd = _memfd_with(b"z" * 10)
        client.put(0, 9, {"world": 1}, [fd], [11])
    os.close(fd)
    client.close()
    assert _gone(info["pid"], 15), "the keeper did not exit after its idle timeout"
    assert _keeper_files(root) == []


def test_corrupt_memory_snapshot_is_detected_and_disk_serves(root):
    ck = AsyncCheckpointer(root, memory=True, chunk_bytes=4096)
    ck.save(1, make_state(1)).wait()
    c = ck.memory_tier.local
    meta, fds = c.get(0, 1)
    size = os.fstat(fds[0]).st_size
    with mmap.mmap(fds[0], size, prot=mmap.PROT_READ) as m:
        data = bytearray(m[:])
    os.close(fds[0])
    data[size // 2] ^= 0x40
    fd = _memfd_with(bytes(data))
    c.put(0, 1, meta, [fd], [size])
    os.close(fd)
    with pytest.warns(RuntimeWarning, match="crc|checksum|CRC"):
        state = ck.load()
    assert ck.last_load["tiers"] == ["disk"]
    assert_same(state, make_state(1))
    ck.close()


def test_memory_arguments_are_checked(root):
    for kw, match in [({"replicas": -1}, "replicas"), ({"replica_bandwidth": 0}, "replica_bandwidth"),
                      ({"memory_keep": 0}, "memory_keep"), ({"memory_budget_bytes": 0}, "memory_budget_bytes"),
                      ({"keeper_idle_timeout_s": 0}, "keeper_idle_timeout_s")]:
        with pytest.raises(ValueError, match=match):
            AsyncCheckpointer(root, memory=True, **kw)
    with pytest.warns(RuntimeWarning, match="replicas=1 needs 2 hosts"):
        AsyncCheckpointer(root, memory=True, replicas=1).close()


def test_zstd_replica_encoding_loads_bit_exact_and_is_smaller(root):
    from ichiban_comm.checkpoint import _replica_codec

    ck = AsyncCheckpointer(root, memory=True, chunk_bytes=4096, writer_threads=2)
    state = {"w": torch.randn(300, 64).to(torch.bfloat16), "m": torch.randn(1000) * 1e-3,
             "z": torch.zeros(5000), "i": torch.arange(77), "step": 4}
    ck.save(4, state).wait()
    c = ck.memory_tier.local
    meta, fds = c.get(0, 4)
    size = os.fstat(fds[0]).st_size
    ratio, rate = _replica_codec.measure(meta, fds[0], size, 2, 4096)
    assert 0 < ratio < 0.9 and rate > 0
    zmeta, zfds, zsizes = _replica_codec.encode(meta, fds[0], size, 0, 2, 4096)
    os.close(fds[0])
    assert sum(zsizes) < 0.9 * size
    c.put(0, 4, zmeta, zfds, zsizes)     # the keeper now holds the encoded form, as a peer would
    for fd in zfds:
        os.close(fd)
    shutil.rmtree(os.path.join(root, "step_000000000004"))
    got = ck.load()
    assert ck.last_load == {"step": 4, "tiers": ["memory"]}
    assert_same(got, state)
    ck.close()


def test_replica_compression_is_chosen_only_when_it_beats_the_link():
    from ichiban_comm.checkpoint._replica_codec import pays

    assert not pays(0.5, 1e9, None)              # no cap: the host network, raw
    assert pays(0.7, 1e9, 100e6)                 # encoder 10x the cap, 30 % smaller
    assert not pays(0.7, 50e6, 100e6)            # encoder slower than the link
    assert not pays(0.97, 1e9, 100e6)            # barely compresses


def test_keeper_exits_with_the_job_launcher(root):
    import subprocess

    launcher = subprocess.Popen(["sleep", "60"])
    try:
        client, info, _ = ensure_keeper(root, "h0", keep=1, budget_bytes=1 << 20, idle_timeout=600,
                                        tcp=None, watch_pid=launcher.pid)
        assert not _gone(info["pid"], 0.5)          # attached client or not, it lives with the job
    finally:
        launcher.kill()
        launcher.wait()
    assert _gone(info["pid"], 10), "the keeper outlived the job's launcher"
    client.close()
    assert _keeper_files(root) == []


def test_rollback_drops_abandoned_steps_from_memory(root):
    ck = AsyncCheckpointer(root, memory=True, memory_keep=3, chunk_bytes=4096)
    for step in (1, 2, 3):
        ck.save(step, seeded_state(step)).wait()
    assert sorted(s["step"] for s in ck.memory_tier.local.list()) == [1, 2, 3]
    ck.rollback(1)
    assert sorted(s["step"] for s in ck.memory_tier.local.list()) == [1]
    got = ck.load()
    assert ck.last_load == {"step": 1, "tiers": ["memory"]}
    assert_same(got, seeded_state(1))
    ck.close()
