"""Many small L-BFGS minimisations at once, in float64 numpy, with early pruning of poor starts.

A multi-start fit (Besiroglu et al.'s 4,500-start grid) or a bootstrap (hundreds of reweighted data sets) solves
thousands of 3–5-parameter problems over the same few hundred points. Looping scipy over them costs one Python
round trip per function evaluation; a `jax.vmap` of a fixed-length solver runs every problem as long as the
slowest. Here each problem is a row of a batch: every iteration evaluates the objective for the rows still
running (one numpy call over rows × points), rows leave the batch as they converge, and `prune` keeps only the
best rows after a few iterations, so the bulk of the work is spent on the few starts that can win.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

# value_and_grad(params (B, P), rows (B,) int indices into the problem batch) -> (values (B,), grads (B, P))
BatchedObjective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class BatchedResult:
    """Final point, objective value, iterations run and convergence flag of every row."""

    x: np.ndarray  # (B, P)
    fun: np.ndarray  # (B,)
    iterations: np.ndarray  # (B,)
    converged: np.ndarray  # (B,) bool


def minimize(
    value_and_grad: BatchedObjective,
    x0: np.ndarray,
    *,
    max_iterations: int = 1000,
    memory: int = 10,
    ftol: float = 1e-12,
    gtol: float = 1e-10,
    prune: Sequence[tuple[int, int]] = (),
    group: np.ndarray | None = None,
) -> BatchedResult:
    """Minimise B independent problems from the rows of x0 (B, P) with L-BFGS and a backtracking line search.

    A row stops when its relative decrease falls below `ftol`, its largest gradient entry below `gtol`, or no
    step along its search direction decreases it (a kink of the objective at float64 resolution).
    `prune` lists (after_iteration, keep): after that many iterations only the `keep` rows with the lowest
    objective in each `group` (default: one group) keep running; the others stop where they are.
    """
    x = np.array(x0, dtype=np.float64)
    batch, dim = x.shape
    group = np.zeros(batch, dtype=np.int64) if group is None else np.asarray(group)
    rows = np.arange(batch)
    f, g = value_and_grad(x, rows)
    s_hist = np.zeros((batch, memory, dim))
    y_hist = np.zeros((batch, memory, dim))
    rho = np.zeros(
        (batch, memory)
    )  # 0 marks an empty (or rejected) memory slot: it drops out of the recursion
    gamma = np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-300))  # first step ~ unit length
    iterations = np.zeros(batch, dtype=np.int64)
    converged = np.abs(g).max(axis=1) <= gtol
    running = ~converged
    schedule = sorted(prune)
    for it in range(max_iterations):
        while schedule and schedule[0][0] <= it:
            running &= _best_per_group(f, group, schedule.pop(0)[1])
        active = np.flatnonzero(running)
        if active.size == 0:
            break
        slot = it % memory
        direction = -_two_loop(g[active], s_hist[active], y_hist[active], rho[active], gamma[active], slot)
        slope = np.einsum("bp,bp->b", direction, g[active])
        uphill = slope >= 0  # memory gone stale: restart from steepest descent
        if uphill.any():
            direction[uphill] = -g[active][uphill] * gamma[active][uphill, None]
            slope[uphill] = np.einsum("bp,bp->b", direction[uphill], g[active][uphill])
            rho[active[uphill]] = 0.0
        x_new, f_new, g_new, found = _backtrack(
            value_and_grad, x[active], f[active], g[active], slope, direction, active
        )
        s = x_new - x[active]
        y = g_new - g[active]
        sy = np.einsum("bp,bp->b", s, y)
        yy = np.einsum("bp,bp->b", y, y)
        curved = found & (sy > 1e-12 * np.maximum(yy, 1e-300))
        s_hist[active, slot] = s
        y_hist[active, slot] = y
        rho[active, slot] = np.where(curved, 1.0 / np.where(curved, sy, 1.0), 0.0)
        gamma[active] = np.where(curved, sy / np.where(curved, yy, 1.0), gamma[active])
        decrease = f[active] - f_new
        x[active], f[active], g[active] = x_new, f_new, g_new
        iterations[active] += 1
        done = (
            ~found
            | (decrease <= ftol * np.maximum(np.abs(f_new), 1e-300))
            | (np.abs(g_new).max(axis=1) <= gtol)
        )
        converged[active] = done
        running[active] = ~done
    return BatchedResult(x=x, fun=f, iterations=iterations, converged=converged)


def _best_per_group(values: np.ndarray, group: np.ndarray, keep: int) -> np.ndarray:
    """Mask of the `keep` lowest values within each group (NaN counts as worst)."""
    order = np.lexsort((np.nan_to_num(values, nan=np.inf), group))
    sorted_groups = group[order]
    starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
    rank = np.arange(order.size) - starts
    mask = np.zeros(values.shape, dtype=bool)
    mask[order[rank < keep]] = True
    return mask


def _two_loop(g, s_hist, y_hist, rho, gamma, newest_slot):
    """H·g for each row by the L-BFGS two-loop recursion over a circular memory whose next write is `newest_slot`."""
    memory = rho.shape[1]
    order = [(newest_slot - 1 - k) % memory for k in range(memory)]  # newest first
    q = g.copy()
    coefficients = []
    for i in order:
        a = rho[:, i] * np.einsum("bp,bp->b", s_hist[:, i], q)
        q -= a[:, None] * y_hist[:, i]
        coefficients.append(a)
    r = gamma[:, None] * q
    for i, a in zip(reversed(order), reversed(coefficients), strict=True):
        b = rho[:, i] * np.einsum("bp,bp->b", y_hist[:, i], r)
        r += (a - b)[:, None] * s_hist[:, i]
    return r


def _backtrack(value_and_grad, x, f, g, slope, direction, rows, c1=1e-4, shrink=0.5, max_halvings=40):
    """Armijo backtracking from a unit step, evaluating only the rows that have not yet found a step."""
    x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
    found = np.zeros(x.shape[0], dtype=bool)
    step = np.ones(x.shape[0])
    pending = np.arange(x.shape[0])
    for _ in range(max_halvings):
        trial = x[pending] + step[pending, None] * direction[pending]
        with np.errstate(over="ignore", invalid="ignore"):
            f_trial, g_trial = value_and_grad(trial, rows[pending])
        ok = np.isfinite(f_trial) & (f_trial <= f[pending] + c1 * step[pending] * slope[pending])
        accepted = pending[ok]
        x_new[accepted], f_new[accepted], g_new[accepted] = trial[ok], f_trial[ok], g_trial[ok]
        found[accepted] = True
        pending = pending[~ok]
        if pending.size == 0:
            break
        step[pending] *= shrink
    return x_new, f_new, g_new, found
