"""Scaling-law fits: the compute law L(C) and Chinchilla's approaches 1–3, with bootstrap confidence intervals.

Laws (losses in nats/token, C in FLOPs, N parameters, D tokens):
- compute law (Cerebras-GPT Eq. 1): L(C) = (C / C_c)^(-alpha) + E;
- Chinchilla approach 3: L(N, D) = E + A / N^alpha + B / D^beta;
- approach 1: the lower envelope of training curves (per FLOP value the run with the least loss) → N_opt(C);
- approach 2: a parabola of loss vs log N per isoFLOP budget, its vertex → N_opt(C);
then N_opt = k_N·C^a and D_opt = k_D·C^b by least squares in log-log space.

The parametric laws are fitted as Besiroglu et al. (2024) do: log L̂ = LSE(a − alpha·log N, b − beta·log D, e)
with A = e^a, B = e^b, E = e^e, L-BFGS from a grid of starts (batched and pruned, see batched_lbfgs), under the
objective each source used (`Objective`): Huber (δ = 1e-3) on log-loss residuals for approach 3 (Hoffmann et
al., Besiroglu et al.), plain least squares on the loss for the compute law (Cerebras-GPT's Eq. 1).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import numpy as np

from chinchax.scaling import batched_lbfgs, bootstrap

HUBER_DELTA = 1e-3
CI_LEVEL = 0.95

# Besiroglu et al. (2024), Approach 3 initialisation grid over (a, b, e, alpha, beta): 6·6·5·5·5 = 4,500 starts
# (e from their np.arange(-1, 1.5, 0.5), which stops before 1.5).
BESIROGLU_GRID_AXES = (
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    (-1.0, -0.5, 0.0, 0.5, 1.0),
    (0.0, 0.5, 1.0, 1.5, 2.0),
    (0.0, 0.5, 1.0, 1.5, 2.0),
)
# Compute-law grid over (a, e, alpha) with log C centred on the data: e^a is the reducible loss at that centre.
COMPUTE_GRID_AXES = (
    (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0),
    (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    (0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
# Multi-start pruning: (after iteration, starts kept). Measured in benchmarks/fit_speed.py.
GRID_PRUNE = ((5, 100), (25, 16))
BOOTSTRAP_STARTS = 4
# E counts as run into its bound (0) when it, or its CI's lower end, is below this fraction of the least loss.
E_BOUND_FRACTION = 1e-3


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a parametric fit minimises over its points' residuals.

    `huber`: Σ Huber_δ(log L̂ − log L) (Hoffmann et al. 2022, Besiroglu et al. 2024); `lsq`: Σ (L̂ − L)² / 2,
    plain least squares on the loss (Cerebras-GPT's compute law).
    """

    name: str
    delta: float | None = None

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective {self.name!r} is not one of {', '.join(OBJECTIVES)}")
        if (self.name == "huber") != (self.delta is not None) or (self.delta is not None and self.delta <= 0):
            raise ValueError(f"objective {self.name!r}: delta must be > 0 for huber and absent for lsq")

    def describe(self) -> dict:
        space = "log_loss" if self.name == "huber" else "loss"
        return {"name": self.name, "delta": self.delta, "space": space}


OBJECTIVES = ("lsq", "huber")
LSQ = Objective("lsq")
HUBER = Objective("huber", HUBER_DELTA)
# Each law's default: the procedure of the source whose constants it reproduces.
DEFAULT_OBJECTIVES = {"compute": LSQ, "chinchilla": HUBER}


@dataclasses.dataclass(frozen=True)
class ComputeLaw:
    """L(C) = (C / C_c)^(-alpha) + E."""

    C_c: float
    alpha: float
    E: float

    def loss(self, flops):
        return (np.asarray(flops, dtype=np.float64) / self.C_c) ** (-self.alpha) + self.E


# Dey et al. 2023 (Cerebras-GPT), Eq. 1 fitted on the Pile; reference/cerebras_gpt.json holds the same figures.
CEREBRAS_GPT_COMPUTE_LAW = ComputeLaw(C_c=5.984e22, alpha=0.0737, E=0.5066)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coefficient · C^exponent."""

    coefficient: float
    exponent: float

    def __call__(self, flops):
        return self.coefficient * np.asarray(flops, dtype=np.float64) ** self.exponent


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    A: float
    B: float
    E: float
    alpha: float
    beta: float

    def loss(self, params, tokens):
        n, d = np.asarray(params, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
        return self.E + self.A * n ** (-self.alpha) + self.B * d ** (-self.beta)

    def optimal_params(self) -> PowerLaw:
        """N_opt(C) minimising L(N, C/(6N)): G·(C/6)^(beta/(alpha+beta)), G = (alpha·A / (beta·B))^(1/(alpha+beta))."""
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / total)
        exponent = self.beta / total
        return PowerLaw(g * 6.0 ** (-exponent), exponent)

    def optimal_tokens(self) -> PowerLaw:
        """D_opt(C) = C / (6·N_opt(C))."""
        n_opt = self.optimal_params()
        return PowerLaw(1.0 / (6.0 * n_opt.coefficient), 1.0 - n_opt.exponent)

    def optimal_loss(self, flops):
        """Loss at the compute-optimal allocation of C FLOPs."""
        return self.loss(self.optimal_params()(flops), self.optimal_tokens()(flops))


# Hoffmann et al. (2022), approach 3 (MassiveText, SentencePiece tokens), and Besiroglu et al.'s (2024) refit of
# the same study's points (the figures tests/test_fit.py reproduces from the digitised points).
HOFFMANN_2022_LAW = ChinchillaLaw(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
BESIROGLU_2024_LAW = ChinchillaLaw(A=482.01, B=2085.43, E=1.82, alpha=0.3478, beta=0.3658)


@dataclasses.dataclass(frozen=True)
class Goodness:
    """R² and RMSE of the log-loss residuals (the space the laws are fitted in)."""

    r2: float
    rmse_log_loss: float


@dataclasses.dataclass(frozen=True)
class PurePowerLaw:
    """L = k · Π x_j^(-exponent_j), fitted by least squares in log-log space: the law without E, to compare with."""

    k: float
    exponents: tuple[float, ...]
    goodness: Goodness


@dataclasses.dataclass(frozen=True)
class LawFit:
    """A fitted law, its constants' confidence intervals and the points it was fitted on (after dropping)."""

    law: ComputeLaw | ChinchillaLaw
    ci: dict[str, tuple[float, float]]
    goodness: Goodness
    objective: Objective
    objective_value: float
    kept: np.ndarray  # bool mask over the input points: False for the dropped highest-loss ones
    bootstrap_samples: dict[str, np.ndarray]
    power_law: PurePowerLaw
    identifiability: list[str]  # one line per constant the data cannot pin down (empty: all identified)


@dataclasses.dataclass(frozen=True)
class AllocationFit:
    """N_opt(C) and D_opt(C) power laws fitted on (C, N_opt, D_opt) estimates of approach 1 or 2.

    `ci` holds the exponents' intervals (`a`, `b`) and, for approach 2, `tokens_per_param@<C>` per budget.
    """

    params: PowerLaw
    tokens: PowerLaw
    flops: np.ndarray  # the C values at which N_opt was estimated
    optimal_params: np.ndarray
    optimal_tokens: np.ndarray
    optimal_loss: np.ndarray  # the envelope's (approach 1) or the vertex's (approach 2) loss
    ci: dict[str, tuple[float, float]]
    bootstrap_samples: dict[str, np.ndarray]
    # approach 2: (C, loss-vs-log-N parabola coefficients, (smallest, largest) N of the budget)
    parabolas: list[tuple[float, np.ndarray, tuple[float, float]]] = dataclasses.field(default_factory=list)

    @property
    def tokens_per_param(self) -> np.ndarray:
        """D_opt / N_opt at each estimated C."""
        return self.optimal_tokens / self.optimal_params


def grid(axes) -> np.ndarray:
    """All combinations of the axes' values, one start per row."""
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


def goodness(predicted_loss, loss) -> Goodness:
    residual = np.log(loss) - np.log(predicted_loss)
    centred = np.log(loss) - np.log(loss).mean()
    return Goodness(
        r2=float(1.0 - (residual**2).sum() / (centred**2).sum()),
        rmse_log_loss=float(np.sqrt((residual**2).mean())),
    )


def keep_mask(loss, drop_highest: int) -> np.ndarray:
    """Mask keeping all but the `drop_highest` points of highest loss."""
    kept = np.ones(len(loss), dtype=bool)
    if drop_highest > 0:
        kept[np.argsort(loss)[-drop_highest:]] = False
    return kept


def lse_objective(log_x, loss, objective: Objective = HUBER, weights=None, weight_of_row=None):
    """Batched value and gradient of Σ_i w_i · ρ(log L̂_i, L_i), log L̂_i = LSE(a_j − alpha_j·x_ij …, e).

    ρ is the objective's: Huber_δ(log L̂ − log L), or (L̂ − L)² / 2. log_x (n, k) holds the log covariates,
    params rows are (a_1..a_k, e, alpha_1..alpha_k). weights (R, n) (default all ones) weight the points; row r
    of a batch uses weights[weight_of_row[r]].
    """
    log_x = np.asarray(log_x, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    log_loss = np.log(loss)
    k = log_x.shape[1]
    weights = np.ones((1, len(log_loss))) if weights is None else np.asarray(weights, dtype=np.float64)

    def value_and_grad(params, rows):
        # In-place numpy over (rows, points) planes: this is the inner loop of every multi-start fit.
        w = weights[0] if weight_of_row is None else weights[weight_of_row[rows]]
        e = params[:, k, None]
        terms = [params[:, j, None] - params[:, k + 1 + j, None] * log_x[:, j] for j in range(k)]
        peak = np.maximum.reduce(terms + [np.broadcast_to(e, terms[0].shape)])
        softmax = [np.exp(np.subtract(t, peak, out=t), out=t) for t in terms] + [np.exp(e - peak)]
        total = sum(softmax)
        log_predicted = np.log(total)
        log_predicted += peak
        if objective.name == "huber":
            residual = log_predicted - log_loss
            slope = np.clip(residual, -objective.delta, objective.delta)  # Huber'(r) = ∂ρ/∂log L̂
            value = residual - 0.5 * slope
            value *= slope  # r²/2 inside ±δ, δ(|r| − δ/2) outside
        else:
            predicted = np.exp(log_predicted)
            residual = predicted - loss
            value = 0.5 * residual**2
            slope = residual * predicted  # ∂ρ/∂log L̂
        slope *= w
        slope /= total
        grad = np.empty_like(params)
        for j, plane in enumerate(softmax):
            plane *= slope  # w·ρ'·∂LSE/∂term_j
            grad[:, j] = plane.sum(axis=1)
        for j in range(k):
            grad[:, k + 1 + j] = -(softmax[j] @ log_x[:, j])
        return (value * w).sum(axis=1), grad

    return value_and_grad


def minimize_from_grid(log_x, loss, starts, objective: Objective = HUBER, prune=GRID_PRUNE):
    """Multi-start L-BFGS over `starts` (pruned as `prune` says); all end points and values, best first.

    Pruned starts stop above the value at which the survivors were chosen, so the survivors come first.
    """
    prune = tuple((it, keep) for it, keep in prune if keep < len(starts))
    result = batched_lbfgs.minimize(lse_objective(log_x, loss, objective), starts, prune=prune)
    order = np.argsort(np.nan_to_num(result.fun, nan=np.inf))
    return result.x[order], result.fun[order]


def bootstrap_refits(
    log_x, loss, starts, resamples: int, rng: np.random.Generator, objective: Objective = HUBER
):
    """Refit on `resamples` resampled point sets (counts as weights), each from the given few `starts`."""
    weights = bootstrap.resample_counts(len(loss), resamples, rng)
    weight_of_row = np.repeat(np.arange(resamples), len(starts))
    value_and_grad = lse_objective(log_x, loss, objective, weights, weight_of_row)
    result = batched_lbfgs.minimize(value_and_grad, np.tile(starts, (resamples, 1)))
    fun = result.fun.reshape(resamples, len(starts))
    best = np.nanargmin(np.where(np.isfinite(fun), fun, np.inf), axis=1)
    return result.x.reshape(resamples, len(starts), -1)[np.arange(resamples), best]


def pure_power_law(log_x, loss) -> PurePowerLaw:
    """log L = log k − Σ exponent_j · x_j by least squares: the law with E = 0."""
    design = np.column_stack([np.ones(len(loss)), -np.asarray(log_x)])
    coefficients, *_ = np.linalg.lstsq(design, np.log(loss), rcond=None)
    predicted = np.exp(design @ coefficients)
    return PurePowerLaw(
        float(np.exp(coefficients[0])), tuple(map(float, coefficients[1:])), goodness(predicted, loss)
    )


def identifiability(
    law, ci, law_goodness: Goodness, power_law: PurePowerLaw, loss, extra_constants: int
) -> list[str]:
    """One line per way the data fail to pin the law down: E (or its CI) at its bound 0, or a fit no better
    than the pure power law by Akaike's criterion (n·ln(RSS ratio) against 2 per extra constant)."""
    lines = []
    floor = E_BOUND_FRACTION * float(np.min(loss))
    low = ci.get("E", (law.E, law.E))[0]
    if min(law.E, low) < floor:
        where = (
            f"its {100 * CI_LEVEL:.0f}% CI [{low:.3g}, {ci['E'][1]:.3g}]" if "E" in ci else f"E = {law.E:.3g}"
        )
        lines.append(
            f"E is not identified: {where} reaches its bound 0 (below {E_BOUND_FRACTION:g} of the least loss); "
            "these points cannot separate the irreducible loss from the power law"
        )
    n = len(loss)
    gain = n * np.log(power_law.goodness.rmse_log_loss**2 / max(law_goodness.rmse_log_loss**2, 1e-300))
    if gain <= 2 * extra_constants:
        lines.append(
            f"the law fits no better than the pure power law (AIC gain {gain:.2f} ≤ {2 * extra_constants} for its "
            f"{extra_constants} extra constant{'s' * (extra_constants > 1)}): prefer the power law beside it"
        )
    return lines


def fit_chinchilla(
    params,
    tokens,
    loss,
    *,
    drop_highest: int = 0,
    resamples: int = 0,
    seed: int | None = None,
    starts: np.ndarray | None = None,
    prune=GRID_PRUNE,
    objective: Objective = DEFAULT_OBJECTIVES["chinchilla"],
) -> LawFit:
    """Approach 3: L(N, D) fitted from Besiroglu et al.'s 4,500-start grid (or `starts`), bootstrap CIs."""
    params, tokens, loss = (np.asarray(v, dtype=np.float64) for v in (params, tokens, loss))
    kept = keep_mask(loss, drop_highest)
    log_x = np.log(np.stack([params[kept], tokens[kept]], axis=1))
    starts = grid(BESIROGLU_GRID_AXES) if starts is None else starts
    best, values = minimize_from_grid(log_x, loss[kept], starts, objective, prune)
    law = _chinchilla_law(best[0])
    samples = {}
    if resamples > 0:
        refits = bootstrap_refits(
            log_x, loss[kept], best[:BOOTSTRAP_STARTS], resamples, np.random.default_rng(seed), objective
        )
        samples = dataclasses.asdict(_chinchilla_law(refits.T))
    return _law_fit(
        law, law.loss(params[kept], tokens[kept]), log_x, loss[kept], kept, samples, objective, values[0], 2
    )


def _chinchilla_law(p) -> ChinchillaLaw:
    a, b, e, alpha, beta = p
    return ChinchillaLaw(A=np.exp(a), B=np.exp(b), E=np.exp(e), alpha=alpha, beta=beta)


def _law_fit(law, predicted, log_x, loss, kept, samples, objective, value, extra_constants) -> LawFit:
    ci = bootstrap.percentile_intervals(samples, CI_LEVEL)
    law_goodness = goodness(predicted, loss)
    power_law = pure_power_law(log_x, loss)
    return LawFit(
        law=law,
        ci=ci,
        goodness=law_goodness,
        objective=objective,
        objective_value=float(value),
        kept=kept,
        bootstrap_samples=samples,
        power_law=power_law,
        identifiability=identifiability(law, ci, law_goodness, power_law, loss, extra_constants),
    )


def fit_compute_law(
    flops,
    loss,
    *,
    drop_highest: int = 0,
    resamples: int = 0,
    seed: int | None = None,
    prune=GRID_PRUNE,
    objective: Objective = DEFAULT_OBJECTIVES["compute"],
) -> LawFit:
    """L(C) = (C/C_c)^(-alpha) + E by the approach-3 procedure with one covariate (log C, centred on the data)."""
    flops, loss = np.asarray(flops, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    kept = keep_mask(loss, drop_highest)
    centre = np.log(flops[kept]).mean()
    log_x = np.log(flops[kept])[:, None] - centre
    best, values = minimize_from_grid(log_x, loss[kept], grid(COMPUTE_GRID_AXES), objective, prune)
    law = _compute_law(best[0], centre)
    samples = {}
    if resamples > 0:
        refits = bootstrap_refits(
            log_x, loss[kept], best[:BOOTSTRAP_STARTS], resamples, np.random.default_rng(seed), objective
        )
        samples = dataclasses.asdict(_compute_law(refits.T, centre))
    return _law_fit(
        law,
        law.loss(flops[kept]),
        np.log(flops[kept])[:, None],
        loss[kept],
        kept,
        samples,
        objective,
        values[0],
        1,
    )


def _compute_law(p, centre) -> ComputeLaw:
    """(a, e, alpha) with reducible loss e^a at C = e^centre → C_c = e^(centre + a/alpha)."""
    a, e, alpha = p
    return ComputeLaw(C_c=np.exp(centre + a / alpha), alpha=alpha, E=np.exp(e))


def power_law_fit(flops, values) -> PowerLaw:
    """Least-squares line through (log C, log y)."""
    exponent, intercept = np.polyfit(np.log(flops), np.log(values), 1)
    return PowerLaw(float(np.exp(intercept)), float(exponent))


def _allocation(flops, optimal_params, optimal_tokens, optimal_loss, samples, parabolas=()) -> AllocationFit:
    samples = {name: np.array(values) for name, values in samples.items() if values}
    return AllocationFit(
        params=power_law_fit(flops, optimal_params),
        tokens=power_law_fit(flops, optimal_tokens),
        flops=flops,
        optimal_params=optimal_params,
        optimal_tokens=optimal_tokens,
        optimal_loss=optimal_loss,
        ci=bootstrap.percentile_intervals(samples, CI_LEVEL),
        bootstrap_samples=samples,
        parabolas=list(parabolas),
    )


class TrainingCurve(NamedTuple):
    """One run's loss against training FLOPs, ascending in C; it covers only its own FLOP range."""

    params: float  # N
    log_flops: np.ndarray  # log C (C in FLOPs), ascending
    loss: np.ndarray  # nats/token
    log_tokens: np.ndarray  # log D (D in tokens)


def training_curves(run, params, flops, loss, tokens) -> list[TrainingCurve]:
    """The groups of `run` (e.g. the model size) with at least two points, as training curves."""
    curves = []
    for name in np.unique(run):
        member = run == name
        if member.sum() >= 2:
            order = np.argsort(flops[member])
            curves.append(
                TrainingCurve(
                    float(params[member][0]),
                    np.log(flops[member][order]),
                    loss[member][order],
                    np.log(tokens[member][order]),
                )
            )
    return curves


def envelope_span(curves: list[TrainingCurve]) -> tuple[float, float]:
    """log C from the earliest curve start to the second-latest curve end (beyond, one curve alone: no envelope
    to take). Needs two curves."""
    return min(c.log_flops[0] for c in curves), sorted(c.log_flops[-1] for c in curves)[-2]


def resampled_curves(curves: list[TrainingCurve], rng: np.random.Generator) -> list[TrainingCurve]:
    """The distinct curves of a draw of len(curves) with replacement (a curve drawn twice leaves the envelope as
    it is, and the span needs distinct curves)."""
    return [curves[i] for i in np.unique(rng.choice(len(curves), len(curves)))]


def envelope(curves: list[TrainingCurve], grid_log_flops):
    """The lower envelope of the curves where it estimates N_opt: those grid points' log C, the least
    (log-interpolated) loss there, and the N and D of the curve that has it.

    Left out: points outside the curves' span (envelope_span), points no curve reaches (never given to a curve
    that stops short of them), and points won by the smallest or the largest N, where N_opt may lie beyond the
    sizes tried (a bound, not an estimate: kept, they flatten the fitted exponent).
    """
    low, high = envelope_span(curves)
    log_flops = grid_log_flops[(grid_log_flops >= low) & (grid_log_flops <= high)]
    curve_loss = np.full((len(curves), len(log_flops)), np.inf)
    log_tokens = np.full_like(curve_loss, np.nan)
    for i, curve in enumerate(curves):
        inside = (log_flops >= curve.log_flops[0]) & (log_flops <= curve.log_flops[-1])
        curve_loss[i, inside] = np.interp(log_flops[inside], curve.log_flops, curve.loss)
        log_tokens[i, inside] = np.interp(log_flops[inside], curve.log_flops, curve.log_tokens)
    reached = np.flatnonzero(np.isfinite(curve_loss).any(axis=0))
    winner = curve_loss[:, reached].argmin(axis=0)
    sizes = np.array([c.params for c in curves])
    inner = (sizes[winner] > sizes.min()) & (sizes[winner] < sizes.max())
    reached, winner = reached[inner], winner[inner]
    return log_flops[reached], curve_loss[winner, reached], sizes[winner], np.exp(log_tokens[winner, reached])


def approach1_envelope(
    run,
    params,
    flops,
    loss,
    tokens=None,
    *,
    num_flops: int = 250,
    resamples: int = 0,
    seed: int | None = None,
) -> AllocationFit | None:
    """Approach 1: at each of `num_flops` log-spaced C over the runs' span, the run with the least
    (log-interpolated) loss gives N_opt, and its tokens at that C give D_opt (C / 6N without a tokens column);
    `envelope` says which C are left out.

    Runs are the groups of `run` (e.g. the model size) with at least two points; None when fewer than two runs
    or fewer than three distinct winners remain. CIs of the exponents refit on runs resampled with replacement,
    each resample's envelope taken over the C its own runs reach.
    """
    run, params, flops, loss = (np.asarray(v) for v in (run, params, flops, loss))
    tokens = flops / (6.0 * params) if tokens is None else np.asarray(tokens, dtype=np.float64)
    curves = training_curves(run, params, flops, loss, tokens)
    if len(curves) < 2:
        return None
    grid_log_flops = np.linspace(*envelope_span(curves), num_flops)
    log_flops, least, sizes, optimal_tokens = envelope(curves, grid_log_flops)
    if len(np.unique(sizes)) < 3:
        return None
    samples = {"a": [], "b": []}
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        picked = resampled_curves(curves, rng)
        if len(picked) < 2:
            continue
        resampled_log_flops, _, n, d = envelope(picked, grid_log_flops)
        if len(np.unique(n)) >= 3:
            samples["a"].append(power_law_fit(np.exp(resampled_log_flops), n).exponent)
            samples["b"].append(power_law_fit(np.exp(resampled_log_flops), d).exponent)
    return _allocation(np.exp(log_flops), sizes, optimal_tokens, least, samples)


def isoflop_budgets(flops, tolerance: float = 0.1) -> np.ndarray:
    """Budget index per point: points (sorted by C) within a factor 1 + tolerance of their group's first share it."""
    order = np.argsort(flops)
    labels = np.empty(len(flops), dtype=np.int64)
    label, first = -1, -np.inf
    for i in order:
        if np.log(flops[i]) - first > np.log1p(tolerance):
            label, first = label + 1, np.log(flops[i])
        labels[i] = label
    return labels


@dataclasses.dataclass(frozen=True)
class IsoflopMinimum:
    """Approach 2 at one budget: its C (geometric mean of its points'), the parabola's vertex and its tokens."""

    budget: int  # the group label
    flops: float
    optimal_params: float
    optimal_tokens: float  # the budget's tokens at the vertex, interpolated linearly in (log N, log D)
    parabola: np.ndarray  # loss = p[0]·(log N)² + p[1]·log N + p[2]
    sizes: tuple[float, float]  # smallest and largest N of the budget


def isoflop_minima(params, tokens, flops, loss, budgets) -> list[IsoflopMinimum]:
    """Per budget with ≥ 3 sizes: a parabola of loss vs log N; keeps those with a vertex inside the sizes tried."""
    estimates = []
    for budget in np.unique(budgets):
        member = budgets == budget
        log_n = np.log(params[member])
        if len(np.unique(log_n)) < 3:
            continue
        coefficients = np.polyfit(log_n, loss[member], 2)
        vertex = -coefficients[1] / (2.0 * coefficients[0])
        if coefficients[0] > 0 and log_n.min() < vertex < log_n.max():
            slope, intercept = np.polyfit(log_n, np.log(tokens[member]), 1)
            estimates.append(
                IsoflopMinimum(
                    budget=int(budget),
                    flops=float(np.exp(np.log(flops[member]).mean())),
                    optimal_params=float(np.exp(vertex)),
                    optimal_tokens=float(np.exp(intercept + slope * vertex)),
                    parabola=coefficients,
                    sizes=(float(params[member].min()), float(params[member].max())),
                )
            )
    return estimates


def approach2_isoflop(
    params,
    flops,
    loss,
    tokens=None,
    budgets=None,
    *,
    resamples: int = 0,
    seed: int | None = None,
    tolerance: float = 0.1,
) -> AllocationFit | None:
    """Approach 2: N_opt and D_opt per isoFLOP budget from its parabola's vertex; None with fewer than two usable
    budgets. `budgets` labels each point's budget (default: points within `tolerance` of each other in C);
    tokens default to C / 6N.

    CIs of the exponents and of each budget's D_opt / N_opt come from refitting on points resampled within each
    budget.
    """
    params, flops, loss = (np.asarray(v, dtype=np.float64) for v in (params, flops, loss))
    tokens = flops / (6.0 * params) if tokens is None else np.asarray(tokens, dtype=np.float64)
    budgets = (
        isoflop_budgets(flops, tolerance) if budgets is None else np.unique(budgets, return_inverse=True)[1]
    )
    estimates = isoflop_minima(params, tokens, flops, loss, budgets)
    if len(estimates) < 2:
        return None
    samples = {"a": [], "b": [], **{tokens_per_param_key(e.flops): [] for e in estimates}}
    flops_of = {e.budget: e.flops for e in estimates}
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        pick = bootstrap.resample_within_groups(budgets, rng)
        again = isoflop_minima(params[pick], tokens[pick], flops[pick], loss[pick], budgets[pick])
        for e in again:
            if e.budget in flops_of:
                samples[tokens_per_param_key(flops_of[e.budget])].append(e.optimal_tokens / e.optimal_params)
        if len(again) >= 2:
            c = np.array([e.flops for e in again])
            samples["a"].append(power_law_fit(c, np.array([e.optimal_params for e in again])).exponent)
            samples["b"].append(power_law_fit(c, np.array([e.optimal_tokens for e in again])).exponent)
    return _allocation(
        np.array([e.flops for e in estimates]),
        np.array([e.optimal_params for e in estimates]),
        np.array([e.optimal_tokens for e in estimates]),
        np.array([np.polyval(e.parabola, np.log(e.optimal_params)) for e in estimates]),
        samples,
        parabolas=[(e.flops, e.parabola, e.sizes) for e in estimates],
    )


def tokens_per_param_key(flops: float) -> str:
    """The CI name of D_opt / N_opt at a budget."""
    return f"tokens_per_param@{flops:.3g}"
