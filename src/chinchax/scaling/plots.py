"""Every figure of the scaling studies, as PNG: loss vs FLOPs, the compute law's bootstrap band (one law, or several
on one figure), isoFLOP curves,
residuals, compute-optimal allocation, μTransfer (loss vs learning rate per width)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chinchax import atomic  # noqa: E402
from chinchax.scaling import bootstrap, fit  # noqa: E402
from chinchax.scaling.fit_io import ScalingPoints  # noqa: E402

MAX_ISOFLOP_CURVES = 8


def save(figure, path: pathlib.Path) -> str:
    """Write the figure atomically (temp file in the same folder, then rename) and close it."""
    try:
        with atomic.replacing(path) as temporary:
            figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(figure)
    return str(path)


def _flops_range(points: ScalingPoints) -> np.ndarray:
    low, high = np.log10(points.flops.min()), np.log10(points.flops.max())
    return np.logspace(low - 0.2, high + 0.2, 200)


def loss_vs_flops(points: ScalingPoints, law_fit: fit.LawFit, path: pathlib.Path) -> str:
    """Points, the fitted law (the compute-optimal frontier for L(N, D)) and the published Cerebras-GPT law."""
    figure, axes = plt.subplots(figsize=(7, 5))
    kept = law_fit.kept
    axes.scatter(points.flops[kept], points.loss[kept], s=12, color="tab:blue", alpha=0.7, label="points")
    if (~kept).any():
        axes.scatter(points.flops[~kept], points.loss[~kept], s=24, marker="x", color="grey", label="dropped")
    flops = _flops_range(points)
    law = law_fit.law
    if isinstance(law, fit.ComputeLaw):
        label = f"fit: (C/{law.C_c:.3g})^-{law.alpha:.4f} + {law.E:.4f}"
        axes.plot(flops, law.loss(flops), color="tab:red", label=label)
    else:
        label = (
            f"fit at N_opt(C): E={law.E:.3f} A={law.A:.4g} B={law.B:.4g} α={law.alpha:.3f} β={law.beta:.3f}"
        )
        axes.plot(flops, law.optimal_loss(flops), color="tab:red", label=label)
    published = fit.CEREBRAS_GPT_COMPUTE_LAW
    axes.plot(flops, published.loss(flops), "--", color="black", label="Cerebras-GPT published (Pile)")
    axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss (nats/token)")
    axes.set_title("Loss vs compute")
    axes.legend(fontsize=8)
    return save(figure, path)


def residuals(points: ScalingPoints, law_fit: fit.LawFit, path: pathlib.Path) -> str:
    """log L − log L̂ per point against C (dropped points marked)."""
    law = law_fit.law
    predicted = (
        law.loss(points.flops) if isinstance(law, fit.ComputeLaw) else law.loss(points.params, points.tokens)
    )
    residual = np.log(points.loss) - np.log(predicted)
    kept = law_fit.kept
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.scatter(points.flops[kept], residual[kept], s=12, color="tab:blue", label="fitted points")
    if (~kept).any():
        axes.scatter(points.flops[~kept], residual[~kept], s=24, marker="x", color="grey", label="dropped")
    axes.set(xscale="log", xlabel="training FLOPs C", ylabel="log L − log L̂")
    axes.set_title(f"Residuals (RMSE {law_fit.goodness.rmse_log_loss:.4f}, R² {law_fit.goodness.r2:.4f})")
    axes.legend(fontsize=8)
    return save(figure, path)


def isoflops(
    points: ScalingPoints,
    law: fit.ChinchillaLaw | None,
    approach2: fit.AllocationFit | None,
    path: pathlib.Path,
) -> str:
    """Loss vs N coloured by C, approach 3's isoFLOP curves L(N, C/6N) with their minima (when fitted), approach
    2's parabolas with their vertices."""
    figure, axes = plt.subplots(figsize=(7, 5))
    log_flops = np.log10(points.flops)
    colours = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(log_flops.min(), log_flops.max())
    scatter = axes.scatter(points.params, points.loss, c=log_flops, cmap=colours, norm=norm, s=12)
    figure.colorbar(scatter, ax=axes, label="log10 C")
    parabolas = approach2.parabolas if approach2 is not None else []
    if len(parabolas) > MAX_ISOFLOP_CURVES:
        parabolas = [
            parabolas[i] for i in np.linspace(0, len(parabolas) - 1, MAX_ISOFLOP_CURVES).round().astype(int)
        ]
    if parabolas:
        budgets = [budget for budget, _, _ in parabolas]
    else:
        budgets = 10.0 ** np.arange(np.ceil(log_flops.min()), np.floor(log_flops.max()) + 1)
    sizes = np.logspace(np.log10(points.params.min()) - 0.3, np.log10(points.params.max()) + 0.3, 200)
    for budget in budgets if law is not None else ():
        colour = colours(norm(np.log10(budget)))
        axes.plot(sizes, law.loss(sizes, budget / (6.0 * sizes)), color=colour, linewidth=1)
        n_opt = law.optimal_params()(budget)
        axes.plot(n_opt, law.loss(n_opt, budget / (6.0 * n_opt)), "o", color=colour, markeredgecolor="black")
    for budget, coefficients, (smallest, largest) in parabolas:
        colour = colours(norm(np.log10(budget)))
        log_n = np.linspace(np.log(smallest), np.log(largest), 100)
        axes.plot(np.exp(log_n), np.polyval(coefficients, log_n), ":", color=colour, linewidth=2)
        vertex = -coefficients[1] / (2.0 * coefficients[0])
        axes.plot(
            np.exp(vertex), np.polyval(coefficients, vertex), "D", color=colour, markeredgecolor="black"
        )
    low, high = np.percentile(points.loss, [0, 98])
    axes.set(xscale="log", xlabel="parameters N", ylabel="loss (nats/token)", ylim=(0.95 * low, 1.05 * high))
    parts = (["approach 3 (solid, ● minimum)"] if law is not None else []) + (
        ["approach 2 (dotted, ◆ vertex)"] if parabolas else []
    )
    axes.set_title("IsoFLOP curves: " + ", ".join(parts), fontsize=10)
    return save(figure, path)


def allocation(
    law: fit.ChinchillaLaw | None,
    approach1: fit.AllocationFit | None,
    approach2: fit.AllocationFit | None,
    flops: np.ndarray,
    path: pathlib.Path,
) -> str:
    """N_opt(C) implied by approach 3 (when fitted), with approach 1 and 2 estimates and their power-law fits."""
    figure, axes = plt.subplots(figsize=(7, 5))
    grid = np.logspace(np.log10(flops.min()) - 0.2, np.log10(flops.max()) + 0.2, 100)
    if law is not None:
        n_opt = law.optimal_params()
        axes.plot(grid, n_opt(grid), color="tab:red", label=f"approach 3: N_opt ∝ C^{n_opt.exponent:.3f}")
    for name, estimate, colour in (
        ("approach 1", approach1, "tab:green"),
        ("approach 2", approach2, "tab:blue"),
    ):
        if estimate is not None:
            axes.scatter(estimate.flops, estimate.optimal_params, s=10, color=colour)
            label = f"{name}: N_opt ∝ C^{estimate.params.exponent:.3f}"
            axes.plot(grid, estimate.params(grid), "--", color=colour, label=label)
    axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal parameters N_opt")
    axes.set_title("Compute-optimal allocation")
    axes.legend(fontsize=8)
    return save(figure, path)


def envelope(points: ScalingPoints, run: np.ndarray, approach1: fit.AllocationFit, path: pathlib.Path) -> str:
    """Approach 1: every run's loss-vs-C curve coloured by its N, and the lower envelope the winners trace."""
    figure, axes = plt.subplots(figsize=(7, 5))
    log_params = np.log10(points.params)
    colours = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(log_params.min(), log_params.max())
    for name in np.unique(run):
        member = run == name
        order = np.argsort(points.flops[member])
        colour = colours(norm(log_params[member][0]))
        axes.plot(points.flops[member][order], points.loss[member][order], color=colour, linewidth=1)
    axes.plot(
        approach1.flops, approach1.optimal_loss, color="black", linewidth=2.5, alpha=0.6, label="envelope"
    )
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=colours)
    figure.colorbar(mappable, ax=axes, label="log10 N")
    axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss (nats/token)")
    axes.set_title(f"Approach 1: {len(np.unique(run))} training curves and their envelope")
    axes.legend(fontsize=8)
    return save(figure, path)


def _law_with_band(
    axes, flops: np.ndarray, law: fit.ComputeLaw, samples: dict, colour: str, prefix: str = ""
) -> None:
    """L(C) over `flops` and its bootstrap 95% band (pointwise percentiles of the refitted curves in `samples`,
    {C_c, alpha, E}: arrays; no band when empty), labelled after `prefix`."""
    if samples:
        curves = np.array(
            [
                fit.ComputeLaw(c, a, e).loss(flops)
                for c, a, e in zip(samples["C_c"], samples["alpha"], samples["E"], strict=True)
            ]
        )
        curves = curves[np.isfinite(curves).all(axis=1)]
        low, high = np.percentile(curves, [2.5, 97.5], axis=0)
        axes.fill_between(flops, low, high, color=colour, alpha=0.2, label=f"{prefix}95% bootstrap band")
    alpha_ci = bootstrap.percentile_intervals(samples, fit.CI_LEVEL).get("alpha")
    ci_text = f" (95% CI {alpha_ci[0]:.3f}–{alpha_ci[1]:.3f})" if alpha_ci else ""
    label = f"{prefix}L = (C/{law.C_c:.3g})^-{law.alpha:.3f}{ci_text} + {law.E:.3f}"
    axes.plot(flops, law.loss(flops), color=colour, label=label)


def compute_law_band(points: ScalingPoints, law_fit: fit.LawFit, path: pathlib.Path) -> str:
    """The points, the fitted L(C) and its bootstrap 95% band (pointwise percentiles of the refitted curves)."""
    figure, axes = plt.subplots(figsize=(7, 5))
    flops = np.logspace(np.log10(points.flops.min()) - 0.3, np.log10(points.flops.max()) + 0.3, 200)
    _law_with_band(axes, flops, law_fit.law, law_fit.bootstrap_samples, "tab:red")
    axes.scatter(points.flops, points.loss, color="tab:blue", zorder=3, label="runs (validation loss)")
    axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss (nats/token)")
    axes.set_title(f"Compute law, R² {law_fit.goodness.r2:.4f}")
    axes.legend(fontsize=8)
    return save(figure, path)


def compute_laws(
    laws: dict[str, tuple[ScalingPoints, fit.ComputeLaw, dict]], path: pathlib.Path, title: str
) -> str:
    """Several compute laws on one figure, one colour each: {name: (its points, its law, its bootstrap refits
    {C_c, alpha, E})}, each drawn with its 95% band and its runs."""
    figure, axes = plt.subplots(figsize=(7.5, 5.5))
    low = min(np.log10(points.flops.min()) for points, _, _ in laws.values())
    high = max(np.log10(points.flops.max()) for points, _, _ in laws.values())
    flops = np.logspace(low - 0.3, high + 0.3, 200)
    markers = ("o", "s", "^", "D", "v")
    for i, (name, (points, law, samples)) in enumerate(laws.items()):
        colour = plt.get_cmap("tab10")(i)
        _law_with_band(axes, flops, law, samples, colour, f"{name}: ")
        axes.scatter(
            points.flops,
            points.loss,
            color=colour,
            marker=markers[i % len(markers)],
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
            label=f"{name}: runs (validation loss)",
        )
    axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss (nats/token)")
    axes.set_title(title)
    axes.legend(fontsize=7)
    return save(figure, path)


def mutransfer(losses: dict, best: dict, diverged: dict, path: pathlib.Path) -> str:
    """Mean loss ± its standard deviation over seeds vs learning rate per width, one panel per parametrization;
    ★ the best rate, × diverged runs.

    losses: {parametrization: {width: [{"lr", "loss", "loss_std", "seeds"}, ...]}} (report.lr_losses);
    best: {parametrization: {width: lr}}; diverged: {parametrization: {width: [lr, ...]}}.
    """
    parametrizations = sorted(losses.keys() | diverged.keys())
    figure, panels = plt.subplots(
        1, len(parametrizations), figsize=(6 * len(parametrizations), 4.5), sharey=True
    )
    panels = np.atleast_1d(panels)
    entries = [e for by_width in losses.values() for curve in by_width.values() for e in curve]
    widths = sorted({w for by_width in losses.values() for w in by_width}, key=int)
    top = max(e["loss"] + e["loss_std"] for e in entries)
    seeds = max(e["seeds"] for e in entries)
    colours = plt.get_cmap("viridis")
    for axes, parametrization in zip(panels, parametrizations, strict=True):
        for i, width in enumerate(widths):
            colour = colours(i / max(1, len(widths) - 1))
            curve = losses.get(parametrization, {}).get(width, [])
            if curve:
                lrs, means, stds = ([e[key] for e in curve] for key in ("lr", "loss", "loss_std"))
                axes.errorbar(
                    lrs, means, yerr=stds, fmt="o-", capsize=3, color=colour, label=f"width {width}"
                )
                k = lrs.index(best[parametrization][width])
                axes.plot(lrs[k], means[k], "*", markersize=14, color=colour, markeredgecolor="black")
            lost = diverged.get(parametrization, {}).get(width, [])
            if lost:
                axes.plot(lost, [top] * len(lost), "x", color=colour, markersize=9)
        axes.set(
            xscale="log", xlabel="peak learning rate", title=f"{parametrization.upper()} (★ best, × diverged)"
        )
        axes.legend(fontsize=8)
    spread = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    panels[0].set_ylabel(f"validation loss (nats/token{spread})")
    figure.suptitle("μTransfer: loss vs learning rate across widths")
    return save(figure, path)


def size_law(
    points: ScalingPoints,
    law: fit.ChinchillaLaw,
    extra: dict[str, tuple[np.ndarray, np.ndarray]],
    path: pathlib.Path,
) -> str:
    """Dense and sparse runs on one curve: loss less the law's data term, L − B/D^β, against N (a sparse run's
    N_avg), beside the law's E + A/N^α; `extra` adds labelled (N, L − B/D^β) sets, e.g. sparse runs at other N."""
    figure, axes = plt.subplots(figsize=(7, 5))
    y = points.loss - law.B * points.tokens ** (-law.beta)
    sparse = points.sparse if points.sparse is not None else np.zeros(len(points.loss), dtype=bool)
    axes.scatter(points.params[~sparse], y[~sparse], s=24, color="tab:blue", label="dense runs (N)")
    if sparse.any():
        axes.scatter(
            points.params[sparse], y[sparse], s=60, marker="^", color="tab:red", label="sparse runs (N_avg)"
        )
    for (label, (n, values)), marker in zip(extra.items(), ("v", "s", "D"), strict=False):
        axes.scatter(n, values, s=36, marker=marker, facecolors="none", edgecolors="grey", label=label)
    grid = np.logspace(np.log10(points.params.min()) - 0.2, np.log10(points.params.max()) + 0.2, 100)
    axes.plot(
        grid, law.E + law.A * grid ** (-law.alpha), color="black", label=f"E + A/N^α (α = {law.alpha:.3f})"
    )
    axes.set(xscale="log", xlabel="parameters N (sparse: average non-zero)", ylabel="L − B/D^β (nats/token)")
    axes.set_title("One law for dense and sparse runs (N_avg)")
    axes.legend(fontsize=8)
    return save(figure, path)
