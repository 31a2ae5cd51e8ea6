"""The C++ pieces of checkpointing against plain Python references.

    python -m pytest -q tests/checkpoint/test_native.py
"""

import os

import pytest
import torch

from ichiban_comm import _C

ck = _C.checkpoint


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vector():
    # The check value of CRC-32C (RFC 3720 appendix B.4).
    assert ck.crc32c(b"123456789") == 0xE3069283
    assert ck.crc32c(b"123456789", software=True) == 0xE3069283


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000, 4099])
def test_crc32c_matches_reference(n):
    g = torch.Generator().manual_seed(n)
    data = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
    ref = crc32c_reference(data)
    assert ck.crc32c(data) == ref
    assert ck.crc32c(data, software=True) == ref
    # continuing from a previous crc equals the crc of the concatenation
    k = n // 3
    assert ck.crc32c(data[k:], ck.crc32c(data[:k])) == ref
    assert ck.crc32c_tensor(torch.tensor(list(data), dtype=torch.uint8)) == ref


def test_crc32c_hardware_and_software_agree_on_large_buffer():
    data = os.urandom(1 << 20)
    assert ck.crc32c(data) == ck.crc32c(data, software=True)


@pytest.mark.parametrize("width", [2, 4, 8, 3])
def test_byte_planes_match_reference(width):
    n = 123 * width
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    ref = src.view(-1, width).t().contiguous().reshape(-1)
    assert torch.equal(ck.split_byte_planes(src, width), ref)
    with pytest.raises(ValueError, match="multiple"):
        ck.split_byte_planes(src[:-1], width)


def _job_roundtrip(tmp_path, codec, blobs_spec, chunk_bytes=4096, threads=3):
    torch.manual_seed(0)
    pool = torch.randn(20000).to(torch.bfloat16).view(torch.uint8).clone()
    paths = [str(tmp_path / f"w{k}.bin") for k in range(threads)]
    job = ck.WriteJob(pool, blobs_spec, paths, chunk_bytes, codec, 3)
    job.wait()
    assert job.done()
    recs = job.records()
    outs = [torch.zeros(n, dtype=torch.uint8) for _, n, _ in blobs_spec]
    specs = [(paths[f], foff, stored, rl, crc, c, pl, b, roff, f"blob {b} chunk {i}")
             for (b, i, roff, rl, f, foff, stored, crc, c, pl) in recs]
    ck.read_chunks(specs, outs)
    for (off, n, _), out in zip(blobs_spec, outs):
        assert torch.equal(out, pool[off:off + n])
    return recs, specs, outs


@pytest.mark.parametrize("codec", [0, 1])
def test_write_job_roundtrip(tmp_path, codec):
    if codec and not ck.zstd_available():
        pytest.skip(f"libzstd unavailable: {ck.zstd_error()}")
    blobs = [(0, 10000, 2), (10048, 16000, 2), (30000, 0, 1), (30016, 9984, 4)]
    recs, _, _ = _job_roundtrip(tmp_path, codec, blobs)
    if codec:
        assert any(r[8] == 1 for r in recs), "bf16 data should compress"


def test_read_detects_flipped_byte_and_truncation(tmp_path):
    recs, specs, outs = _job_roundtrip(tmp_path, 0, [(0, 12288, 2)], threads=1)
    path = specs[1][0]
    with open(path, "r+b") as f:
        f.seek(specs[1][1] + 5)
        b = f.read(1)
        f.seek(specs[1][1] + 5)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(RuntimeError, match=r"blob 0 chunk 1: crc32c mismatch"):
        ck.read_chunks(specs, outs)
    os.truncate(path, specs[0][2] + 10)
    with pytest.raises(RuntimeError, match="truncated"):
        ck.read_chunks(specs, outs)


def test_write_job_reports_disk_full(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available")
    os.symlink("/dev/full", tmp_path / "w0.bin")
    pool = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    job = ck.WriteJob(pool, [(0, 1 << 16, 1)], [str(tmp_path / "w0.bin")], 4096, 0, 1)
    with pytest.raises(RuntimeError, match="No space left on device"):
        job.wait()


def test_write_job_bad_arguments(tmp_path):
    pool = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside the source"):
        ck.WriteJob(pool, [(50, 100, 1)], [str(tmp_path / "a")], 4096, 0, 1)
    with pytest.raises(ValueError, match="multiple of its element width"):
        ck.WriteJob(pool, [(0, 7, 2)], [str(tmp_path / "a")], 4096, 0, 1)
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        ck.WriteJob(pool.float(), [(0, 8, 1)], [str(tmp_path / "a")], 4096, 0, 1)


def test_stage_copy_matches_reference():
    torch.manual_seed(1)
    a = torch.randn(37, 53)
    b = torch.randn(64, 33).t()[3:, ::2]      # non-contiguous view
    c = torch.randn(5, 7).to(torch.bfloat16)
    pool = ck.alloc_staging(1 << 16)
    offs = [0, 8192, 16384]
    ck.stage_copy([a, b, c], pool, offs)
    for t, o in zip([a, b, c], offs):
        n = t.numel() * t.element_size()
        assert torch.equal(pool[o:o + n].view(t.dtype).view(t.shape), t)
    with pytest.raises(ValueError, match="pool of"):
        ck.stage_copy([a], pool, [(1 << 16) - 8])
