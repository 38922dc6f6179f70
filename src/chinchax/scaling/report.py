"""Analyses of scaling results: the law fit with its plots and report (shared by `experiments.fit` and the sweeps),
one compute law per model block drawn together, the μTransfer learning-rate comparison, and sparse runs against
the law of the dense ones.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

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
    if law_fit is not None and points.sparse is not None:
        paths["size_law"] = plots.size_law(points, law_fit.law, {}, out / "size_law.png")
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
    if sweep.analysis == "sparse":
        return sparse(root, rows, resamples)
    if sweep.analysis == "compute_law_by_block":
        return compute_law_by_block(root, rows, resamples)
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


BLOCK_TAG = "block"  # the results column compute_law_by_block groups the points by


def compute_law_by_block(root: pathlib.Path, rows: list[dict], resamples: int = BOOTSTRAP) -> dict:
    """One compute law L(C) = (C/C_c)^-alpha + E per model block (rows tagged `block`, e.g. gpt3 and llama), each
    fitted and drawn as `fit_and_report` does the compute law (figures in root/fit_<block>/), and every law with
    its bootstrap band and points on one figure (root/compute_laws.png). Writes root/blocks.json:
    {"blocks": {block: its fit report}, "plot": the figure}."""
    untagged = [str(row["point"]) for row in rows if row.get(BLOCK_TAG) in (None, "")]
    if untagged:
        raise SweepError(
            f"the compute_law_by_block analysis needs a {BLOCK_TAG!r} tag; {', '.join(untagged)} lack it"
        )
    blocks = list(dict.fromkeys(str(row[BLOCK_TAG]) for row in rows))
    laws, curves, text = {}, {}, []
    try:
        points = fit_io.load_points(root / "results.csv")  # the rows as gathered, in their order
        for block in blocks:
            member = np.array([str(row[BLOCK_TAG]) == block for row in rows])
            own = _subset(points, member)
            summary = fit_and_report(own, "compute", root / f"fit_{block}", resamples=resamples)
            text += [f"block {block}:", summary.pop("text")]
            laws[block] = {"block": block, **summary}
            law = fit.ComputeLaw(**{k: summary[k] for k in fit_io.CONSTANT_NAMES["compute"]})
            curves[block] = (own, law, summary["bootstrap_samples"])
    except fit_io.FitDataError as error:
        raise SweepError(f"not fitting yet: {error}") from None
    path = plots.compute_laws(
        curves, root / "compute_laws.png", f"Compute law per block: {', '.join(blocks)}"
    )
    summary = {"blocks": laws, "plot": path}
    atomic.write_json(root / "blocks.json", summary, indent=1)
    return {**summary, "text": "\n".join(text + [f"plot: {path}"])}


def _subset(points: fit_io.ScalingPoints, member: np.ndarray) -> fit_io.ScalingPoints:
    """The points where `member` is True (every per-point array cut alike)."""
    arrays = {
        field.name: getattr(points, field.name)[member]
        for field in dataclasses.fields(points)
        if isinstance(getattr(points, field.name), np.ndarray)
    }
    return dataclasses.replace(points, **arrays)


def sparse(root: pathlib.Path, rows: list[dict], resamples: int = BOOTSTRAP) -> dict:
    """Jin et al. (2025)'s test: L(N, D) fitted (approach 3) on the dense runs alone predicts each sparse run's
    loss with N its average non-zero count (N_avg), its final and its initial count; the RMSE of log-loss of each
    choice, each sparse run against its dense twin (tag `twin_of`), and one plot of both kinds on the law.
    Writes root/sparse.json and root/sparse_law.png."""
    is_sparse = np.array([row.get("n_avg") not in (None, "") for row in rows])
    if is_sparse.all() or not is_sparse.any():
        raise SweepError(
            "the sparse analysis needs dense runs (to fit) and sparse runs (with n_avg) to predict"
        )
    dense = [row for row, s in zip(rows, is_sparse, strict=True) if not s]
    law_fit = fit.fit_chinchilla(
        [r["params"] for r in dense],
        [r["tokens"] for r in dense],
        [r["loss"] for r in dense],
        resamples=resamples,
        seed=SEED,
    )
    law = law_fit.law
    runs = [_sparse_prediction(row, dense, law) for row, s in zip(rows, is_sparse, strict=True) if s]
    rmse = {
        k: float(np.sqrt(np.mean([np.log(r[f"predicted_{k}"] / r["loss"]) ** 2 for r in runs])))
        for k in ("n_avg", "n_final", "n_initial")
    }
    path = _plot_sparse(root, rows, is_sparse, runs, law)
    summary = {
        "law": {
            **fit_io.constants(law),
            "ci": {k: list(v) for k, v in law_fit.ci.items()},
            "dense_points": len(dense),
        },
        "rmse_log_loss": rmse,
        "best_size": min(rmse, key=rmse.get),
        "runs": runs,
        "plot": path,
    }
    atomic.write_json(root / "sparse.json", summary, indent=1)
    return {**summary, "text": _sparse_text(law, summary)}


def _sparse_prediction(row: dict, dense: list[dict], law: fit.ChinchillaLaw) -> dict:
    """A sparse run's sizes (N_avg, final and initial parameters), the law's loss at each (nats/token) and its
    dense twin (the dense row tagged `twin_of` it), beside its point, tokens and loss."""
    prunable = (row["params"] - row["n_avg"]) / (1.0 - row["average_density"])
    sizes = {
        "n_avg": row["n_avg"],
        "n_final": row["params"] - (1.0 - row["final_density"]) * prunable,
        "n_initial": row["params"],
    }
    twin = next((r for r in dense if r.get("twin_of") == row["point"]), None)
    return {
        "point": row["point"],
        "tokens": row["tokens"],
        "loss": row["loss"],
        **sizes,
        **{f"predicted_{k}": float(law.loss(n, row["tokens"])) for k, n in sizes.items()},
        "twin": twin and {"point": twin["point"], "params": twin["params"], "loss": twin["loss"]},
    }


def _plot_sparse(
    root: pathlib.Path, rows: list[dict], is_sparse: np.ndarray, runs: list[dict], law: fit.ChinchillaLaw
) -> str:
    """root/sparse_law.png: every run on the law, sparse runs at N_avg, and the sparse runs again at their
    final and initial N (their loss less the law's data term); returns its path."""
    both = fit_io.ScalingPoints(
        source=str(root / "results.csv"),
        flops=np.array([r["flops"] for r in rows], dtype=float),
        loss=np.array([r["loss"] for r in rows], dtype=float),
        params=np.array(
            [r["n_avg"] if s else r["params"] for r, s in zip(rows, is_sparse, strict=True)], dtype=float
        ),
        tokens=np.array([r["tokens"] for r in rows], dtype=float),
        run=None,
        budget=None,
        sparse=is_sparse,
        counting={"params": "total", "flops": "detailed", "size": "avg_params"},
    )
    shifted = {
        f"sparse runs at their {label} N": (
            np.array([r[key] for r in runs]),
            np.array([r["loss"] - law.B * r["tokens"] ** (-law.beta) for r in runs]),
        )
        for key, label in (("n_final", "final"), ("n_initial", "initial"))
    }
    return plots.size_law(both, law, shifted, root / "sparse_law.png")


def _sparse_text(law: fit.ChinchillaLaw, summary: dict) -> str:
    """The sparse analysis for the terminal: the dense law, the RMSE of each size choice, each sparse run's
    loss and prediction at N_avg beside its dense twin's, the plot's path."""
    lines = [
        f"L(N, D) on {summary['law']['dense_points']} dense runs: E {law.E:.4g}, A {law.A:.4g}, B {law.B:.4g}, α {law.alpha:.3f}, β {law.beta:.3f}"
    ]
    lines.append(
        "RMSE of log-loss predicting the sparse runs: "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary["rmse_log_loss"].items())
    )
    for r in summary["runs"]:
        twin = r["twin"]
        twin_text = (
            f"; dense twin {twin['point']} (N {twin['params']:,}) {twin['loss']:.4f}, Δ {r['loss'] - twin['loss']:+.4f}"
            if twin
            else ""
        )
        lines.append(
            f"  {r['point']}: loss {r['loss']:.4f}, N_avg {r['n_avg']:,.0f} → predicted {r['predicted_n_avg']:.4f}{twin_text}"
        )
    return "\n".join(lines + [f"plot: {summary['plot']}"])


def lr_losses(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{parametrization: {width: [{lr, loss, loss_std, seeds}, ...] by ascending lr}} from rows tagged with
    `parametrization`, `width` and `lr` (one row per seed) and their validation `loss`: the mean loss over the
    seeds that ran (nats/token), its sample standard deviation over them (0 for one seed) and their number."""
    runs: dict = {}
    for row in rows:
        by_lr = runs.setdefault(row["parametrization"], {}).setdefault(str(row["width"]), {})
        by_lr.setdefault(row["lr"], []).append(row["loss"])
    return {
        parametrization: {
            width: [
                {
                    "lr": lr,
                    "loss": float(np.mean(losses)),
                    "loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
                    "seeds": len(losses),
                }
                for lr, losses in sorted(by_lr.items())
            ]
            for width, by_lr in sorted(by_width.items(), key=lambda item: int(item[0]))
        }
        for parametrization, by_width in runs.items()
    }


def best_learning_rates(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{parametrization: {width: the learning rate of the lowest mean loss over seeds}} (rows as lr_losses takes
    them). A learning rate with fewer seeds than another at its width (one of its runs diverged) is no candidate."""
    best = {}
    for parametrization, by_width in lr_losses(rows).items():
        best[parametrization] = {}
        for width, entries in by_width.items():
            most = max(entry["seeds"] for entry in entries)
            complete = [entry for entry in entries if entry["seeds"] == most]
            best[parametrization][width] = min(complete, key=lambda entry: entry["loss"])["lr"]
    return best


def mutransfer(sweep: Sweep, root: pathlib.Path, rows: list[dict]) -> dict:
    """Mean loss over seeds vs learning rate per width, SP and μP side by side; the best LR per width per
    parametrization, the number of seeds and each point's mean loss and spread over them (mutransfer.json).

    Rows need tags `parametrization`, `width` and `lr` (and `seed` where a point ran several); diverged points are
    drawn as crosses at the top.
    """
    diverged = [p for p in sweep.points if status(root, p) == "diverged"]
    lost: dict = {}
    for point in diverged:
        lost.setdefault(point.tags["parametrization"], {}).setdefault(str(point.tags["width"]), []).append(
            point.tags["lr"]
        )
    losses = lr_losses(rows)
    best = best_learning_rates(rows)
    seeds = max(e["seeds"] for by_width in losses.values() for entries in by_width.values() for e in entries)
    path = plots.mutransfer(losses, best, lost, root / "mutransfer.png")
    summary = {
        "best_lr": best,
        "seeds": seeds,
        "losses": losses,
        "diverged": [p.name for p in diverged],
        "plot": path,
    }
    atomic.write_json(root / "mutransfer.json", summary, indent=1)
    lines = [f"mean validation loss over {seeds} seed(s) per point"] + [
        f"best learning rate per width ({parametrization}): "
        + ", ".join(f"{w}: {lr:.3g}" for w, lr in best.get(parametrization, {}).items())
        for parametrization in sorted(losses.keys() | lost.keys())
    ]
    return {**summary, "text": "\n".join(lines + [f"plot: {path}"])}
