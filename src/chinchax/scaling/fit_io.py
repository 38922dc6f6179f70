"""Reading (C, L) or (N, D, L) points for the law fits, and reporting the fits as text and JSON.

A results file is CSV (header row) or JSONL (one object per line) with columns `flops` (or `train_flops`) and
`loss`, or `params`, `tokens` and `loss` (then C = 6ND unless a FLOPs column is there too). An optional `run`
column names the training run each point belongs to (approach 1's curves; default: one run per `params`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np

from chinchax.scaling import fit

FLOPS_COLUMNS = ("flops", "train_flops")
MIN_POINTS = {"compute": 4, "chinchilla": 6}  # more points than constants, so the fit is overdetermined


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


def load_points(path: str | pathlib.Path) -> ScalingPoints:
    """Read and validate a CSV or JSONL results file (all numbers finite and > 0)."""
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
    wanted = ["loss"] + ([flops_column] if flops_column else []) + (["params", "tokens"] if has_sizes else [])
    values = {
        name: np.array([_positive(path, line, name, row[name]) for line, row in rows]) for name in wanted
    }
    params, tokens = (values["params"], values["tokens"]) if has_sizes else (None, None)
    run = np.array([str(row["run"]) for _, row in rows]) if "run" in columns else None
    return ScalingPoints(
        source=str(path),
        flops=values[flops_column] if flops_column else 6.0 * params * tokens,
        loss=values["loss"],
        params=params,
        tokens=tokens,
        run=run,
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
    """Fail before fitting when too few points remain for `law` after dropping the highest-loss ones."""
    if law == "chinchilla" and points.params is None:
        raise FitDataError(f"{points.source}: the chinchilla law needs columns 'params' and 'tokens'")
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
    if ci:
        summary["ci"] = {name: list(interval) for name, interval in ci.items()}
    return summary


def report(
    points: ScalingPoints,
    law_name: str,
    law_fit: fit.LawFit,
    approach1: fit.AllocationFit | None,
    approach2: fit.AllocationFit | None,
    plots: dict[str, str],
    seed: int,
    resamples: int,
) -> dict:
    """The JSON summary: constants named as in the formula, their CIs under `ci`, goodness of fit, plot paths."""
    summary = {"law": law_name, **constants(law_fit.law)}
    summary["ci"] = {name: list(interval) for name, interval in law_fit.ci.items()}
    summary["ci_level"] = fit.CI_LEVEL
    summary.update(r2=law_fit.goodness.r2, rmse_log_loss=law_fit.goodness.rmse_log_loss)
    summary.update(
        points=int(law_fit.kept.sum()),
        dropped=int((~law_fit.kept).sum()),
        bootstrap=resamples,
        seed=seed,
        huber_objective=law_fit.objective,
    )
    if law_name == "chinchilla":
        summary["allocation"] = {
            "approach3": allocation_summary(law_fit.law),
            "approach1": allocation_summary(approach1),
            "approach2": allocation_summary(approach2),
        }
    summary["source"] = points.source
    summary["plots"] = plots
    return summary


def format_text(summary: dict) -> str:
    """Human-readable lines: constants with CIs, goodness of fit, the allocation exponents."""
    formula = {
        "compute": "L(C) = (C / C_c)^(-alpha) + E",
        "chinchilla": "L(N, D) = E + A / N^alpha + B / D^beta  (approach 3)",
    }[summary["law"]]
    lines = [
        f"{formula}: {summary['points']} points from {summary['source']} "
        f"({summary['dropped']} highest-loss dropped, {summary['bootstrap']} bootstrap resamples)"
    ]
    names = ("C_c", "alpha", "E") if summary["law"] == "compute" else ("A", "B", "E", "alpha", "beta")
    for name in names:
        interval = summary["ci"].get(name)
        ci = (
            f"   {100 * summary['ci_level']:.0f}% CI [{interval[0]:.5g}, {interval[1]:.5g}]"
            if interval
            else ""
        )
        lines.append(f"  {name:<6}= {summary[name]:.5g}{ci}")
    lines.append(f"  R² (log-loss) = {summary['r2']:.5f}   RMSE of log-loss = {summary['rmse_log_loss']:.5f}")
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
    for name, path in summary["plots"].items():
        lines.append(f"  plot {name}: {path}")
    return "\n".join(lines)
