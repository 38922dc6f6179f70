"""The training state (step, params, optimizer state) and how a run's state is created."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import ml_collections

from chinchax.config import TrainSchedule, train_schedule
from chinchax.model import flops, gpt
from chinchax.training import optim


class TrainState(flax.struct.PyTreeNode):
    """Everything a step updates: steps done, fp32 params, the optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


def run_schedule(cfg: ml_collections.ConfigDict) -> TrainSchedule:
    """The run's tokens, steps and batches (its tokens from its parameter count when train.tokens is 0)."""
    return train_schedule(cfg, flops.param_count(cfg.model))


def optimizer(cfg: ml_collections.ConfigDict, params, schedule: TrainSchedule | None = None):
    """The run's optax optimizer (schedule: the run's, when already derived)."""
    return optim.make_optimizer(cfg, params, schedule or run_schedule(cfg))


def new_state(cfg: ml_collections.ConfigDict, params, schedule: TrainSchedule | None = None) -> TrainState:
    """Step 0 with these params and a fresh optimizer state."""
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        opt_state=optimizer(cfg, params, schedule).init(params),
    )


def init_state(
    cfg: ml_collections.ConfigDict, rng: jax.Array, schedule: TrainSchedule | None = None
) -> TrainState:
    """Step 0 with freshly initialised params."""
    return new_state(cfg, gpt.init_params(cfg.model, rng), schedule)
