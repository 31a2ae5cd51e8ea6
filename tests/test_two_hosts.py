"""Two hosts on one machine: torchrun in two network namespaces joined by a veth pair.

Each namespace runs one torchrun agent with two workers; a declared topology
(ICHIBAN_TOPOLOGY) puts ranks 0,1 on host h0 (namespace a) and 2,3 on h1
(namespace b), so the "ichiban" backend uses shared memory inside a namespace
and Gloo over the veth between them -- a real network path, optionally shaped
with ``tc``. Needs root and iproute2; skipped with the reason otherwise.

Run: python -m pytest -q tests/test_two_hosts.py        (-m "not slow" for the fast ones)

What a launch across namespaces needs (docs/two_hosts.md): GLOO_SOCKET_IFNAME
set to the namespace's veth, ``--local-addr`` set to its address and
``--rdzv-conf is_host=true`` on the agent whose namespace holds the rendezvous
endpoint (the machine's hostname resolves to 127.0.0.1 in both namespaces).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from netns import ShapingUnavailable, TwoHosts, netem_available, netns_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "two_host_worker.py")
PORT = 29400  # free by construction: each namespace pair is new and holds nothing else

_ok, _why = netns_available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"two simulated hosts need network namespaces: {_why}")


def _declared_topology(path) -> str:
    topo = {"hosts": [{"name": "h0"}, {"name": "h1"}],
            "ranks": [{"rank": r, "host": f"h{r // 2}", "local_rank": r % 2} for r in range(4)]}
    with open(path, "w") as f:
        json.dump(topo, f)
    return str(path)


def _launch(hosts: TwoHosts, tmp_path, program: list[str], timeout: float, env: dict | None = None):
    """One torchrun agent per namespace (2 nodes x 2 workers) running `program`; fails the
    test with both agents' output tails unless both exit 0 within `timeout`."""
    topo = _declared_topology(tmp_path / "topology.json")
    argvs, envs = [], []
    for i in (0, 1):
        argvs.append([sys.executable, "-m", "torch.distributed.run",
                      "--nnodes", "2", "--nproc-per-node", "2", "--max-restarts", "0",
                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts.addr[0]}:{PORT}",
                      "--rdzv-id", hosts.ns[0],
                      # namespace a hosts the rendezvous store; the heuristic cannot tell
                      "--rdzv-conf", f"is_host={'true' if i == 0 else 'false'},join_timeout={int(timeout)}",
                      "--local-addr", hosts.addr[i], *program])
        envs.append({"ICHIBAN_TOPOLOGY": topo, "GLOO_SOCKET_IFNAME": hosts.ifname[i],
                     "ICB_TEST_HOST": str(i), "OMP_NUM_THREADS": "1",
                     "PYTHONPATH": os.pathsep.join([REPO] + ([os.environ["PYTHONPATH"]]
                                                             if os.environ.get("PYTHONPATH") else [])),
                     **(env or {})})
    t = time.monotonic()
    runs = hosts.run_pair(argvs, envs, timeout=timeout, log_dir=str(tmp_path), cwd=REPO)
    elapsed = time.monotonic() - t
    if any(r.timed_out or r.returncode != 0 for r in runs):
        tails = "\n".join(f"---- namespace {hosts.ns[r.host]} (exit {r.returncode}"
                          f"{', killed: timeout, or its peer failed' if r.timed_out else ''}) ----\n{r.tail(6000)}"
                          for r in runs)
        pytest.fail(f"two-host run did not finish cleanly within {timeout} s:\n{tails}")
    return elapsed


def _collectives(tmp_path, rate=None, delay=None):
    out = tmp_path / "reports"
    out.mkdir()
    with TwoHosts(rate=rate, delay=delay) as hosts:
        elapsed = _launch(hosts, tmp_path, [WORKER, str(out)], timeout=90)
        shaping = hosts.shaping
    reports = []
    for r in range(4):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no report ({path})"
        reports.append(json.loads(path.read_text()))
    for r, rep in enumerate(reports):
        c = rep["counters"]
        assert rep["backend_type"] == "IchibanBackend", rep
        # The declared hosts are the namespaces: ranks 0,1 in a, 2,3 in b.
        assert rep["test_host"] == str(r // 2), f"rank {r} ran in namespace {rep['test_host']}"
        assert c["num_hosts"] == 2 and c["local_size"] == 2, (r, c)
        if rep["local_rank"] == "0":  # each host's leader sent through the inter-host engine
            assert c["inter_host_bytes"] > 0, (r, c)
        # Inside a host: the group's shared-memory segment exists, and where peers copy
        # directly from each other's buffers, the 1 MiB tensors went that way.
        assert c["has_segment"], (r, c)
        if c["direct"]:
            assert c["direct_bytes"] > 0, (r, c)
    return reports, elapsed, shaping


def _timing_note(label, reports, elapsed, shaping):
    t = reports[0]["timing"]
    print(f"\n[two hosts, {label}, shaping={shaping}] run {elapsed:.1f} s; all_reduce of "
          f"{t['all_reduce_bytes'] >> 10} KiB over 4 ranks, median of 5 on rank 0: "
          f"ichiban {t['ichiban_ms']:.2f} ms, gloo {t['gloo_ms']:.2f} ms; "
          f"inter_host_bytes per rank {[r['counters']['inter_host_bytes'] for r in reports]}, "
          f"direct_bytes per rank {[r['counters'].get('direct_bytes') for r in reports]}")


def test_namespaces_are_removed_with_everything_inside(tmp_path):
    """The harness itself: a command outliving its timeout is killed (its children too), so is
    one whose peer failed (after a grace period), and
    a process left running plus an exception inside the block still leave no namespace, no
    link and no process behind."""
    with TwoHosts() as hosts:
        t = time.monotonic()
        runs = hosts.run_pair([["sh", "-c", "sleep 600 & sleep 600"], ["setsid", "sleep", "600"]],
                              env=[{}, {}], timeout=1, log_dir=str(tmp_path))
        assert time.monotonic() - t < 15
        assert all(r.timed_out and r.returncode is not None for r in runs), runs
        assert hosts.pids(0) == [] and hosts.pids(1) == []
        # One side failing: its peer gets `grace` seconds, not the whole timeout.
        t = time.monotonic()
        runs = hosts.run_pair([["sleep", "600"], ["sh", "-c", "echo dying >&2; exit 3"]],
                              env=[{}, {}], timeout=300, grace=1, log_dir=str(tmp_path))
        assert time.monotonic() - t < 15
        assert runs[1].returncode == 3 and "dying" in runs[1].tail() and runs[0].returncode == -9, runs
        assert hosts.pids(0) == []
    with pytest.raises(RuntimeError, match="boom"):
        with TwoHosts(rate="100mbit") as hosts:
            names, links = list(hosts.ns), list(hosts.ifname)
            sleeper = subprocess.Popen(hosts.cmd(1, ["sleep", "600"]))
            got = subprocess.run(hosts.cmd(0, ["ip", "-o", "addr", "show", "dev", links[0]]),
                                 capture_output=True, text=True, timeout=20).stdout
            assert hosts.addr[0] + "/24" in got
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) == -9
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(line.split()[0] in names for line in listed.splitlines() if line.strip())
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(name in root_links for name in links)


def test_collectives_across_two_namespaces(tmp_path):
    reports, elapsed, shaping = _collectives(tmp_path)
    _timing_note("unshaped veth", reports, elapsed, shaping)


@pytest.mark.slow
def test_collectives_over_a_rate_limited_link(tmp_path):
    """200 Mbit/s each way: netem where the kernel has it, a token bucket (tbf) otherwise."""
    reports, elapsed, shaping = _collectives(tmp_path, rate="200mbit")
    assert shaping in ("netem", "tbf")
    _timing_note("rate 200mbit", reports, elapsed, shaping)


@pytest.mark.slow
def test_collectives_over_netem_rate_and_delay(tmp_path):
    ok, why = netem_available()
    if not ok:
        pytest.skip(f"rate 200mbit + delay 2ms need netem: {why}")
    try:
        reports, elapsed, shaping = _collectives(tmp_path, rate="200mbit", delay="2ms")
    except ShapingUnavailable as e:  # pragma: no cover - netem_available() said yes
        pytest.fail(str(e))
    assert shaping == "netem"
    _timing_note("netem rate 200mbit delay 2ms", reports, elapsed, shaping)


# ---- the main job across the two namespaces ----------------------------------
MAIN_JOB = ["--steps", "6", "--tp", "2", "--dp", "2", "--d-model", "64", "--n-layer", "2", "--n-head", "2",
            "--seq-len", "32", "--batch-size", "4", "--data-bytes", "200000",
            "--eval-batches", "1", "--log-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def main_job_summary(tmp_path_factory):
    """ichiban_comm.train (tp 2 x dp 2) run once across the two namespaces; its summary."""
    tmp = tmp_path_factory.mktemp("two_host_train")
    out = tmp / "run"
    with TwoHosts() as hosts:
        elapsed = _launch(hosts, tmp, ["-m", "ichiban_comm.train", *MAIN_JOB, "--out-dir", str(out)],
                          timeout=180, env={"ICHIBAN_KERNELS": "reference"})
    path = out / "summary.json"
    assert path.exists(), f"the main job finished but wrote no {path}"
    summary = json.loads(path.read_text())
    print(f"\n[two hosts, main job] 6 steps tp2 x dp2 in {elapsed:.1f} s (torchrun start included)")
    return summary


@pytest.mark.slow
def test_main_job_runs_across_two_namespaces(main_job_summary):
    s = main_job_summary
    assert s["world_size"] == 4 and s["tp"] == 2 and s["dp"] == 2 and s["steps"] == 6, s
    assert s["last_loss"] == s["last_loss"] and s["first_loss"] == s["first_loss"], s  # not NaN


@pytest.mark.slow
def test_main_job_summary_reports_inter_and_intra_host_bytes(main_job_summary):
    s = main_job_summary
    for key in ("inter_host_bytes", "intra_host_bytes"):
        if key not in s:
            pytest.fail(f"summary.json has no {key} (main job not yet reporting); keys: {sorted(s)}")
    assert s["inter_host_bytes"] > 0, s
    assert s["intra_host_bytes"] > 0, s
