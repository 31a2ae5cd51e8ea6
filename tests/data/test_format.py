"""Shard files: our .bin/.idx round trip, Megatron and nanoGPT files from independent writers.

Run: python -m pytest -q tests/data/test_format.py
"""

import os
import struct

import numpy as np
import pytest
import torch

from _shards import random_docs, write_megatron, write_nanogpt, write_ours
from ichiban_comm.data import ShardError, ShardWriter, TokenDataset, read_index
from ichiban_comm.data.format import HEADER_BYTES, MAGIC


@pytest.mark.parametrize("vocab", [300, 65536, 70000])
def test_round_trip_documents_to_stream(tmp_path, vocab):
    docs = random_docs(37, vocab, seed=vocab, eod=vocab - 1)
    shard = write_ours(tmp_path / "s0", docs, vocab, eod=vocab - 1)
    assert shard.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert shard.n_docs == 37 and shard.n_tokens == sum(map(len, docs)) and shard.eod_id == vocab - 1
    raw = np.fromfile(tmp_path / "s0.bin", dtype=shard.dtype.newbyteorder("<"))
    want = np.concatenate(docs)
    assert np.array_equal(raw, want)
    ds = TokenDataset(tmp_path, seq_len=16)
    assert ds.vocab_size == vocab and ds.num_tokens == len(want)
    assert torch.equal(ds.tokens(0, len(want)), torch.from_numpy(want))
    x, y = ds[3]
    assert torch.equal(x, torch.from_numpy(want[48:64])) and torch.equal(y, torch.from_numpy(want[49:65]))
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]])
    assert np.array_equal(ds.doc_starts().numpy(), starts)


def test_header_layout_is_as_documented(tmp_path):
    shard = write_ours(tmp_path / "a", [np.array([1, 2, 3]), np.array([4, 5])], vocab=10, eod=9)
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[:8] == MAGIC and struct.unpack_from("<I", raw, 8)[0] == 1 and raw[12] == 2
    vocab, n_docs, n_tokens, eod = struct.unpack_from("<QQQq", raw, 16)
    assert (vocab, n_docs, n_tokens, eod) == (10, 2, 5, 9)
    assert list(np.frombuffer(raw, "<u8", 3, HEADER_BYTES)) == [0, 3, 5]
    assert len(raw) == HEADER_BYTES + 3 * 8 + 4 and shard.bin_crc32 is not None


def test_shards_span_files_in_sorted_order(tmp_path):
    a, b = random_docs(5, 100, seed=1), random_docs(7, 100, seed=2)
    write_ours(tmp_path / "part_000", a, 100)
    write_ours(tmp_path / "part_001", b, 100)
    ds = TokenDataset(tmp_path, seq_len=8)
    want = np.concatenate(a + b)
    assert len(ds.shards) == 2 and torch.equal(ds.tokens(0, len(want)), torch.from_numpy(want))


def test_writer_publishes_only_complete_shards(tmp_path):
    w = ShardWriter(str(tmp_path / "p"), vocab_size=50)
    w.add([1, 2, 3])
    assert sorted(os.listdir(tmp_path)) == ["p.bin.tmp"]  # nothing a reader would pick up
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx"]
    w = ShardWriter(str(tmp_path / "q"), vocab_size=50)
    w.add([4])
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx"]
    with pytest.raises(ValueError, match=r"token id 50 is outside the vocabulary \[0, 50\)"):
        ShardWriter(str(tmp_path / "r"), vocab_size=50).add([3, 50])


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_megatron_indexed_dataset_reads_back_exactly(tmp_path, dtype, code):
    docs = random_docs(23, 1000, seed=code)
    write_megatron(tmp_path / "corpus_text_document", docs, dtype, code)
    ds = TokenDataset(tmp_path / "corpus_text_document", seq_len=10, vocab_size=1000)
    shard = ds.shards[0]
    assert shard.format == "megatron" and shard.dtype == dtype and shard.n_docs == 23
    want = np.concatenate(docs)
    assert torch.equal(ds.tokens(0, len(want)), torch.from_numpy(want))
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]])
    assert np.array_equal(ds.doc_starts().numpy(), starts)
    with pytest.raises(ShardError, match="records no vocabulary size"):
        TokenDataset(tmp_path / "corpus_text_document", seq_len=10)


def test_nanogpt_flat_uint16_reads_back_exactly(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 5000)
    write_nanogpt(tmp_path / "train.bin", tokens)
    ds = TokenDataset(tmp_path / "train.bin", seq_len=64, vocab_size=50257)
    assert ds.shards[0].format == "nanogpt" and ds.num_tokens == 5000
    assert torch.equal(ds.tokens(0, 5000), torch.from_numpy(tokens))
    assert len(ds) == (5000 - 1) // 64
    with pytest.raises(ShardError, match="needs vocab_size="):
        TokenDataset(tmp_path / "train.bin", seq_len=64)
