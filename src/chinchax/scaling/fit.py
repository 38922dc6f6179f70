"""Scaling-law fits: the compute law L(C) and Chinchilla's approaches 1–3, with bootstrap confidence intervals.

Laws (losses in nats/token, C in FLOPs, N parameters, D tokens, C = 6ND):
- compute law (Cerebras-GPT Eq. 1): L(C) = (C / C_c)^(-alpha) + E;
- Chinchilla approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as Besiroglu et al. (2024) do: log L as
  LSE(a − alpha·log N, b − beta·log D, e) with A = e^a, B = e^b, E = e^e, Huber loss (δ = 1e-3) summed over the
  log-loss residuals, L-BFGS from a grid of starts (batched and pruned, see batched_lbfgs);
- approach 1: the lower envelope of training curves (per FLOP value the run with the least loss) → N_opt(C);
- approach 2: a parabola of loss vs log N per isoFLOP budget, its vertex → N_opt(C);
then N_opt = k_N·C^a and D_opt = k_D·C^b by least squares in log-log space.
"""

from __future__ import annotations

import dataclasses
import itertools

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


@dataclasses.dataclass(frozen=True)
class Goodness:
    """R² and RMSE of the log-loss residuals (the space the laws are fitted in)."""

    r2: float
    rmse_log_loss: float


@dataclasses.dataclass(frozen=True)
class LawFit:
    """A fitted law, its constants' confidence intervals and the points it was fitted on (after dropping)."""

    law: ComputeLaw | ChinchillaLaw
    ci: dict[str, tuple[float, float]]
    goodness: Goodness
    objective: float
    kept: np.ndarray  # bool mask over the input points: False for the dropped highest-loss ones
    bootstrap_samples: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class AllocationFit:
    """N_opt(C) and D_opt(C) power laws fitted on (C, N_opt) estimates of approach 1 or 2."""

    params: PowerLaw
    tokens: PowerLaw
    flops: np.ndarray  # the C values at which N_opt was estimated
    optimal_params: np.ndarray
    ci: dict[str, tuple[float, float]]
    # approach 2: (C, loss-vs-log-N parabola coefficients, (smallest, largest) N of the budget)
    parabolas: list[tuple[float, np.ndarray, tuple[float, float]]] = dataclasses.field(default_factory=list)


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


def lse_huber_objective(log_x, loss, weights=None, weight_of_row=None, delta=HUBER_DELTA):
    """Batched value and gradient of Σ_i w_i · Huber_δ(LSE(a_j − alpha_j·x_ij …, e) − log L_i).

    log_x (n, k) holds the log covariates, params rows are (a_1..a_k, e, alpha_1..alpha_k). weights (R, n)
    (default all ones) weight the points; row r of a batch uses weights[weight_of_row[r]].
    """
    log_x = np.asarray(log_x, dtype=np.float64)
    log_loss = np.log(np.asarray(loss, dtype=np.float64))
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
        residual = np.log(total)
        residual += peak
        residual -= log_loss
        clipped = np.clip(residual, -delta, delta)  # Huber'(r)
        huber = residual - 0.5 * clipped
        huber *= clipped  # r²/2 inside ±δ, δ(|r| − δ/2) outside
        clipped *= w
        clipped /= total
        grad = np.empty_like(params)
        for j, plane in enumerate(softmax):
            plane *= clipped  # w·Huber'(r)·∂LSE/∂term_j
            grad[:, j] = plane.sum(axis=1)
        for j in range(k):
            grad[:, k + 1 + j] = -(softmax[j] @ log_x[:, j])
        return (huber * w).sum(axis=1), grad

    return value_and_grad


def minimize_from_grid(log_x, loss, starts, prune=GRID_PRUNE, delta=HUBER_DELTA):
    """Multi-start L-BFGS over `starts` (pruned as `prune` says); all end points and values, best first.

    Pruned starts stop above the value at which the survivors were chosen, so the survivors come first.
    """
    objective = lse_huber_objective(log_x, loss, delta=delta)
    prune = tuple((it, keep) for it, keep in prune if keep < len(starts))
    result = batched_lbfgs.minimize(objective, starts, prune=prune)
    order = np.argsort(np.nan_to_num(result.fun, nan=np.inf))
    return result.x[order], result.fun[order]


def bootstrap_refits(log_x, loss, starts, resamples: int, rng: np.random.Generator, delta=HUBER_DELTA):
    """Refit on `resamples` resampled point sets (counts as weights), each from the given few `starts`."""
    weights = bootstrap.resample_counts(len(loss), resamples, rng)
    weight_of_row = np.repeat(np.arange(resamples), len(starts))
    objective = lse_huber_objective(log_x, loss, weights, weight_of_row, delta)
    result = batched_lbfgs.minimize(objective, np.tile(starts, (resamples, 1)))
    fun = result.fun.reshape(resamples, len(starts))
    best = np.nanargmin(np.where(np.isfinite(fun), fun, np.inf), axis=1)
    return result.x.reshape(resamples, len(starts), -1)[np.arange(resamples), best]


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
) -> LawFit:
    """Approach 3: L(N, D) fitted from Besiroglu et al.'s 4,500-start grid (or `starts`), bootstrap CIs."""
    params, tokens, loss = (np.asarray(v, dtype=np.float64) for v in (params, tokens, loss))
    kept = keep_mask(loss, drop_highest)
    log_x = np.log(np.stack([params[kept], tokens[kept]], axis=1))
    starts = grid(BESIROGLU_GRID_AXES) if starts is None else starts
    best, objective = minimize_from_grid(log_x, loss[kept], starts, prune)
    law = _chinchilla_law(best[0])
    samples = {}
    if resamples > 0:
        refits = bootstrap_refits(
            log_x, loss[kept], best[:BOOTSTRAP_STARTS], resamples, np.random.default_rng(seed)
        )
        samples = dataclasses.asdict(_chinchilla_law(refits.T))
    return LawFit(
        law=law,
        ci=bootstrap.percentile_intervals(samples, CI_LEVEL),
        goodness=goodness(law.loss(params[kept], tokens[kept]), loss[kept]),
        objective=float(objective[0]),
        kept=kept,
        bootstrap_samples=samples,
    )


def _chinchilla_law(p) -> ChinchillaLaw:
    a, b, e, alpha, beta = p
    return ChinchillaLaw(A=np.exp(a), B=np.exp(b), E=np.exp(e), alpha=alpha, beta=beta)


def fit_compute_law(
    flops, loss, *, drop_highest: int = 0, resamples: int = 0, seed: int | None = None, prune=GRID_PRUNE
) -> LawFit:
    """L(C) = (C/C_c)^(-alpha) + E by the approach-3 procedure with one covariate (log C, centred on the data)."""
    flops, loss = np.asarray(flops, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    kept = keep_mask(loss, drop_highest)
    centre = np.log(flops[kept]).mean()
    log_x = np.log(flops[kept])[:, None] - centre
    best, objective = minimize_from_grid(log_x, loss[kept], grid(COMPUTE_GRID_AXES), prune)
    law = _compute_law(best[0], centre)
    samples = {}
    if resamples > 0:
        refits = bootstrap_refits(
            log_x, loss[kept], best[:BOOTSTRAP_STARTS], resamples, np.random.default_rng(seed)
        )
        samples = dataclasses.asdict(_compute_law(refits.T, centre))
    return LawFit(
        law=law,
        ci=bootstrap.percentile_intervals(samples, CI_LEVEL),
        goodness=goodness(law.loss(flops[kept]), loss[kept]),
        objective=float(objective[0]),
        kept=kept,
        bootstrap_samples=samples,
    )


def _compute_law(p, centre) -> ComputeLaw:
    """(a, e, alpha) with reducible loss e^a at C = e^centre → C_c = e^(centre + a/alpha)."""
    a, e, alpha = p
    return ComputeLaw(C_c=np.exp(centre + a / alpha), alpha=alpha, E=np.exp(e))


def power_law_fit(flops, values) -> PowerLaw:
    """Least-squares line through (log C, log y)."""
    exponent, intercept = np.polyfit(np.log(flops), np.log(values), 1)
    return PowerLaw(float(np.exp(intercept)), float(exponent))


def _allocation(flops, optimal_params, ci, parabolas=()) -> AllocationFit:
    return AllocationFit(
        params=power_law_fit(flops, optimal_params),
        tokens=power_law_fit(flops, flops / (6.0 * optimal_params)),
        flops=flops,
        optimal_params=optimal_params,
        ci=ci,
        parabolas=list(parabolas),
    )


def approach1_envelope(run, params, flops, loss, num_flops: int = 250) -> AllocationFit | None:
    """Approach 1: at each of `num_flops` log-spaced C, the run with the least (log-interpolated) loss gives N_opt.

    Runs are the groups of `run` (e.g. the model size) with at least two points; None when fewer than two runs
    or fewer than three distinct winners remain.
    """
    run, params, flops, loss = (np.asarray(v) for v in (run, params, flops, loss))
    curves = []
    for name in np.unique(run):
        member = run == name
        if member.sum() >= 2:
            order = np.argsort(flops[member])
            curves.append((float(params[member][0]), np.log(flops[member][order]), loss[member][order]))
    if len(curves) < 2:
        return None
    low = min(c[1][0] for c in curves)
    high = max(c[1][-1] for c in curves)
    grid_log_flops = np.linspace(low, high, num_flops)
    envelope = np.full((len(curves), num_flops), np.inf)
    for i, (_, log_c, curve_loss) in enumerate(curves):
        inside = (grid_log_flops >= log_c[0]) & (grid_log_flops <= log_c[-1])
        envelope[i, inside] = np.interp(grid_log_flops[inside], log_c, curve_loss)
    winner = envelope.argmin(axis=0)
    sizes = np.array([c[0] for c in curves])[winner]
    if len(np.unique(sizes)) < 3:
        return None
    return _allocation(np.exp(grid_log_flops), sizes, ci={})


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


def isoflop_minima(params, flops, loss, budgets):
    """Per budget with ≥ 3 sizes: a parabola of loss vs log N; keeps those with a vertex inside the sizes tried."""
    estimates = []
    for budget in np.unique(budgets):
        member = budgets == budget
        log_n = np.log(params[member])
        if len(np.unique(log_n)) < 3:
            continue
        coeffs = np.polyfit(log_n, loss[member], 2)
        vertex = -coeffs[1] / (2.0 * coeffs[0])
        if coeffs[0] > 0 and log_n.min() < vertex < log_n.max():
            c = float(np.exp(np.log(flops[member]).mean()))
            estimates.append((c, float(np.exp(vertex)), coeffs, (params[member].min(), params[member].max())))
    return estimates


def approach2_isoflop(
    params, flops, loss, *, resamples: int = 0, seed: int | None = None, tolerance: float = 0.1
) -> AllocationFit | None:
    """Approach 2: N_opt per isoFLOP budget from its parabola's vertex; None with fewer than two usable budgets.

    CIs of the exponents come from refitting on points resampled within each budget.
    """
    params, flops, loss = (np.asarray(v, dtype=np.float64) for v in (params, flops, loss))
    budgets = isoflop_budgets(flops, tolerance)
    estimates = isoflop_minima(params, flops, loss, budgets)
    if len(estimates) < 2:
        return None
    budget_flops = np.array([e[0] for e in estimates])
    optimal = np.array([e[1] for e in estimates])
    samples = {"a": [], "b": []}
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        pick = bootstrap.resample_within_groups(budgets, rng)
        again = isoflop_minima(params[pick], flops[pick], loss[pick], budgets[pick])
        if len(again) >= 2:
            c = np.array([e[0] for e in again])
            n = np.array([e[1] for e in again])
            samples["a"].append(power_law_fit(c, n).exponent)
            samples["b"].append(power_law_fit(c, c / (6.0 * n)).exponent)
    ci = bootstrap.percentile_intervals({k: np.array(v) for k, v in samples.items() if v}, CI_LEVEL)
    return _allocation(budget_flops, optimal, ci, parabolas=[(e[0], e[2], e[3]) for e in estimates])
