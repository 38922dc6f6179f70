"""Reading (C, L) or (N, D, L) points for the law fits, and reporting the fits as text and JSON.

A results file is CSV (header row) or JSONL (one object per line) with columns `flops` (or `train_flops`) and
`loss`, or `params`, `tokens` and `loss` (then C = 6ND unless a FLOPs column is there too). An optional `run`
column names the training run each point belongs to (approach 1's curves; default: one run per `params`), an
optional `budget` column the isoFLOP budget it was planned for (approach 2's groups; default: points within 10%
in C).

Counting conventions (Porian et al. 2024 trace much of the Kaplan/Chinchilla disagreement to them): N is
`total` (with the embeddings, Cerebras-GPT's and Chinchilla's count) or `non_embedding` (Kaplan's; needs a
`non_embedding_params` column), C is `detailed` (the file's FLOPs column: attention and logits included, as
chinchax.model.flops counts) or `6nd` (6·N·D with the chosen N). The default is Cerebras-GPT's: total N and the
detailed C (6ND where the file has no FLOPs column); every report names the convention it used.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np

from chinchax.scaling import fit

FLOPS_COLUMNS = ("flops", "train_flops")
LAWS = ("compute", "chinchilla", "envelope", "isoflop")
MIN_POINTS = {
    "compute": 4,
    "chinchilla": 6,
    "envelope": 6,
    "isoflop": 6,
}  # parametric: more points than constants
PARAM_COUNTS = ("total", "non_embedding")
FLOP_COUNTS = ("detailed", "6nd")
SIZES = ("params", "avg_params")  # N as the parameter count, or a sparse run's average non-zero count


class FitDataError(ValueError):
    """A results file that cannot be fitted; the message says what and where, in one line."""


@dataclasses.dataclass(frozen=True)
class ScalingPoints:
    """Points of a results file; params/tokens/run are None when the file has no such column."""

    source: str
    flops: np.ndarray
    loss: np.ndarray
    params: np.ndarray | None
    tokens: np.ndarray | None
    run: np.ndarray | None
    budget: np.ndarray | None
    sparse: np.ndarray | None  # with size="avg_params": True for the rows N_avg came from (sparse runs)
    counting: dict  # {"params": total | non_embedding (None: no sizes), "flops": detailed | 6nd, "size"}


def load_points(
    path: str | pathlib.Path, params: str | None = None, flops: str | None = None, size: str = "params"
) -> ScalingPoints:
    """Read and validate a CSV or JSONL results file (all numbers finite and > 0) under a counting convention:
    `params` in PARAM_COUNTS, `flops` in FLOP_COUNTS (None: the Cerebras-GPT convention where the file allows).

    `size="avg_params"` takes N as a sparse run's average non-zero parameter count (its `n_avg`: Jin et al. 2025)
    and the parameter count of the rows without one (dense runs)."""
    if params not in (None, *PARAM_COUNTS) or flops not in (None, *FLOP_COUNTS) or size not in SIZES:
        raise FitDataError(
            f"counting must be params in {PARAM_COUNTS}, flops in {FLOP_COUNTS} and size in {SIZES}, "
            f"got {params!r}, {flops!r}, {size!r}"
        )
    path = pathlib.Path(path)
    if not path.is_file():
        raise FitDataError(f"{path}: no such file")
    rows = _read_rows(path)
    if not rows:
        raise FitDataError(f"{path}: no data rows")
    columns = set.intersection(*(set(row) for _, row in rows))
    flops_column = next((c for c in FLOPS_COLUMNS if c in columns), None)
    has_sizes = {"params", "tokens"} <= columns
    if "loss" not in columns or not (flops_column or has_sizes):
        found = ", ".join(sorted(set.union(*(set(row) for _, row in rows))))
        raise FitDataError(
            f"{path}: needs columns 'loss' and 'flops' (or 'train_flops'), or 'params', 'tokens' and 'loss'; "
            f"every row has only: {', '.join(sorted(columns)) or 'nothing'} (seen: {found})"
        )
    params_column = "params" if params in (None, "total") else "non_embedding_params"
    flops = flops or ("detailed" if flops_column else "6nd")
    if has_sizes and params_column not in columns:
        raise FitDataError(f"{path}: --params={params} needs a '{params_column}' column in every row")
    if flops == "detailed" and not flops_column:
        raise FitDataError(
            f"{path}: --flops=detailed needs a 'flops' or 'train_flops' column; use --flops=6nd"
        )
    if flops == "6nd" and not has_sizes:
        raise FitDataError(f"{path}: --flops=6nd needs columns 'params' and 'tokens'")
    wanted = (
        ["loss"] + ([flops_column] if flops_column else []) + ([params_column, "tokens"] if has_sizes else [])
    )
    values = {
        name: np.array([_positive(path, line, name, row[name]) for line, row in rows]) for name in wanted
    }
    n, tokens = (values[params_column], values["tokens"]) if has_sizes else (None, None)
    sparse = None
    if size == "avg_params":
        if (
            not has_sizes
            or params_column != "params"
            or not any(row.get("n_avg") not in (None, "") for _, row in rows)
        ):
            raise FitDataError(
                f"{path}: --size=avg_params needs 'params', 'tokens' and an 'n_avg' column (sparse runs)"
            )
        sparse = np.array([row.get("n_avg") not in (None, "") for _, row in rows])
        n = np.array(
            [
                _positive(path, line, "n_avg", row["n_avg"]) if is_sparse else dense
                for (line, row), dense, is_sparse in zip(rows, n, sparse, strict=True)
            ]
        )
    return ScalingPoints(
        source=str(path),
        flops=values[flops_column] if flops == "detailed" else 6.0 * n * tokens,
        loss=values["loss"],
        params=n,
        tokens=tokens,
        run=np.array([str(row["run"]) for _, row in rows]) if "run" in columns else None,
        budget=np.array([str(row["budget"]) for _, row in rows]) if "budget" in columns else None,
        sparse=sparse,
        counting={"params": (params or "total") if has_sizes else None, "flops": flops, "size": size},
    )


def _read_rows(path: pathlib.Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs; JSONL for .jsonl/.json, CSV otherwise."""
    text = path.read_text()
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for line, content in enumerate(text.splitlines(), start=1):
            if content.strip():
                try:
                    row = json.loads(content)
                except json.JSONDecodeError as error:
                    raise FitDataError(f"{path}:{line}: not a JSON object ({error.msg})") from None
                if not isinstance(row, dict):
                    raise FitDataError(f"{path}:{line}: not a JSON object")
                rows.append((line, row))
        return rows
    reader = csv.DictReader(text.splitlines())
    return [(line, row) for line, row in enumerate(reader, start=2) if any(v for v in row.values() if v)]


def _positive(path, line, name, raw) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise FitDataError(f"{path}:{line}: {name} is not a number: {raw!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise FitDataError(f"{path}:{line}: {name} must be finite and positive, got {raw!r}")
    return value


def require_points(points: ScalingPoints, law: str, drop_highest: int) -> None:
    """Fail before fitting when the file cannot give `law`: missing columns, or too few points, runs or budgets
    after dropping the highest-loss points."""
    if law != "compute" and points.params is None:
        raise FitDataError(f"{points.source}: the {law} law needs columns 'params' and 'tokens'")
    if law == "envelope":
        run = points.run if points.run is not None else points.params.astype(str)
        curves = sum((run == r).sum() >= 2 for r in np.unique(run))
        if curves < 3:
            raise FitDataError(
                f"{points.source}: the envelope (approach 1) needs training curves: a 'run' column with at least "
                f"3 runs of 2 or more points each, found {curves}"
            )
    if law == "isoflop":
        budgets = points.budget if points.budget is not None else fit.isoflop_budgets(points.flops)
        usable = sum(len(np.unique(points.params[budgets == b])) >= 3 for b in np.unique(budgets))
        if usable < 2:
            raise FitDataError(
                f"{points.source}: approach 2 needs at least 2 isoFLOP budgets of 3 or more sizes, found {usable}"
            )
    if drop_highest < 0:
        raise FitDataError(f"--drop_highest must be >= 0, got {drop_highest}")
    remaining = len(points.loss) - drop_highest
    if remaining < MIN_POINTS[law]:
        raise FitDataError(
            f"{points.source}: {remaining} points after dropping {drop_highest}; "
            f"the {law} law needs at least {MIN_POINTS[law]}"
        )


def constants(law) -> dict[str, float]:
    """The law's constants named as in its formula."""
    return {name: float(value) for name, value in dataclasses.asdict(law).items()}


def allocation_summary(allocation: fit.AllocationFit | fit.ChinchillaLaw | None) -> dict | None:
    """N_opt = k_N·C^a and D_opt = k_D·C^b as {k_N, a, k_D, b} (plus CIs of a and b when bootstrapped)."""
    if allocation is None:
        return None
    if isinstance(allocation, fit.ChinchillaLaw):
        params, tokens, ci = allocation.optimal_params(), allocation.optimal_tokens(), {}
    else:
        params, tokens, ci = allocation.params, allocation.tokens, allocation.ci
    summary = {
        "k_N": params.coefficient,
        "a": params.exponent,
        "k_D": tokens.coefficient,
        "b": tokens.exponent,
    }
    exponent_ci = {name: list(ci[name]) for name in ("a", "b") if name in ci}
    if exponent_ci:
        summary["ci"] = exponent_ci
    return summary


def power_law_summary(power_law: fit.PurePowerLaw, law_name: str) -> dict:
    """The pure power law as {form, k, exponents by covariate, r2, rmse_log_loss}."""
    names = ("a",) if law_name == "compute" else ("a", "b")
    form = "L = k·C^(-a)" if law_name == "compute" else "L = k·N^(-a)·D^(-b)"
    return {
        "form": form,
        "k": power_law.k,
        **dict(zip(names, power_law.exponents, strict=True)),
        "r2": power_law.goodness.r2,
        "rmse_log_loss": power_law.goodness.rmse_log_loss,
    }


def report(
    points: ScalingPoints,
    law_name: str,
    law_fit: fit.LawFit | None,
    approach1: fit.AllocationFit | None,
    approach2: fit.AllocationFit | None,
    plots: dict[str, str],
    seed: int,
    resamples: int,
) -> dict:
    """The JSON summary: the law's constants named as in its formula with their CIs under `ci`, its objective,
    goodness of fit and identifiability (parametric laws), the allocations, the counting convention, plot paths."""
    summary: dict = {"law": law_name, "counting": points.counting}
    if law_fit is not None:
        summary.update(constants(law_fit.law))
        summary["ci"] = {name: list(interval) for name, interval in law_fit.ci.items()}
        summary["ci_level"] = fit.CI_LEVEL
        summary.update(r2=law_fit.goodness.r2, rmse_log_loss=law_fit.goodness.rmse_log_loss)
        summary.update(points=int(law_fit.kept.sum()), dropped=int((~law_fit.kept).sum()))
        summary["objective"] = {**law_fit.objective.describe(), "value": law_fit.objective_value}
        summary["identifiability"] = law_fit.identifiability
        summary["power_law"] = power_law_summary(law_fit.power_law, law_name)
        # the refits themselves: a prediction's joint interval (e.g. experiments.plan --law) needs them
        summary["bootstrap_samples"] = {
            k: [float(x) for x in v] for k, v in law_fit.bootstrap_samples.items()
        }
    else:
        summary.update(points=len(points.loss), dropped=0, ci_level=fit.CI_LEVEL)
        first = "loss per budget (parabola)" if law_name == "isoflop" else "least loss per C over the curves"
        summary["objective"] = {"name": "lsq", "space": f"{first}, then log-log (power law)"}
    summary.update(bootstrap=resamples, seed=seed)
    if law_name == "chinchilla":
        summary["allocation"] = {
            "approach3": allocation_summary(law_fit.law),
            "approach1": allocation_summary(approach1),
            "approach2": allocation_summary(approach2),
        }
    elif law_name == "envelope":
        summary["allocation"] = {"approach1": allocation_summary(approach1)}
    elif law_name == "isoflop":
        summary["allocation"] = {"approach2": allocation_summary(approach2)}
    if approach2 is not None:
        summary["optimum_per_budget"] = [
            {
                "flops": float(c),
                "params": float(n),
                "tokens": float(d),
                "tokens_per_param": float(d / n),
                "tokens_per_param_ci": list(approach2.ci.get(fit.tokens_per_param_key(c), ())) or None,
            }
            for c, n, d in zip(
                approach2.flops, approach2.optimal_params, approach2.optimal_tokens, strict=True
            )
        ]
    summary["source"] = points.source
    summary["plots"] = plots
    return summary


def printable(summary: dict) -> dict:
    """The summary without the bootstrap refits (kept in fit.json, too long for the one JSON line on stdout)."""
    return {
        k: printable(v) if isinstance(v, dict) else v for k, v in summary.items() if k != "bootstrap_samples"
    }


# The constants of each parametric law, named (and ordered) as its dataclass's fields.
CONSTANT_NAMES = {
    law: tuple(field.name for field in dataclasses.fields(cls))
    for law, cls in (("compute", fit.ComputeLaw), ("chinchilla", fit.ChinchillaLaw))
}
FORMULAS = {
    "compute": "L(C) = (C / C_c)^(-alpha) + E",
    "chinchilla": "L(N, D) = E + A / N^alpha + B / D^beta  (approach 3)",
    "envelope": "approach 1: the least loss per C over training curves → N_opt(C), D_opt(C)",
    "isoflop": "approach 2: a parabola of loss vs log N per isoFLOP budget → N_opt(C), D_opt(C)",
}


def format_text(summary: dict) -> str:
    """Human-readable lines: constants with CIs, objective, goodness of fit, identifiability, allocations."""
    counting = summary["counting"]
    lines = [
        f"{FORMULAS[summary['law']]}: {summary['points']} points from {summary['source']} "
        f"({summary['dropped']} highest-loss dropped, {summary['bootstrap']} bootstrap resamples; "
        f"N {counting['params'] or 'not given'}{' average non-zero' * (counting.get('size') == 'avg_params')}, "
        f"C {counting['flops']})"
    ]
    names = CONSTANT_NAMES.get(summary["law"], ())
    for name in names:
        interval = summary["ci"].get(name)
        ci = (
            f"   {100 * summary['ci_level']:.0f}% CI [{interval[0]:.5g}, {interval[1]:.5g}]"
            if interval
            else ""
        )
        lines.append(f"  {name:<6}= {summary[name]:.5g}{ci}")
    if names:
        objective = summary["objective"]
        delta = f" δ={objective['delta']:g}" if objective.get("delta") else ""
        lines.append(f"  objective: {objective['name']}{delta} on {objective['space']}")
        lines.append(
            f"  R² (log-loss) = {summary['r2']:.5f}   RMSE of log-loss = {summary['rmse_log_loss']:.5f}"
        )
        for warning in summary["identifiability"]:
            lines.append(f"  ! {warning}")
        if summary["identifiability"]:
            power = summary["power_law"]
            exponents = ", ".join(f"{k} = {power[k]:.4f}" for k in ("a", "b") if k in power)
            lines.append(
                f"  pure power law {power['form']}: k = {power['k']:.4g}, {exponents}, R² {power['r2']:.5f}"
            )
    for approach, allocation in summary.get("allocation", {}).items():
        if allocation is None:
            lines.append(f"  {approach}: not applicable to these points")
            continue
        ci = allocation.get("ci", {})
        ci_text = "".join(
            f"  {name} CI [{ci[name][0]:.3f}, {ci[name][1]:.3f}]" for name in ("a", "b") if name in ci
        )
        lines.append(
            f"  {approach}: N_opt = {allocation['k_N']:.4g}·C^{allocation['a']:.4f}, "
            f"D_opt = {allocation['k_D']:.4g}·C^{allocation['b']:.4f}{ci_text}"
        )
    for budget in summary.get("optimum_per_budget", []):
        ci = budget["tokens_per_param_ci"]
        ci_text = f" (CI {ci[0]:.1f}–{ci[1]:.1f})" if ci else ""
        lines.append(
            f"  C = {budget['flops']:.3g}: N_opt = {budget['params']:.4g}, D_opt = {budget['tokens']:.4g}, "
            f"{budget['tokens_per_param']:.1f} tokens/param{ci_text}"
        )
    for name, path in summary["plots"].items():
        lines.append(f"  plot {name}: {path}")
    return "\n".join(lines)
