"""Generate text from a run: `python -m experiments.sample --workdir=DIR --prompt=TEXT [--max_new_tokens=N]
[--temperature=T] [--top_k=K] [--top_p=P] [--seed=S] [--num_samples=N] [--step=N] [--nocache]`.

Decodes with the KV cache (--nocache reruns the whole sequence each step, for comparison), temperature 0 is
greedy; a sample ends at the EOS token. Prints each sample, then last on stdout one JSON object: prompt,
samples (text), tokens generated, seconds and tokens per second (compilation included).
"""

import json
import time

from absl import app, flags, logging

from chinchax.data import DataError, get_tokenizer
from chinchax.model import sample
from chinchax.training import checkpoint
from experiments import cli as cli_lib

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory holding config.json and checkpoints/.", required=True
)
_PROMPT = flags.DEFINE_string(
    "prompt", None, "Text to continue (empty: start after an EOS token).", required=True
)
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", 100, "Tokens to generate at most per sample.", lower_bound=1
)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.", lower_bound=0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: the smallest set with this probability (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples drawn in one batch.", lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
_CACHE = flags.DEFINE_bool("cache", True, "Decode with the KV cache.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    cfg, params = checkpoint.load_params(_WORKDIR.value, _STEP.value)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    sampling = sample.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, tokenizer.vocab_size)
    prompt = tokenizer.encode(_PROMPT.value) or [tokenizer.eos_id]
    start = time.perf_counter()
    samples = sample.generate(
        cfg.model,
        params,
        prompt,
        _MAX_NEW.value,
        sampling,
        seed=_SEED.value,
        num_samples=_NUM_SAMPLES.value,
        stop_tokens=[tokenizer.eos_id],
        use_cache=_CACHE.value,
    )
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(s) for s in samples]
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{_PROMPT.value}{text}")
    generated = sum(len(s) for s in samples)
    print(
        json.dumps(
            {
                "prompt": _PROMPT.value,
                "samples": texts,
                "tokens": generated,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(generated / seconds, 1),
            }
        )
    )


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (checkpoint.CheckpointError, DataError, ValueError))


if __name__ == "__main__":
    cli()
