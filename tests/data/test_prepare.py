"""ichiban-data prepare / inspect: documents in, the same token stream out.

Run: python -m pytest -q tests/data/test_prepare.py
"""

import json

import numpy as np
import pytest
import torch

from ichiban_comm.data import TokenDataset
from ichiban_comm.data.cli import describe, main
from ichiban_comm.data.prepare import prepare, prepare_builtin

TEXTS = [f"def f{i}(x):\n    return x * {i} + {'abc' * (i % 5)}  # é ü {i}\n" * (1 + i % 7)
         for i in range(120)]


@pytest.fixture
def jsonl(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for part in range(2):
        with open(d / f"part{part}.jsonl", "w") as f:
            for t in TEXTS[part * 60:(part + 1) * 60]:
                f.write(json.dumps({"text": t, "id": 1}) + "\n")
    return d


def expected_stream(tokenizer_json, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    eod = tok.token_to_id("<|endoftext|>")
    return np.concatenate([tok.encode(t, add_special_tokens=False).ids + [eod] for t in texts]), tok


def test_jsonl_with_trained_bpe_round_trips(tmp_path, jsonl, capsys):
    out = tmp_path / "shards"
    assert main(["prepare", "--input", str(jsonl / "*.jsonl"), "--text-key", "text",
                 "--train-vocab", "300", "--shard-tokens", "2000", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "MB/s" in captured.err and "prepared 120 documents" in captured.out
    want, tok = expected_stream(out / "tokenizer.json", TEXTS)
    ds = TokenDataset(out, seq_len=16)
    assert len(ds.shards) > 1 and ds.vocab_size == tok.get_vocab_size()
    assert torch.equal(ds.tokens(0, ds.num_tokens), torch.from_numpy(want))
    starts = ds.doc_starts().tolist()
    assert len(starts) == 120
    # each document decodes back to its text
    for i in (0, 57, 119):
        end = starts[i + 1] if i + 1 < len(starts) else ds.num_tokens
        assert tok.decode(ds.tokens(starts[i], end - starts[i] - 1).tolist()) == TEXTS[i]
    info = describe(out, verify=True)
    assert info["documents"] == 120 and info["tokens"] == len(want) and info["dtypes"] == ["uint16"]
    assert all(row["ok"] for row in info["files"]) and info["tokenizer_sha256"]


def test_text_files_with_a_given_tokenizer(tmp_path, jsonl):
    prepare([str(jsonl)], str(tmp_path / "a"), train_vocab=280, progress=False)
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(TEXTS[:9]):
        (txt / f"{i}.txt").write_text(t)
    r = prepare([str(txt)], str(tmp_path / "b"), tokenizer=str(tmp_path / "a" / "tokenizer.json"),
                progress=False)
    assert r.documents == 9 and r.shards == 1
    want, _ = expected_stream(tmp_path / "a" / "tokenizer.json", TEXTS[:9])
    ds = TokenDataset(tmp_path / "b", seq_len=4)
    assert torch.equal(ds.tokens(0, ds.num_tokens), torch.from_numpy(want))


def test_inspect_cli_and_verify_catches_corruption(tmp_path, jsonl, capsys):
    out = tmp_path / "s"
    prepare([str(jsonl)], str(out), train_vocab=300, progress=False)
    assert main(["inspect", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "1 shard(s), 120 documents" in line and "dtype uint16, vocab 300" in line
    with open(out / "shard_00000.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\x07\x00")
    assert main(["inspect", str(out), "--verify"]) == 1
    assert "BAD: checksum mismatch" in capsys.readouterr().out


def test_prepare_errors(tmp_path, jsonl, capsys):
    with pytest.raises(ValueError, match=r"part0.jsonl:1: no 'body' field \(set --text-key\)"):
        prepare([str(jsonl)], str(tmp_path / "x"), text_key="body", train_vocab=300, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no documents found"):
        prepare([str(empty)], str(tmp_path / "y"), train_vocab=300, progress=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare([str(tmp_path / "nothing*.jsonl")], str(tmp_path / "z"), train_vocab=300)
    prepare([str(jsonl)], str(tmp_path / "w"), train_vocab=300, progress=False)
    assert main(["prepare", "--input", str(jsonl), "--train-vocab", "300",
                 "--out", str(tmp_path / "w")]) == 2
    assert "already holds shards" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one of --tokenizer"):
        prepare([str(jsonl)], str(tmp_path / "v"))
    with pytest.raises(ValueError, match="no end-of-document token '<eos>'"):
        prepare([str(jsonl)], str(tmp_path / "u"), tokenizer=str(tmp_path / "w" / "tokenizer.json"),
                eod_token="<eos>", progress=False)


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TEXTS[:30], "n": list(range(30))}), tmp_path / "d.parquet")
    r = prepare([str(tmp_path / "d.parquet")], str(tmp_path / "p"), text_key="content",
                train_vocab=300, progress=False)
    want, _ = expected_stream(tmp_path / "p" / "tokenizer.json", TEXTS[:30])
    assert r.documents == 30
    ds = TokenDataset(tmp_path / "p", seq_len=4)
    assert torch.equal(ds.tokens(0, ds.num_tokens), torch.from_numpy(want))


def test_builtin_is_cached_and_deterministic(tmp_path, capsys):
    a = prepare_builtin(max_bytes=60_000, vocab_size=300, cache_dir=str(tmp_path / "c"))
    assert "once" in capsys.readouterr().err
    b = prepare_builtin(max_bytes=60_000, vocab_size=300, cache_dir=str(tmp_path / "c"))
    assert a == b and capsys.readouterr().err == ""  # second call: from the cache, silent
    other = prepare_builtin(str(tmp_path / "o"), max_bytes=60_000, vocab_size=300, progress=False)
    da, do = TokenDataset(a, seq_len=8), TokenDataset(other, seq_len=8)
    assert da.num_tokens == do.num_tokens and torch.equal(da.tokens(0, da.num_tokens),
                                                          do.tokens(0, do.num_tokens))
