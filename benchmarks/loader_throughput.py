"""Loader throughput: `python -m benchmarks.loader_throughput [--tokenizer=gpt2] [--seq_len=2048] [--batch_size=8]`.

Reads shuffled training batches of the embedded corpus's store (prepared on first use) through the grain
loader and reports tokens/s, next to the peer: the same random windows gathered from an in-memory numpy copy
(the ceiling for any loader). Last line: one JSON object.
"""

import json
import time

import numpy as np
from absl import app, flags

from chinchax import data

_TOKENIZER = flags.DEFINE_enum("tokenizer", "gpt2", ["gpt2", "bytes"], "Tokenizer of the store.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per batch.")
_BATCHES = flags.DEFINE_integer("batches", 400, "Timed batches per measurement.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", None, "Cap on the embedded corpus (default: all of it).")


def loader_tokens_per_s(store, read_threads: int) -> float:
    loader = data.make_loader(store, "train", _SEQ_LEN.value, _BATCH.value, seed=0, read_threads=read_threads)
    for _ in range(20):  # warm up: threads started, cache filled as in steady state
        next(loader)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(loader)
    return _BATCHES.value * _BATCH.value * _SEQ_LEN.value / (time.perf_counter() - start)


def numpy_tokens_per_s(store) -> float:
    """Peer: gather the same number of random (seq_len+1)-windows from RAM and build int32 inputs/targets."""
    tokens = data.open_store(store).arrays["train"].read().result()
    windows = (len(tokens) - 1) // _SEQ_LEN.value
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        starts = rng.integers(0, windows, _BATCH.value) * _SEQ_LEN.value
        rows = np.stack([tokens[s : s + _SEQ_LEN.value + 1] for s in starts]).astype(np.int32)
        _ = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    return _BATCHES.value * _BATCH.value * _SEQ_LEN.value / (time.perf_counter() - start)


def main(argv):
    del argv
    store = data.ensure_embedded_store(_TOKENIZER.value, max_bytes=_MAX_BYTES.value)
    result = {
        "store": str(store),
        "seq_len": _SEQ_LEN.value,
        "batch_size": _BATCH.value,
        "loader_tokens_per_s_threads_0": round(loader_tokens_per_s(store, 0)),
        "loader_tokens_per_s_threads_2": round(loader_tokens_per_s(store, 2)),
        "numpy_peer_tokens_per_s": round(numpy_tokens_per_s(store)),
    }
    result["ratio_threads_2_to_peer"] = round(
        result["loader_tokens_per_s_threads_2"] / result["numpy_peer_tokens_per_s"], 3
    )
    for key, value in result.items():
        print(f"{key:>32}: {value:,}" if isinstance(value, int) else f"{key:>32}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
