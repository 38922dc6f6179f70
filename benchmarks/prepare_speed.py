"""Tokenize-and-store speed: `python -m benchmarks.prepare_speed [--tokenizer=gpt2] [--max_bytes=N] [--repeats=5]`.

Prepares two corpora of the same text into fresh temporary folders, on one thread (the single-threaded path) and
on all available CPUs (the parallel path): the embedded corpus (one document per stdlib file) and one text file
holding all of it (a single document, which the parallel path cuts into pieces). In the same run it measures the
peer: the bare tokenizer (tiktoken for gpt2) over the embedded texts in memory, on one thread and on all CPUs
(no reading, hashing or writing: the ceiling). Repeats are interleaved so that a change in machine load hits
every row alike; each row reports the median text MB/s with its range, the CPU cores this process kept busy, and
the cores other processes used meanwhile (a shared machine's load lowers the figures). Prints a table, then one
JSON object.
"""

import json
import os
import pathlib
import statistics
import tempfile
import time

from absl import app, flags

from chinchax import data

_TOKENIZER = flags.DEFINE_enum("tokenizer", "gpt2", ["gpt2", "bytes"], "Tokenizer.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", None, "Cap on the embedded corpus (default: all of it).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per row (the median is reported).", lower_bound=1)
PEER = "tokenizer alone, in memory (peer)"
PREPARE = "prepare: embedded corpus"
PREPARE_ONE = "prepare: one file, one document"


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def _timed(run, text_bytes: int) -> dict:
    """Times `run()` over `text_bytes` of text: MB/s, the cores this process kept busy, other processes' cores."""
    busy, ours, start = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    ours = time.process_time() - ours
    others = max(0.0, _busy_cpu_seconds() - busy - ours)
    return {"mb_per_s": text_bytes / seconds / 1e6, "cores": ours / seconds, "other_cores": others / seconds}


def main(argv):
    del argv
    cpus = len(os.sched_getaffinity(0))
    tokenizer = data.get_tokenizer(_TOKENIZER.value)
    corpus = data.open_corpus("embedded", _MAX_BYTES.value)
    texts = [d.text for d in corpus.documents(data.Skips())]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    with tempfile.TemporaryDirectory() as root:
        one_file = pathlib.Path(root, "corpus.txt")
        one_file.write_text("".join(texts), encoding="utf-8")
        corpora = {PREPARE: corpus, PREPARE_ONE: data.open_corpus(one_file)}
        paths = {PEER: lambda threads: tokenizer.encode_batch(texts, num_threads=threads)} | {
            name: lambda threads, c=c: data.prepare(
                c, tokenizer, tempfile.mkdtemp(dir=root), num_threads=threads, progress=False
            )
            for name, c in corpora.items()
        }
        runs = {(path, threads): [] for path in paths for threads in sorted({1, cpus})}
        for _ in range(_REPEATS.value):
            for path, threads in runs:
                runs[path, threads].append(_timed(lambda: paths[path](threads), text_bytes))  # noqa: B023

    table = []
    for (path, threads), measured in runs.items():
        speeds = [m["mb_per_s"] for m in measured]
        table.append(
            {
                "path": path,
                "threads": threads,
                "mb_per_s": statistics.median(speeds),
                "mb_per_s_range": [min(speeds), max(speeds)],
                "to_1_thread": statistics.median(speeds)
                / statistics.median(m["mb_per_s"] for m in runs[path, 1]),
                "cores": statistics.median(m["cores"] for m in measured),
                "other_cores": statistics.median(m["other_cores"] for m in measured),
            }
        )
    print(
        f"{text_bytes / 1e6:.1f} MB of embedded text, tokenizer {tokenizer.name}, {cpus} CPUs, "
        f"median of {_REPEATS.value} interleaved runs"
    )
    print(
        f"{'path':<40}{'threads':>8}{'MB/s':>10}{'range':>16}{'x 1 thread':>12}{'our cores':>11}{'others':>8}"
    )
    for row in table:
        low, high = row["mb_per_s_range"]
        print(
            f"{row['path']:<40}{row['threads']:>8}{row['mb_per_s']:>10.2f}{f'{low:.1f}-{high:.1f}':>16}"
            f"{row['to_1_thread']:>12.2f}{row['cores']:>11.2f}{row['other_cores']:>8.2f}"
        )
    print(
        json.dumps({"tokenizer": tokenizer.name, "text_mb": text_bytes / 1e6, "cpus": cpus, "table": table})
    )


if __name__ == "__main__":
    app.run(main)
