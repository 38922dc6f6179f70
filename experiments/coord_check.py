"""The μP coordinate check: `python -m experiments.coord_check [--out=DIR] [--widths=128,256,512,1024]
[--block=gpt3|llama]`.

Trains byte-level models of several widths (GPT-3's block, or the Llama block) for a few Adam steps under SP and
μP, draws mean |activation| against width per step (DIR/coord_check.png; coord_check_llama.png for the Llama
block, beside its .json) and prints the max/min spread across widths per activation and the slope of log scale
against log width (0: flat), last on stdout as one JSON object.
"""

import json
import pathlib

from absl import flags

from chinchax import atomic
from chinchax.config import ConfigError
from chinchax.scaling import coord_check
from experiments import cli as cli_lib

_OUT = flags.DEFINE_string(
    "out", "runs/coord_check", "Folder for coord_check[_<block>].png and .json (no suffix for gpt3)."
)
_WIDTHS = flags.DEFINE_list("widths", ["128", "256", "512", "1024"], "Model widths (multiples of 16).")
_STEPS = flags.DEFINE_integer("steps", 3, "Adam steps after init.")
_LR = flags.DEFINE_float("lr", 3e-3, "Adam learning rate (μP: η_base, scaled per role).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init and the batch.")
_BLOCK = flags.DEFINE_enum(
    "block", "gpt3", list(coord_check.BLOCKS), "Model block: GPT-3's or the Llama block."
)


def main(argv):
    del argv
    if not all(w.isdigit() and int(w) > 0 for w in _WIDTHS.value):
        raise ConfigError(f"--widths={','.join(_WIDTHS.value)} must be positive integers")
    widths = [int(w) for w in _WIDTHS.value]
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    block = _BLOCK.value
    options = dict(steps=_STEPS.value, lr=_LR.value, seed=_SEED.value, block=block)
    results = {name: coord_check.run(name, widths, **options) for name in ("sp", "mup")}
    stem = "coord_check" if block == "gpt3" else f"coord_check_{block}"
    plot_path = out / f"{stem}.png"
    coord_check.plot(results, str(plot_path), block)
    summary = {name: coord_check.spread(r) for name, r in results.items()}
    slopes = {name: coord_check.slopes(r) for name, r in results.items()}
    summary.update(block=block, slope=slopes, plot=str(plot_path))
    atomic.write_json(out / f"{stem}.json", {"summary": summary, "results": results}, indent=1)
    for name in ("sp", "mup"):
        print(
            f"{name:4s} spread across widths: " + ", ".join(f"{k} {v:.2f}×" for k, v in summary[name].items())
        )
        print(
            f"{name:4s} slope of log scale vs log width: "
            + ", ".join(f"{k} {v:+.2f}" for k, v in slopes[name].items())
        )
    print(json.dumps(summary))


def cli():
    """Entry point: one-line errors (experiments.cli), e.g. a width its heads do not divide."""
    cli_lib.run(main, (ConfigError,))


if __name__ == "__main__":
    cli()
