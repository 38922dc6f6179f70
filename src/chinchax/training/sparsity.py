"""Sparse pre-training: gradual global magnitude pruning of the Dense kernels, as an optax wrapper.

What is pruned: every Dense kernel (QKV, attn-out, fc1, fc2; the head is tied to the token embedding here, so
it is not a kernel). Embeddings, LayerNorms and biases always stay dense.

When: a schedule of pruning events at steps (counts of updates done) start, start + every, ..., ≤ end. After
event k of n the kept fraction of the prunable weights is

    geometric   (1 − s)^((k+1)/n)                 (Jin et al. 2025, "The Journey Matters": their code)
    cubic       1 − s·(1 − (1 − (k+1)/n)³)        (Zhu & Gupta 2017, starting dense)
    one_shot    1 − s at `start` (n = 1)

with s the final sparsity. The density at step t is the kept fraction of the weights once t updates are done:
1 before the first event, and the forward pass of (0-based) step t runs at that density. Start and end are
given as fractions of the run's compute (Σ density over steps) and solved to steps (`solve_steps`).

How: at an event the kept weights are the largest |w| over all prunable tensors at once (one global threshold
on raw magnitudes, no per-tensor normalisation) among those still kept: masks only shrink. The mask gates the
gradients going into the wrapped optimizer (pruned weights add nothing to the clip norm or the moments) and
the updates coming out of it, which set pruned weights to exactly zero, so momentum and weight decay never
revive them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from chinchax.config import SPARSITY_SCHEDULES as SCHEDULES
from chinchax.config import batch_phases
from chinchax.model import flops

_SEARCH_ITERATIONS = 100  # fixed-point iterations of `solve_steps` (converges in a handful)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Pruning events: the steps (updates done) at which masks shrink and the kept fraction after each."""

    steps: tuple[int, ...]  # increasing, ≥ 1
    densities: tuple[float, ...]  # kept fraction of the prunable weights once each event is done

    def density_at(self, step: int) -> float:
        """Kept fraction of the prunable weights once `step` updates are done (1 before the first event)."""
        done = [d for s, d in zip(self.steps, self.densities, strict=True) if s <= step]
        return done[-1] if done else 1.0

    def densities_over(self, total_steps: int) -> np.ndarray:
        """Density at the start of each 0-based step 0 … total_steps − 1 (what its forward pass runs at)."""
        out = np.ones(total_steps)
        for step, density in zip(self.steps, self.densities, strict=True):
            out[step:] = density
        return out


def event_densities(kind: str, target: float, events: int) -> tuple[float, ...]:
    """Kept fraction after each of `events` pruning events, ending at 1 − target."""
    if kind not in SCHEDULES:
        raise ValueError(f"sparsity schedule {kind!r} is not one of {SCHEDULES}")
    progress = (np.arange(events) + 1) / events
    if kind == "cubic":
        return tuple(float(d) for d in 1.0 - target * (1.0 - (1.0 - progress) ** 3))
    return tuple(float(d) for d in (1.0 - target) ** progress)


def make_schedule(kind: str, target: float, start: int, end: int, every: int) -> Schedule:
    """Events at start, start + every, … up to end inclusive (one_shot: at start only)."""
    steps = (start,) if kind == "one_shot" else tuple(range(start, end + 1, every))
    return Schedule(steps, event_densities(kind, target, len(steps)))


def compute_fractions(schedule: Schedule, total_steps: int) -> np.ndarray:
    """Fraction of the run's compute (Σ density) spent before each step 0 … total_steps."""
    spent = np.concatenate([[0.0], np.cumsum(schedule.densities_over(total_steps))])
    return spent / spent[-1]


def solve_steps(
    kind: str, target: float, total_steps: int, start_fraction: float, end_fraction: float, every: int
) -> tuple[int, int]:
    """(start, end) steps at which start_fraction and end_fraction of the run's compute are spent.

    The compute depends on the schedule it places, so this iterates to a fixed point (or, should it cycle,
    keeps the candidate closest in compute fraction). one_shot has no end: it is returned equal to start.
    """
    start = max(round(start_fraction * total_steps), 1)
    end = max(round(end_fraction * total_steps), start)
    candidates = []
    for _ in range(_SEARCH_ITERATIONS):
        spent = compute_fractions(make_schedule(kind, target, start, end, every), total_steps)
        error = abs(spent[start] - start_fraction)
        if kind != "one_shot":
            error += abs(spent[end] - end_fraction)
        candidates.append((error, start, end))
        start_next = max(int(np.searchsorted(spent, start_fraction)), 1)
        end_next = (
            start_next if kind == "one_shot" else max(int(np.searchsorted(spent, end_fraction)), start_next)
        )
        if (start_next, end_next) == (start, end):
            break
        start, end = start_next, end_next
    _, start, end = min(candidates)
    return start, end


def schedule_for(sparsity: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    """The run's pruning schedule (config.sparsity, compute fractions solved to steps)."""
    start, end = solve_steps(
        sparsity.schedule,
        sparsity.target,
        total_steps,
        sparsity.start_fraction,
        sparsity.end_fraction,
        sparsity.every,
    )
    return make_schedule(sparsity.schedule, sparsity.target, start, end, sparsity.every)


def average_density(schedule: Schedule, total_steps: int) -> float:
    """Mean over the run's steps of the density each step runs at."""
    return float(np.mean(schedule.densities_over(total_steps)))


def average_nonzero_params(model: ml_collections.ConfigDict, schedule: Schedule, total_steps: int) -> float:
    """N_avg: parameters averaged over the run's steps, the prunable kernels at their density, the rest dense."""
    prunable = flops.matmul_params(model)
    return flops.param_count(model) - prunable + average_density(schedule, total_steps) * prunable


def flops_per_token(model: ml_collections.ConfigDict, seq_len: int, density):
    """Training FLOPs per token with the block matmuls at `density` (a float or an array of them; attention and
    the tied head stay dense)."""
    return flops.flops_per_token(model, seq_len) - 6 * (1.0 - density) * flops.matmul_params(model)


def train_flops(cfg: ml_collections.ConfigDict, schedule: Schedule, total_steps: int) -> float:
    """Training FLOPs of the run, each step's block matmuls at the density it runs at (batch ramp included)."""
    phases = batch_phases(cfg)
    first_steps = np.array([first for first, _, _ in phases])
    sizes = np.array([size for _, _, size in phases], np.float64)
    sequences = sizes[np.searchsorted(first_steps, np.arange(total_steps), side="right") - 1]
    per_token = flops_per_token(cfg.model, cfg.data.seq_len, schedule.densities_over(total_steps))
    return float(np.sum(sequences * cfg.data.seq_len * per_token))


def is_prunable(path: tuple) -> bool:
    """Whether the parameter at this pytree path is a Dense kernel."""
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last))) == "kernel"


class SparsityState(NamedTuple):
    """The wrapper's state: updates done, one boolean mask per prunable parameter (None elsewhere), the
    wrapped optimizer's state."""

    count: jax.Array
    masks: Any
    inner_state: Any


def _is_none(x) -> bool:
    return x is None


def _masked_map(fn, masks, *trees):
    """fn(mask, *leaves) on prunable leaves; the first tree's leaf unchanged elsewhere."""
    return jax.tree.map(
        lambda mask, *leaves: leaves[0] if mask is None else fn(mask, *leaves),
        masks,
        *trees,
        is_leaf=_is_none,
    )


def density(masks) -> jax.Array:
    """Kept fraction of the prunable weights under these masks."""
    kept = [jnp.sum(m, dtype=jnp.float32) for m in jax.tree.leaves(masks)]
    total = sum(m.size for m in jax.tree.leaves(masks))
    return sum(kept) / total


def shrink(masks, params, keep: jax.Array):
    """Masks keeping the `keep` largest |w| among the kept prunable weights, over all tensors at once.

    The threshold is found by bisection on the bit patterns of |w| (monotone for non-negative floats), so
    it is the exact keep-th largest magnitude without sorting or gathering the tensors; a tie at the
    threshold keeps all tied weights. Counts are summed in fp32: exact up to 2^24 prunable weights.
    """

    def magnitude_bits(mask, p):
        return (
            None if mask is None else jnp.where(mask, jax.lax.bitcast_convert_type(jnp.abs(p), jnp.int32), -1)
        )

    bits = jax.tree.map(magnitude_bits, masks, params, is_leaf=_is_none)
    leaves = jax.tree.leaves(bits)

    def at_least(threshold):
        return sum(
            jnp.sum(jnp.sum(b >= threshold, axis=-1, dtype=jnp.int32).astype(jnp.float32)) for b in leaves
        )

    def bisect(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        enough = at_least(middle) >= keep
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    above_inf = jnp.int32(0x7F800001)
    threshold, _ = jax.lax.fori_loop(0, 31, bisect, (jnp.int32(0), above_inf))
    return jax.tree.map(
        lambda m, b: None if m is None else m & (b >= threshold), masks, bits, is_leaf=_is_none
    )


def prune(inner: optax.GradientTransformation, schedule: Schedule) -> optax.GradientTransformationExtraArgs:
    """`inner` with gradual magnitude pruning of the Dense kernels by `schedule` (see the module docstring)."""
    inner = optax.with_extra_args_support(inner)
    event_steps = jnp.asarray(schedule.steps, jnp.int32)

    def init(params):
        masks = jax.tree_util.tree_map_with_path(
            lambda path, p: jnp.ones(p.shape, bool) if is_prunable(path) else None, params
        )
        return SparsityState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("sparsity.prune needs the params")
        gated = _masked_map(lambda m, g: jnp.where(m, g, jnp.zeros_like(g)), state.masks, updates)
        updates, inner_state = inner.update(gated, state.inner_state, params, **extra_args)
        done = state.count + 1
        total = sum(m.size for m in jax.tree.leaves(state.masks))
        keep_table = jnp.asarray([round(d * total) for d in schedule.densities], jnp.float32)
        is_event = jnp.any(event_steps == done)
        keep = keep_table[jnp.argmax(event_steps == done)]
        candidate = optax.apply_updates(params, updates)
        masks = jax.lax.cond(is_event, shrink, lambda m, p, k: m, state.masks, candidate, keep)
        updates = _masked_map(lambda m, u, p: jnp.where(m, u, -p), masks, updates, params)
        return updates, SparsityState(done, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
