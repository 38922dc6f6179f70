"""Parameter counts, FLOPs per token and training FLOPs of a config (analytic, no devices).

Counts follow Cerebras-GPT App. E: embeddings V·d + S·d, per layer 12d² + 13d (with d_ffn = 4d), final LN 2d;
the Llama-style switches change the terms (`layer_params`): grouped K/V, a third (gate) MLP matrix, no biases,
RMSNorm's gain alone, no position table under rope, and an untied (vocab, d) head, which counts as a
non-embedding matrix (every token multiplies through it; its FLOPs are the logits' in either case).
FLOPs count multiply-adds as 2 and training as 3× the forward pass (forward + backward), as Chinchilla and
PaLM do; the detailed count adds attention (q·kᵀ and weights·v over the full sequence) and the logits matmul
to the non-embedding matmuls, and leaves out LayerNorm, GELU, softmax and the embedding lookup.

A sparse run (sparsity.target > 0, pruned by chinchax.training.sparsity) runs each step's block matmuls, forward
and backward, at the kept fraction of the Dense kernels (its density) at that step; attention and the tied head
stay dense. Its pruning schedule is analytic (it lives here, so that the planner and the dry run count what the
run spends): events at steps start, start + every, …, ≤ end, after event k of n the kept fraction

    geometric   (1 − s)^((k+1)/n)                 (Jin et al. 2025, "The Journey Matters": their code)
    cubic       1 − s·(1 − (1 − (k+1)/n)³)        (Zhu & Gupta 2017, starting dense)
    one_shot    1 − s at `start` (n = 1)

with s the final sparsity. The density at step t is the kept fraction once t updates are done: 1 before the
first event, and the forward pass of (0-based) step t runs at that density. Start and end are given as
fractions of the run's compute (Σ density over steps) and solved to steps (`solve_steps`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from chinchax.config import (
    SPARSITY_SCHEDULES,
    batch_phases,
    d_ffn,
    d_head,
    kv_heads,
    steps_for,
    train_schedule,
)

_SEARCH_ITERATIONS = 100  # fixed-point iterations of `solve_steps` (converges in a handful)


def paper_param_count(vocab: int, positions: int, d: int, layers: int) -> int:
    """Cerebras-GPT App. E: V·d + S·d + L·(12d² + 13d) + 2d (assumes d_ffn = 4d)."""
    return vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d


def norm_params(model: ml_collections.ConfigDict) -> int:
    """One norm: its gain, and LayerNorm's bias when model.bias is on."""
    return model.d_model * (2 if model.norm == "layernorm" and model.bias else 1)


def _block_matrices(model: ml_collections.ConfigDict) -> tuple[int, int]:
    """(weights, biases) of one block's Dense layers: Q, K/V (kv_heads of them), attn-out, the MLP's two (gelu)
    or three (swiglu) matrices."""
    d, f, kv = model.d_model, d_ffn(model), kv_heads(model) * d_head(model)
    mlp_in = 2 if model.mlp == "swiglu" else 1
    weights = 2 * d * d + 2 * d * kv + (mlp_in + 1) * d * f
    biases = 3 * d + 2 * kv + mlp_in * f
    return weights, biases if model.bias else 0


def layer_params(model: ml_collections.ConfigDict) -> int:
    """Parameters of one block: its Dense weights and biases and two norms (GPT-3: 12d² + 13d)."""
    return sum(_block_matrices(model)) + 2 * norm_params(model)


def embedding_params(model: ml_collections.ConfigDict) -> int:
    """The lookup tables: token embedding, and the position table under learned positions."""
    positions = model.max_positions if model.position == "learned" else 0
    return (model.vocab_size + positions) * model.d_model


def head_params(model: ml_collections.ConfigDict) -> int:
    """The untied head's (vocab, d) matrix (0 when tied to the token embedding)."""
    return 0 if model.tie_embeddings else model.vocab_size * model.d_model


def param_count(model: ml_collections.ConfigDict) -> int:
    """All parameters: embeddings, blocks, final norm, an untied head."""
    return (
        embedding_params(model)
        + model.n_layers * layer_params(model)
        + norm_params(model)
        + head_params(model)
    )


def matmul_params(model: ml_collections.ConfigDict) -> int:
    """Weights of the block matmuls (what each token multiplies through once, excluding the head): the Dense
    kernels a sparse run prunes."""
    return model.n_layers * _block_matrices(model)[0]


def flops_per_token(model: ml_collections.ConfigDict, seq_len: int, density: float = 1):
    """Training FLOPs per token, detailed: 6·matmul params·density + 12·L·S·d (attention) + 6·d·V (logits).

    density: the kept fraction of the block matmuls' weights (a float or an array of them; 1, dense, gives an int).
    """
    attention = 12 * model.n_layers * seq_len * model.d_model
    logits = 6 * model.d_model * model.vocab_size
    return 6 * matmul_params(model) * density + attention + logits


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
    if kind not in SPARSITY_SCHEDULES:
        raise ValueError(f"sparsity schedule {kind!r} is not one of {SPARSITY_SCHEDULES}")
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
    prunable = matmul_params(model)
    return param_count(model) - prunable + average_density(schedule, total_steps) * prunable


def step_densities(cfg: ml_collections.ConfigDict, total_steps: int) -> np.ndarray:
    """Density each (0-based) step 0 … total_steps − 1 of cfg's run runs at (all 1 for a dense run)."""
    if cfg.sparsity.target == 0:
        return np.ones(total_steps)
    return schedule_for(cfg.sparsity, total_steps).densities_over(total_steps)


def step_tokens(cfg: ml_collections.ConfigDict, total_steps: int) -> np.ndarray:
    """Tokens in each (0-based) step 0 … total_steps − 1 under the batch schedule."""
    phases = batch_phases(cfg)
    first_steps = np.array([first for first, _, _ in phases])
    sizes = np.array([size for _, _, size in phases], np.float64)
    return sizes[np.searchsorted(first_steps, np.arange(total_steps), side="right") - 1] * cfg.data.seq_len


def mean_density(cfg: ml_collections.ConfigDict, tokens: float) -> float:
    """Density of cfg's run were it trained for `tokens` tokens, averaged over its steps weighted by their tokens:
    the run's block matmuls spend what a dense run's would at this kept fraction (1 for a dense run)."""
    if cfg.sparsity.target == 0:
        return 1.0
    steps = steps_for(cfg, tokens)
    weights = step_tokens(cfg, steps)
    return float(np.sum(step_densities(cfg, steps) * weights) / np.sum(weights))


def spent_flops(cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Training FLOPs cfg's run has spent before each step 0 … steps (steps + 1 values): each step's tokens at
    the FLOPs per token of its density."""
    steps = train_schedule(cfg, param_count(cfg.model)).steps
    per_step = step_tokens(cfg, steps) * flops_per_token(
        cfg.model, cfg.data.seq_len, step_densities(cfg, steps)
    )
    return np.concatenate([[0.0], np.cumsum(per_step)])


@dataclasses.dataclass(frozen=True)
class Plan:
    """The analytic budget of a training run."""

    params: int
    non_embedding_params: int
    tokens: int
    steps: int
    flops_per_token: int  # detailed count, every weight dense
    flops_per_token_6n: int  # 6 · params
    train_flops: float  # what the run spends: train_flops_dense less a sparse run's pruned block matmuls
    train_flops_dense: float  # tokens · flops_per_token: the same run with every weight dense
    average_density: (
        float  # kept fraction of the block matmuls' weights, token-weighted over steps (1: dense)
    )
    tokens_per_param: float


def plan(cfg: ml_collections.ConfigDict) -> Plan:
    """Parameters, tokens, steps and FLOPs of a config (a sparse config's at each step's density)."""
    params = param_count(cfg.model)
    schedule = train_schedule(cfg, params)
    tokens, steps = schedule.tokens, schedule.steps
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    density = mean_density(cfg, tokens)
    dense = float(tokens) * per_token
    pruned = 6 * matmul_params(cfg.model) * (1 - density) * float(np.sum(step_tokens(cfg, steps)))
    return Plan(
        params=params,
        non_embedding_params=params - embedding_params(cfg.model),
        tokens=tokens,
        steps=steps,
        flops_per_token=per_token,
        flops_per_token_6n=6 * params,
        train_flops=dense - pruned,
        train_flops_dense=dense,
        average_density=density,
        tokens_per_param=tokens / params,
    )
