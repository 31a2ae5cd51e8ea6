"""zstd with byte planes: bit-exact round trip, and bf16 weights shrink by >= 20%.

    python -m pytest -q tests/checkpoint/test_compression.py
"""

import os

import pytest
import torch

from ichiban_comm import _C
from ichiban_comm.checkpoint import AsyncCheckpointer
from ichiban_comm.checkpoint import _layout as layout

from _states import assert_same, make_state

pytestmark = pytest.mark.skipif(not _C.checkpoint.zstd_available(),
                                reason=f"libzstd unavailable: {_C.checkpoint.zstd_error()}")


def _dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".bin"))


def test_zstd_roundtrip_bit_exact(tmp_path):
    state = make_state(21, scale=4)
    state["zeros_compress"] = torch.zeros(4096)
    with AsyncCheckpointer(tmp_path, compression="zstd", chunk_bytes=8192, writer_threads=3) as ck:
        ck.save(1, state).wait()
        assert_same(state, ck.load())


def test_bf16_weights_compress_at_least_20_percent(tmp_path):
    # Weights as a transformer initialises them: normal, std 0.02, stored in bf16.
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": (torch.randn(512, 512, generator=g) * 0.02).to(torch.bfloat16)
             for i in range(4)}
    raw = sum(t.numel() * t.element_size() for t in state.values())
    with AsyncCheckpointer(tmp_path / "z", compression="zstd") as ck:
        h = ck.save(1, state)
        h.wait()
        loaded = ck.load()
    for k in state:
        assert torch.equal(loaded[k].view(torch.int16), state[k].view(torch.int16))
    stored = _dir_bytes(layout.step_dir(str(tmp_path / "z"), 1))
    assert stored == h.bytes_written
    assert stored <= 0.8 * raw, f"bf16 weights compressed to {stored / raw:.1%} of {raw} bytes"
    with AsyncCheckpointer(tmp_path / "raw") as ck:
        ck.save(1, state).wait()
    assert _dir_bytes(layout.step_dir(str(tmp_path / "raw"), 1)) == raw


def test_byte_planes_are_what_makes_floats_compress(tmp_path):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(1 << 18, generator=g) * 0.02).to(torch.bfloat16)
    pool = t.view(torch.uint8).clone()
    sizes = {}
    for width in (1, 2):
        paths = [str(tmp_path / f"p{width}.bin")]
        job = _C.checkpoint.WriteJob(pool, [(0, pool.numel(), width)], paths, 1 << 20, 1, 1)
        job.wait()
        sizes[width] = job.bytes_stored()
    assert sizes[2] < 0.9 * sizes[1], sizes
