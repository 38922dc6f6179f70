"""Tokenize-and-store speed: `python -m benchmarks.prepare_speed [--tokenizer=gpt2] [--max_bytes=N]`.

Prepares the embedded corpus into a fresh temporary folder with 1 and with all available threads, and
measures the peer in the same run: the bare tokenizer (tiktoken for gpt2) over the same texts in memory on
one thread (no reading, hashing or writing). Reports text MB/s, tokens/s and ratios. Last line: JSON.
"""

import json
import os
import tempfile
import time

from absl import app, flags

from chinchax import data

_TOKENIZER = flags.DEFINE_enum("tokenizer", "gpt2", ["gpt2", "bytes"], "Tokenizer.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", None, "Cap on the embedded corpus (default: all of it).")


def peer_mb_per_s(texts: list[str], tokenizer: data.Tokenizer) -> float:
    start = time.perf_counter()
    tokenizer.encode_batch(texts, num_threads=1)
    return sum(len(t.encode("utf-8")) for t in texts) / (time.perf_counter() - start) / 1e6


def main(argv):
    del argv
    tokenizer = data.get_tokenizer(_TOKENIZER.value)
    corpus = data.open_corpus("embedded", _MAX_BYTES.value)
    texts = [d.text for d in corpus.documents(data.Skips())]
    result = {"tokenizer": tokenizer.name, "text_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2)}
    result["peer_encode_in_memory_1_thread_mb_per_s"] = round(peer_mb_per_s(texts, tokenizer), 2)
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        with tempfile.TemporaryDirectory() as out:
            store = data.prepare(corpus, tokenizer, out, num_threads=threads, progress=False)
            build = data.open_store(store).manifest["build"]
        result[f"prepare_{threads}_threads_mb_per_s"] = build["text_mb_per_s"]
        result[f"prepare_{threads}_threads_tokens_per_s"] = build["tokens_per_s"]
        result[f"prepare_{threads}_threads_to_peer"] = round(
            build["text_mb_per_s"] / result["peer_encode_in_memory_1_thread_mb_per_s"], 3
        )
    for key, value in result.items():
        print(f"{key:>36}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
