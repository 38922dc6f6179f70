"""Tokenizers, corpora, the tensorstore token store and the grain loader.

tok = get_tokenizer("gpt2")                              # or "bytes"
store_path = resolve_store(cfg.data.dataset, cfg.data.tokenizer)   # name, store or corpus path
store = open_store(store_path)                           # .manifest, .arrays[split] (tensorstore)
it = make_loader(store_path, "train", seq_len, batch_size, seed,
                 shard_index=jax.process_index(), shard_count=jax.process_count())
batch = next(it)                                         # {'inputs','targets'}: int32 (batch, seq_len)
it.epochs_seen, it.batches_seen                          # progress; state saved via grain.checkpoint
"""

from chinchax.data.corpora import Corpus, Document, Skips, StdlibCorpus, open_corpus
from chinchax.data.errors import DataError
from chinchax.data.loader import TokenBatchIterator, make_loader
from chinchax.data.prepare import prepare, split_of
from chinchax.data.resolve import default_cache_dir, ensure_embedded_store, resolve_store
from chinchax.data.store import FORMAT_VERSION, SPLITS, Store, open_store
from chinchax.data.tokenizers import ByteTokenizer, Gpt2Tokenizer, Tokenizer, get_tokenizer

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "Document",
    "Gpt2Tokenizer",
    "Skips",
    "StdlibCorpus",
    "Store",
    "TokenBatchIterator",
    "Tokenizer",
    "default_cache_dir",
    "ensure_embedded_store",
    "get_tokenizer",
    "make_loader",
    "open_corpus",
    "open_store",
    "prepare",
    "resolve_store",
    "split_of",
]
