"""Host-shared tensors (ICHIBAN_SHARED_TENSORS / enable_shared_tensors): the
allocator on its own, and all-reduce reading and writing the peers' tensors in
place, against plain references on random inputs.

The environment variable is set in the parent so that spawned workers have it
when they import the package (before any tensor or group exists).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

import ichiban_comm  # noqa: F401  registers "ichiban" (torch < 2.14 reads no entry point)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spawn import native_stderr, random_tensor, run_workers  # noqa: E402

ELEMS = 20_011  # >= 64 KiB for 4-byte types, odd, not divisible by 2, 3 or 4

CASES = [
    (torch.float32, ["SUM", "AVG", "PRODUCT", "MIN", "MAX"]),
    (torch.float64, ["SUM", "MAX"]),
    (torch.bfloat16, ["SUM", "AVG"]),
    (torch.float16, ["SUM"]),
    (torch.complex64, ["SUM", "AVG"]),
    (torch.int64, ["SUM", "MIN", "BAND", "BOR", "BXOR"]),
    (torch.int32, ["SUM", "PRODUCT", "MAX"]),
    (torch.int8, ["SUM"]),
    (torch.uint8, ["MAX", "BXOR"]),
    (torch.bool, ["SUM", "PRODUCT"]),
]


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _input(dtype, rank, n):
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(n, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        # PRODUCT of four ranks stays finite in float16/bfloat16 near 1
        return (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 255, (n,), generator=g, dtype=dtype)
    if dtype == torch.int8:
        return torch.randint(-30, 30, (n,), generator=g, dtype=dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)


def _reference(ins, op):
    if ins[0].dtype == torch.bool:
        x = torch.stack(ins)
        return x.any(0) if op == "SUM" else x.all(0)
    dt = ins[0].dtype
    wide = torch.complex128 if dt.is_complex else torch.float64 if dt.is_floating_point else torch.int64
    x = torch.stack([i.to(wide) for i in ins])
    if op in ("SUM", "AVG"):
        r = x.sum(0) / (len(ins) if op == "AVG" else 1)
    elif op == "PRODUCT":
        r = x.prod(0)
    elif op == "MIN":
        r = x.min(0).values
    elif op == "MAX":
        r = x.max(0).values
    else:
        r = x[0]
        for y in x[1:]:
            r = {"BAND": r & y, "BOR": r | y, "BXOR": r ^ y}[op]
    return r.to(dt)


def _close(got, want):
    if got.dtype in (torch.bfloat16, torch.float16):
        return torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    if got.dtype.is_floating_point or got.dtype.is_complex:
        return torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    return torch.equal(got, want)


def _allreduce_body(rank, ws, private_rank):
    from ichiban_comm.distributed import is_shared

    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    bad = []
    for dtype, ops in CASES:
        n = max(ELEMS, (64 << 10) // torch.empty((), dtype=dtype).element_size() + 11)
        ins = [_input(dtype, p, n) for p in range(ws)]
        for op in ops:
            t = ins[rank].clone()
            if rank == private_rank:  # memory from numpy: not in the arena
                t = torch.from_numpy(t.numpy().copy()) if dtype != torch.bfloat16 else t
            if rank != private_rank and not is_shared(t):
                bad.append(f"{dtype}: a {t.nbytes}-byte tensor is not in the arena")
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
            if not _close(t, _reference(ins, op)):
                bad.append(f"{dtype} {op}: max error {(t.to(torch.complex128) - _reference(ins, op).to(torch.complex128)).abs().max()}")
            if not all(torch.equal(i, _input(dtype, p, n)) for p, i in enumerate(ins)):
                bad.append(f"{dtype} {op}: an input that was not reduced changed")
    # a non-contiguous tensor goes through a contiguous copy, which is in the arena
    x = torch.randn(ELEMS, 3, generator=torch.Generator().manual_seed(rank))
    xt = x.t()
    dist.all_reduce(xt)
    want = sum(torch.randn(ELEMS, 3, generator=torch.Generator().manual_seed(p)) for p in range(ws)).t()
    if not torch.allclose(xt, want, rtol=1e-5, atol=1e-5):
        bad.append("non-contiguous")
    # the same tensor again and again: the result must not drift between ranks
    y = torch.randn(ELEMS, generator=torch.Generator().manual_seed(7))
    for _ in range(20):
        dist.all_reduce(y, op=dist.ReduceOp.AVG)
    ys = [torch.empty_like(y) for _ in range(ws)]
    dist.all_gather(ys, y)
    if not all(torch.equal(ys[0], v) for v in ys):
        bad.append("ranks disagree after repeated averaging")
    return be.shared, be.shared_declined, be.shared_bytes, bad


@pytest.mark.parametrize("ws", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_allreduce_in_place_on_shared_tensors(ws, monkeypatch):
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    res = run_workers(_allreduce_body, ws, backend="ichiban", timeout=300, args=(-1,))
    for shared, why, nbytes, bad in res:
        assert bad == [], bad
        assert shared, f"the group does not use shared tensors: {why}"
        assert nbytes > 0, "no all-reduce ran in place"


def test_a_private_tensor_on_one_rank_falls_back_everywhere(monkeypatch):
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    res = run_workers(_allreduce_body, 2, backend="ichiban", timeout=300, args=(1,))
    for shared, _, nbytes, bad in res:
        assert bad == [], bad
        assert shared
    # bfloat16 (no numpy dtype) and the last checks stay shared on both ranks;
    # every other case fell back, on both ranks alike.
    assert res[0][2] == res[1][2] > 0


_rand = random_tensor


def _other_ops_body(rank, ws):
    """all_gather, reduce_scatter, broadcast and all_to_all on shared tensors; each
    op must run on them (the byte counter grows) and match its reference."""
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    bad = []

    def ran(name, before):
        if be.shared_bytes <= before:
            bad.append(f"{name}: did not run on the shared tensors")

    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        n = (64 << 10) // torch.empty((), dtype=dtype).element_size() + 13  # per rank, odd
        ins = [_rand((n,), dtype, 100 * p + 1) for p in range(ws)]
        want = torch.cat(ins)
        before = be.shared_bytes
        out = torch.empty(ws * n, dtype=dtype)
        dist.all_gather_into_tensor(out, ins[rank].clone())
        ran(f"all_gather_into_tensor {dtype}", before)
        if not torch.equal(out, want):
            bad.append(f"all_gather_into_tensor {dtype}")
        buf = torch.empty(ws * n, dtype=dtype)  # in place: input is my block of the output
        buf[rank * n:(rank + 1) * n] = ins[rank]
        before = be.shared_bytes
        dist.all_gather_into_tensor(buf, buf[rank * n:(rank + 1) * n])
        ran(f"in-place all_gather_into_tensor {dtype}", before)
        if not torch.equal(buf, want):
            bad.append(f"in-place all_gather_into_tensor {dtype}")
        outs = [torch.empty(n, dtype=dtype) for _ in range(ws)]
        dist.all_gather(outs, ins[rank].clone())
        if not all(torch.equal(o, i) for o, i in zip(outs, ins)):
            bad.append(f"all_gather {dtype}")
        for root in (0, ws - 1):
            t = ins[rank].clone()
            before = be.shared_bytes
            dist.broadcast(t, src=root)
            ran(f"broadcast {dtype}", before)
            if not torch.equal(t, ins[root]):
                bad.append(f"broadcast from {root} {dtype}")
        if dtype != torch.bool:
            big = [_rand((ws * n,), dtype, 500 + p) for p in range(ws)]
            ops = ["SUM", "AVG"] if dtype.is_floating_point else ["SUM", "MAX"]
            for op in ops:
                ref = _reference([b[rank * n:(rank + 1) * n] for b in big], op)
                o = torch.empty(n, dtype=dtype)
                before = be.shared_bytes
                dist.reduce_scatter_tensor(o, big[rank].clone(), op=getattr(dist.ReduceOp, op))
                ran(f"reduce_scatter_tensor {dtype} {op}", before)
                if not _close(o, ref):
                    bad.append(f"reduce_scatter_tensor {dtype} {op}")
                inp = big[rank].clone()  # in place: output is my block of the input
                dist.reduce_scatter_tensor(inp[rank * n:(rank + 1) * n], inp, op=getattr(dist.ReduceOp, op))
                if not _close(inp[rank * n:(rank + 1) * n], ref):
                    bad.append(f"in-place reduce_scatter_tensor {dtype} {op}")
                lst = [torch.empty(n, dtype=dtype)]
                dist.reduce_scatter(lst[0], list(big[rank].clone().chunk(ws)), op=getattr(dist.ReduceOp, op))
                if not _close(lst[0], ref):
                    bad.append(f"reduce_scatter {dtype} {op}")
        # all_to_all_single with uneven splits: rank p sends (p + q + 1) * n elements to q
        sends = [(rank + q + 1) * n for q in range(ws)]
        recvs = [(p + rank + 1) * n for p in range(ws)]
        src = _rand((sum(sends),), dtype, 7 + rank * 31)
        dst = torch.empty(sum(recvs), dtype=dtype)
        before = be.shared_bytes
        dist.all_to_all_single(dst, src, output_split_sizes=recvs, input_split_sizes=sends)
        ran(f"all_to_all_single {dtype}", before)
        pieces = []
        for p in range(ws):
            sp = _rand((sum((p + q + 1) * n for q in range(ws)),), dtype, 7 + p * 31)
            off = sum((p + q + 1) * n for q in range(rank))
            pieces.append(sp[off:off + recvs[p]])
        if not torch.equal(dst, torch.cat(pieces)):
            bad.append(f"all_to_all_single uneven {dtype}")
        t = _rand((ws * n,), dtype, 900 + rank)  # in place: through the slots, still right
        dist.all_to_all_single(t, t)
        want_t = torch.cat([_rand((ws * n,), dtype, 900 + p)[rank * n:(rank + 1) * n] for p in range(ws)])
        if not torch.equal(t, want_t):
            bad.append(f"in-place all_to_all_single {dtype}")
    return be.shared, bad


@pytest.mark.parametrize("ws", [2, 3])
def test_other_collectives_on_shared_tensors(ws, monkeypatch):
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    for shared, bad in run_workers(_other_ops_body, ws, backend="ichiban", timeout=300):
        assert shared
        assert bad == [], bad


def _debug_group():
    """A new "ichiban" group with debug=True, and what it logged while setting up (its first op)."""
    from ichiban_comm.distributed import IchibanOptions

    made = []

    def make():
        g = dist.new_group(backend="ichiban", pg_options=IchibanOptions(debug=True))
        dist.barrier(group=g)  # the first CPU op sets up the host's segment
        made.append(g)

    log = native_stderr(make)
    return made[0], log


def _declined_body(rank, ws):
    # The parent did not set ICHIBAN_SHARED_TENSORS: only rank 0 enables it.
    from ichiban_comm.distributed import enable_shared_tensors, shared_tensors_enabled

    if rank == 0:
        enable_shared_tensors()
    assert shared_tensors_enabled() == (rank == 0)
    group, log = _debug_group()
    be = group._get_backend(torch.device("cpu"))
    t = torch.randn(1 << 18, generator=torch.Generator().manual_seed(rank))
    want = sum(torch.randn(1 << 18, generator=torch.Generator().manual_seed(p)) for p in range(ws))
    dist.all_reduce(t, group=group)
    return be.shared, be.shared_bytes, torch.allclose(t, want, rtol=1e-5, atol=1e-5), log


def test_a_rank_without_an_arena_turns_it_off_for_the_group(monkeypatch):
    monkeypatch.delenv("ICHIBAN_SHARED_TENSORS", raising=False)
    res = run_workers(_declined_body, 2, backend="gloo", timeout=120)
    for shared, nbytes, ok, _ in res:
        assert ok and not shared and nbytes == 0
    assert "shared tensors not used: rank 1 (pid " in res[0][3] and ") has no arena" in res[0][3], res[0][3]
    assert "(pid 0)" not in res[0][3], res[0][3]
    assert "shared tensors" not in res[1][3], res[1][3]  # it did not ask: nothing to explain


def _debug_body(rank, ws):
    group, _ = _debug_group()
    t = torch.randn(1 << 18)
    log = native_stderr(lambda: dist.all_reduce(t, group=group))
    return log


def test_debug_log_names_the_in_place_path(monkeypatch):
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    for log in run_workers(_debug_body, 2, backend="gloo", timeout=120):
        assert f"allreduce algo=inplace bytes={1 << 20} us=" in log, log


def _dead_peer_body(rank, ws):
    group = dist.new_group(backend="ichiban")
    t = torch.randn(1 << 18)
    dist.all_reduce(t, group=group)  # both in the op once
    if rank == 1:
        os._exit(3)
    import time
    t0 = time.monotonic()
    try:
        dist.all_reduce(t, group=group)
    except Exception as e:  # noqa: BLE001
        return str(e), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def test_dead_peer_during_a_shared_allreduce_is_an_error(monkeypatch):
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    res = run_workers(_dead_peer_body, 2, backend="gloo", timeout=60, pg_timeout=20, expect_failure_ranks=(1,))
    msg, took = res[0]
    assert "allreduce" in msg and "rank 1" in msg and "exited" in msg, msg
    assert took < 20


# ----------------------------------------------------------------------------- the allocator alone


def test_allocator_places_large_tensors_in_the_arena_and_reuses_freed_blocks():
    r = _python("""
        import torch, ichiban_comm.distributed as d
        d.enable_shared_tensors(reserve_bytes=64 << 20, min_bytes=64 << 10)
        d.enable_shared_tensors()                       # idempotent
        assert d.shared_tensors_enabled()
        small, big = torch.empty(1000), torch.randn(1 << 20)
        assert not d.is_shared(small) and d.is_shared(big)
        assert d.is_shared(big[10:20]) and torch.isfinite(big).all()
        s0 = d.shared_tensor_stats()
        assert s0["reserve"] == 64 << 20 and s0["in_use"] >= 4 << 20, s0
        ptr = big.data_ptr(); del big
        s1 = d.shared_tensor_stats()
        assert s1["in_use"] == s0["in_use"] - (4 << 20), (s0, s1)
        again = torch.empty(1 << 20)
        assert again.data_ptr() == ptr                  # best fit: the freed block
        keep = [torch.ones(1 << 20) for _ in range(20)]  # 80 MiB > 64 MiB: the rest falls back
        assert sum(d.is_shared(k) for k in keep) < 20 and d.shared_tensor_stats()["fallbacks"] > 0
        assert all(float(k.sum()) == (1 << 20) for k in keep)
        del keep, again
        assert d.shared_tensor_stats()["in_use"] == 0
        assert d.trim_shared_tensors() > 0
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@pytest.mark.slow
def test_env_setting_enables_it_and_bad_values_are_clear_errors():
    r = _python("import ichiban_comm.distributed as d; print(d.shared_tensors_enabled())",
                {"ICHIBAN_SHARED_TENSORS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    r = _python("import ichiban_comm.distributed as d; print(d.shared_tensors_enabled())",
                {"ICHIBAN_SHARED_TENSORS": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    r = _python("import ichiban_comm", {"ICHIBAN_SHARED_TENSORS": "yes please"})
    assert r.returncode != 0 and "ICHIBAN_SHARED_TENSORS='yes please'" in r.stderr, r.stderr
    from ichiban_comm.distributed import enable_shared_tensors, is_shared

    with pytest.raises(ValueError, match="reserve_bytes=-1"):
        enable_shared_tensors(reserve_bytes=-1)
    with pytest.raises(ValueError, match="min_bytes=0"):
        enable_shared_tensors(min_bytes=0)
    with pytest.raises(TypeError, match="tensor: expected a torch.Tensor"):
        is_shared(np.zeros(3))


def test_forked_child_allocates_privately_and_shares_the_parents_tensors():
    r = _python("""
        import os, torch, ichiban_comm.distributed as d
        torch.set_num_threads(1)    # no OpenMP pool to inherit across fork
        d.enable_shared_tensors()
        t = torch.zeros(1 << 20)
        pid = os.fork()
        if pid == 0:
            import signal
            signal.alarm(60)        # a hung child must not outlive the test
            ok = not d.shared_tensors_enabled() and not d.is_shared(torch.empty(1 << 20))
            t.fill_(7)              # shared with the parent, not a copy
            del t                   # must not hand the parent's block out again
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert status == 0, "child"
        assert float(t[123]) == 7.0
        u = torch.empty(1 << 20)
        assert d.is_shared(u) and u.data_ptr() != t.data_ptr()
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def _ddp_body(rank, ws):
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ichiban_comm.distributed import is_shared

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64))
    ref = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64))
    ref.load_state_dict(model.state_dict())
    ddp = DDP(model, bucket_cap_mb=1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(42)
    for _ in range(5):
        xs = [torch.randn(8, 64, generator=g) for _ in range(ws)]
        ys = [torch.randn(8, 64, generator=g) for _ in range(ws)]
        opt.zero_grad()
        nn.functional.mse_loss(ddp(xs[rank]), ys[rank]).backward()
        opt.step()
        ref_opt.zero_grad()  # one process on the whole batch: the mean of the ranks' losses
        (sum(nn.functional.mse_loss(ref(x), y) for x, y in zip(xs, ys)) / ws).backward()
        ref_opt.step()
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(model.parameters(), ref.parameters()))
    return same, be.shared_bytes > 0, is_shared(model[0].weight)


def test_ddp_on_shared_tensors_matches_one_process(monkeypatch):
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    assert run_workers(_ddp_body, 2, backend="ichiban", timeout=180) == [(True, True, True)] * 2


def _fsdp_body(rank, ws):
    import copy

    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))  # 512 KiB weights
    ref = copy.deepcopy(model)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    before = be.shared_bytes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)

    def batch(step, r):
        g = torch.Generator().manual_seed(1000 * step + r)
        return torch.randn(4, 256, generator=g), torch.randn(4, 256, generator=g)

    for s in range(3):
        x, y = batch(s, rank)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ref_opt.zero_grad()  # the mean of every rank's loss, on one process
        (sum(nn.functional.mse_loss(ref(batch(s, r)[0]), batch(s, r)[1]) for r in range(ws)) / ws).backward()
        ref_opt.step()
    full = [p.full_tensor() for p in model.parameters()]
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(full, ref.parameters()))
    return same, be.shared_bytes > before


@pytest.mark.slow
def test_fsdp2_on_shared_tensors_matches_one_process(monkeypatch):
    # FSDP2's all-gathers and reduce-scatters work on views into its own flat buffers.
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    assert run_workers(_fsdp_body, 2, backend="ichiban", timeout=180) == [(True, True)] * 2


def _hier_body(rank, ws):
    # Declared as 2 hosts x 2 ranks: the intra-host reduce-scatter and all-gather
    # of the hierarchical all-reduce run on the shared tensors.
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    bad = []
    if be.num_hosts != 2 or be.local_size != 2:
        bad.append(f"expected 2 hosts x 2 local ranks, got {be.num_hosts} x {be.local_size}")
    before_inter, before_shared = be.inter_host_bytes, be.shared_bytes
    for op in ("SUM", "AVG", "MAX"):
        for n in (100_003, 1 << 17):
            ins = [_input(torch.float32, 10 * p + n % 7, n) for p in range(ws)]
            t = ins[rank].clone()
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
            if not _close(t, _reference(ins, op)):
                bad.append(f"{op} {n}")
    return bad, be.inter_host_bytes > before_inter, be.shared_bytes > before_shared


def test_hierarchical_allreduce_on_shared_tensors(tmp_path, monkeypatch):
    import json

    topo = {"hosts": [{"name": "h0"}, {"name": "h1"}],
            "ranks": [{"rank": r, "host": f"h{r // 2}", "local_rank": r % 2} for r in range(4)]}
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(topo))
    monkeypatch.setenv("ICHIBAN_SHARED_TENSORS", "1")
    res = run_workers(_hier_body, 4, backend="ichiban", timeout=240, env={"ICHIBAN_TOPOLOGY": str(path)})
    for bad, inter, shared in res:
        assert bad == [], bad
        assert inter, "the inter-host engine moved nothing"
        assert shared, "the intra-host steps did not run on the shared tensors"
