"""The Cerebras-GPT optimizer: global-norm clip → AdamW with per-role LR multipliers, warmup + decay to 10%
(linear or cosine, as the paper), or warmup-stable-decay (WSD: constant, then a cooldown over the last fraction).

The schedule is defined in tokens (so a batch-size ramp, as for 13B, does not bend it) and evaluated at the
tokens seen once each step is done: the first step already has a non-zero rate and the last step's rate is
exactly end_lr_fraction · peak. Weight decay is decoupled and LR-coupled as in PyTorch's AdamW: each step
subtracts lr · role multiplier · (m̂ / (√v̂ + ε) + wd · p) (biases and LayerNorm not decayed, embeddings are).

How it differs from the Cerebras modelzoo's AdamW: the modelzoo adds ε to √v before the bias corrections
(equivalent to ε / √(1 − β₂ᵗ) here, a larger ε over the first steps); optax adds it after, as PyTorch does.
With ε = 1e-8 the difference is below fp32 resolution once √v̂ ≫ ε, i.e. from the first steps on.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from chinchax import parametrization
from chinchax.config import TrainSchedule
from chinchax.training import sparsity


def tokens_seen(schedule: TrainSchedule):
    """steps done → tokens seen, under the run's batch schedule (jnp-traceable)."""

    def tokens(count):
        count = jnp.asarray(count, jnp.float32)
        out = jnp.zeros_like(count)
        for first_step, first_token, size in schedule.phases:
            per_step = float(size * schedule.seq_len)  # floats: published token counts exceed int32
            out = jnp.where(count >= first_step, float(first_token) + (count - first_step) * per_step, out)
        return out

    return tokens


def cooldown(shape: str, peak: float, end: float, tokens: float) -> optax.Schedule:
    """tokens into a cooldown → learning rate, from peak to end over `tokens`: linear, cosine, or 1-sqrt
    (end + (peak − end)·(1 − √(t / tokens)), Hägele et al. 2024; optax has no such schedule)."""
    if shape == "linear":
        return optax.linear_schedule(peak, end, tokens)
    if shape == "cosine":
        return optax.cosine_decay_schedule(peak, tokens, alpha=end / peak)
    return lambda t: end + (peak - end) * (1.0 - jnp.sqrt(jnp.clip(t / tokens, 0.0, 1.0)))


def token_schedule(cfg: ml_collections.ConfigDict, total_tokens: int) -> optax.Schedule:
    """tokens → learning rate: linear warmup to peak, then linear or cosine decay to end_lr_fraction · peak, or
    (wsd) peak until the last cooldown_fraction of the tokens, then the cooldown to end_lr_fraction · peak."""
    t = cfg.train
    warmup = float(min(t.warmup_tokens, total_tokens))
    decay_tokens = float(max(total_tokens - warmup, 1))
    end = t.peak_lr * t.end_lr_fraction
    if t.decay == "wsd":
        cooling = min(t.cooldown_fraction * total_tokens, decay_tokens)
        stable = decay_tokens - cooling
        decay = optax.join_schedules(
            [
                optax.constant_schedule(t.peak_lr),
                cooldown(t.cooldown_shape, t.peak_lr, end, max(cooling, 1.0)),
            ],
            [stable],
        )
    elif t.decay == "cosine":
        decay = optax.cosine_decay_schedule(t.peak_lr, decay_tokens, alpha=t.end_lr_fraction)
    else:
        decay = optax.linear_schedule(t.peak_lr, end, decay_tokens)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, t.peak_lr, warmup), decay], [warmup])


def learning_rate(cfg: ml_collections.ConfigDict, schedule: TrainSchedule) -> optax.Schedule:
    """0-based step → learning rate: the token schedule over the run's tokens, at the tokens seen once the step
    is done."""
    by_tokens, tokens = token_schedule(cfg, schedule.tokens), tokens_seen(schedule)
    return lambda step: by_tokens(jnp.minimum(tokens(step + 1), float(schedule.tokens)))


def make_optimizer(
    cfg: ml_collections.ConfigDict, params, schedule: TrainSchedule
) -> optax.GradientTransformation:
    """clip → Adam → decoupled weight decay → −schedule → per-role LR multipliers (μP: hidden 1/m); with
    sparsity.target > 0, wrapped by the pruner (chinchax.training.sparsity) over the run's steps, else exactly
    this chain."""
    t = cfg.train
    dense = optax.chain(
        optax.clip_by_global_norm(t.grad_clip_norm) if t.grad_clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps),
        optax.add_decayed_weights(t.weight_decay, parametrization.weight_decay_mask(cfg.model, params)),
        optax.scale_by_learning_rate(learning_rate(cfg, schedule)),
        parametrization.lr_multipliers(cfg.model, params),
    )
    if cfg.sparsity.target == 0:
        return dense
    return sparsity.prune(dense, sparsity.schedule_for(cfg.sparsity, schedule.steps))
