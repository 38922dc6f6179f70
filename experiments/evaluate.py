"""Held-out metrics of a run: `python -m experiments.evaluate --workdir=DIR [--split=validation,test]
[--step=N] [--store=PATH] [--seq_len=N] [--batch_size=N] [--max_tokens=N]`.

Loads the newest readable checkpoint (or --step), evaluates loss (nats/token), perplexity and bits per byte
on each split of the run's token store (data.dataset + data.tokenizer of its config, or --store), prints a
line per split, then last on stdout one JSON object: {"workdir", "store", "seq_len", "splits": {split:
{"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}}}.
"""

import dataclasses
import json

from absl import app, flags, logging

from chinchax import data
from chinchax.evaluation import evaluate
from chinchax.training import checkpoint
from experiments import cli as cli_lib

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory holding config.json and checkpoints/.", required=True
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
_SPLIT = flags.DEFINE_list("split", ["validation", "test"], f"Splits to evaluate, from {list(data.SPLITS)}.")
_STORE = flags.DEFINE_string("store", None, "Token store (default: the run's data.dataset and tokenizer).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Window length (default: the run's data.seq_len).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", None, "Evaluate only the first N predicted tokens of a split."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    unknown = [s for s in _SPLIT.value if s not in data.SPLITS]
    if unknown:
        raise ValueError(f"--split: unknown split {unknown[0]!r}; expected some of {list(data.SPLITS)}")
    cfg, params = checkpoint.load_params(_WORKDIR.value, _STEP.value)
    store = _STORE.value or data.resolve_store(cfg.data.dataset, cfg.data.tokenizer)
    results = evaluate.evaluate(
        cfg,
        params,
        store,
        tuple(_SPLIT.value),
        seq_len=_SEQ_LEN.value,
        batch_size=_BATCH_SIZE.value,
        max_tokens=_MAX_TOKENS.value,
    )
    for m in results.values():
        print(
            f"{m.split:>10}: loss {m.loss:.4f} nats/token, perplexity {m.perplexity:.3f}, "
            f"{m.bits_per_byte:.4f} bits/byte over {m.tokens:,} tokens ({m.bytes:,} bytes)"
        )
    report = {
        "workdir": _WORKDIR.value,
        "store": str(store),
        "seq_len": _SEQ_LEN.value or cfg.data.seq_len,
        "splits": {split: dataclasses.asdict(m) for split, m in results.items()},
    }
    print(json.dumps(report))


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (checkpoint.CheckpointError, data.DataError, ValueError))


if __name__ == "__main__":
    cli()
