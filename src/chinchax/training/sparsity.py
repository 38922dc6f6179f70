"""Sparse pre-training: gradual global magnitude pruning of the Dense kernels, as an optax wrapper.

What is pruned: every Dense kernel of the blocks (QKV or Q and K/V, attn-out, fc1, SwiGLU's gate, fc2). The
head, tied or untied, embeddings, norms and biases always stay dense.

When: the schedule of pruning events and kept fractions (`Schedule`, `schedule_for`) is analytic and lives with
the FLOP counts (chinchax.model.flops), so the planner and the dry run count the FLOPs a sparse run spends; the
names the trainer and the sweep specs use are re-exported here.

How: at an event the kept weights are the largest |w| over all prunable tensors at once (one global threshold
on raw magnitudes, no per-tensor normalisation) among those still kept: masks only shrink. The mask gates the
gradients going into the wrapped optimizer (pruned weights add nothing to the clip norm or the moments) and
the updates coming out of it, which set pruned weights to exactly zero, so momentum and weight decay never
revive them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from chinchax.model.flops import Schedule
from chinchax.model.flops import average_nonzero_params as average_nonzero_params
from chinchax.model.flops import schedule_for as schedule_for

WORD = 2**32  # counts are two uint32 words, high · WORD + low


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


def gated(masks, grads):
    """The gradients the wrapped optimizer (and its clip) sees: zero at the pruned weights."""
    return _masked_map(lambda m, g: jnp.where(m, g, jnp.zeros_like(g)), masks, grads)


def _add_words(a, b):
    """(high, low) + (high, low) as 64-bit unsigned integers: the low words' carry goes into the high word."""
    low = a[1] + b[1]
    return a[0] + b[0] + (low < a[1]).astype(jnp.uint32), low


def count_true(leaves) -> tuple[jax.Array, jax.Array]:
    """How many elements of these boolean arrays are True, exact at any size: the (high, low) uint32 words of
    the count high · WORD + low (each row counted in uint32, rows and arrays summed with a carry)."""
    zero = jnp.uint32(0)
    high = low = zero
    for leaf in leaves:
        rows = jnp.sum(leaf.reshape(-1, leaf.shape[-1]), axis=-1, dtype=jnp.uint32)
        summed = jax.lax.reduce((jnp.zeros_like(rows), rows), (zero, zero), _add_words, (0,))
        high, low = _add_words((high, low), summed)
    return high, low


def _at_least(count: tuple[jax.Array, jax.Array], bound: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Whether the count (high, low) is ≥ bound (high, low)."""
    return (count[0] > bound[0]) | ((count[0] == bound[0]) & (count[1] >= bound[1]))


def density(masks) -> jax.Array:
    """Kept fraction of the prunable weights under these masks (counted exactly, divided in fp32)."""
    leaves = jax.tree.leaves(masks)
    high, low = count_true(leaves)
    total = sum(m.size for m in leaves)
    return (high.astype(jnp.float32) * float(WORD) + low.astype(jnp.float32)) / total


def shrink(masks, params, keep: tuple[jax.Array, jax.Array]):
    """Masks keeping the `keep` (high, low uint32 words) largest |w| among the kept prunable weights, over all
    tensors at once.

    The threshold is found by bisection on the bit patterns of |w| (monotone for non-negative floats), so
    it is the exact keep-th largest magnitude without sorting or gathering the tensors; a tie at the
    threshold keeps all tied weights. Counts are integers (`count_true`): exact at any size.
    """

    def magnitude_bits(mask, p):
        return (
            None if mask is None else jnp.where(mask, jax.lax.bitcast_convert_type(jnp.abs(p), jnp.int32), -1)
        )

    bits = jax.tree.map(magnitude_bits, masks, params, is_leaf=_is_none)
    leaves = jax.tree.leaves(bits)

    def bisect(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        enough = _at_least(count_true([b >= middle for b in leaves]), keep)
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
        updates, inner_state = inner.update(
            gated(state.masks, updates), state.inner_state, params, **extra_args
        )
        done = state.count + 1
        total = sum(m.size for m in jax.tree.leaves(state.masks))
        keeps = [divmod(round(d * total), WORD) for d in schedule.densities]
        keep_high, keep_low = (jnp.asarray(words, jnp.uint32) for words in zip(*keeps, strict=True))
        is_event = jnp.any(event_steps == done)
        event = jnp.argmax(event_steps == done)
        keep = (keep_high[event], keep_low[event])
        candidate = optax.apply_updates(params, updates)
        masks = jax.lax.cond(is_event, shrink, lambda m, p, k: m, state.masks, candidate, keep)
        updates = _masked_map(lambda m, u, p: jnp.where(m, u, -p), masks, updates, params)
        return updates, SparsityState(done, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
