"""Tokenize once: text, JSONL or Parquet in, ichiban token shards out.

Documents are tokenized with Hugging Face ``tokenizers`` (Rust, batch-parallel)
from a ``tokenizer.json``, or with a byte-level BPE trained here on the input
(``train_vocab``); nothing is downloaded. An end-of-document token follows each
document. Shards roll over at a document boundary once they hold
``shard_tokens`` tokens; each is written under a temporary name and renamed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

from .format import ShardWriter, file_sha256

DEFAULT_EOD = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")


@dataclass
class PrepareResult:
    out: str
    shards: int
    documents: int
    tokens: int
    text_bytes: int
    seconds: float
    vocab_size: int

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


class Progress:
    """One status line on stderr: MB of text done, MB/s, tokens, shards."""

    def __init__(self, total_bytes: int | None, enabled: bool = True, label: str = "prepare"):
        self.total, self.enabled, self.label = total_bytes, enabled, label
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = None  # the last (done, tokens, shards) printed

    def update(self, done: int, tokens: int, shards: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 5.0)):
            return
        if (done, tokens, shards) == self.shown:
            return
        self.last, self.shown = now, (done, tokens, shards)
        rate = done / 1e6 / max(now - self.t0, 1e-9)
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        total = f"/{self.total / 1e6:.1f}" if self.total else ""
        line = (f"{self.label}: {done / 1e6:.1f}{total} MB{pct}  {rate:.1f} MB/s  "
                f"{tokens:,} tokens  {shards} shard(s)")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def done(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


# ---- inputs --------------------------------------------------------------------

def expand_inputs(patterns) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    files = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(p for p in glob.glob(os.path.join(pat, "**", "*"), recursive=True)
                           if os.path.isfile(p))
        else:
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"--input {pat!r}: matches no file")
        files += found
    return files


def iter_documents(files: list[str], text_key: str = "text"):
    """(text, bytes consumed) per document: a text file is one document, a JSONL
    line one document (its ``text_key`` field), a Parquet row one (its column)."""
    for path in files:
        if path.endswith((".jsonl", ".json", ".ndjson")):
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not JSON: {e.msg}") from None
                    if not isinstance(obj, dict) or text_key not in obj:
                        raise ValueError(f"{path}:{lineno}: no {text_key!r} field (set --text-key)")
                    text = obj[text_key]
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: field {text_key!r} is "
                                         f"{type(text).__name__}, expected a string")
                    yield text, len(line)
        elif path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
            pf = pq.ParquetFile(path)
            if text_key not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {text_key!r} (columns: "
                                 f"{', '.join(pf.schema_arrow.names)}; set --text-key)")
            for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text is not None:
                        yield text, len(text.encode())
        else:
            with open(path, "rb") as f:
                data = f.read()
            yield data.decode("utf-8", errors="replace"), len(data)


def _batches(docs, max_docs=512, max_bytes=4 << 20):
    batch, size, nbytes = [], 0, 0
    for text, n in docs:
        batch.append(text)
        size += len(text)
        nbytes += n
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch, nbytes
            batch, size, nbytes = [], 0, 0
    if batch:
        yield batch, nbytes


# ---- tokenizer -----------------------------------------------------------------

def train_bpe(docs, vocab_size: int, eod_token: str = DEFAULT_EOD, max_bytes: int | None = None):
    """A byte-level BPE (GPT-2 style pre-tokenization) trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"--train-vocab must be >= 258 (256 bytes + the end-of-document token "
                         f"+ merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)

    def capped():
        seen = 0
        for text, n in docs:
            yield text
            seen += n
            if max_bytes is not None and seen >= max_bytes:
                return

    tok.train_from_iterator(capped(), trainer=trainer)
    return tok


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokenizer {path}: no such file (a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type
        raise ValueError(f"--tokenizer {path}: not a tokenizer.json: {e}") from None


# ---- prepare -------------------------------------------------------------------

def prepare(inputs, out: str, *, text_key: str = "text", tokenizer: str | None = None,
            train_vocab: int | None = None, train_bytes: int | None = 64 << 20,
            eod_token: str = DEFAULT_EOD, shard_tokens: int = 1 << 28, progress: bool = True,
            documents=None, total_bytes: int | None = None, overwrite: bool = False) -> PrepareResult:
    """Tokenizes ``inputs`` (paths, directories or globs; or ``documents``, an
    iterable of (text, bytes), re-iterable when training) into shards in ``out``."""
    if (tokenizer is None) == (train_vocab is None):
        raise ValueError("give exactly one of --tokenizer (a tokenizer.json) and --train-vocab N")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if documents is None:
        files = expand_inputs(inputs)
        total_bytes = sum(os.path.getsize(p) for p in files)
        make_docs = lambda: iter_documents(files, text_key)  # noqa: E731
    else:
        make_docs = documents
    os.makedirs(out, exist_ok=True)
    existing = glob.glob(os.path.join(out, "*.idx"))
    if existing and not overwrite:
        raise FileExistsError(f"--out {out}: already holds shards ({len(existing)} .idx); "
                              f"choose another directory or pass --overwrite")
    for p in existing:
        os.unlink(p)
        if os.path.exists(p[:-4] + ".bin"):
            os.unlink(p[:-4] + ".bin")
    tok_path = os.path.join(out, "tokenizer.json")
    if train_vocab is not None:
        t0 = time.perf_counter()
        if progress:
            cap = f" (first {train_bytes / 1e6:.0f} MB)" if train_bytes else ""
            print(f"prepare: training a byte-level BPE of {train_vocab} tokens on the input{cap}",
                  file=sys.stderr, flush=True)
        tok = train_bpe(make_docs(), train_vocab, eod_token, train_bytes)
        tok.save(tok_path + ".tmp")
        os.replace(tok_path + ".tmp", tok_path)
        if progress:
            print(f"prepare: trained in {time.perf_counter() - t0:.1f} s -> {tok_path}",
                  file=sys.stderr, flush=True)
    else:
        tok = load_tokenizer(tokenizer)
        if os.path.abspath(tokenizer) != os.path.abspath(tok_path):
            shutil.copyfile(tokenizer, tok_path)
    eod = tok.token_to_id(eod_token)
    if eod is None:
        raise ValueError(f"the tokenizer has no end-of-document token {eod_token!r}: name its "
                         f"token with --eod-token")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    digest = file_sha256(tok_path)

    bar = Progress(total_bytes, progress)
    t0 = time.perf_counter()
    writer, shards, n_docs, n_tokens, done = None, 0, 0, 0, 0
    try:
        for texts, nbytes in _batches(make_docs()):
            for enc in tok.encode_batch(texts, add_special_tokens=False):
                if writer is None:
                    writer = ShardWriter(os.path.join(out, f"shard_{shards:05d}"), vocab, eod, digest)
                ids = enc.ids
                ids.append(eod)
                writer.add(ids)
                n_docs += 1
                n_tokens += len(ids)
                if writer.n_tokens >= shard_tokens:
                    writer.close()
                    writer, shards = None, shards + 1
            done += nbytes
            bar.update(done, n_tokens, shards + (writer is not None))
        if writer is not None:
            writer.close()
            writer, shards = None, shards + 1
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if n_docs == 0 or n_tokens == 0:
        raise ValueError(f"--input: no documents found in {inputs!r}: nothing to write")
    secs = time.perf_counter() - t0
    bar.update(done, n_tokens, shards, force=True)
    bar.done()
    return PrepareResult(out, shards, n_docs, n_tokens, done, secs, vocab)


# ---- the built-in corpus ----------------------------------------------------

BUILTIN_VOCAB = 2048
BUILTIN_TRAIN_BYTES = 2 << 20


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ichiban_comm", "data")


def prepare_builtin(out: str | None = None, *, max_bytes: int | None = None,
                    vocab_size: int = BUILTIN_VOCAB, train_bytes: int = BUILTIN_TRAIN_BYTES,
                    progress: bool = True, cache_dir: str | None = None) -> str:
    """Shards of the Python standard library's own source, tokenized with a BPE
    trained on its first ``train_bytes``. With ``out=None`` the result is cached
    under ``cache_dir`` (keyed by Python version, size and vocabulary) and
    prepared only once; concurrent callers wait for the first (a file lock)."""
    import fcntl
    import sysconfig

    from .corpus import stdlib_documents, stdlib_paths

    def docs():
        return ((data.decode("utf-8", errors="replace"), len(data))
                for _, data in stdlib_documents(max_bytes))

    total = sum(os.path.getsize(p) for p in stdlib_paths())
    total = min(total, max_bytes) if max_bytes else total
    if out is not None:
        prepare(None, out, train_vocab=vocab_size, train_bytes=train_bytes, documents=docs,
                total_bytes=total, progress=progress)
        return out
    cache_dir = cache_dir or default_cache_dir()
    py = "%d.%d" % sys.version_info[:2]
    key = f"stdlib-py{py}-{max_bytes or 'all'}B-v{vocab_size}-t{train_bytes}-f1"
    final = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(final, "tokenizer.json")):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(final, "tokenizer.json")):
            return final
        tmp = f"{final}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"prepare: the built-in corpus (standard library of {sysconfig.get_paths()['stdlib']}"
                  f", {total / 1e6:.1f} MB) -> {final}, once", file=sys.stderr, flush=True)
        prepare(None, tmp, train_vocab=vocab_size, train_bytes=train_bytes, documents=docs,
                total_bytes=total, progress=progress)
        os.replace(tmp, final)
    return final
