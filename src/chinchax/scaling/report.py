"""Analyses of scaling results: the law fit with its plots and report (shared by `experiments.fit` and the sweeps),
and the μTransfer learning-rate comparison.
"""

from __future__ import annotations

import pathlib

from chinchax import atomic
from chinchax.scaling import fit, fit_io, plots
from chinchax.scaling.sweep import Sweep, SweepError, status

BOOTSTRAP = 200
SEED = 0


def fit_and_report(
    points: fit_io.ScalingPoints,
    law: str,
    out: pathlib.Path,
    drop_highest: int = 0,
    resamples: int = BOOTSTRAP,
    seed: int = SEED,
    objective: fit.Objective | None = None,
) -> dict:
    """Fit `law` (one of fit_io.LAWS; approach 3 with approaches 1 and 2 beside it for 'chinchilla') to the
    points under `objective` (default: the law's source's), draw its figures into `out`, and return the report
    (fit_io.report, plus 'text' for the terminal)."""
    fit_io.require_points(points, law, drop_highest)
    objective = objective or fit.DEFAULT_OBJECTIVES.get(law)
    options = dict(drop_highest=drop_highest, resamples=resamples, seed=seed)
    law_fit = approach1 = approach2 = None
    kept = fit.keep_mask(points.loss, drop_highest)
    run = points.run if points.run is not None else points.params
    if law in ("chinchilla", "envelope"):
        approach1 = fit.approach1_envelope(
            run[kept],
            points.params[kept],
            points.flops[kept],
            points.loss[kept],
            points.tokens[kept],
            resamples=resamples,
            seed=seed,
        )
    if law in ("chinchilla", "isoflop"):
        budget = points.budget[kept] if points.budget is not None else None
        approach2 = fit.approach2_isoflop(
            points.params[kept],
            points.flops[kept],
            points.loss[kept],
            points.tokens[kept],
            budget,
            resamples=resamples,
            seed=seed,
        )
    if law == "compute":
        law_fit = fit.fit_compute_law(points.flops, points.loss, objective=objective, **options)
        paths = {"compute_law_ci": plots.compute_law_band(points, law_fit, out / "compute_law_ci.png")}
    elif law == "chinchilla":
        law_fit = fit.fit_chinchilla(
            points.params, points.tokens, points.loss, objective=objective, **options
        )
    elif law == "envelope" and approach1 is None:
        raise fit_io.FitDataError(f"{points.source}: the envelope has fewer than 3 distinct winning runs")
    elif law == "isoflop" and approach2 is None:
        raise fit_io.FitDataError(
            f"{points.source}: fewer than 2 budgets have a parabola with its minimum inside the sizes tried"
        )
    if law != "compute":
        approach3 = law_fit.law if law_fit is not None else None
        paths = {
            "allocation": plots.allocation(
                approach3, approach1, approach2, points.flops, out / "allocation.png"
            )
        }
        if law != "envelope":
            paths["isoflops"] = plots.isoflops(points, approach3, approach2, out / "isoflops.png")
        if approach1 is not None:
            paths["envelope"] = plots.envelope(points, run, approach1, out / "envelope.png")
    if law_fit is not None:
        paths["loss_vs_flops"] = plots.loss_vs_flops(points, law_fit, out / "loss_vs_flops.png")
        paths["residuals"] = plots.residuals(points, law_fit, out / "residuals.png")
    summary = fit_io.report(points, law, law_fit, approach1, approach2, paths, seed, resamples)
    return {**summary, "text": fit_io.format_text(summary)}


def analyse(sweep: Sweep, root: pathlib.Path, rows: list[dict], resamples: int = BOOTSTRAP) -> dict | None:
    """Run the sweep's analysis on the gathered rows; writes root/fit.json (or mutransfer.json) and plots."""
    if sweep.analysis is None or not rows:
        return None
    unvalidated = [str(row["point"]) for row in rows if row["loss"] is None]
    if unvalidated:
        raise SweepError(
            f"the {sweep.analysis} analysis needs a validation loss; {', '.join(unvalidated)} did not evaluate "
            "validation (their train.final_eval leaves it out)"
        )
    if sweep.analysis == "mutransfer":
        return mutransfer(sweep, root, rows)
    law = "compute" if sweep.analysis == "compute_law" else "isoflop"
    try:
        points = fit_io.load_points(root / "results.csv")
        summary = fit_and_report(points, law, root / "fit", resamples=resamples)
        if law == "isoflop":
            # The optimum under the other common count too: N without embeddings, C = 6ND (Kaplan et al.).
            kaplan = fit_io.load_points(root / "results.csv", "non_embedding", "6nd")
            other = fit_and_report(kaplan, law, root / "fit_non_embedding_6nd", resamples=resamples)
            summary["text"] += "\n" + other.pop("text")
            summary["other_counting"] = other
    except fit_io.FitDataError as error:
        raise SweepError(f"not fitting yet: {error}") from None
    atomic.write_json(root / "fit.json", {k: v for k, v in summary.items() if k != "text"}, indent=1)
    return summary


def best_learning_rates(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{parametrization: {width: the learning rate of the lowest loss}} from rows tagged with
    `parametrization`, `width`, `lr` and their `loss`."""
    best: dict[str, dict[str, tuple[float, float]]] = {}
    for row in rows:
        key = str(row["width"])
        current = best.setdefault(row["parametrization"], {}).get(key)
        if current is None or row["loss"] < current[1]:
            best[row["parametrization"]][key] = (row["lr"], row["loss"])
    return {
        p: {w: lr for w, (lr, _) in sorted(by_width.items(), key=lambda item: int(item[0]))}
        for p, by_width in best.items()
    }


def mutransfer(sweep: Sweep, root: pathlib.Path, rows: list[dict]) -> dict:
    """Loss vs learning rate per width, SP and μP side by side; the best LR per width per parametrization.

    Rows need tags `parametrization`, `width` and `lr`; diverged points are drawn as crosses at the top.
    """
    diverged = [p for p in sweep.points if status(root, p) == "diverged"]
    curves: dict = {}
    for row in rows:
        curves.setdefault(row["parametrization"], {}).setdefault(row["width"], []).append(
            (row["lr"], row["loss"])
        )
    lost: dict = {}
    for point in diverged:
        lost.setdefault(point.tags["parametrization"], {}).setdefault(point.tags["width"], []).append(
            point.tags["lr"]
        )
    best = best_learning_rates(rows)
    path = plots.mutransfer(curves, lost, root / "mutransfer.png")
    summary = {"best_lr": best, "diverged": [p.name for p in diverged], "plot": path}
    atomic.write_json(root / "mutransfer.json", summary, indent=1)
    lines = [
        f"best learning rate per width ({parametrization}): "
        + ", ".join(f"{w}: {lr:.3g}" for w, lr in best.get(parametrization, {}).items())
        for parametrization in sorted(curves.keys() | lost.keys())
    ]
    return {**summary, "text": "\n".join(lines + [f"plot: {path}"])}
