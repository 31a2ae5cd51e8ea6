"""Token data for training: the built-in default corpus (and, later, mmap'd token shards)."""

from .corpus import ByteBatches, stdlib_corpus

__all__ = ["ByteBatches", "stdlib_corpus"]
