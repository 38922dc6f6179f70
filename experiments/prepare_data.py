"""Tokenize a corpus into a token store: `python -m experiments.prepare_data --corpus=NAME_OR_PATH
--tokenizer=gpt2|bytes [--out=DIR] [--max_bytes=N]`.

NAME_OR_PATH is `embedded` (the interpreter's standard-library sources) or a text / JSONL file or folder
(plain, .gz or .zst). The store goes under --out (default: $CHINCHAX_DATA or ~/.cache/chinchax); the same
inputs reuse it. Prints a summary, then one JSON line: store path, tokens per split, throughput.
"""

import json

from absl import app, flags

from chinchax import data
from experiments import cli as cli_lib

_CORPUS = flags.DEFINE_string("corpus", "embedded", "Corpus name ('embedded') or path of a file or folder.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "gpt2", ["gpt2", "bytes"], "Tokenizer.")
_OUT = flags.DEFINE_string("out", None, "Folder that holds stores (default: data.default_cache_dir()).")
_MAX_BYTES = flags.DEFINE_integer(
    "max_bytes", None, "Stop after this many bytes of text (an ordered subset)."
)
_VALIDATION = flags.DEFINE_float("validation_fraction", 0.01, "Share of documents held out for validation.")
_TEST = flags.DEFINE_float("test_fraction", 0.01, "Share of documents held out for test.")
_THREADS = flags.DEFINE_integer("threads", None, "Tokenizer threads (default: the CPUs available).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    path = data.prepare(
        _CORPUS.value,
        _TOKENIZER.value,
        _OUT.value or data.default_cache_dir(),
        max_bytes=_MAX_BYTES.value,
        validation_fraction=_VALIDATION.value,
        test_fraction=_TEST.value,
        num_threads=_THREADS.value,
    )
    manifest = data.open_store(path).manifest
    summary = {
        "store": str(path),
        "content_hash": manifest["content_hash"],
        "tokens": {split: counts["tokens"] for split, counts in manifest["splits"].items()},
        "skipped": {reason: s["count"] for reason, s in manifest["skipped"].items()},
        **manifest["build"],
    }
    print(json.dumps(summary))


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (data.DataError,))


if __name__ == "__main__":
    cli()
