"""Two "hosts" on one machine: two network namespaces joined by a veth pair.

    from netns import TwoHosts, netns_available

    ok, why = netns_available()
    with TwoHosts(rate="200mbit") as hosts:          # optional shaping of both ends
        hosts.addr[0], hosts.addr[1]                  # 10.231.X.1, 10.231.X.2
        hosts.ifname[0]                               # the veth inside namespace 0
        subprocess.run(hosts.cmd(0, ["ip", "-br", "addr"]))
        runs = hosts.run_pair([argv0, argv1], env=[env0, env1], timeout=60, log_dir=d)

Each namespace holds only ``lo`` (up) and its end of the veth, with one address
of a 10.231.X.0/24 (X from the pid; the namespaces have no other device, so the
subnet is reachable only between the two). The veth is created directly inside
the namespaces: the machine's own network is never touched. Names are unique
per process and instance (``icb<pid>_<n>a``/``b``); namespaces of that form left
by a process that no longer exists (killed before it could clean up) are
deleted when the next pair is made. Leaving the ``with`` block -- normally, on
an exception or on a timeout -- kills every process still inside the two
namespaces (only processes started there by this object's user can be there),
deletes both namespaces (which deletes the veth pair) and checks that nothing
is left; a leftover is an error.

Shaping: ``rate`` uses ``netem rate`` when the kernel has ``sch_netem`` and a
token bucket (``tbf``) otherwise; ``delay`` needs ``netem`` and raises
:class:`ShapingUnavailable` without it (``netem_available()`` tells beforehand).

Needs root and ``ip``/``tc`` (iproute2); ``netns_available()`` says why not.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time

_counter = itertools.count()
_probe_cache: dict[str, tuple[bool, str]] = {}


class ShapingUnavailable(RuntimeError):
    """The requested traffic shaping needs a queueing discipline this kernel lacks."""


def _ip(*args, check=True, timeout=20) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _probe(key: str, fn) -> tuple[bool, str]:
    if key not in _probe_cache:
        _probe_cache[key] = fn()
    return _probe_cache[key]


def netns_available() -> tuple[bool, str]:
    """(True, "") when this process can create network namespaces and veth pairs;
    otherwise (False, the precise reason)."""

    def check():
        if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
            return False, "network namespaces need Linux"
        if os.geteuid() != 0:
            return False, f"network namespaces need root (euid {os.geteuid()})"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return False, f"`{tool}` not found on PATH (install iproute2)"
        name = f"icb{os.getpid()}p"
        try:
            p = _ip("netns", "add", name, check=False)
            if p.returncode != 0:
                return False, f"`ip netns add` failed: {p.stderr.strip()}"
            p = _ip("-n", name, "link", "add", name + "x", "type", "veth", "peer", "name", name + "y",
                    check=False)
            if p.returncode != 0:
                return False, f"cannot create a veth pair: {p.stderr.strip()}"
            return True, ""
        finally:
            _ip("netns", "del", name, check=False)

    return _probe("netns", check)


def netem_available() -> tuple[bool, str]:
    """(True, "") when ``tc qdisc ... netem`` works (rate and delay); otherwise why not."""

    def check():
        ok, why = netns_available()
        if not ok:
            return False, why
        name = f"icb{os.getpid()}q"
        try:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
            p = subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem",
                                "delay", "1ms"], capture_output=True, text=True, timeout=20)
            if p.returncode != 0:
                return False, (f"the kernel has no netem queueing discipline (sch_netem): "
                               f"`tc qdisc add ... netem` says {p.stderr.strip()!r}")
            return True, ""
        finally:
            _ip("netns", "del", name, check=False)

    return _probe("netem", check)


_OURS = re.compile(r"^icb(\d+)(_\d+[ab]|[pq])$")


def _sweep_dead() -> None:
    """Delete namespaces this module made in processes that no longer exist (a test
    process killed outright never reaches its ``finally``), with what still runs inside."""
    listed = _ip("netns", "list", check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _OURS.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its creator still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("netns", "del", name, check=False)


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class HostRun:
    """One host's command after :meth:`TwoHosts.run_pair`: exit code and output."""

    def __init__(self, host: int, argv: list[str], returncode: int | None, log: str, timed_out: bool):
        self.host, self.argv, self.returncode, self.log, self.timed_out = host, argv, returncode, log, timed_out

    def tail(self, n: int = 4000) -> str:
        return _tail(self.log, n)

    def __repr__(self):
        return f"HostRun(host={self.host}, returncode={self.returncode}, timed_out={self.timed_out})"


class TwoHosts:
    """Context manager: two network namespaces joined by a veth pair (see the module doc).

    rate: e.g. "200mbit", applied to the egress of both veth ends; delay: e.g. "2ms"
    one way on each end (so a round trip gains twice it); both need ``tc``.
    """

    def __init__(self, rate: str | None = None, delay: str | None = None):
        ok, why = netns_available()
        if not ok:
            raise RuntimeError(f"cannot simulate two hosts: {why}")
        _sweep_dead()
        pid, n = os.getpid(), next(_counter) % 100
        base = f"icb{pid}_{n}"  # + "va": at most 15 characters (pid_max is 7 digits)
        self.ns = [base + "a", base + "b"]
        self.ifname = [base + "va", base + "vb"]
        x = (pid * 31 + n) % 250 + 1
        self.subnet = f"10.231.{x}.0/24"
        self.addr = [f"10.231.{x}.1", f"10.231.{x}.2"]
        self.rate, self.delay = rate, delay
        self.shaping = "none"  # "netem", "tbf" or "none", once entered
        self._created: list[str] = []

    # ---- lifetime ----------------------------------------------------------
    def __enter__(self) -> "TwoHosts":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise  # a leftover is an error, unless a failure is already on its way
        return False

    def _setup(self):
        for ns in self.ns:
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", self.ifname[0], "netns", self.ns[0], "type", "veth",
            "peer", "name", self.ifname[1], "netns", self.ns[1])
        for i in (0, 1):
            _ip("-n", self.ns[i], "addr", "add", self.addr[i] + "/24", "dev", self.ifname[i])
            _ip("-n", self.ns[i], "link", "set", self.ifname[i], "up")
        if self.rate or self.delay:
            self._shape()
        # The link is usable once both ends see each other.
        self._wait_link()

    def _shape(self):
        netem, why = netem_available()
        if self.delay and not netem:
            raise ShapingUnavailable(f"delay={self.delay!r} needs netem: {why}")
        for i in (0, 1):
            if netem:
                args = ["netem"] + (["delay", self.delay] if self.delay else []) \
                       + (["rate", self.rate] if self.rate else [])
                self.shaping = "netem"
            else:
                # Token bucket: the burst must hold at least one timer tick of traffic.
                args = ["tbf", "rate", self.rate, "burst", "256kb", "latency", "100ms"]
                self.shaping = "tbf"
            p = subprocess.run(["tc", "-n", self.ns[i], "qdisc", "add", "dev", self.ifname[i], "root",
                                *args], capture_output=True, text=True, timeout=20)
            if p.returncode != 0:
                raise RuntimeError(f"`tc qdisc add ... {' '.join(args)}` failed: {p.stderr.strip()}")

    def _wait_link(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            states = [_ip("-n", self.ns[i], "-br", "link", "show", "dev", self.ifname[i]).stdout.split()
                      for i in (0, 1)]
            if all(len(s) > 1 and s[1] == "UP" for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"veth {self.ifname[0]} <-> {self.ifname[1]} not up after {timeout} s: {states}")
            time.sleep(0.05)

    def pids(self, i: int) -> list[int]:
        p = _ip("netns", "pids", self.ns[i], check=False)
        return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []

    def kill_all(self, i: int, wait: float = 10.0) -> list[int]:
        """SIGKILL every process in namespace i; wait until they are gone. Returns those
        still there after `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            pids = self.pids(i)
            if not pids or time.monotonic() > deadline:
                return pids
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def close(self):
        """Kill what still runs inside, delete both namespaces, check nothing is left."""
        problems = []
        for ns in list(self._created):
            left = self.kill_all(self.ns.index(ns))
            if left:
                problems.append(f"processes {left} still in {ns}")
            p = _ip("netns", "del", ns, check=False)
            if p.returncode != 0:
                problems.append(f"`ip netns del {ns}`: {p.stderr.strip()}")
            self._created.remove(ns)
        left = _ip("netns", "list", check=False).stdout
        for ns in self.ns:
            if any(line.split()[0] == ns for line in left.splitlines() if line.strip()):
                problems.append(f"namespace {ns} still listed")
        links = _ip("-o", "link", "show", check=False).stdout
        for name in self.ifname:
            if f" {name}@" in links or f" {name}:" in links:
                problems.append(f"link {name} still in the root namespace")
        if problems:
            raise RuntimeError("two-host cleanup left: " + "; ".join(problems))

    # ---- running commands --------------------------------------------------
    def cmd(self, i: int, argv: list[str]) -> list[str]:
        """argv run inside namespace i (0 or 1)."""
        return ["ip", "netns", "exec", self.ns[i], *argv]

    def run_pair(self, argvs: list[list[str]], env: list[dict], timeout: float, log_dir: str,
                 cwd: str | None = None, grace: float = 15.0) -> list[HostRun]:
        """Run argvs[i] inside namespace i (both at once, each in its own process group)
        with env[i] added to this environment; wait for both, at most `timeout` seconds
        (and at most `grace` seconds after one of them failed: its peer would otherwise
        wait for the collective timeout), then kill whatever still runs in the two
        namespaces. Each host's output (stdout and stderr) goes to log_dir/host<i>.log."""
        procs, logs = [], []
        deadline = time.monotonic() + timeout
        try:
            for i in (0, 1):
                log = os.path.join(log_dir, f"host{i}.log")
                logs.append(log)
                with open(log, "wb") as f:
                    procs.append(subprocess.Popen(self.cmd(i, argvs[i]), env={**os.environ, **env[i]},
                                                  stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                                  start_new_session=True))
            timed_out = False
            while None in [p.poll() for p in procs]:  # poll every one: it sets returncode
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if any(p.returncode not in (None, 0) for p in procs):
                    deadline = min(deadline, time.monotonic() + grace)
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for p in procs:
                p.wait(timeout=10)
            for i in (0, 1):  # torchrun's workers run in sessions of their own
                self.kill_all(i)
        return [HostRun(i, argvs[i], p.returncode, logs[i], timed_out) for i, p in enumerate(procs)]
