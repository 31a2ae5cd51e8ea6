"""The "ichiban" backend when things go wrong or get unusual: abort with a stopped
peer, collectives issued from Future callbacks (DDP communication hooks), NaN
and Inf like torch, settings through IchibanOptions, liveness across PID
namespaces, and the parts made only on first use (the /dev/shm segment, the
NCCL group).

    python -m pytest -q tests/distributed/test_ichiban_faults.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from ichiban_ref import shm_entries
from spawn import free_port, run_workers


def _opts(**kw):
    from ichiban_comm.distributed import IchibanOptions

    return IchibanOptions(**kw)


# ---- NaN and Inf -------------------------------------------------------------

_SPECIALS = [float("nan"), float("inf"), float("-inf")]


def _nan_body(rank, ws):
    fails = []
    for algo in ("oneshot", "twoshot", "ring"):
        g = dist.new_group(backend="ichiban", pg_options=_opts(algo=algo))
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for n in (1, 7, 1003):
                ins = []
                for r in range(ws):
                    x = torch.randn(n, generator=torch.Generator().manual_seed(10 * n + r)).to(dtype)
                    # rank r puts a special value at index r % n, one of them on every rank
                    x[r % n] = _SPECIALS[r % 3]
                    if r == ws - 1 and n > 3:
                        x[3] = float("nan")  # NaN on the last rank only
                    ins.append(x)
                stacked = torch.stack(ins).float()
                refs = {dist.ReduceOp.MAX: stacked.amax(0), dist.ReduceOp.MIN: stacked.amin(0),
                        dist.ReduceOp.SUM: stacked.sum(0), dist.ReduceOp.AVG: stacked.mean(0)}
                for op, want in refs.items():
                    t = ins[rank].clone()
                    dist.all_reduce(t, op=op, group=g)
                    got = t.float()
                    same_nan = torch.equal(got.isnan(), want.isnan())
                    finite = want.isfinite()
                    same_inf = torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
                    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
                    close = torch.allclose(got[finite], want[finite], rtol=tol, atol=tol)
                    if not (same_nan and same_inf and close):
                        fails.append(f"{algo} {dtype} n={n} {op}: got {got[:4].tolist()} want {want[:4].tolist()}")
        dist.destroy_process_group(g)
    return fails


@pytest.mark.parametrize("ws", [2, 3])
def test_min_max_avg_propagate_nan_and_inf_like_torch(ws):
    assert run_workers(_nan_body, ws, backend="gloo", timeout=180) == [[]] * ws


# ---- abort with a stopped peer -----------------------------------------------

def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _abort_body(rank, ws):
    pids = [None] * ws
    dist.all_gather_object(pids, os.getpid())
    g = dist.new_group(backend="ichiban")
    dist.all_reduce(torch.ones(4), group=g)  # the group works
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 continues us once it has aborted
        return None
    while not _stopped(pids[1]):
        time.sleep(0.01)
    work = dist.all_reduce(torch.ones(1 << 16), group=g, async_op=True)  # waits on the stopped peer
    time.sleep(0.3)
    be = g._get_backend(torch.device("cpu"))
    t0 = time.monotonic()
    be.abort()
    took = time.monotonic() - t0
    try:
        work.wait()
        err = "no error"
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    waited = time.monotonic() - t0
    try:
        dist.all_reduce(torch.ones(1), group=g)
        after = "no error"
    except Exception as e:  # noqa: BLE001
        after = f"{type(e).__name__}: {e}"
    os.kill(pids[1], signal.SIGCONT)
    return took, waited, err, after


def test_abort_returns_promptly_with_a_stopped_peer():
    pg_timeout = 60.0
    res = run_workers(_abort_body, 2, backend="gloo", timeout=90, pg_timeout=pg_timeout)
    took, waited, err, after = res[0]
    assert took < pg_timeout / 60, f"abort() took {took:.2f} s with a stopped peer"
    assert waited < pg_timeout / 30, waited
    assert err.startswith("DistBackendError: ") and "aborted" in err and "allreduce" in err, err
    assert "sequence number" in err and "missing: [1]" in err, err
    assert after.startswith("DistBackendError: ") and "after the group was aborted" in after, after


# ---- collectives from Future callbacks ---------------------------------------

def _callback_body(rank, ws):
    t = torch.full((8,), float(rank + 1))
    inner = {}

    def cb(fut):
        # issued and waited on from the callback, on the thread that completed the first op
        u = torch.ones(4)
        dist.all_reduce(u, async_op=True).wait()
        v = torch.ones(2)
        dist.all_reduce(v)
        inner["u"], inner["v"] = u.tolist(), v.tolist()
        return fut.value()[0] * 2

    fut = dist.all_reduce(t, async_op=True).get_future().then(cb)
    out = fut.wait()
    want = float(sum(range(1, ws + 1)))
    return out.tolist() == [2 * want] * 8 and inner == {"u": [ws] * 4, "v": [ws] * 2}


def test_collectives_issued_and_waited_on_from_a_future_callback():
    assert run_workers(_callback_body, 2, backend="ichiban", timeout=60) == [True, True]


def _ddp_hook_body(rank, ws, hook_name):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    ich = dist.new_group(backend="ichiban")
    gloo = dist.new_group(backend="gloo")
    params = {}
    for name, group in (("ichiban", ich), ("gloo", gloo)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        ddp = DDP(model, process_group=group)
        if hook_name == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=2,
                                                start_powerSGD_iter=2, use_error_feedback=True,
                                                warm_start=True, random_seed=0)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        elif hook_name == "allreduce":
            ddp.register_comm_hook(group, default_hooks.allreduce_hook)
        else:
            ddp.register_comm_hook(group, default_hooks.fp16_compress_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)
        for _ in range(5):
            x = torch.randn(8, 16, generator=gen)
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        params[name] = [p.detach().clone() for p in model.parameters()]
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params["ichiban"], params["gloo"]))


@pytest.mark.parametrize("hook", ["powersgd", "allreduce", "fp16"])
def test_ddp_comm_hooks_match_gloo(hook):
    assert run_workers(_ddp_hook_body, 2, backend="gloo", timeout=120, args=(hook,)) == [True, True]


# ---- settings through IchibanOptions -----------------------------------------

def test_options_defaults_environment_and_overrides(monkeypatch):
    from ichiban_comm.distributed import IchibanOptions

    for var in ("ICHIBAN_ALGO", "ICHIBAN_SHM_SLOT_BYTES", "ICHIBAN_SPIN", "ICHIBAN_CMA", "ICHIBAN_NO_NCCL"):
        monkeypatch.delenv(var, raising=False)
    d = IchibanOptions()
    assert (d.algo, d.slot_bytes, d.spin_iters, d.direct, d.nccl) == ("auto", 256 << 10, -1, True, True)
    monkeypatch.setenv("ICHIBAN_ALGO", "Ring")
    monkeypatch.setenv("ICHIBAN_SHM_SLOT_BYTES", "8192")
    monkeypatch.setenv("ICHIBAN_SPIN", "7,3")
    monkeypatch.setenv("ICHIBAN_CMA", "off")
    monkeypatch.setenv("ICHIBAN_NO_NCCL", "1")
    e = IchibanOptions()
    assert (e.algo, e.slot_bytes, e.spin_iters, e.yield_iters, e.direct, e.nccl) == ("ring", 8192, 7, 3, False, False)
    o = IchibanOptions(algo="oneshot", slot_bytes=1 << 20)  # explicit wins over the environment
    assert (o.algo, o.slot_bytes, o.spin_iters) == ("oneshot", 1 << 20, 7)
    with pytest.raises(TypeError, match="unknown setting 'slot_size'.*slot_bytes"):
        IchibanOptions(slot_size=4096)
    with pytest.raises(TypeError, match="slot_bytes must be int"):
        IchibanOptions(slot_bytes="big")
    monkeypatch.setenv("ICHIBAN_SPIN", "fast")
    with pytest.raises(ValueError, match="ICHIBAN_SPIN='fast'"):
        IchibanOptions()
    monkeypatch.setenv("ICHIBAN_SPIN", "1")
    monkeypatch.setenv("ICHIBAN_DEBUG", "sometimes")
    with pytest.raises(ValueError, match="ICHIBAN_DEBUG"):
        IchibanOptions()


def _options_body(rank, ws):
    g = dist.new_group(backend="ichiban", pg_options=_opts(algo="ring", slot_bytes=8192, liveness="heartbeat",
                                                           heartbeat_ms=2000))
    t = torch.full((5000,), float(rank + 1))
    dist.all_reduce(t, group=g)
    be = g._get_backend(torch.device("cpu"))
    o = be.options
    errs = []
    try:
        dist.new_group(backend="ichiban", pg_options={"algo": "ring"})
        errs.append("a dict was accepted")
    except TypeError as e:
        if "IchibanOptions" not in str(e):
            errs.append(str(e))
    try:
        bad = dist.new_group(backend="ichiban", pg_options=_opts(algo="fastest"))
        dist.all_reduce(torch.ones(1), group=bad)
        errs.append("algo='fastest' was accepted")
    except ValueError as e:
        if "fastest" not in str(e):
            errs.append(str(e))
    return (o.algo, o.slot_bytes, be.choose_allreduce(64), be.heartbeat, t[0].item(), errs)


def test_options_reach_the_group_through_new_group():
    for algo, slot, chosen, heartbeat, total, errs in run_workers(_options_body, 2, backend="gloo", timeout=60):
        assert (algo, slot, chosen, heartbeat, total, errs) == ("ring", 8192, "ring", True, 3.0, [])


# ---- liveness ------------------------------------------------------------------

def _heartbeat_dead_body(rank, ws, pg_timeout):
    g = dist.new_group(backend="ichiban", pg_options=_opts(liveness="heartbeat", heartbeat_ms=1000))
    dist.all_reduce(torch.ones(3), group=g)
    if rank == 1:
        os._exit(3)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3), group=g)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}", time.monotonic() - t0, os.getpid()
    return "no error", 0.0, os.getpid()


def test_heartbeat_detects_a_dead_peer():
    pg_timeout = 60.0
    res = run_workers(_heartbeat_dead_body, 2, backend="gloo", timeout=90, pg_timeout=pg_timeout,
                      args=(pg_timeout,), expect_failure_ranks=(1,))
    msg, elapsed, pid = res[0]
    assert msg.startswith("DistBackendError: ") and "rank 1" in msg and "no heartbeat" in msg, msg
    assert elapsed < pg_timeout / 6, elapsed
    assert shm_entries([pid]) == []


_NS_RANK = r"""
import datetime, os, sys, time, torch, torch.distributed as dist
import ichiban_comm
rank, port, ws = int(sys.argv[1]), sys.argv[2], 2
dist.init_process_group("ichiban", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws,
                        timeout=datetime.timedelta(seconds=60))
for _ in range(20):
    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)
    time.sleep(0.01)
be = dist.group.WORLD._get_backend(torch.device("cpu"))
print("RESULT", t[0].item(), be.heartbeat, os.getpid(), flush=True)
if rank == 1:
    os._exit(0)  # leaves without a word: rank 0 must notice by the heartbeat
t0 = time.monotonic()
try:
    dist.all_reduce(t)
    print("ERROR none", flush=True)
except Exception as e:
    print("ERROR", type(e).__name__, round(time.monotonic() - t0, 2), str(e).replace("\n", " "), flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_ranks_in_different_pid_namespaces():
    if os.geteuid() != 0 or subprocess.run(["unshare", "--pid", "--fork", "true"],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --pid --fork` (root)")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _NS_RANK, "0", port], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", _NS_RANK, "1", port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out in outs:
        assert "RESULT 3.0 True" in out, out[-3000:]
    err = [line for line in outs[0].splitlines() if line.startswith("ERROR")]
    assert err and err[0].startswith("ERROR DistBackendError"), outs[0][-3000:]
    assert "rank 1 (in another PID namespace)" in err[0] and float(err[0].split()[2]) < 60 / 6, err[0]
    pid0 = int(next(line for line in outs[0].splitlines() if line.startswith("RESULT")).split()[3])
    assert shm_entries([pid0]) == []


# ---- made on first use ----------------------------------------------------------

def _lazy_body(rank, ws):
    g = dist.new_group(backend="ichiban")
    be = g._get_backend(torch.device("cpu"))
    before = (be.has_segment, be.has_cuda_group)
    dist.all_reduce(torch.ones(2), group=g)
    after = (be.has_segment, be.has_cuda_group)
    return before, after, torch.cuda.is_initialized()


def test_segment_on_first_cpu_op_and_no_cuda_call_without_nccl():
    # ICHIBAN_NO_NCCL=1: not even torch.cuda.is_available() may run (it would initialise the driver).
    for before, after, cuda_init in run_workers(_lazy_body, 2, backend="gloo", timeout=60,
                                                env={"ICHIBAN_NO_NCCL": "1"}):
        assert before == (False, False) and after == (True, False) and not cuda_init


def _mixed_options_body(rank, ws):
    # "cpu:ichiban,cuda:nccl" hands the same pg_options to both backends: the ichiban one must
    # take NCCL's options (for its CUDA tensors) without complaint.
    g = dist.new_group(backend="ichiban", pg_options=dist.ProcessGroupNCCL.Options())
    t = torch.full((100,), float(rank + 1))
    dist.all_reduce(t, group=g)
    be = g._get_backend(torch.device("cpu"))
    return t[0].item(), be.has_cuda_group


def test_mixed_backend_string_and_nccl_options_on_cpu():
    if not dist.is_nccl_available():
        pytest.skip("torch built without NCCL")
    from torch.distributed.distributed_c10d import BackendConfig

    config = BackendConfig(dist.Backend("cpu:ichiban,cuda:nccl"))
    assert config.get_device_backend_map() == {"cpu": "ichiban", "cuda": "nccl"}
    assert run_workers(_mixed_options_body, 2, backend="gloo", timeout=60) == [(3.0, False)] * 2


def _mixed_body(rank, ws):
    torch.cuda.set_device(rank % torch.cuda.device_count())
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    t = torch.full((100,), float(rank + 1))
    dist.all_reduce(t)
    c = torch.full((100,), float(rank + 1), device="cuda")
    dist.all_reduce(c)
    return type(be).__name__, t[0].item(), c[0].item(), be.has_cuda_group


@pytest.mark.gpu
def test_cpu_ichiban_cuda_nccl_on_a_gpu():
    # NCCL's own group takes the CUDA tensors; the ichiban backend never makes one.
    ws = min(2, torch.cuda.device_count())
    res = run_workers(_mixed_body, ws, backend="cpu:ichiban,cuda:nccl", timeout=120)
    total = float(sum(range(1, ws + 1)))
    assert res == [("IchibanBackend", total, total, False)] * ws


# ---- one topology ------------------------------------------------------------------

def _topology_body(rank, ws, path):
    import datetime

    from ichiban_comm import topology
    from ichiban_comm.distributed import backend

    calls, sweeps = [], []
    real_gather = topology._publish_and_gather
    real_exchange = topology._exchange

    def count_gather(*a, **k):
        calls.append("gather")
        return real_gather(*a, **k)

    def count_exchange(*a, **k):
        calls.append("exchange")
        return real_exchange(*a, **k)

    topology._publish_and_gather = count_gather
    topology._exchange = count_exchange
    backend._sweep_stale_segments = lambda: sweeps.append(rank)
    dist.init_process_group("ichiban", rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=30))
    sub = dist.new_group([0, 1], backend="ichiban")
    other = dist.new_group(backend="ichiban")
    t = torch.ones(4)
    dist.all_reduce(t, group=other)
    if rank in (0, 1):
        dist.all_reduce(t, group=sub)
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    job = topology.job_topology()
    return calls.count("gather"), job.num_hosts, be.num_hosts, be.local_size, sweeps, t[0].item()


def test_backend_reads_the_one_topology(tmp_path):
    import json

    path = tmp_path / "topo.json"
    path.write_text(json.dumps({"hosts": [{"name": "a"}, {"name": "b"}],
                                "ranks": [{"rank": r, "host": "ab"[r // 2], "local_rank": r % 2}
                                          for r in range(4)]}))
    res = run_workers(_topology_body, 4, backend=None, timeout=120, args=(str(path),),
                      env={"ICHIBAN_TOPOLOGY": str(path)})
    for rank, (gathers, topo_hosts, be_hosts, local, sweeps, total) in enumerate(res):
        # one exchange (the default group's), read by every later group
        assert gathers == 1 and topo_hosts == 2 and be_hosts == 2 and local == 2
        # the first member of each host sweeps stale segments, for each of the 3 groups it is in
        assert sweeps == ([rank] * (3 if rank == 0 else 2) if rank in (0, 2) else []), (rank, sweeps)
        assert total == (8.0 if rank in (0, 1) else 4.0)
