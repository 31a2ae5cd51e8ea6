"""Bad input gets a clear error naming the file and what is wrong; a shard
truncated while a loader has it open fails cleanly (no SIGBUS).

Run: python -m pytest -q tests/data/test_errors.py
"""

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _shards import random_docs, write_megatron, write_ours
from ichiban_comm.data import DataError, ShardError, TokenDataset, TokenLoader


@pytest.fixture
def shard(tmp_path):
    write_ours(tmp_path / "s", random_docs(40, 300, seed=0, eod=299), 300, eod=299)
    return tmp_path / "s"


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic(shard):
    _patch(f"{shard}.idx", 0, b"NOTMAGIC")
    with pytest.raises(ShardError, match=r"s\.idx: bad magic b'NOTMAGIC\\x..'"):
        TokenDataset(shard, seq_len=8)


def test_bad_version(shard):
    _patch(f"{shard}.idx", 8, struct.pack("<I", 7))
    with pytest.raises(ShardError, match=r"s\.idx: index version 7, this reader knows version 1"):
        TokenDataset(shard, seq_len=8)


def test_corrupt_index_checksum(shard):
    _patch(f"{shard}.idx", 100, b"\xff")
    with pytest.raises(ShardError, match=r"s\.idx: index checksum mismatch"):
        TokenDataset(shard, seq_len=8)


def test_truncated_index_and_token_file(shard):
    raw = open(f"{shard}.idx", "rb").read()
    open(f"{shard}.idx", "wb").write(raw[:-9])
    with pytest.raises(ShardError, match=r"s\.idx: index is \d+ bytes, .* needs \d+: truncated"):
        TokenDataset(shard, seq_len=8)
    open(f"{shard}.idx", "wb").write(raw)
    size = os.path.getsize(f"{shard}.bin")
    os.truncate(f"{shard}.bin", size - 2)
    with pytest.raises(ShardError, match=rf"s\.bin: truncated: {size - 2} bytes"):
        TokenDataset(shard, seq_len=8)


def test_truncated_megatron_index(tmp_path):
    write_megatron(tmp_path / "m", random_docs(5, 100))
    raw = open(tmp_path / "m.idx", "rb").read()
    open(tmp_path / "m.idx", "wb").write(raw[:-3])
    with pytest.raises(ShardError, match=r"m\.idx: Megatron index is \d+ bytes.*truncated"):
        TokenDataset(tmp_path / "m", seq_len=4, vocab_size=100)


def test_token_id_at_or_above_the_vocabulary(shard):
    _patch(f"{shard}.bin", 2 * 17, struct.pack("<H", 300))  # token 17 := vocab
    loader = TokenLoader(TokenDataset(shard, seq_len=8, shuffle=False), batch_size=4)
    with pytest.raises(DataError, match=r"s\.bin: token id 300 at token 17 is outside the "
                                        r"vocabulary \[0, 300\)"):
        next(loader)
    with pytest.raises(DataError, match="token id 300"):  # the loader stays failed
        next(loader)


def test_fingerprint_mismatch_on_resume(shard, tmp_path):
    ds = TokenDataset(shard, seq_len=8)
    state = TokenLoader(ds, batch_size=2).state_dict()
    other = tmp_path / "other"
    other.mkdir()
    write_ours(other / "s", random_docs(41, 300, seed=1), 300)
    with pytest.raises(ValueError, match=r"fingerprint \w+ does not match the dataset's \w+"):
        TokenLoader(TokenDataset(other, seq_len=8), batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):  # seq_len is part of it
        TokenLoader(TokenDataset(shard, seq_len=9), batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with seed 0, the dataset has seed 4"):
        TokenLoader(TokenDataset(shard, seq_len=8, seed=4), batch_size=2).load_state_dict(state)


def test_empty_input_and_seq_len_larger_than_the_data(tmp_path, shard):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match="empty: no shards"):
        TokenDataset(empty, seq_len=8)
    write_ours(empty / "z", [], 300)
    with pytest.raises(ShardError, match="empty: the shards hold no tokens"):
        TokenDataset(empty, seq_len=8)
    n = TokenDataset(shard, seq_len=8).num_tokens
    with pytest.raises(ValueError, match=rf"seq_len={n} is larger than the data: .* holds {n} tokens"):
        TokenDataset(shard, seq_len=n)
    with pytest.raises(ShardError, match="no such shard"):
        TokenDataset(tmp_path / "missing", seq_len=8)


def test_shard_truncated_while_open_fails_cleanly(shard):
    # In a child: a SIGBUS would kill it, which the return code shows.
    code = textwrap.dedent(f"""
        import os
        from ichiban_comm.data import TokenDataset, TokenLoader, DataError
        ds = TokenDataset({str(shard)!r}, seq_len=8)
        loader = TokenLoader(ds, batch_size=4, prefetch=1)
        next(loader)
        os.truncate({str(shard) + '.bin'!r}, 0)
        try:
            for _ in range(50):
                next(loader)
        except DataError as e:
            print("DataError:", e)
        else:
            print("no error")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "DataError:" in out.stdout and "s.bin: token file truncated while open" in out.stdout, out.stdout


def test_sigbus_guard_turns_a_fault_into_an_error(shard):
    # The size check skipped, a read of pages lost to truncation faults (SIGBUS);
    # the guard must turn it into the same clean error. Any other SIGBUS still kills.
    code = textwrap.dedent(f"""
        import os
        from ichiban_comm.data import TokenDataset
        ds = TokenDataset({str(shard)!r}, seq_len=8)
        n = ds.num_tokens
        ds.tokens(0, n)
        os.truncate({str(shard) + '.bin'!r}, 0)
        try:
            ds._source.read(0, n, check_size=False)
        except RuntimeError as e:
            print("error:", str(e).splitlines()[0])
        try:
            ds._source.read(n - 1, 1, check_size=False)  # the thread's guard still works
        except RuntimeError as e:
            print("again:", str(e).splitlines()[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "error: " in out.stdout and "truncated while open (bus error" in out.stdout, out.stdout
    assert "again: " in out.stdout and "bus error" in out.stdout, out.stdout
