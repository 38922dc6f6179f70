"""Sweeps: what a sweep is, where its points' files live, and gathering and analysing their results.

A sweep is a list of planned points (chinchax.scaling.plan.Point) and the analysis that follows them. Under a
root folder each point trains in `runs/<point>/` (experiments.run's workdir: a killed point resumes from its
checkpoint by rerunning the same command) with its output in `logs/<point>.log`; a point whose workdir holds
summary.json is done and skipped. chinchax.scaling.launch trains the pending points (local subprocesses, Ray
tasks on a local or existing cluster, a SLURM array job, printed commands). `results.csv` / `results.jsonl`
gather every done point's tags and summary, and the analysis (compute-law fit, isoFLOP fit, μTransfer figure)
writes its JSON and plots into the root.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chinchax import atomic  # noqa: E402
from chinchax.scaling import fit, fit_io, plots  # noqa: E402
from chinchax.scaling.plan import Point  # noqa: E402

ANALYSES = ("compute_law", "isoflop", "mutransfer")
BOOTSTRAP = 200
SEED = 0
SUMMARY_COLUMNS = (
    "final_train_loss",
    "final_eval_loss",
    "params",
    "non_embedding_params",
    "tokens",
    "train_flops",
    "flops_per_token",
    "wall_seconds",
    "tokens_per_second",
    "mfu",
)


class SweepError(ValueError):
    """A sweep that cannot be run or analysed as asked; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Points to train and the analysis of their results (one of ANALYSES, or None)."""

    name: str
    description: str
    points: tuple[Point, ...]
    analysis: str | None = None

    def __post_init__(self):
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise SweepError(f"sweep {self.name!r}: point names repeat")
        if self.analysis not in (None, *ANALYSES):
            raise SweepError(f"sweep {self.name!r}: analysis {self.analysis!r} is not one of {ANALYSES}")


def workdir(root: pathlib.Path, point: Point) -> pathlib.Path:
    return root / "runs" / point.name


def log_path(root: pathlib.Path, point: Point) -> pathlib.Path:
    return root / "logs" / f"{point.name}.log"


def diverged_path(root: pathlib.Path, point: Point) -> pathlib.Path:
    return root / "diverged" / f"{point.name}.json"


def status(root: pathlib.Path, point: Point) -> str:
    """'done' (summary.json written), 'diverged' (recorded, not retried) or 'pending'."""
    if (workdir(root, point) / "summary.json").is_file():
        return "done"
    return "diverged" if diverged_path(root, point).is_file() else "pending"


def write_manifest(sweep: Sweep, root: pathlib.Path) -> None:
    """root/sweep.json: the sweep's points with their experiments.run arguments and tags."""
    points = [
        {"name": p.name, "args": p.run_args(), "tags": dict(p.tags), "workdir": str(workdir(root, p))}
        for p in sweep.points
    ]
    manifest = {"sweep": sweep.name, "description": sweep.description, "analysis": sweep.analysis}
    atomic.write_text(root / "sweep.json", json.dumps({**manifest, "points": points}, indent=1) + "\n")


def gather(sweep: Sweep, root: pathlib.Path) -> list[dict]:
    """One row per done point (sweep order): point name, tags, summary.json fields, and `flops` / `loss` columns
    (train FLOPs, validation loss) for the fits. Written atomically to root/results.{csv,jsonl}."""
    rows = []
    for point in sweep.points:
        path = workdir(root, point) / "summary.json"
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SweepError(f"{path}: not JSON ({error.msg})") from None
        missing = [c for c in SUMMARY_COLUMNS if c not in summary]
        if missing:
            raise SweepError(f"{path}: summary lacks {', '.join(missing)}")
        row = {"point": point.name, **point.tags, **{c: summary[c] for c in SUMMARY_COLUMNS}}
        row.update(flops=summary["train_flops"], loss=summary["final_eval_loss"])
        rows.append(row)
    atomic.write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(root / "results.csv", text.getvalue())
    return rows


def analyse(sweep: Sweep, root: pathlib.Path, rows: list[dict], resamples: int = BOOTSTRAP) -> dict | None:
    """Run the sweep's analysis on the gathered rows; writes root/fit.json (or mutransfer.json) and plots."""
    if sweep.analysis is None or not rows:
        return None
    if sweep.analysis == "mutransfer":
        return mutransfer(sweep, root, rows)
    points = fit_io.load_points(root / "results.csv")
    law = "compute" if sweep.analysis == "compute_law" else "chinchilla"
    try:
        fit_io.require_points(points, law, 0)
    except fit_io.FitDataError as error:
        raise SweepError(f"not fitting yet: {error}") from None
    out = root / "fit"
    approach1 = approach2 = None
    if law == "compute":
        law_fit = fit.fit_compute_law(points.flops, points.loss, resamples=resamples, seed=SEED)
        paths = {"compute_law_ci": compute_law_band(points, law_fit, out / "compute_law_ci.png")}
    else:
        law_fit = fit.fit_chinchilla(
            points.params, points.tokens, points.loss, resamples=resamples, seed=SEED
        )
        approach2 = fit.approach2_isoflop(
            points.params, points.flops, points.loss, resamples=resamples, seed=SEED
        )
        paths = {
            "isoflops": plots.isoflops(points, law_fit.law, approach2, out / "isoflops.png"),
            "allocation": plots.allocation(
                law_fit.law, None, approach2, points.flops, out / "allocation.png"
            ),
        }
    paths["loss_vs_flops"] = plots.loss_vs_flops(points, law_fit, out / "loss_vs_flops.png")
    paths["residuals"] = plots.residuals(points, law_fit, out / "residuals.png")
    summary = fit_io.report(points, law, law_fit, approach1, approach2, paths, SEED, resamples)
    atomic.write_text(root / "fit.json", json.dumps(summary, indent=1) + "\n")
    summary["text"] = fit_io.format_text(summary)
    return summary


def compute_law_band(points: fit_io.ScalingPoints, law_fit: fit.LawFit, path: pathlib.Path) -> str:
    """The points, the fitted L(C) and its bootstrap 95% band (pointwise percentiles of the refitted curves)."""
    figure, axes = plt.subplots(figsize=(7, 5))
    flops = np.logspace(np.log10(points.flops.min()) - 0.3, np.log10(points.flops.max()) + 0.3, 200)
    samples = law_fit.bootstrap_samples
    law = law_fit.law
    if samples:
        curves = np.array(
            [
                fit.ComputeLaw(c, a, e).loss(flops)
                for c, a, e in zip(samples["C_c"], samples["alpha"], samples["E"], strict=True)
            ]
        )
        curves = curves[np.isfinite(curves).all(axis=1)]
        low, high = np.percentile(curves, [2.5, 97.5], axis=0)
        axes.fill_between(flops, low, high, color="tab:red", alpha=0.2, label="95% bootstrap band")
    alpha_ci = law_fit.ci.get("alpha")
    ci_text = f" (95% CI {alpha_ci[0]:.3f}–{alpha_ci[1]:.3f})" if alpha_ci else ""
    axes.plot(
        flops,
        law.loss(flops),
        color="tab:red",
        label=f"L = (C/{law.C_c:.3g})^-{law.alpha:.3f}{ci_text} + {law.E:.3f}",
    )
    axes.scatter(points.flops, points.loss, color="tab:blue", zorder=3, label="runs (validation loss)")
    axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss (nats/token)")
    axes.set_title(f"Compute law, R² {law_fit.goodness.r2:.4f}")
    axes.legend(fontsize=8)
    return plots.save(figure, path)


def mutransfer(sweep: Sweep, root: pathlib.Path, rows: list[dict]) -> dict:
    """Loss vs learning rate per width, SP and μP side by side; the best LR per width per parametrization.

    Rows need tags `parametrization`, `width` and `lr`; diverged points are drawn as crosses at the top.
    """
    diverged = [p for p in sweep.points if status(root, p) == "diverged"]
    parametrizations = sorted(
        {r["parametrization"] for r in rows} | {p.tags["parametrization"] for p in diverged}
    )
    figure, panels = plt.subplots(
        1, len(parametrizations), figsize=(6 * len(parametrizations), 4.5), sharey=True
    )
    panels = np.atleast_1d(panels)
    colours = plt.get_cmap("viridis")
    widths = sorted({r["width"] for r in rows})
    top = max(r["loss"] for r in rows)
    best: dict[str, dict[str, float]] = {}
    for axes, parametrization in zip(panels, parametrizations, strict=True):
        for i, width in enumerate(widths):
            colour = colours(i / max(1, len(widths) - 1))
            mine = sorted(
                (r["lr"], r["loss"])
                for r in rows
                if r["parametrization"] == parametrization and r["width"] == width
            )
            if not mine:
                continue
            lrs, losses = zip(*mine, strict=True)
            axes.plot(lrs, losses, "o-", color=colour, label=f"width {width}")
            k = int(np.argmin(losses))
            axes.plot(lrs[k], losses[k], "*", markersize=14, color=colour, markeredgecolor="black")
            best.setdefault(parametrization, {})[str(width)] = lrs[k]
            lost = [
                p.tags["lr"]
                for p in diverged
                if p.tags["parametrization"] == parametrization and p.tags["width"] == width
            ]
            if lost:
                axes.plot(lost, [top] * len(lost), "x", color=colour, markersize=9)
        axes.set(
            xscale="log", xlabel="peak learning rate", title=f"{parametrization.upper()} (★ best, × diverged)"
        )
        axes.legend(fontsize=8)
    panels[0].set_ylabel("validation loss (nats/token)")
    figure.suptitle("μTransfer: loss vs learning rate across widths")
    path = plots.save(figure, root / "mutransfer.png")
    summary = {"best_lr": best, "diverged": [p.name for p in diverged], "plot": path}
    atomic.write_text(root / "mutransfer.json", json.dumps(summary, indent=1) + "\n")
    lines = [
        f"best learning rate per width ({parametrization}): "
        + ", ".join(f"{w}: {lr:.3g}" for w, lr in best.get(parametrization, {}).items())
        for parametrization in parametrizations
    ]
    summary["text"] = "\n".join(lines + [f"plot: {path}"])
    return summary
