"""Every op x dtype x reduce op x size x world size 1-4 of the "ichiban" backend
against a plain torch reference, on random inputs.

    python -m pytest -q tests/distributed/test_ichiban_ops.py

One spawned job per world size runs hundreds of cases (spawning costs seconds);
each rank returns the list of mismatches, which must be empty. Sizes cover 0,
1, odd and not divisible by the world size; one job uses 4 KiB slots so that
every message crosses many chunks; all-reduce runs once per algorithm (a
group per ICHIBAN_ALGO value).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from ichiban_ref import ALL_DTYPES, R, make, mismatch, ops_for, reduce_ref
from spawn import run_workers

SIZES = [0, 1, 7, 1003]
ALGOS = ["oneshot", "twoshot", "ring"]


def _group(algo: str):
    from ichiban_comm.distributed import IchibanOptions

    return dist.new_group(backend="ichiban", pg_options=IchibanOptions(algo=algo))


def _allreduce_cases(rank, ws, fails, seed):
    for algo in ALGOS:
        g = _group(algo)
        for dtype in ALL_DTYPES:
            for op in ops_for(dtype):
                for n in SIZES:
                    seed += 1
                    ins = [make(seed, r, (n,), dtype, op) for r in range(ws)]
                    t = ins[rank].clone()
                    dist.all_reduce(t, op=op, group=g)
                    m = mismatch(t, ins, op, f"all_reduce[{algo}] {dtype} {op} n={n}")
                    if m:
                        fails.append(m)
        dist.destroy_process_group(g)
    return seed


def _reduce_scatter_cases(rank, ws, fails, seed):
    for dtype in ALL_DTYPES:
        for op in ops_for(dtype):
            for n in SIZES[:3]:
                seed += 1
                ins = [make(seed, r, (ws * n,), dtype, op) for r in range(ws)]
                out = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(out, ins[rank].clone(), op=op)
                shard = [x[rank * n:(rank + 1) * n] for x in ins]
                m = mismatch(out, shard, op, f"reduce_scatter_tensor {dtype} {op} n={n}")
                if m:
                    fails.append(m)
                if hasattr(dist, "reduce_scatter_single"):  # its name from torch 2.14 on
                    out1 = torch.empty(n, dtype=dtype)
                    dist.reduce_scatter_single(out1, ins[rank].clone(), op=op)
                    if not torch.equal(out1, out):
                        fails.append(f"reduce_scatter_single {dtype} {op} n={n}: differs from reduce_scatter_tensor")
                # list form with 2-D chunks
                outl = torch.empty(n, 2, dtype=dtype)
                ins2 = [make(seed + 5000, r, (ws, n, 2), dtype, op) for r in range(ws)]
                dist.reduce_scatter(outl, list(ins2[rank].unbind(0)), op=op)
                m = mismatch(outl, [x[rank] for x in ins2], op, f"reduce_scatter {dtype} {op} n={n}")
                if m:
                    fails.append(m)
    return seed


def _reduce_cases(rank, ws, fails, seed):
    for dtype in [torch.float32, torch.bfloat16, torch.int64, torch.complex64]:
        for op in ops_for(dtype)[:3]:
            for root in range(ws):
                seed += 1
                ins = [make(seed, r, (13,), dtype, op) for r in range(ws)]
                t = ins[rank].clone()
                dist.reduce(t, dst=root, op=op)
                if rank == root:
                    m = mismatch(t, ins, op, f"reduce {dtype} {op} root={root}")
                    if m:
                        fails.append(m)
                elif not torch.equal(t, ins[rank]):
                    fails.append(f"reduce {dtype}: non-root input modified")
    return seed


def _copy_cases(rank, ws, fails, seed):
    """Ops that move data without reducing: exact equality."""
    for dtype in ALL_DTYPES:
        for n in SIZES:
            seed += 1
            ins = [make(seed, r, (n, 3), dtype) for r in range(ws)]
            want_all = torch.cat(ins)
            # all_gather_into_tensor
            out = torch.empty(ws * n, 3, dtype=dtype)
            dist.all_gather_into_tensor(out, ins[rank])
            if not torch.equal(out, want_all):
                fails.append(f"all_gather_into_tensor {dtype} n={n}")
            if hasattr(dist, "all_gather_single"):  # its name from torch 2.14 on
                out1 = torch.empty(ws * n, 3, dtype=dtype)
                dist.all_gather_single(out1, ins[rank])
                if not torch.equal(out1, want_all):
                    fails.append(f"all_gather_single {dtype} n={n}")
            # all_gather (list)
            outs = [torch.empty(n, 3, dtype=dtype) for _ in range(ws)]
            dist.all_gather(outs, ins[rank])
            if not all(torch.equal(a, b) for a, b in zip(outs, ins)):
                fails.append(f"all_gather {dtype} n={n}")
            # broadcast from every root
            for root in range(ws):
                t = ins[rank].clone()
                dist.broadcast(t, src=root)
                if not torch.equal(t, ins[root]):
                    fails.append(f"broadcast {dtype} n={n} root={root}")
            # gather / scatter with the last rank as root
            root = ws - 1
            glist = [torch.empty(n, 3, dtype=dtype) for _ in range(ws)] if rank == root else None
            dist.gather(ins[rank], gather_list=glist, dst=root)
            if rank == root and not all(torch.equal(a, b) for a, b in zip(glist, ins)):
                fails.append(f"gather {dtype} n={n}")
            out1 = torch.empty(n, 3, dtype=dtype)
            slist = [make(seed + 77, q, (n, 3), dtype) for q in range(ws)]
            dist.scatter(out1, scatter_list=slist if rank == root else None, src=root)
            if not torch.equal(out1, slist[rank]):
                fails.append(f"scatter {dtype} n={n}")
            # all_to_all_single, equal splits: block q of rank p goes to rank q
            a_in = [make(seed + 99, p, (ws * n, 2), dtype) for p in range(ws)]
            a_out = torch.empty(ws * n, 2, dtype=dtype)
            dist.all_to_all_single(a_out, a_in[rank])
            want = torch.cat([a_in[p][rank * n:(rank + 1) * n] for p in range(ws)])
            if not torch.equal(a_out, want):
                fails.append(f"all_to_all_single {dtype} n={n}")
    return seed


def _uneven_alltoall(rank, ws, fails, seed):
    # splits[p][q]: rows rank p sends to rank q (some zero, some odd)
    splits = [[(p * 3 + q * 5 + 1) % 4 for q in range(ws)] for p in range(ws)]
    for dtype in [torch.float32, torch.int8, torch.complex128]:
        seed += 1
        ins = [make(seed, p, (sum(splits[p]), 3), dtype) for p in range(ws)]
        in_s = splits[rank]
        out_s = [splits[p][rank] for p in range(ws)]
        out = torch.empty(sum(out_s), 3, dtype=dtype)
        dist.all_to_all_single(out, ins[rank], output_split_sizes=out_s, input_split_sizes=in_s)
        want = torch.cat([ins[p][sum(splits[p][:rank]):sum(splits[p][:rank + 1])] for p in range(ws)])
        if not torch.equal(out, want):
            fails.append(f"all_to_all_single uneven {dtype}")
        # list form with different sizes per peer
        outs = [torch.empty(splits[p][rank], 3, dtype=dtype) for p in range(ws)]
        inl = list(torch.split(ins[rank], in_s))
        dist.all_to_all(outs, inl)
        if not torch.equal(torch.cat(outs), want):
            fails.append(f"all_to_all uneven {dtype}")
    return seed


def _noncontiguous(rank, ws, fails, seed):
    seed += 1
    ins = [make(seed, r, (6, 5), torch.float32) for r in range(ws)]
    t = ins[rank].clone().t()  # (5, 6), strides (1, 5)
    dist.all_reduce(t)
    m = mismatch(t, [x.t() for x in ins], R.SUM, "all_reduce non-contiguous")
    if m:
        fails.append(m)
    base = torch.zeros(6, 10)
    view = base[:, ::2]  # (6, 5) every other column
    view.copy_(ins[rank])
    dist.broadcast(view, src=0)
    if not torch.equal(view, ins[0]) or bool(base[:, 1::2].any()):
        fails.append("broadcast into a strided view")
    out = torch.empty(ws * 5, 6)
    dist.all_gather_into_tensor(out, ins[rank].t())
    if not torch.equal(out, torch.cat([x.t() for x in ins])):
        fails.append("all_gather_into_tensor non-contiguous input")
    out_nc = torch.empty(6, ws * 5).t()  # non-contiguous output
    dist.all_gather_into_tensor(out_nc, ins[rank].t())
    if not torch.equal(out_nc, torch.cat([x.t() for x in ins])):
        fails.append("all_gather_into_tensor non-contiguous output")
    return seed


def _coalesced_and_p2p(rank, ws, fails, seed):
    seed += 1
    ins = [[make(seed, r, (k + 1,), torch.float32) for k in range(3)] for r in range(ws)]
    ts = [x.clone() for x in ins[rank]]
    with dist._coalescing_manager(async_ops=True) as cm:
        for t in ts:
            dist.all_reduce(t)
    cm.wait()
    for k, t in enumerate(ts):
        m = mismatch(t, [ins[r][k] for r in range(ws)], R.SUM, f"coalesced all_reduce #{k}")
        if m:
            fails.append(m)
    outs = [torch.empty(ws * (k + 1)) for k in range(3)]
    with dist._coalescing_manager(async_ops=True) as cm:
        for o, t in zip(outs, ins[rank]):
            dist.all_gather_into_tensor(o, t)
    cm.wait()
    for k, o in enumerate(outs):
        if not torch.equal(o, torch.cat([ins[r][k] for r in range(ws)])):
            fails.append(f"coalesced all_gather_into_tensor #{k}")
    if ws > 1:
        # ring of send/recv, and batch_isend_irecv both ways
        nxt, prv = (rank + 1) % ws, (rank - 1) % ws
        buf = torch.empty(9)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, ins[rank][2], nxt),
                                       dist.P2POp(dist.irecv, buf, prv)])
        for q in reqs:
            q.wait()
        if not torch.equal(buf[:3], ins[prv][2]):
            fails.append("batch_isend_irecv ring")
        if rank == 0:
            dist.send(ins[0][1], dst=ws - 1)
        elif rank == ws - 1:
            b = torch.empty(2)
            dist.recv(b, src=0)
            if not torch.equal(b, ins[0][1]):
                fails.append("send/recv")
    dist.barrier()
    return seed


def _matrix_body(rank, ws):
    import ichiban_comm.distributed  # noqa: F401
    fails: list[str] = []
    seed = 0
    seed = _allreduce_cases(rank, ws, fails, seed)
    seed = _reduce_scatter_cases(rank, ws, fails, seed)
    seed = _reduce_cases(rank, ws, fails, seed)
    seed = _copy_cases(rank, ws, fails, seed)
    seed = _uneven_alltoall(rank, ws, fails, seed)
    seed = _noncontiguous(rank, ws, fails, seed)
    seed = _coalesced_and_p2p(rank, ws, fails, seed)
    return fails, os.getpid()


@pytest.mark.parametrize("ws,slot", [(1, None), (2, None), (3, "4096"), (4, None)])
def test_every_op_dtype_size(ws, slot):
    env = {"ICHIBAN_SHM_SLOT_BYTES": slot} if slot else {}
    results = run_workers(_matrix_body, ws, backend="ichiban", timeout=240, env=env)
    fails = [f"rank {r}: {m}" for r, (fs, _) in enumerate(results) for m in fs]
    assert not fails, "\n".join(fails[:40])


def _large_body(rank, ws):
    """Messages spanning several 1 MiB slots, every algorithm, float32 and bfloat16."""
    fails = []
    for algo in ALGOS:
        g = _group(algo)
        for dtype, n in [(torch.float32, (3 << 17) + 5), (torch.bfloat16, (1 << 19) + 3)]:
            ins = [make(n + 1, r, (n,), dtype) for r in range(ws)]
            t = ins[rank].clone()
            dist.all_reduce(t, group=g)
            m = mismatch(t, ins, R.SUM, f"large all_reduce[{algo}] {dtype}")
            if m:
                fails.append(m)
            # every rank must hold bit-identical results
            allt = [torch.empty_like(t) for _ in range(ws)]
            dist.all_gather(allt, t, group=g)
            if not all(torch.equal(a, allt[0]) for a in allt):
                fails.append(f"large all_reduce[{algo}] {dtype}: ranks disagree bitwise")
        dist.destroy_process_group(g)
    out = torch.empty((3 << 17) + 1)
    ins = [make(9, r, (ws * out.numel(),), torch.float32) for r in range(ws)]
    dist.reduce_scatter_tensor(out, ins[rank])
    m = mismatch(out, [x[rank * out.numel():(rank + 1) * out.numel()] for x in ins], R.SUM,
                 "large reduce_scatter_tensor")
    if m:
        fails.append(m)
    return fails


@pytest.mark.parametrize("ws", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_large_messages(ws):
    results = run_workers(_large_body, ws, backend="ichiban", timeout=240)
    fails = [f"rank {r}: {m}" for r, fs in enumerate(results) for m in fs]
    assert not fails, "\n".join(fails)


def _pipeline_body(rank, ws):
    """Two-shot runs chunks through a pipeline up to several chunks deep; with
    4 KiB slots these messages are tens of chunks long. Lock-step ops are
    interleaved on the same group, so a slot one kind still reads must never be
    rewritten by the other."""
    fails = []
    g2 = _group("twoshot")
    seed = 1000
    for dtype, op, n in [(torch.float32, R.SUM, 50_003), (torch.bfloat16, R.AVG, 20_001),
                         (torch.int64, R.MAX, 9_999), (torch.float64, R.PRODUCT, 7_001)]:
        for rep in range(3):
            seed += 1
            ins = [make(seed, r, (n + rep * 64,), dtype, op) for r in range(ws)]
            t = ins[rank].clone()
            dist.all_reduce(t, op=op, group=g2)
            m = mismatch(t, ins, op, f"pipelined all_reduce {dtype} {op} rep {rep}")
            if m:
                fails.append(m)
            # lock-step ops on the same group, right behind it
            b = make(seed, 0, (3000,), torch.float32)
            bb = b.clone() if rank == 0 else torch.empty_like(b)
            dist.broadcast(bb, 0, group=g2)
            if not torch.equal(bb, b):
                fails.append(f"broadcast after pipelined all_reduce {dtype} rep {rep}")
            full = [make(seed, r, (ws * 700,), torch.float32) for r in range(ws)]
            out = torch.empty(700)
            dist.reduce_scatter_tensor(out, full[rank].clone(), group=g2)
            m = mismatch(out, [x[rank * 700:(rank + 1) * 700] for x in full], R.SUM,
                         "reduce_scatter after pipelined all_reduce")
            if m:
                fails.append(m)
    dist.destroy_process_group(g2)
    return fails


@pytest.mark.parametrize("ws", [3, 4])
def test_pipelined_two_shot_many_chunks(ws):
    results = run_workers(_pipeline_body, ws, backend="ichiban", timeout=240,
                          env={"ICHIBAN_SHM_SLOT_BYTES": "4096"})
    fails = [f"rank {r}: {m}" for r, fs in enumerate(results) for m in fs]
    assert not fails, "\n".join(fails)
