"""The inter-host path of the "ichiban" backend, on one machine: a declared
topology of 2 hosts x 2 ranks (ICHIBAN_TOPOLOGY) keeps the two "hosts" in
separate shared segments, so all-reduce must go intra-host reduce-scatter ->
Gloo all-reduce of each shard between the hosts -> intra-host all-gather.

    python -m pytest -q tests/distributed/test_ichiban_hierarchical.py
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ichiban_ref import ALL_DTYPES, R, make, mismatch, ops_for
from spawn import run_workers


def _hier_body(rank, ws):
    import ichiban_comm.distributed  # noqa: F401
    from ichiban_comm._native import _C

    fails = []
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    if getattr(backend, "num_hosts", None) != 2 or backend.local_size != 2:
        fails.append(f"expected 2 hosts x 2 local ranks, got {backend!r}")
    from ichiban_comm.distributed import IchibanOptions

    flat = dist.new_group(backend="ichiban", pg_options=IchibanOptions(algo="flat"))
    before = _C.backend.global_inter_host_bytes()
    sent = 0
    seed = 0
    for dtype in ALL_DTYPES:
        for op in ops_for(dtype):
            for n in (0, 1, 7, 1003):
                seed += 1
                ins = [make(seed, r, (n,), dtype, op) for r in range(ws)]
                t = ins[rank].clone()
                dist.all_reduce(t, op=op)
                m = mismatch(t, ins, op, f"hier all_reduce {dtype} {op} n={n}")
                if m:
                    fails.append(m)
                if dtype != torch.bool:
                    # my shard of the padded message; complex travels as (n, 2) reals
                    k = 2 * n if t.is_complex() else n
                    sent += (k + 1) // 2 * (t.element_size() // (2 if t.is_complex() else 1))
                u = ins[rank].clone()
                dist.all_reduce(u, op=op, group=flat)
                if dtype in (torch.float32, torch.float64) and not torch.allclose(t, u, rtol=1e-6, atol=1e-6):
                    fails.append(f"hier vs flat differ: {dtype} {op} n={n}")
    through = _C.backend.global_inter_host_bytes() - before
    if through != sent:
        fails.append(f"inter-host bytes {through}, expected {sent}")
    # the other ops on a group spanning hosts (through Gloo), spot checks
    ins = [make(99, r, (5, 3), torch.float32) for r in range(ws)]
    out = torch.empty(ws * 5, 3)
    dist.all_gather_into_tensor(out, ins[rank])
    if not torch.equal(out, torch.cat(ins)):
        fails.append("all_gather_into_tensor across hosts")
    rs = torch.empty(5, 3)
    big = [make(7, r, (ws * 5, 3), torch.float32) for r in range(ws)]
    dist.reduce_scatter_tensor(rs, big[rank], op=R.AVG)
    m = mismatch(rs, [b[rank * 5:(rank + 1) * 5] for b in big], R.AVG, "reduce_scatter_tensor AVG across hosts")
    if m:
        fails.append(m)
    b = ins[rank].clone()
    dist.broadcast(b, src=3)
    if not torch.equal(b, ins[3]):
        fails.append("broadcast across hosts")
    dist.barrier()
    return fails, through


def test_declared_two_hosts_take_the_inter_host_path(tmp_path):
    topo = {"hosts": [{"name": "h0"}, {"name": "h1"}],
            "ranks": [{"rank": r, "host": f"h{r // 2}", "local_rank": r % 2} for r in range(4)]}
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(topo))
    res = run_workers(_hier_body, 4, backend="ichiban", timeout=240, env={"ICHIBAN_TOPOLOGY": str(path)})
    fails = [f"rank {r}: {m}" for r, (fs, _) in enumerate(res) for m in fs]
    assert not fails, "\n".join(fails[:30])
    assert all(b > 0 for _, b in res)
