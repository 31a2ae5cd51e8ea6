"""The main job under torchrun surviving the faults that matter, on one machine.

Each test runs plain ``torchrun --max-restarts`` (no TORCHELASTIC_DISABLE... variable: the job
agrees a fresh store per attempt itself, ichiban_comm/elastic.py) and compares against an
uninterrupted run of the same job started with ``--nproc``: per-step losses and the final
parameters' digests must be bit-identical (CPU, fixed seeds, fixed topology; see
docs/resilience.md for what makes them so).

    python -m pytest -q tests/test_train_resilient.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from spawn import free_port as _port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = ["--steps", "12", "--d-model", "64", "--n-layer", "2", "--n-head", "2", "--seq-len", "32",
       "--batch-size", "4", "--data-bytes", "300000", "--eval-batches", "1", "--log-every", "4",
       "--ckpt-every", "3", "--keep-last", "2", "--threads", "1"]


def _env(extra=None):
    # the kernels' plain-torch references: the Triton interpreter (tests/conftest.py) is too slow
    # to train with
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ICHIBAN_KERNELS="reference")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)   # the users' plain torchrun
    env.update(extra or {})
    return env


def _records(out):
    recs = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass   # a line torn by SIGKILL
    return recs


def _losses(recs, attempt=None):
    return {r["step"]: r["loss"] for r in recs
            if "event" not in r and (attempt is None or r["attempt"] == attempt)}


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _reference(tmp_path, nproc, args, env, name="ref"):
    out = str(tmp_path / name)
    cmd = [sys.executable, "-m", "ichiban_comm.train", "--nproc", str(nproc), "--out-dir", out] + JOB + args
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _torchrun_cmd(nnodes, nproc, port, out, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "2", "--monitor-interval", "0.5",
            "-m", "ichiban_comm.train", "--out-dir", out] + JOB + args


def _run_agents(cmds, env, timeout, during=None):
    """Start one torchrun agent per command; `during(procs)` runs while they do. Returns
    (return codes, combined output). Everything is killed on timeout."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT, start_new_session=True) for c in cmds]
    try:
        if during is not None:
            during(procs)
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except BaseException:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        outs = [p.communicate()[0] for p in procs]
        print("\n".join(o[-4000:] for o in outs))
        raise
    return [p.returncode for p in procs], "\n".join(outs)


def _workers(out):
    """pids of this job's training processes (their command line names the out dir)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"ichiban_comm.train" in argv and out.encode() in argv and b"torch.distributed.run" not in argv:
            pids.append(int(d))
    return pids


def _shm_segments():
    return {n for n in os.listdir("/dev/shm") if n.startswith("ichiban")}


def _assert_same_as_reference(out, ref):
    recs, ref_recs = _records(out), _records(ref)
    got, want = _losses(recs), _losses(ref_recs)
    last = max(r["attempt"] for r in recs if r.get("event") == "start")
    assert last >= 2, "no restart happened"
    resumed = _losses(recs, last)
    assert resumed and min(resumed) > 0
    assert resumed == {s: want[s] for s in resumed}, "losses after the restart differ"
    assert got == want
    assert _summary(out)["param_digests"] == _summary(ref)["param_digests"]


def _two_host_topology(tmp_path):
    path = tmp_path / "two_hosts.json"
    path.write_text(json.dumps({"hosts": [{"name": "h0"}, {"name": "h1"}],
                                "ranks": [{"rank": r, "host": f"h{r // 2}", "local_rank": r % 2}
                                          for r in range(4)]}))
    return str(path)


@pytest.mark.slow
def test_rank_killed_by_fail_at_resumes_bit_identical(tmp_path):
    """--fail-at: a rank SIGKILLs itself mid-run; torchrun restarts the group, which resumes from
    the newest disk checkpoint with the loader's state: same losses, same final parameters."""
    env = _env()
    args = ["--dp", "2"]
    ref = _reference(tmp_path, 2, args, env)
    out = str(tmp_path / "run")
    codes, log = _run_agents([_torchrun_cmd(1, 2, _port(), out, args + ["--fail-at", "7:1"])], env, 240)
    assert codes == [0], log[-4000:]
    assert "--fail-at 7:1" in log and "attempt 2" in log
    recs = _records(out)
    fail = [r for r in recs if r.get("event") == "fail"]
    assert fail and fail[0]["rank"] == 1 and fail[0]["step"] == 7
    start2 = [r for r in recs if r.get("event") == "start" and r["attempt"] == 2][0]
    assert start2["restore"]["source"] == "disk" and start2["start_step"] in (3, 6)
    _assert_same_as_reference(out, ref)
    assert not _workers(out)
    # the report of the real run: the restart, its cost and the PNG
    r = subprocess.run([sys.executable, "-m", "ichiban_comm.train", "report", out],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "1 restart" in r.stdout and "disk@" in r.stdout and "goodput" in r.stdout
    with open(os.path.join(out, "report.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_hosts_rank_killed_recovers_from_memory(tmp_path):
    """Two torchrun agents as two declared hosts, tp=2 x dp=2 with the memory tier. The test
    removes every checkpoint from disk and SIGKILLs a rank: the restart reads the keepers'
    snapshots and continues bit-identically. The summary shows traffic through shared memory
    (inside a host) and between the hosts."""
    env = _env({"ICHIBAN_TOPOLOGY": _two_host_topology(tmp_path)})
    args = ["--tp", "2", "--dp", "2", "--memory-ckpt", "--comm-timeout", "30"]
    ref = _reference(tmp_path, 4, args, env)
    out = str(tmp_path / "run")
    port = _port()
    ckpt = os.path.join(out, "ckpt")

    def kill_after_a_checkpoint(procs):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            steps = _losses(_records(out)) if os.path.exists(os.path.join(out, "metrics.jsonl")) else {}
            if steps and max(steps) >= 7 and os.path.isdir(ckpt) and \
                    any(n.startswith("step_") for n in os.listdir(ckpt)):
                break
            assert all(p.poll() is None for p in procs), "an agent ended before the failure"
            time.sleep(0.05)
        victims = sorted(_workers(out))
        assert len(victims) == 4
        for n in os.listdir(ckpt):   # the disk copy is gone: only memory can serve the restart
            if n.startswith("step_"):
                os.rename(os.path.join(ckpt, n), os.path.join(ckpt, "gone_" + n))
        os.kill(victims[-1], signal.SIGKILL)

    cmds = [_torchrun_cmd(2, 2, port, out, args) for _ in range(2)]
    codes, log = _run_agents(cmds, env, 300, during=kill_after_a_checkpoint)
    assert codes == [0, 0], log[-6000:]
    recs = _records(out)
    starts = [r for r in recs if r.get("event") == "start"]
    assert starts[-1]["attempt"] >= 2 and starts[-1]["restore"]["source"] == "memory", starts
    _assert_same_as_reference(out, ref)
    s = _summary(out)
    assert s["intra_host_bytes"] > 0 and s["inter_host_bytes"] > 0, s
    assert not _workers(out)


@pytest.mark.slow
def test_hung_rank_times_out_naming_it_and_the_run_completes(tmp_path):
    """--fail-signal stop: a rank stops (SIGSTOP) mid-run. The others' collectives fail within
    --comm-timeout with an error naming it, torchrun restarts the group (killing the stopped
    process), the run completes; no training process or /dev/shm segment is left behind."""
    env = _env()
    before = _shm_segments()
    out = str(tmp_path / "run")
    args = ["--dp", "2", "--comm-timeout", "4", "--fail-at", "5:1", "--fail-signal", "stop"]
    t0 = time.monotonic()
    codes, log = _run_agents([_torchrun_cmd(1, 2, _port(), out, args)], env, 240)
    assert codes == [0], log[-4000:]
    assert "SIGSTOP at step 5" in log
    assert "rank 1" in log and ("timed out" in log or "not responding" in log), log[-4000:]
    recs = _records(out)
    assert [r["attempt"] for r in recs if r.get("event") == "start"] == [1, 2]
    assert max(_losses(recs, 2)) == 11
    assert not _workers(out)
    time.sleep(0.5)
    assert _shm_segments() <= before, _shm_segments() - before
    print(f"hung-rank run: {time.monotonic() - t0:.1f} s")
