"""Held-out loss, perplexity and bits per byte of a model on the splits of a token store.

A split is read in order as consecutive windows of seq_len inputs, each window's targets the next seq_len
tokens, so every token after the first is predicted exactly once (the last window is partial and masked).
Windows do not overlap: each token sees the context back to the start of its window. The per-token loss
is the fused tied-head cross-entropy (never the whole logit matrix), summed in fp32 per batch and in fp64
across batches.

bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted text, the bytes counted by decoding the
predicted tokens with the store's tokenizer, one document at a time (the EOS separators count 0 bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from chinchax import data
from chinchax.model import loss as loss_lib


@dataclasses.dataclass(frozen=True)
class SplitMetrics:
    """What evaluating one split gives."""

    split: str
    loss: float  # mean nats per predicted token
    perplexity: float  # exp(loss)
    bits_per_byte: float  # total nats / ln 2 / bytes
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the predicted tokens' text


@functools.partial(jax.jit, static_argnums=0)
def _summed_nats(model, params, inputs, targets):
    """Σ cross-entropy (nats, fp32) over the target tokens that are not IGNORE of a (batch, seq_len) batch."""
    return loss_lib.summed_cross_entropy(model, head="chunked")(params, inputs, targets)[0]


class _ByteCounter:
    """UTF-8 bytes of a token stream's text, decoded a whole document at a time (EOS: 0 bytes)."""

    def __init__(self, tokenizer: data.Tokenizer):
        self._tokenizer = tokenizer
        self._pending = np.zeros(0, np.int64)
        self.bytes = 0

    def _count(self, ids: np.ndarray) -> None:
        ids = ids[ids != self._tokenizer.eos_id]
        if ids.size:
            self.bytes += len(self._tokenizer.decode(ids.tolist()).encode("utf-8"))

    def feed(self, ids: np.ndarray) -> None:
        ids = np.concatenate([self._pending, np.asarray(ids, np.int64)])
        ends = np.flatnonzero(ids == self._tokenizer.eos_id)
        cut = ends[-1] + 1 if ends.size else 0
        self._count(ids[:cut])
        self._pending = ids[cut:]

    def finish(self) -> int:
        self._count(self._pending)
        self._pending = self._pending[:0]
        return self.bytes


def evaluate_split(
    cfg: ml_collections.ConfigDict,
    params,
    store: data.Store,
    split: str,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> SplitMetrics:
    """Metrics of `params` on `split` of an opened store (its first max_tokens predicted tokens, if given)."""
    seq_len = seq_len or cfg.data.seq_len
    if not 0 < seq_len <= cfg.model.max_positions or batch_size < 1:
        raise ValueError(
            f"evaluate: need 0 < seq_len={seq_len} <= max_positions={cfg.model.max_positions} "
            f"and batch_size={batch_size} >= 1"
        )
    if split not in store.arrays:
        raise ValueError(f"evaluate: store {store.path} has no split {split!r}; it has {list(store.arrays)}")
    tokenizer = data.get_tokenizer(store.manifest["tokenizer"]["name"])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"evaluate: store {store.path} uses the {tokenizer.name} tokenizer ({tokenizer.vocab_size} ids), "
            f"more than the model's vocab_size={cfg.model.vocab_size}"
        )
    available = store.tokens(split)
    end = available if max_tokens is None else min(available, max_tokens + 1)  # tokens [0, end) are read
    predicted = end - 1
    if predicted < 1:
        raise ValueError(f"evaluate: split {split!r} of {store.path} has {available} tokens; need at least 2")
    model = ml_collections.FrozenConfigDict(cfg.model)
    array = store.arrays[split]
    windows = math.ceil(predicted / seq_len)
    window_tokens = batch_size * seq_len
    bytes_counter = _ByteCounter(tokenizer)
    nats = 0.0
    for first in tqdm(
        range(0, windows * seq_len, window_tokens),
        desc=f"evaluating {split}",
        unit="batch",
        disable=not progress,
    ):
        chunk = np.asarray(array[first : min(first + window_tokens + 1, end)].read().result(), np.int32)
        bytes_counter.feed(chunk[1:])
        padded = np.zeros(window_tokens + 1, np.int32)
        padded[: chunk.size] = chunk
        targets = np.where(np.arange(window_tokens) < chunk.size - 1, padded[1:], loss_lib.IGNORE)
        inputs = padded[:-1].reshape(batch_size, seq_len)
        nats += float(_summed_nats(model, params, inputs, targets.reshape(batch_size, seq_len)))
    text_bytes = bytes_counter.finish()
    loss = nats / predicted
    return SplitMetrics(
        split=split,
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=nats / math.log(2) / text_bytes if text_bytes else float("nan"),
        tokens=predicted,
        bytes=text_bytes,
    )


def evaluate(
    cfg: ml_collections.ConfigDict,
    params,
    store_path: str | os.PathLike,
    splits: tuple[str, ...] = ("validation", "test"),
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, SplitMetrics]:
    """Metrics per split of the store at `store_path` (see `evaluate_split`)."""
    store = data.open_store(store_path)
    unknown = [s for s in splits if s not in store.arrays]
    if unknown:
        raise ValueError(
            f"evaluate: store {store.path} has no split {unknown[0]!r}; it has {list(store.arrays)}"
        )
    return {
        split: evaluate_split(cfg, params, store, split, seq_len, batch_size, max_tokens, progress)
        for split in splits
    }
