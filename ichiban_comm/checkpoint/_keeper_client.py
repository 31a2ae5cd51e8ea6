"""Connections to checkpoint keepers: attach (starting one when there is none), call, stop.

The keeper itself is ``keeper.py``; ``memory.py`` drives these for the checkpointer.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import warnings

from . import keeper as kp
from .errors import CheckpointError


class KeeperClient:
    """One authenticated connection to a keeper (Unix socket path or (host, port))."""

    def __init__(self, address, token: str, timeout: float = 60.0):
        self.unix = isinstance(address, str)
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX if self.unix else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address if self.unix else tuple(address))
            if not self.unix:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kp.send_msg(self.sock, {"op": "hello", "token": token})
            self.info = self._reply()
        except BaseException:
            self.sock.close()
            raise

    def _reply(self) -> dict:
        msg, fds = kp.recv_msg(self.sock, self.unix)
        self._fds = fds
        if not msg.get("ok"):
            for fd in fds:
                os.close(fd)
            raise CheckpointError(f"keeper at {self.address}: {msg.get('error', 'refused')}")
        return msg

    def call(self, header: dict, fds=()) -> dict:
        kp.send_msg(self.sock, header, fds)
        return self._reply()

    def put(self, rank, step, meta, fds, sizes, origin="local", rate=None) -> None:
        head = {"op": "put", "rank": rank, "step": step, "meta": meta, "sizes": sizes, "origin": origin}
        if self.unix:
            self.call(head, fds)
            return
        kp.send_msg(self.sock, head)
        clock = [time.monotonic(), 0]
        for fd, n in zip(fds, sizes):
            kp.send_fd_bytes(self.sock, fd, n, rate, clock)
        self._reply()

    def list(self) -> list[dict]:
        return self.call({"op": "list"})["snapshots"]

    def get(self, rank, step, meta_only=False):
        """(meta, fds): descriptors passed on a Unix socket, streamed into local memfds over TCP."""
        reply = self.call({"op": "get", "rank": rank, "step": step, "meta_only": meta_only})
        if meta_only:
            return reply["meta"], []
        if self.unix:
            return reply["meta"], self._fds
        fds = []
        try:
            for i, n in enumerate(reply["sizes"]):
                fds.append(kp.recv_into_memfd(self.sock, n, f"ichiban-fetch-r{rank}-{i}"))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return reply["meta"], fds

    def close(self) -> None:
        self.sock.close()


def _read_file(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def ensure_keeper(root: str, host: str, *, keep: int, budget_bytes: int | None, idle_timeout: float,
                  tcp: str | None, start_timeout: float = 60.0, watch_pid: int | None = None):
    """Attach to this host's keeper of root, starting it first when there is none.

    Returns (client, info, token). Starting is serialised per user by a lock on the runtime
    directory, so the ranks of a host end up with one keeper. The keeper exits with watch_pid
    (default: this process's parent, the job's launcher).
    """
    import fcntl

    base = kp.keeper_base(root, host)
    dirfd = os.open(kp.runtime_dir(), os.O_RDONLY)
    try:
        fcntl.flock(dirfd, fcntl.LOCK_EX)
        try:
            token = _read_file(base + ".token")
            info = json.loads(_read_file(base + ".json"))
            client = KeeperClient(base + ".sock", token, timeout=start_timeout)
            if tcp and not info.get("tcp"):
                warnings.warn(f"the keeper of host {host!r} (pid {info['pid']}) does not listen on TCP: "
                              f"its snapshots are not served to other hosts", RuntimeWarning)
            return client, info, token
        except (OSError, ValueError, CheckpointError):
            pass  # none, or a dead one's files: start a new one
        token = secrets.token_hex(24)
        for suffix in (".sock", ".json"):
            try:
                os.unlink(base + suffix)
            except FileNotFoundError:
                pass
        with open(os.open(base + ".token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(token + "\n")
        if budget_bytes is None:
            budget_bytes = _default_budget()
        cmd = [sys.executable, kp.__file__, "serve", "--base", base, "--host", host, "--keep", str(keep),
               "--budget-bytes", str(budget_bytes), "--idle-timeout", str(idle_timeout),
               "--watch-pid", str(os.getppid() if watch_pid is None else watch_pid)]
        if tcp:
            cmd += ["--tcp", tcp]
        with open(os.open(base + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                                    start_new_session=True, close_fds=True, text=True, cwd="/")
        proc.stdin.write(token + "\n")
        proc.stdin.close()
        import select

        ready, _, _ = select.select([proc.stdout], [], [], start_timeout)
        line = proc.stdout.readline() if ready else ""
        proc.stdout.close()
        if not line.startswith("ready "):
            proc.kill()
            proc.wait()
            raise CheckpointError(f"the checkpoint keeper for host {host!r} did not start within "
                                  f"{start_timeout:.0f} s ({line.strip() or 'no output'}); see {base}.log")
        info = json.loads(line[len("ready "):])
        # Reaped by a thread so it never lingers as a zombie while this trainer lives.
        threading.Thread(target=proc.wait, daemon=True).start()
        return KeeperClient(base + ".sock", token, timeout=start_timeout), info, token
    finally:
        os.close(dirfd)


def stop_keepers(root: str) -> list[int]:
    """Stop every keeper of root on this machine; returns their pids (for tests and job ends)."""
    import glob

    pids = []
    for info_path in glob.glob(os.path.join(kp.runtime_dir(), f"keeper-{kp.job_id(root)}-*.json")):
        base = info_path[:-len(".json")]
        try:
            info = json.loads(_read_file(info_path))
            c = KeeperClient(base + ".sock", _read_file(base + ".token"), timeout=10)
            c.call({"op": "stop"})
            c.close()
            pids.append(info["pid"])
        except (OSError, ValueError, CheckpointError):
            continue
    return pids


def _default_budget() -> int:
    """Half of the memory the host has available now."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def tcp_address() -> str:
    """The address other hosts reach this one at: ICHIBAN_KEEPER_ADDR, else the interface that
    routes to MASTER_ADDR (127.0.0.1 when the job runs on one machine)."""
    explicit = os.environ.get("ICHIBAN_KEEPER_ADDR")
    if explicit:
        return explicit
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master in ("localhost", "") or master.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(master), 1))
        return s.getsockname()[0]
