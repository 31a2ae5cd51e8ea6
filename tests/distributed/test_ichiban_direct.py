"""Single-copy reads between ranks (cross-memory attach) against plain references.

With ICHIBAN_CMA_MIN_BYTES=1 every all_to_all block (and, at 2 ranks, every
all_gather input) is read straight from the owner's tensor; the byte counter
proves the path was taken, and turning it off on one rank must turn it off on
all of them.
"""

import ctypes
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import ichiban_comm  # noqa: F401  registers "ichiban" (torch < 2.14 reads no entry point)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spawn import native_stderr, random_tensor, run_workers  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool]


def _cma_available() -> bool:
    """Whether this machine lets a process read a sibling's memory (process_vm_readv)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(f"/proc/{child.pid}/maps") as f:
            start = next(int(line.split("-")[0], 16) for line in f if line.split()[1].startswith("r"))

        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        buf = ctypes.create_string_buffer(8)
        local, remote = IoVec(ctypes.addressof(buf), 8), IoVec(start, 8)
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.process_vm_readv(child.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == 8
    finally:
        child.kill()
        child.wait()


_rand = random_tensor


def _ops(rank, ws, group):
    """Runs every op that may copy directly; returns the first mismatch or None."""
    for dtype in DTYPES:
        for n in (1, 7, 1003):
            ins = [_rand((n,), dtype, 100 * p + n) for p in range(ws)]
            want = torch.cat(ins)
            out = torch.empty(ws * n, dtype=dtype)
            dist.all_gather_into_tensor(out, ins[rank].clone(), group=group)
            if not torch.equal(out, want):
                return f"all_gather_into_tensor {dtype} {n}"
            buf = torch.empty(ws * n, dtype=dtype)  # in place: input is my block of the output
            buf[rank * n:(rank + 1) * n] = ins[rank]
            dist.all_gather_into_tensor(buf, buf[rank * n:(rank + 1) * n], group=group)
            if not torch.equal(buf, want):
                return f"in-place all_gather_into_tensor {dtype} {n}"
            outs = [torch.empty(n, dtype=dtype) for _ in range(ws)]
            dist.all_gather(outs, ins[rank].clone(), group=group)
            if not all(torch.equal(o, i) for o, i in zip(outs, ins)):
                return f"all_gather {dtype} {n}"
            # all_to_all_single with uneven splits: rank p sends (p + q + 1) * n elements to q
            sends = [(rank + q + 1) * n for q in range(ws)]
            recvs = [(p + rank + 1) * n for p in range(ws)]
            src = _rand((sum(sends),), dtype, 7 + rank * 31 + n)
            dst = torch.empty(sum(recvs), dtype=dtype)
            dist.all_to_all_single(dst, src, output_split_sizes=recvs, input_split_sizes=sends, group=group)
            pieces = []
            for p in range(ws):
                sp = _rand((sum((p + q + 1) * n for q in range(ws)),), dtype, 7 + p * 31 + n)
                off = sum((p + q + 1) * n for q in range(rank))
                pieces.append(sp[off:off + recvs[p]])
            if not torch.equal(dst, torch.cat(pieces)):
                return f"all_to_all_single uneven {dtype} {n}"
            # in place (input is the output): must take the staged path and still be right
            t = _rand((ws * n,), dtype, 900 + rank)
            dist.all_to_all_single(t, t, group=group)
            want_t = torch.cat([_rand((ws * n,), dtype, 900 + p)[rank * n:(rank + 1) * n] for p in range(ws)])
            if not torch.equal(t, want_t):
                return f"in-place all_to_all_single {dtype} {n}"
            # non-contiguous list all_to_all
            outs = [torch.empty(n, 2, dtype=dtype).t() for _ in range(ws)]
            inl = [_rand((2, n), dtype, 50 + rank * 7 + q) for q in range(ws)]
            dist.all_to_all(outs, inl, group=group)
            if not all(torch.equal(outs[p], _rand((2, n), dtype, 50 + p * 7 + rank)) for p in range(ws)):
                return f"all_to_all {dtype} {n}"
    return None


def _direct_body(rank, ws):
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    bad = _ops(rank, ws, None)
    return be.direct, be.direct_bytes, bad


@pytest.mark.parametrize("ws", [2, 3])
def test_direct_copies_match_reference(ws):
    if not _cma_available():
        pytest.skip("this machine forbids process_vm_readv between processes (seccomp or ptrace policy)")
    res = run_workers(_direct_body, ws, backend="ichiban", timeout=240, env={"ICHIBAN_CMA_MIN_BYTES": "1"})
    for direct, nbytes, bad in res:
        assert bad is None, bad
        assert direct, "every rank could read its peers, yet the group did not agree on direct copies"
        assert nbytes > 0, "no byte was read directly"


def _agree_body(rank, ws):
    # Only rank 1 declines: the group must fall back on every rank.
    from ichiban_comm.distributed import IchibanOptions

    group = dist.new_group(backend="ichiban", pg_options=IchibanOptions(direct=rank != 1))
    be = group._get_backend(torch.device("cpu"))
    bad = _ops(rank, ws, group)
    return be.direct, be.direct_bytes, bad


def test_one_rank_declining_turns_direct_copies_off_everywhere():
    res = run_workers(_agree_body, 2, backend="gloo", timeout=240, env={"ICHIBAN_CMA_MIN_BYTES": "1"})
    for direct, nbytes, bad in res:
        assert bad is None, bad
        assert not direct and nbytes == 0


def test_bad_cma_setting_is_a_clear_error(monkeypatch):
    from ichiban_comm.distributed import IchibanOptions

    monkeypatch.setenv("ICHIBAN_CMA", "maybe")
    with pytest.raises(ValueError, match="ICHIBAN_CMA='maybe'"):
        IchibanOptions()


def _debug_body(rank, ws):
    from ichiban_comm.distributed import IchibanOptions

    group = dist.new_group(backend="ichiban", pg_options=IchibanOptions(debug=True))
    inp = torch.randn(1 << 18)  # 1 MiB per rank: above the default 256 KiB threshold
    out = torch.empty(ws << 18)
    log = native_stderr(lambda: dist.all_gather_into_tensor(out, inp, group=group))
    gathered = [torch.empty_like(inp) for _ in range(ws)]
    dist.all_gather(gathered, inp)  # the Gloo default group as the reference
    return log, torch.equal(out, torch.cat(gathered))


def test_debug_log_names_the_direct_path():
    if not _cma_available():
        pytest.skip("this machine forbids process_vm_readv between processes (seccomp or ptrace policy)")
    for log, same in run_workers(_debug_body, 2, backend="gloo", timeout=120):
        assert same
        assert f"all_gather_into_tensor algo=direct bytes={1 << 20} us=" in log, log
