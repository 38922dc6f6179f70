"""Fit a scaling law to results: `python -m experiments.fit --results=FILE [--law=compute|chinchilla] [--out=DIR]
[--drop_highest=K] [--bootstrap=N] [--seed=S]`.

FILE is CSV or JSONL with columns `flops` (or `train_flops`) and `loss`, or `params`, `tokens` and `loss`.
Prints the constants with bootstrap CIs and the goodness of fit, writes PNG plots into --out, and prints last
on stdout one JSON object (constants named as in the formula, `ci`, `r2`, `rmse_log_loss`, `plots`).
"""

import json
import pathlib

import numpy as np
from absl import flags

from chinchax.scaling import fit_io, report
from experiments import cli as cli_lib

_RESULTS = flags.DEFINE_string("results", None, "CSV or JSONL results file.", required=True)
_LAW = flags.DEFINE_enum(
    "law",
    None,
    ["compute", "chinchilla"],
    "Law to fit (default: chinchilla when params and tokens are given).",
)
_OUT = flags.DEFINE_string("out", None, "Folder for the PNG plots (default: <results stem>_fit/ here).")
_DROP_HIGHEST = flags.DEFINE_integer("drop_highest", 0, "Leave out the K highest-loss points.")
_BOOTSTRAP = flags.DEFINE_integer(
    "bootstrap", 200, "Bootstrap resamples for the CIs (0: none).", lower_bound=0
)
_SEED = flags.DEFINE_integer("seed", None, "Bootstrap seed (default: fresh, reported in the JSON).")


def main(argv):
    del argv
    points = fit_io.load_points(_RESULTS.value)
    law = _LAW.value or ("chinchilla" if points.params is not None else "compute")
    seed = _SEED.value if _SEED.value is not None else int(np.random.SeedSequence().entropy % 2**32)
    out = pathlib.Path(_OUT.value or f"{pathlib.Path(points.source).stem}_fit")
    summary = report.fit_and_report(points, law, out, _DROP_HIGHEST.value, _BOOTSTRAP.value, seed)
    print(summary.pop("text"))
    print(json.dumps(summary))


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (fit_io.FitDataError,))


if __name__ == "__main__":
    cli()
