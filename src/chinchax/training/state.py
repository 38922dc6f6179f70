"""The training state (step, params, optimizer state) and how a run's state is created."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import ml_collections

from chinchax.model import flops, gpt
from chinchax.training import optim


class TrainState(flax.struct.PyTreeNode):
    """Everything a step updates: steps done, fp32 params, the optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


def total_tokens(cfg: ml_collections.ConfigDict) -> int:
    """Training tokens of the run (what the LR schedule spans)."""
    return flops.plan(cfg).tokens


def optimizer(cfg: ml_collections.ConfigDict, params, tokens: int | None = None):
    """The run's optax optimizer (tokens: the run's training tokens, when already planned)."""
    return optim.make_optimizer(cfg, params, tokens or total_tokens(cfg))


def new_state(cfg: ml_collections.ConfigDict, params, tokens: int | None = None) -> TrainState:
    """Step 0 with these params and a fresh optimizer state."""
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        opt_state=optimizer(cfg, params, tokens).init(params),
    )


def init_state(cfg: ml_collections.ConfigDict, rng: jax.Array, tokens: int | None = None) -> TrainState:
    """Step 0 with freshly initialised params."""
    return new_state(cfg, gpt.init_params(cfg.model, rng), tokens)
