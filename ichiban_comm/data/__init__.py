"""Token data for training: shards of token ids on disk (tokenized once by
``ichiban-data prepare``), memory-mapped and packed into batches by C++ threads
in a deterministic shuffled order that resumes exactly, also at another number
of ranks. The byte-level corpus of earlier versions stays for small tools."""

from .corpus import ByteBatches, stdlib_corpus
from .format import Shard, ShardError, ShardWriter, discover, read_index
from .loader import DataError, TokenDataset, TokenLoader

__all__ = ["ByteBatches", "stdlib_corpus", "Shard", "ShardError", "ShardWriter", "discover",
           "read_index", "DataError", "TokenDataset", "TokenLoader"]
