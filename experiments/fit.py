"""Fit a scaling law to results: `python -m experiments.fit --results=FILE [--law=compute|chinchilla|envelope|isoflop]
[--objective=lsq|huber] [--delta=D] [--params=total|non_embedding] [--flops=detailed|6nd]
[--size=params|avg_params] [--out=DIR] [--drop_highest=K] [--bootstrap=N] [--seed=S]`.

FILE is CSV or JSONL with columns `flops` (or `train_flops`) and `loss`, or `params`, `tokens` and `loss`
(optional: `non_embedding_params`, `run` for approach 1's training curves, `budget` for approach 2's groups).
Laws: `compute` L(C) = (C/C_c)^-alpha + E (Cerebras-GPT Eq. 1; default objective lsq on the loss, as the paper);
`chinchilla` approach 3, L(N, D) = E + A/N^alpha + B/D^beta (default Huber δ=1e-3 on log-loss, as Hoffmann et
al. and Besiroglu et al.), with approaches 1 and 2 beside it; `envelope` approach 1 (the least loss per C over
training curves → N_opt ∝ C^a, D_opt ∝ C^b); `isoflop` approach 2 (a parabola in log N per budget → the same).
Prints the constants with bootstrap CIs, the objective, the counting convention and one line per constant the
data cannot identify (with the pure power law beside), writes PNG plots and fit.json (the summary with its
bootstrap refits: what `experiments.plan --law` reads) into --out, and prints last on stdout one JSON object
(constants named as in the formula, `ci`, `objective`, `counting`, `identifiability`, `plots`, `fit_json`).
"""

import json
import pathlib

import numpy as np
from absl import flags

from chinchax import atomic
from chinchax.scaling import fit, fit_io, report
from experiments import cli as cli_lib

_RESULTS = flags.DEFINE_string("results", None, "CSV or JSONL results file.", required=True)
_LAW = flags.DEFINE_enum(
    "law",
    None,
    list(fit_io.LAWS),
    "Law to fit (default: chinchilla when params and tokens are given, else compute).",
)
_OBJECTIVE = flags.DEFINE_enum(
    "objective",
    None,
    list(fit.OBJECTIVES),
    "What the parametric fit minimises: lsq (squared loss residuals) or huber (on log-loss residuals). "
    "Default: the source's procedure, lsq for compute (Cerebras-GPT), huber for chinchilla (Hoffmann et al.).",
)
_DELTA = flags.DEFINE_float(
    "delta", fit.HUBER_DELTA, "Huber δ on log-loss residuals (huber only).", lower_bound=0
)
_PARAMS = flags.DEFINE_enum(
    "params", None, list(fit_io.PARAM_COUNTS), "N with (total, default) or without the embeddings."
)
_FLOPS = flags.DEFINE_enum(
    "flops",
    None,
    list(fit_io.FLOP_COUNTS),
    "C as the file's detailed count (default when it has one) or 6·N·D with the chosen N.",
)
_SIZE = flags.DEFINE_enum(
    "size",
    "params",
    list(fit_io.SIZES),
    "N as the parameter count, or avg_params: a sparse run's average non-zero count (its n_avg column).",
)
_OUT = flags.DEFINE_string("out", None, "Folder for the PNG plots (default: <results stem>_fit/ here).")
_DROP_HIGHEST = flags.DEFINE_integer("drop_highest", 0, "Leave out the K highest-loss points.")
_BOOTSTRAP = flags.DEFINE_integer(
    "bootstrap", 200, "Bootstrap resamples for the CIs (0: none).", lower_bound=0
)
_SEED = flags.DEFINE_integer("seed", None, "Bootstrap seed (default: fresh, reported in the JSON).")


def main(argv):
    del argv
    points = fit_io.load_points(_RESULTS.value, _PARAMS.value, _FLOPS.value, _SIZE.value)
    law = _LAW.value or ("chinchilla" if points.params is not None else "compute")
    if _OBJECTIVE.value is not None and law not in fit.DEFAULT_OBJECTIVES:
        raise fit_io.FitDataError(
            f"--objective applies to the parametric laws (compute, chinchilla), not {law}"
        )
    objective = None
    if _OBJECTIVE.value is not None:
        objective = fit.Objective(_OBJECTIVE.value, _DELTA.value if _OBJECTIVE.value == "huber" else None)
    seed = _SEED.value if _SEED.value is not None else int(np.random.SeedSequence().entropy % 2**32)
    out = pathlib.Path(_OUT.value or f"{pathlib.Path(points.source).stem}_fit")
    summary = report.fit_and_report(points, law, out, _DROP_HIGHEST.value, _BOOTSTRAP.value, seed, objective)
    text = summary.pop("text")
    summary["fit_json"] = str(out / "fit.json")
    atomic.write_json(out / "fit.json", summary, indent=1)
    print(text + f"\n  fit (with its bootstrap refits): {summary['fit_json']}")
    print(json.dumps(fit_io.printable(summary)))


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (fit_io.FitDataError,))


if __name__ == "__main__":
    cli()
