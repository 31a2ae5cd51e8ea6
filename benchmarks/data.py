"""Data pipeline benchmark: ichiban_comm's TokenLoader against torch DataLoader.

One run, the same shards for every contender (random GPT-2-sized ids made here):

    python benchmarks/data.py                      # 64M tokens (128 MB), table
    python benchmarks/data.py --gb 1 --json out.json   # >= 1 GB of tokens

Rows per loader (ours; DataLoader over a map-style dataset reading the same
memory map, num_workers 0 and 2, pin_memory where CUDA is present):
  wait_us     the training thread's time in next() per batch while it computes
              ~--compute-ms between batches (median and p90): what a step pays
  tokens/s    consumed flat out, no compute
  first_s     construction to the first batch
  floor       median torch.empty(8) call just after, to read the waits against
              (a loaded host inflates every call alike)
  rss_anon    anonymous resident memory of the process and its workers after the
              run, and its growth over the run (mapped shard pages are page
              cache, counted apart as rss_file)
Then prepare throughput: MB/s of text through `prepare` (tokenize + write
shards) against a bare `tokenizers` encode_batch loop over the same documents.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from ichiban_comm.data import ShardWriter, TokenDataset, TokenLoader
from _machine import machine  # noqa: E402  (benchmarks/ is the script's directory)


def make_shards(path: str, tokens: int, vocab: int = 50257, shard_tokens: int = 1 << 28) -> None:
    rng = np.random.default_rng(0)
    written, i = 0, 0
    while written < tokens:
        n = min(shard_tokens, tokens - written)
        w = ShardWriter(os.path.join(path, f"shard_{i:05d}"), vocab_size=vocab, eod_id=vocab - 1)
        done = 0
        while done < n:
            chunk = min(1 << 22, n - done)
            ids = rng.integers(0, vocab, chunk, dtype=np.uint16)
            # documents of ~1000 tokens: one add per document, like prepare
            cuts = np.sort(rng.integers(0, chunk, max(1, chunk // 1000)))
            for doc in np.split(ids, cuts):
                w.add(doc)
            done += chunk
        w.close()
        written += n
        i += 1


class MemmapSamples(torch.utils.data.Dataset):
    """The DataLoader baseline: sample i of the same packing, read from np.memmap."""

    def __init__(self, ds: TokenDataset):
        self.maps = [np.memmap(s.bin_path, dtype=s.dtype, mode="r") for s in ds.shards]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.seq_len, self.n = ds.seq_len, len(ds)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        a = i * self.seq_len
        k = int(np.searchsorted(self.starts, a, side="right") - 1)
        lo = a - self.starts[k]
        row = self.maps[k][lo:lo + self.seq_len + 1]
        if len(row) < self.seq_len + 1:  # crosses into the next shard
            row = np.concatenate([row, self.maps[k + 1][:self.seq_len + 1 - len(row)]])
        row = torch.from_numpy(row.astype(np.int64))
        return row[:-1], row[1:]


def rss() -> dict:
    """RssAnon / RssFile (MiB) of this process plus its children (DataLoader workers)."""
    def read(pid):
        out = {}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(("RssAnon", "RssFile")):
                        k, v = line.split(":")
                        out[k] = int(v.split()[0]) / 1024
        except OSError:
            pass
        return out

    pids = [os.getpid()]
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    tot = {"RssAnon": 0.0, "RssFile": 0.0}
    for pid in pids:
        for k, v in read(pid).items():
            tot[k] += v
    return {"rss_anon_MiB": round(tot["RssAnon"], 1), "rss_file_MiB": round(tot["RssFile"], 1)}


def calibrate_compute(ms: float):
    """The 'training step': small matmuls until `ms` of wall time have passed
    (a fixed time, not a fixed amount of work, so host load cannot stretch it)."""
    a = torch.randn(64, 64)
    for _ in range(20):  # warm-up: the first calls pay the BLAS start-up
        a @ a

    def compute():
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            a @ a
    return compute


def measure(name: str, make, compute, steps: int, flat_steps: int) -> dict:
    before = rss()
    t0 = time.perf_counter()
    it = make()
    next(it)
    first = time.perf_counter() - t0
    waits = []
    for _ in range(steps):
        compute()
        t = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(flat_steps):
        x, _y = next(it)
    flat = time.perf_counter() - t
    mem = rss()
    tokens = flat_steps * x.numel()
    del it
    waits.sort()
    return {"loader": name, "wait_us_median": 1e6 * statistics.median(waits),
            "wait_us_mean": 1e6 * statistics.mean(waits),
            "wait_us_p90": 1e6 * waits[int(0.9 * len(waits))], "tokens_per_s": tokens / flat,
            "first_batch_s": first, **mem,
            "rss_anon_growth_MiB": round(mem["rss_anon_MiB"] - before["rss_anon_MiB"], 1)}


def call_floor_us() -> float:
    """Median cost of torch.empty(8): the price of one trivial torch call on this
    machine at this moment (a loaded host inflates every wait in the same way)."""
    ts = []
    for _ in range(500):
        t = time.perf_counter()
        torch.empty(8)
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def bench_loaders(path: str, args) -> list[dict]:
    ds = TokenDataset(path, seq_len=args.seq_len, seed=0)
    compute = calibrate_compute(args.compute_ms)
    t = time.perf_counter()
    for _ in range(20):
        compute()
    compute_ms = (time.perf_counter() - t) / 20 * 1e3
    pin = torch.cuda.is_available()
    rows = []

    def ours():
        return iter(TokenLoader(TokenDataset(path, seq_len=args.seq_len, seed=0),
                                batch_size=args.batch, prefetch=4, num_threads=args.loader_threads,
                                pin_memory=pin))

    def torch_loader(workers):
        def make():
            base = MemmapSamples(TokenDataset(path, seq_len=args.seq_len, seed=0))
            g = torch.Generator().manual_seed(0)
            dl = torch.utils.data.DataLoader(base, batch_size=args.batch, shuffle=True, generator=g,
                                             num_workers=workers, pin_memory=pin,
                                             persistent_workers=workers > 0,
                                             prefetch_factor=4 if workers else None)
            return iter(dl)
        return make

    for name, make in [("ichiban TokenLoader", ours),
                       ("torch DataLoader workers=0", torch_loader(0)),
                       ("torch DataLoader workers=2", torch_loader(2))]:
        row = measure(name, make, compute, args.steps, args.flat_steps)
        row["compute_ms"] = compute_ms
        row["floor_us_torch_empty"] = call_floor_us()
        rows.append(row)
        print(f"  {name:<28} wait {row['wait_us_median']:8.1f} us (p90 {row['wait_us_p90']:8.1f}, "
              f"mean {row['wait_us_mean']:8.1f})  "
              f"{row['tokens_per_s'] / 1e6:8.1f} M tok/s  first {row['first_batch_s']:.3f} s  "
              f"anon +{row['rss_anon_growth_MiB']:.0f} MiB (total {row['rss_anon_MiB']:.0f})  "
              f"[torch.empty {row['floor_us_torch_empty']:.1f} us]", flush=True)
    return rows


def bench_prepare(tmp: str, mb: float) -> dict:
    from tokenizers import Tokenizer

    from ichiban_comm.data.corpus import stdlib_documents
    from ichiban_comm.data.prepare import prepare

    docs = [(d.decode("utf-8", errors="replace"), len(d)) for _, d in
            stdlib_documents(int(mb * 1e6))]
    text_bytes = sum(n for _, n in docs)
    prepare(None, os.path.join(tmp, "tok"), train_vocab=4096, train_bytes=2 << 20,
            documents=lambda: iter(docs), progress=False)
    tok_path = os.path.join(tmp, "tok", "tokenizer.json")
    t = time.perf_counter()
    r = prepare(None, os.path.join(tmp, "prep"), tokenizer=tok_path, documents=lambda: iter(docs),
                total_bytes=text_bytes, progress=False)
    ours = time.perf_counter() - t
    tok = Tokenizer.from_file(tok_path)
    texts = [d for d, _ in docs]
    t = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 512):
        n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 512], add_special_tokens=False))
    plain = time.perf_counter() - t
    row = {"text_MB": text_bytes / 1e6, "prepare_MB_per_s": text_bytes / 1e6 / ours,
           "encode_batch_MB_per_s": text_bytes / 1e6 / plain, "tokens": r.tokens}
    row["ratio"] = row["prepare_MB_per_s"] / row["encode_batch_MB_per_s"]
    print(f"  prepare {row['prepare_MB_per_s']:.2f} MB/s vs encode_batch loop "
          f"{row['encode_batch_MB_per_s']:.2f} MB/s ({row['ratio']:.2f}x) over {row['text_MB']:.1f} MB",
          flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64 << 20, help="tokens in the shards")
    p.add_argument("--gb", type=float, default=None, help="size the shards in GB of uint16 tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--compute-ms", type=float, default=1.5, help="compute between batches")
    p.add_argument("--steps", type=int, default=300, help="batches timed with compute")
    p.add_argument("--flat-steps", type=int, default=300, help="batches timed flat out")
    p.add_argument("--prepare-mb", type=float, default=4.0, help="MB of text for the prepare rows")
    p.add_argument("--dir", default=None, help="where to make the shards (default: a temp dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the compute")
    p.add_argument("--loader-threads", type=int, default=1, help="TokenLoader num_threads")
    p.add_argument("--json", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.gb:
        args.tokens = int(args.gb * 1e9 / 2)
    torch.set_num_threads(args.threads)
    res = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        shards = os.path.join(tmp, "shards")
        os.makedirs(shards)
        t = time.perf_counter()
        make_shards(shards, args.tokens)
        print(f"shards: {args.tokens:,} tokens ({args.tokens * 2 / 1e9:.2f} GB) made in "
              f"{time.perf_counter() - t:.1f} s; batches of {args.batch}x{args.seq_len}", flush=True)
        t = time.perf_counter()
        ds = TokenDataset(shards, seq_len=args.seq_len)
        res["open_dataset_s"] = time.perf_counter() - t
        del ds
        res["loaders"] = bench_loaders(shards, args)
        res["prepare"] = bench_prepare(tmp, args.prepare_mb)
    by = {r["loader"]: r for r in res["loaders"]}
    ours = by["ichiban TokenLoader"]
    best = min(by["torch DataLoader workers=0"]["wait_us_median"],
               by["torch DataLoader workers=2"]["wait_us_median"])
    res["ratios"] = {
        "wait_vs_best_dataloader": ours["wait_us_median"] / best,
        "tokens_per_s_vs_workers0": ours["tokens_per_s"] / by["torch DataLoader workers=0"]["tokens_per_s"],
    }
    print(f"ratios: wait {res['ratios']['wait_vs_best_dataloader']:.3f}x the better DataLoader; "
          f"flat-out {res['ratios']['tokens_per_s_vs_workers0']:.2f}x DataLoader(workers=0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
