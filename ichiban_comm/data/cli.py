"""ichiban-data: tokenize corpora into token shards and look inside them.

    ichiban-data prepare --input 'corpus/**/*.jsonl' --text-key text --tokenizer tokenizer.json --out data/shards
    ichiban-data prepare --input 'books/*.txt' --train-vocab 32000 --out data/books
    ichiban-data prepare --builtin --out data/stdlib      # the main job's default corpus
    ichiban-data inspect data/shards [--verify] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib

import numpy as np


def _prepare(args) -> int:
    from .prepare import BUILTIN_TRAIN_BYTES, BUILTIN_VOCAB, prepare, prepare_builtin

    if args.builtin:
        if args.input or args.tokenizer:
            print("error: --builtin takes no --input or --tokenizer", file=sys.stderr)
            return 2
        prepare_builtin(args.out, max_bytes=args.max_bytes,
                        vocab_size=args.train_vocab or BUILTIN_VOCAB,
                        train_bytes=args.train_bytes or BUILTIN_TRAIN_BYTES, progress=not args.quiet)
    else:
        if not args.input:
            print("error: give --input (files, directories or globs) or --builtin", file=sys.stderr)
            return 2
        r = prepare(args.input, args.out, text_key=args.text_key, tokenizer=args.tokenizer,
                    train_vocab=args.train_vocab, train_bytes=args.train_bytes or None,
                    eod_token=args.eod_token, shard_tokens=args.shard_tokens,
                    progress=not args.quiet, overwrite=args.overwrite)
        print(f"prepared {r.documents:,} documents, {r.tokens:,} tokens (vocab {r.vocab_size}) in "
              f"{r.shards} shard(s) in {r.out}: {r.text_bytes / 1e6:.1f} MB of text at "
              f"{r.mb_per_s:.1f} MB/s")
        return 0
    return _inspect(argparse.Namespace(path=args.out, vocab_size=None, verify=False, json=False))


def describe(path, vocab_size=None, verify=False) -> dict:
    from .format import discover

    shards = discover(path, vocab_size)
    rows = []
    for s in shards:
        row = {"bin": s.bin_path, "format": s.format, "dtype": str(s.dtype), "tokens": s.n_tokens,
               "documents": s.n_docs if s.doc_offsets is not None else None,
               "vocab_size": s.vocab_size, "eod_id": s.eod_id if s.eod_id >= 0 else None}
        if verify:
            tokens = np.memmap(s.bin_path, dtype=s.dtype.newbyteorder("<"), mode="r")
            crc, hi, lo, step = 0, 0, 0, 1 << 24
            for i in range(0, len(tokens), step):
                block = np.asarray(tokens[i:i + step])
                crc = zlib.crc32(block.tobytes(), crc)
                hi, lo = max(hi, int(block.max())), min(lo, int(block.min()))
            row["max_id"] = hi
            problems = []
            vocab = s.vocab_size or vocab_size
            if vocab is not None and (hi >= vocab or lo < 0):
                problems.append(f"token ids reach {hi}, the vocabulary is {vocab}")
            if s.bin_crc32 is not None and crc != s.bin_crc32:
                problems.append("checksum mismatch: the token file is corrupt")
            row["ok"] = not problems
            if problems:
                row["problems"] = problems
        rows.append(row)
    vocabs = {s.vocab_size for s in shards if s.vocab_size}
    hashes = {s.tokenizer_hash for s in shards if s.tokenizer_hash}
    return {"path": str(path), "shards": len(shards),
            "documents": sum(s.n_docs for s in shards if s.doc_offsets is not None),
            "tokens": sum(s.n_tokens for s in shards),
            "dtypes": sorted({str(s.dtype) for s in shards}),
            "vocab_size": vocabs.pop() if len(vocabs) == 1 else sorted(vocabs) or None,
            "tokenizer_sha256": hashes.pop() if len(hashes) == 1 else sorted(hashes) or None,
            "formats": sorted({s.format for s in shards}), "files": rows}


def _inspect(args) -> int:
    info = describe(args.path, args.vocab_size, args.verify)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['path']}: {info['shards']} shard(s), {info['documents']:,} documents, "
              f"{info['tokens']:,} tokens, dtype {'/'.join(info['dtypes'])}, vocab "
              f"{info['vocab_size']}, format {'/'.join(info['formats'])}")
        if info["tokenizer_sha256"]:
            print(f"  tokenizer sha256 {info['tokenizer_sha256']}")
        for row in info["files"]:
            docs = f"{row['documents']:>10,} docs" if row["documents"] is not None else " " * 15
            ok = "" if "ok" not in row else ("  ok" if row["ok"] else "  BAD: " + "; ".join(row["problems"]))
            print(f"  {row['bin']}  {row['tokens']:>14,} tokens {docs}  {row['dtype']}{ok}")
    bad = [r for r in info["files"] if r.get("ok") is False]
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ichiban-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="tokenize text/JSONL/Parquet into shards")
    q.add_argument("--input", nargs="+", help="files, directories or globs (quote them): .txt and "
                   "other text files are one document each, .jsonl one per line, .parquet one per row")
    q.add_argument("--text-key", default="text", help="JSONL field / Parquet column with the text")
    q.add_argument("--tokenizer", help="a Hugging Face tokenizer.json")
    q.add_argument("--train-vocab", type=int, help="train a byte-level BPE of N tokens on the input")
    q.add_argument("--train-bytes", type=int, default=None,
                   help="bytes of input the BPE trains on (default: 64 MB; --builtin: 2 MB)")
    q.add_argument("--builtin", action="store_true",
                   help="the Python standard library's source with a BPE trained on it")
    q.add_argument("--max-bytes", type=int, default=None, help="--builtin: bytes of source to use")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--eod-token", default="<|endoftext|>", help="the end-of-document token")
    q.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard")
    q.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    q.add_argument("--quiet", action="store_true", help="no progress line")
    i = sub.add_parser("inspect", help="documents, tokens, dtype, vocabulary and shards")
    i.add_argument("path", help="a shard directory, prefix, .idx or flat .bin")
    i.add_argument("--vocab-size", type=int, help="for formats that do not record it")
    i.add_argument("--verify", action="store_true", help="read every token: checksum and id range")
    i.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from .format import ShardError

    try:
        return _prepare(args) if args.cmd == "prepare" else _inspect(args)
    except (ShardError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
