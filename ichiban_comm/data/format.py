"""Token shard files: our ``.bin``/``.idx`` pair, and the formats read as they are.

Our shard is two files. ``NAME.bin`` holds the token ids of every document, one
after another, as little-endian ``uint16`` when the vocabulary fits in 16 bits,
else ``uint32``. ``NAME.idx`` describes it (all integers little-endian)::

    offset  size  field
         0     8  magic  b"ICHTOKN\\x00"
         8     4  version (uint32) = 1
        12     1  token dtype code (uint8): 2 = uint16, 4 = uint32
        13     3  zero
        16     8  vocabulary size (uint64): every id is below it
        24     8  documents (uint64) = D
        32     8  tokens (uint64) = N
        40     8  end-of-document id (int64), -1 when none was appended
        48    32  SHA-256 of the tokenizer.json that made the ids (zeros: unknown)
        80     4  CRC-32 of the .bin bytes (zlib.crc32; checked by `inspect --verify`)
        84    12  zero
        96  8(D+1)  document offsets (uint64): document d is tokens [off[d], off[d+1])
        ..     4  CRC-32 of every byte of the .idx before it

Both files are written under a temporary name (``.tmp`` suffix), flushed to disk
and renamed, the ``.bin`` first: an ``.idx`` that exists describes a complete
``.bin``. Opening checks the magic, version, dtype, the index checksum, that the
offsets rise from 0 to N and that the ``.bin`` holds exactly N tokens.

Also read, unchanged:

* Megatron-LM ``MMIDIDX`` indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``):
  header ``b"MMIDIDX\\x00\\x00"``, version (uint64) 1, dtype code (uint8),
  sequence count S (uint64), document count D (uint64), then int32 sequence
  lengths [S], int64 byte pointers [S], int64 document indices [D] (sequence
  index at each document start, ending with S). Sequences must lie back to back.
* nanoGPT flat ``uint16`` ``.bin`` files (no header, no index): one stream of
  GPT-2 ids; the vocabulary size must be given (50257 for GPT-2).
"""

from __future__ import annotations

import glob
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"ICHTOKN\x00"
VERSION = 1
HEADER_BYTES = 96
_HEADER = struct.Struct("<8sIB3xQQQq32sI12x")
assert _HEADER.size == HEADER_BYTES

# Token type codes shared with csrc/data/token_source.h.
TYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.uint16): 2, np.dtype(np.int32): 3,
              np.dtype(np.uint32): 4, np.dtype(np.int64): 5}
_OUR_DTYPES = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                    6: np.float64, 7: np.float32, 8: np.uint16}


class ShardError(ValueError):
    """A shard file that is missing, truncated, corrupt or not what it claims to be."""


@dataclass
class Shard:
    """One token file and what its index says about it."""

    bin_path: str
    format: str              # "ichiban", "megatron" or "nanogpt"
    dtype: np.dtype
    n_tokens: int
    vocab_size: int | None   # None: not recorded (Megatron)
    eod_id: int = -1
    tokenizer_hash: str = ""
    bin_crc32: int | None = None
    index_crc32: int = 0
    idx_path: str | None = None
    doc_offsets: np.ndarray | None = field(default=None, repr=False)  # (D+1,) token offsets

    @property
    def n_docs(self) -> int:
        return 0 if self.doc_offsets is None else len(self.doc_offsets) - 1

    @property
    def type_code(self) -> int:
        return TYPE_CODES[self.dtype]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _fsync_rename(tmp: str, final: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class ShardWriter:
    """Writes one shard, document by document: ``add(ids)`` then ``close()``.

    Until ``close()`` the files carry a ``.tmp`` suffix, so a reader never sees
    a partial shard; ``abort()`` removes them.
    """

    def __init__(self, prefix: str, vocab_size: int, eod_id: int = -1, tokenizer_hash: str = ""):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.prefix, self.vocab_size, self.eod_id = prefix, vocab_size, eod_id
        self.tokenizer_hash = tokenizer_hash
        self.dtype = dtype_for_vocab(vocab_size)
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._offsets = [0]
        self._crc = 0
        self.n_tokens = 0

    def add(self, ids) -> None:
        """Appends one document (a sequence of ids, end-of-document token included if wanted)."""
        arr = np.asarray(ids)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            bad = int(arr.max()) if int(arr.max()) >= self.vocab_size else int(arr.min())
            raise ValueError(f"{self.prefix}.bin: token id {bad} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        data = arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self.n_tokens += arr.size
        self._offsets.append(self.n_tokens)

    def close(self) -> Shard:
        self._bin.close()
        digest = bytes.fromhex(self.tokenizer_hash) if self.tokenizer_hash else bytes(32)
        header = _HEADER.pack(MAGIC, VERSION, 2 if self.dtype == np.uint16 else 4, self.vocab_size,
                              len(self._offsets) - 1, self.n_tokens, self.eod_id, digest, self._crc)
        body = header + np.asarray(self._offsets, dtype="<u8").tobytes()
        crc = zlib.crc32(body)
        with open(self.prefix + ".idx.tmp", "wb") as f:
            f.write(body + struct.pack("<I", crc))
        _fsync_rename(self.prefix + ".bin.tmp", self.prefix + ".bin")
        _fsync_rename(self.prefix + ".idx.tmp", self.prefix + ".idx")
        return read_index(self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for p in (self.prefix + ".bin.tmp", self.prefix + ".idx.tmp"):
            if os.path.exists(p):
                os.unlink(p)


def _check_bin_size(shard: Shard) -> Shard:
    if not os.path.exists(shard.bin_path):
        raise ShardError(f"{shard.bin_path}: token file missing (its index is {shard.idx_path})")
    size = os.path.getsize(shard.bin_path)
    want = shard.n_tokens * shard.dtype.itemsize
    if size != want:
        what = "truncated" if size < want else "longer than its index says"
        raise ShardError(f"{shard.bin_path}: {what}: {size} bytes, the index {shard.idx_path} "
                         f"describes {shard.n_tokens} tokens of {shard.dtype.itemsize} bytes "
                         f"= {want} bytes")
    return shard


def _read_ours(idx_path: str, raw: bytes) -> Shard:
    if len(raw) < HEADER_BYTES + 12:
        raise ShardError(f"{idx_path}: truncated index ({len(raw)} bytes, a header is {HEADER_BYTES})")
    magic, version, code, vocab, n_docs, n_tokens, eod, digest, bin_crc = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise ShardError(f"{idx_path}: index version {version}, this reader knows version {VERSION}")
    if code not in _OUR_DTYPES:
        raise ShardError(f"{idx_path}: unknown token dtype code {code} (expected 2 = uint16 or "
                         f"4 = uint32)")
    want = HEADER_BYTES + 8 * (n_docs + 1) + 4
    if len(raw) != want:
        raise ShardError(f"{idx_path}: index is {len(raw)} bytes, its header ({n_docs} documents) "
                         f"needs {want}: truncated or corrupt")
    (crc,) = struct.unpack_from("<I", raw, len(raw) - 4)
    if zlib.crc32(raw[:-4]) != crc:
        raise ShardError(f"{idx_path}: index checksum mismatch: the file is corrupt")
    offsets = np.frombuffer(raw, dtype="<u8", count=n_docs + 1, offset=HEADER_BYTES).astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tokens or (n_docs and np.any(np.diff(offsets) < 0)):
        raise ShardError(f"{idx_path}: document offsets do not rise from 0 to {n_tokens}: corrupt")
    if vocab < 1 or (code == 2 and vocab > 1 << 16):
        raise ShardError(f"{idx_path}: vocabulary size {vocab} does not fit token dtype code {code}")
    shard = Shard(bin_path=idx_path[:-4] + ".bin", format="ichiban", dtype=_OUR_DTYPES[code],
                  n_tokens=int(n_tokens), vocab_size=int(vocab), eod_id=int(eod),
                  tokenizer_hash="" if digest == bytes(32) else digest.hex(), bin_crc32=bin_crc,
                  index_crc32=crc, idx_path=idx_path, doc_offsets=offsets)
    return _check_bin_size(shard)


def _read_megatron(idx_path: str, raw: bytes) -> Shard:
    fixed = 9 + 8 + 1 + 8 + 8
    if len(raw) < fixed:
        raise ShardError(f"{idx_path}: truncated Megatron index ({len(raw)} bytes)")
    (version,) = struct.unpack_from("<Q", raw, 9)
    if version != 1:
        raise ShardError(f"{idx_path}: Megatron index version {version}, this reader knows version 1")
    code = raw[17]
    if code not in _MEGATRON_DTYPES:
        raise ShardError(f"{idx_path}: unknown Megatron dtype code {code}")
    dtype = np.dtype(_MEGATRON_DTYPES[code])
    if dtype not in TYPE_CODES:
        raise ShardError(f"{idx_path}: Megatron dtype {dtype} is not a token type this reader "
                         f"takes (uint8, uint16, int32, int64)")
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    need = fixed + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if len(raw) < need:
        raise ShardError(f"{idx_path}: Megatron index is {len(raw)} bytes, its header "
                         f"({n_seq} sequences, {n_doc} document indices) needs {need}: truncated")
    lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=fixed).astype(np.int64)
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=fixed + 4 * n_seq)
    doc_idx = np.frombuffer(raw, dtype="<i8", count=n_doc, offset=fixed + 12 * n_seq)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    if np.any(lengths < 0) or not np.array_equal(pointers, starts[:-1] * dtype.itemsize):
        raise ShardError(f"{idx_path}: Megatron sequences are not stored back to back "
                         f"(pointers != cumulative lengths): not supported")
    if n_doc < 1 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise ShardError(f"{idx_path}: Megatron document indices do not rise from 0 to {n_seq}")
    shard = Shard(bin_path=idx_path[:-4] + ".bin", format="megatron", dtype=dtype,
                  n_tokens=int(starts[-1]), vocab_size=None, idx_path=idx_path,
                  index_crc32=zlib.crc32(raw), doc_offsets=starts[doc_idx].astype(np.int64))
    return _check_bin_size(shard)


def read_index(idx_path: str) -> Shard:
    """Parses and validates one ``.idx`` (ours or Megatron's); checks its ``.bin``'s size."""
    try:
        with open(idx_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ShardError(f"{idx_path}: cannot read the index: {e.strerror}") from None
    if raw.startswith(MAGIC):
        return _read_ours(idx_path, raw)
    if raw.startswith(MEGATRON_MAGIC):
        return _read_megatron(idx_path, raw)
    raise ShardError(f"{idx_path}: bad magic {raw[:9]!r}: expected {MAGIC!r} (ichiban shard) or "
                     f"{MEGATRON_MAGIC!r} (Megatron indexed dataset)")


def read_flat(bin_path: str, vocab_size: int, dtype=np.uint16) -> Shard:
    """A nanoGPT-style flat token file: no header, no document boundaries."""
    dtype = np.dtype(dtype)
    size = os.path.getsize(bin_path)
    if size % dtype.itemsize:
        raise ShardError(f"{bin_path}: {size} bytes is not a whole number of {dtype} tokens: "
                         f"truncated or not a flat {dtype} token file")
    return Shard(bin_path=bin_path, format="nanogpt", dtype=dtype, n_tokens=size // dtype.itemsize,
                 vocab_size=vocab_size, index_crc32=zlib.crc32(struct.pack("<QQ", size, vocab_size)))


def discover(path, vocab_size: int | None = None) -> list[Shard]:
    """The shards at ``path``: a directory (every ``*.idx`` in it, sorted, or else
    every ``*.bin`` as a flat file), an index or token file, a prefix, a glob, or a list."""
    if isinstance(path, (list, tuple)):
        return [s for p in path for s in discover(p, vocab_size)]
    path = os.fspath(path)
    if os.path.isdir(path):
        idx = sorted(glob.glob(os.path.join(path, "*.idx")))
        if idx:
            return [read_index(p) for p in idx]
        bins = sorted(glob.glob(os.path.join(path, "*.bin")))
        if not bins:
            raise ShardError(f"{path}: no shards (*.idx with *.bin, or flat *.bin) in this directory")
        return [_flat(p, vocab_size) for p in bins]
    if path.endswith(".idx"):
        return [read_index(path)]
    if os.path.exists(path + ".idx"):
        return [read_index(path + ".idx")]
    if path.endswith(".bin"):
        if os.path.exists(path[:-4] + ".idx"):
            return [read_index(path[:-4] + ".idx")]
        if os.path.exists(path):
            return [_flat(path, vocab_size)]
    matches = sorted(glob.glob(path, recursive=True))
    if matches and any(ch in path for ch in "*?["):
        return discover([m for m in matches if m.endswith(".idx")] or matches, vocab_size)
    raise ShardError(f"{path}: no such shard, directory or glob")


def _flat(bin_path: str, vocab_size: int | None) -> Shard:
    if vocab_size is None:
        raise ShardError(f"{bin_path}: a flat token file (nanoGPT layout, no .idx) needs "
                         f"vocab_size= (50257 for GPT-2 ids)")
    return read_flat(bin_path, vocab_size)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
