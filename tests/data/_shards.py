"""Small shard files for the data tests, written without the package's writer
where the point is an independent reference (Megatron, nanoGPT layouts)."""

import struct

import numpy as np


def random_docs(n_docs, vocab, seed=0, min_len=1, max_len=60, eod=None):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        d = rng.integers(0, vocab if eod is None else vocab - 1, rng.integers(min_len, max_len + 1))
        if eod is not None:
            d = np.append(d, eod)
        docs.append(d.astype(np.int64))
    return docs


def write_ours(prefix, docs, vocab, eod=-1):
    from ichiban_comm.data import ShardWriter

    w = ShardWriter(str(prefix), vocab_size=vocab, eod_id=eod)
    for d in docs:
        w.add(d)
    return w.close()


def write_megatron(prefix, docs, dtype=np.uint16, code=8):
    """Megatron-LM MMIDIDX, from its documented layout: one sequence per document."""
    lengths = np.array([len(d) for d in docs], dtype="<i4")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<i8") * itemsize
    doc_idx = np.arange(len(docs) + 1, dtype="<i8")
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())


def write_nanogpt(path, tokens):
    """nanoGPT's prepare.py layout: a flat little-endian uint16 array, nothing else."""
    np.asarray(tokens, dtype="<u2").tofile(path)
