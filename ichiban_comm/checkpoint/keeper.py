"""The snapshot keeper: one small process per host that holds checkpoint snapshots in memory.

``AsyncCheckpointer(..., memory=True)`` starts it (the first rank on a host that needs it; the
others attach) and hands it each committed snapshot as a sealed memfd, so a snapshot outlives the
trainer process that made it: a SIGKILLed trainer leaves its last committed snapshot here, and
the next trainer reloads it without touching the disk. With ``replicas=1`` the keeper also takes
snapshots streamed from the ranks of another host (over TCP) and serves them back when that
host's keeper and disk are gone.

Who may talk to it: the Unix socket is mode 0600 inside a 0700 directory, and every connection,
local or TCP, must present the job's token first (the wrong or no token: the connection is closed
with no reply). Snapshots are anonymous memory (memfd): nothing is ever created in /dev/shm, and
the memory is returned when the keeper drops the last descriptor.

It exits when asked (``stop``), when the process that launched the job (the trainer's parent at
start: torchrun's agent, a launcher script) exits, or after ``--idle-timeout`` seconds with no
client connected. It holds the newest ``--keep`` steps per rank within ``--budget-bytes``.

This file needs only the standard library: the checkpointer runs it by path, so the keeper does
not import torch (seconds of start-up and hundreds of MB that would stay resident for the job).

    python -m ichiban_comm.checkpoint.keeper status --root RUN/ckpt [--host NAME]
    python -m ichiban_comm.checkpoint.keeper stop --root RUN/ckpt [--host NAME]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

PROTOCOL = 1
_LEN = struct.Struct("<I")
_MAX_HEADER = 64 << 20          # a header is JSON metadata; anything larger is not ours
_MAX_FDS = 64
_IO_SLICE = 4 << 20             # bytes per send/recv call on streams


# ---------------------------------------------------------------- paths (shared with the client)
def runtime_dir() -> str:
    """A directory only this user can enter: $XDG_RUNTIME_DIR/ichiban or /tmp/ichiban-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "ichiban") if base and os.path.isdir(base) else f"/tmp/ichiban-{os.getuid()}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or (st.st_mode & 0o077) or not os.path.isdir(path) or os.path.islink(path):
        raise PermissionError(f"{path} must be a directory owned by uid {os.getuid()} with mode 0700 "
                              f"(found uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); remove it or set "
                              f"XDG_RUNTIME_DIR")
    return path


def job_id(root: str) -> str:
    """The keeper serves one checkpoint root: the id is a hash of its real path."""
    return hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:16]


def keeper_base(root: str, host: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)[:64]
    return os.path.join(runtime_dir(), f"keeper-{job_id(root)}-{safe}")


# ---------------------------------------------------------------- wire format
def send_msg(sock: socket.socket, header: dict, fds=()) -> None:
    data = json.dumps(header, separators=(",", ":")).encode()
    buf = _LEN.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [buf], list(fds))
        if sent < len(buf):
            sock.sendall(buf[sent:])
    else:
        sock.sendall(buf)


def _recv_exact(sock, n: int, into=None):
    view = memoryview(into) if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, _IO_SLICE))
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return view


def recv_msg(sock: socket.socket, unix: bool) -> tuple[dict, list[int]]:
    """One header (and the descriptors sent with it on a Unix socket)."""
    fds: list[int] = []
    if unix:
        data, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, _MAX_FDS)
        if not data:
            raise ConnectionError("connection closed")
        head = bytes(data) + (bytes(_recv_exact(sock, _LEN.size - len(data))) if len(data) < _LEN.size else b"")
    else:
        head = bytes(_recv_exact(sock, _LEN.size))
    (n,) = _LEN.unpack(head)
    if n > _MAX_HEADER:
        for fd in fds:
            os.close(fd)
        raise ConnectionError(f"header of {n} bytes is larger than {_MAX_HEADER}")
    try:
        return json.loads(bytes(_recv_exact(sock, n))), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def new_memfd(name: str, nbytes: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal(fd: int) -> None:
    """No one may change a snapshot's bytes or size from now on (needs no writable mapping)."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_SEAL)


def recv_into_memfd(sock, nbytes: int, name: str) -> int:
    """Receive nbytes from a stream into a new sealed memfd."""
    fd = new_memfd(name, nbytes)
    try:
        if nbytes:
            # MAP_POPULATE: pages allocated in one go, not one fault per page while receiving.
            with mmap.mmap(fd, nbytes, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           mmap.PROT_READ | mmap.PROT_WRITE) as m:
                view = memoryview(m)
                try:
                    _recv_exact(sock, nbytes, view)
                finally:
                    view.release()
        seal(fd)
        return fd
    except BaseException:
        os.close(fd)
        raise


def send_fd_bytes(sock, fd: int, nbytes: int, rate: float | None = None, start=None) -> None:
    """Stream a descriptor's bytes; with rate (bytes/s) the sender sleeps to stay under it."""
    if not nbytes:
        return
    sent = 0
    t0 = start if start is not None else [time.monotonic(), 0]
    with mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        view = memoryview(m)
        try:
            while sent < nbytes:
                n = min(_IO_SLICE if rate is None else max(65536, min(_IO_SLICE, int(rate / 20))),
                        nbytes - sent)
                sock.sendall(view[sent:sent + n])
                sent += n
                if rate:
                    t0[1] += n
                    ahead = t0[1] / rate - (time.monotonic() - t0[0])
                    if ahead > 0:
                        time.sleep(ahead)
        finally:
            view.release()


# ---------------------------------------------------------------- the keeper
class _Snapshot:
    __slots__ = ("rank", "step", "meta", "fds", "sizes", "origin", "seq")

    def __init__(self, rank, step, meta, fds, sizes, origin, seq):
        self.rank, self.step, self.meta, self.fds, self.sizes = rank, step, meta, fds, sizes
        self.origin, self.seq = origin, seq

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class Keeper:
    def __init__(self, base: str, token: str, host: str, keep: int, budget: int, idle_timeout: float,
                 watch_pid: int | None, tcp_host: str | None):
        self.base, self.token, self.host = base, token, host
        self.keep, self.budget, self.idle_timeout = keep, budget, idle_timeout
        self.lock = threading.Lock()
        self.snaps: dict[tuple[int, int], _Snapshot] = {}
        self.seq = 0
        self.clients = 0
        self.last_active = time.monotonic()
        self.stopping = threading.Event()
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = base + ".sock"
        old = os.umask(0o177)
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.unix.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.unix.listen(64)
        self.tcp = None
        if tcp_host:
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tcp.bind((tcp_host, 0))
            self.tcp.listen(64)
        self.pidfd = None
        if watch_pid and watch_pid > 1:
            try:
                self.pidfd = os.pidfd_open(watch_pid)
            except (OSError, AttributeError):
                self.pidfd = None  # already gone: the idle timeout still ends us
                if not _alive(watch_pid):
                    self.stopping.set()

    def address(self):
        return list(self.tcp.getsockname()) if self.tcp is not None else None

    def serve(self) -> None:
        listeners = [self.unix] + ([self.tcp] if self.tcp is not None else [])
        while not self.stopping.is_set():
            waits = listeners + ([self.pidfd] if self.pidfd is not None else [])
            ready, _, _ = select.select(waits, [], [], 0.5)
            if self.pidfd is not None and self.pidfd in ready:
                break  # the job's launcher is gone: so is the job
            for s in ready:
                if s in listeners:
                    try:
                        conn, _ = s.accept()
                    except OSError:
                        continue
                    with self.lock:
                        self.clients += 1
                        self.last_active = time.monotonic()
                    threading.Thread(target=self._client, args=(conn, s is self.unix), daemon=True).start()
            with self.lock:
                idle = self.clients == 0 and time.monotonic() - self.last_active > self.idle_timeout
            if idle:
                break
        self.shutdown()

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            for s in self.snaps.values():
                s.close()
            self.snaps.clear()
        for suffix in (".sock", ".json", ".token", ".log"):
            try:
                os.unlink(self.base + suffix)
            except OSError:
                pass

    # ---- one connection
    def _client(self, conn: socket.socket, unix: bool) -> None:
        conn.settimeout(10.0)   # a stranger that says nothing is dropped soon
        try:
            if not unix:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello, fds = recv_msg(conn, unix)
            conn.settimeout(None if unix else 600.0)
            for fd in fds:
                os.close(fd)
            token = hello.get("token") if isinstance(hello, dict) else None
            if hello.get("op") != "hello" or not isinstance(token, str) or \
                    not hmac.compare_digest(token.encode(), self.token.encode()):
                return  # nothing for a stranger: not even an error message
            send_msg(conn, {"ok": True, "protocol": PROTOCOL, "pid": os.getpid(), "host": self.host,
                            "keep": self.keep, "budget": self.budget})
            while not self.stopping.is_set():
                try:
                    msg, fds = recv_msg(conn, unix)
                except (ConnectionError, OSError):
                    return
                with self.lock:
                    self.last_active = time.monotonic()
                try:
                    self._handle(conn, unix, msg, fds)
                except (ConnectionError, OSError):
                    return
                except Exception as e:  # noqa: BLE001 - a bad request fails alone, the keeper stays
                    send_msg(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        except (ConnectionError, OSError, ValueError):
            return
        finally:
            conn.close()
            with self.lock:
                self.clients -= 1
                self.last_active = time.monotonic()

    def _handle(self, conn, unix, msg, fds) -> None:
        op = msg.get("op")
        if op == "put":
            sizes = [int(n) for n in msg["sizes"]]
            if unix:
                if len(fds) != len(sizes):
                    for fd in fds:
                        os.close(fd)
                    raise ValueError(f"put: {len(sizes)} sizes but {len(fds)} descriptors")
                for fd, n in zip(fds, sizes):
                    have = os.fstat(fd).st_size
                    if have != n:
                        for f in fds:
                            os.close(f)
                        raise ValueError(f"put: a descriptor holds {have} bytes, not {n}")
            else:
                fds = []
                try:
                    for i, n in enumerate(sizes):
                        fds.append(recv_into_memfd(conn, n, f"ichiban-replica-r{msg['rank']}-{i}"))
                except BaseException:
                    for fd in fds:
                        os.close(fd)
                    raise
            if sum(sizes) > self.budget:
                for fd in fds:
                    os.close(fd)
                raise ValueError(f"a snapshot of {sum(sizes)} bytes does not fit the keeper's budget of "
                                 f"{self.budget} bytes")
            self._store(int(msg["rank"]), int(msg["step"]), msg["meta"], fds, sizes, msg.get("origin", "local"))
            send_msg(conn, {"ok": True})
        elif op == "list":
            with self.lock:
                snaps = [{"rank": s.rank, "step": s.step, "origin": s.origin, "nbytes": s.nbytes,
                          "seq": s.seq, "world": s.meta.get("world"), "time": s.meta.get("time")}
                         for s in self.snaps.values()]
            send_msg(conn, {"ok": True, "snapshots": snaps, "pid": os.getpid(), "host": self.host})
        elif op == "get":
            with self.lock:
                s = self.snaps.get((int(msg["rank"]), int(msg["step"])))
                # Duplicated under the lock: an eviction racing with the reply cannot close them.
                dup = [os.dup(fd) for fd in s.fds] if s is not None else []
            if s is None:
                send_msg(conn, {"ok": False, "error": f"no snapshot of rank {msg['rank']} step {msg['step']}"})
                return
            try:
                head = {"ok": True, "meta": s.meta, "sizes": s.sizes, "origin": s.origin}
                if msg.get("meta_only"):
                    send_msg(conn, head)
                elif unix:
                    send_msg(conn, head, dup)
                else:
                    send_msg(conn, head)
                    for fd, n in zip(dup, s.sizes):
                        send_fd_bytes(conn, fd, n)
            finally:
                for fd in dup:
                    os.close(fd)
        elif op == "drop":
            after = msg.get("after")
            with self.lock:
                for key in [k for k in self.snaps if after is None or k[1] > int(after)]:
                    self.snaps.pop(key).close()
            send_msg(conn, {"ok": True})
        elif op == "stop":
            send_msg(conn, {"ok": True})
            self.stopping.set()
        else:
            raise ValueError(f"unknown op {op!r}")

    def _store(self, rank, step, meta, fds, sizes, origin) -> None:
        with self.lock:
            self.seq += 1
            old = self.snaps.pop((rank, step), None)
            if old is not None:
                old.close()
            self.snaps[(rank, step)] = _Snapshot(rank, step, meta, fds, sizes, origin, self.seq)
            # The newest `keep` steps of each rank, then the oldest snapshots go until the budget holds.
            for r in {k[0] for k in self.snaps}:
                mine = sorted((s for s in self.snaps.values() if s.rank == r), key=lambda s: s.seq)
                for s in mine[:-self.keep]:
                    self.snaps.pop((s.rank, s.step)).close()
            total = sum(s.nbytes for s in self.snaps.values())
            for s in sorted(self.snaps.values(), key=lambda s: s.seq):
                if total <= self.budget or s.seq == self.seq:
                    break
                total -= s.nbytes
                self.snaps.pop((s.rank, s.step)).close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _serve_main(args) -> int:
    token = sys.stdin.readline().strip()
    if len(token) < 16:
        print("error: the job token (>= 16 characters) must come on stdin", flush=True)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C to the job is not for us
    keeper = Keeper(args.base, token, args.host, args.keep, args.budget_bytes, args.idle_timeout,
                    args.watch_pid, args.tcp)
    signal.signal(signal.SIGTERM, lambda *_: keeper.stopping.set())
    info = {"pid": os.getpid(), "host": args.host, "tcp": keeper.address(), "protocol": PROTOCOL,
            "keep": args.keep, "budget": args.budget_bytes}
    tmp = args.base + ".json.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(info, f)
    os.replace(tmp, args.base + ".json")
    print("ready " + json.dumps(info), flush=True)
    sys.stdout.close()
    try:
        keeper.serve()
    finally:
        keeper.shutdown()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ichiban_comm.checkpoint.keeper",
                                description="The in-memory checkpoint keeper of one host.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a keeper (the checkpointer does this; token on stdin)")
    s.add_argument("--base", required=True, help="path prefix of the socket, token and info files")
    s.add_argument("--host", required=True)
    s.add_argument("--keep", type=int, default=2)
    s.add_argument("--budget-bytes", type=int, required=True)
    s.add_argument("--idle-timeout", type=float, default=900.0)
    s.add_argument("--watch-pid", type=int, default=None)
    s.add_argument("--tcp", default=None, help="also listen on this address (token required)")
    for name in ("status", "stop"):
        c = sub.add_parser(name, help=f"{name} the keeper of a checkpoint root on this machine")
        c.add_argument("--root", required=True)
        c.add_argument("--host", default=None, help="declared host name (default: every keeper of root)")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return _serve_main(args)
    import glob

    pattern = keeper_base(args.root, args.host) if args.host else \
        os.path.join(runtime_dir(), f"keeper-{job_id(args.root)}-*")
    found = sorted(glob.glob(pattern + ".json" if args.host else pattern + ".json"))
    if not found:
        print(f"no keeper for {args.root}")
        return 1
    for info_path in found:
        base = info_path[:-len(".json")]
        with open(info_path) as f:
            info = json.load(f)
        with open(base + ".token") as f:
            token = f.read().strip()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(base + ".sock")
            send_msg(sock, {"op": "hello", "token": token})
            recv_msg(sock, True)
            send_msg(sock, {"op": "stop" if args.cmd == "stop" else "list"})
            reply, _ = recv_msg(sock, True)
            sock.close()
        except OSError as e:
            print(f"keeper {info['host']} (pid {info['pid']}): not reachable ({e})")
            continue
        if args.cmd == "stop":
            print(f"keeper {info['host']} (pid {info['pid']}): stopping")
        else:
            snaps = reply["snapshots"]
            total = sum(x["nbytes"] for x in snaps)
            print(f"keeper {info['host']} (pid {info['pid']}, tcp {info['tcp']}): {len(snaps)} snapshot(s), "
                  f"{total / 2**20:.1f} MiB")
            for x in sorted(snaps, key=lambda x: (x["step"], x["rank"])):
                print(f"  step {x['step']} rank {x['rank']} {x['origin']} {x['nbytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
