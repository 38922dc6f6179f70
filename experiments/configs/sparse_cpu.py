"""The sparse CPU sweep: does a sparse run train like a dense model of its average parameter count?

Three groups of one-layer, four-head shapes (cpu_tiny with the CPU recipe of experiments/configs/cpu.py):

- dense: a ladder of widths × token counts, enough (N, D) variety to fit L(N, D) = E + A/N^α + B/D^β
  (Chinchilla approach 3); its widest point at the sparse token count is the sparse runs' dense base;
- sparse: the widest shape pruned to SPARSE_TARGETS (geometric schedule between 25% and 75% of its compute);
- twin: per sparse run, the dense shape whose N is closest (in log) to that run's N_avg, the average non-zero
  parameter count over training (embeddings counted dense), trained for the same tokens.

N_avg is known before training (chinchax.training.sparsity is pure in the schedule), so twins are planned.
All shapes keep four heads, so widths step by 4: that is the twin grid. Tags: `kind` (dense/sparse/twin),
`target` (the run's own final sparsity, 0 for dense and twin runs), `twin_of` (a twin's sparse point),
`n_avg_plan` (a sparse run's planned N_avg).
"""

from __future__ import annotations

import math

from chinchax.config import steps_for
from chinchax.model import flops
from chinchax.scaling import plan
from chinchax.scaling.sweep import Sweep
from chinchax.training import sparsity
from experiments import configs
from experiments.configs.cpu import CPU_BASE, CPU_RECIPE, FINAL_EVAL

HEADS = 4  # every shape's head count: widths step by HEADS
LAYERS = 1
STEP_TOKENS = 8 * 256  # CPU_RECIPE's batch × cpu_tiny's sequence
LADDER_WIDTHS = (32, 48, 64, 96)
LADDER_STEPS = (120, 240, 480)  # 0.25 M, 0.5 M, 1 M tokens
SPARSE_WIDTH = 96  # the ladder's widest shape: N 161,280, 69% of it in the prunable kernels
SPARSE_STEPS = 480  # 6 tokens per parameter: about 1.1e12 FLOPs at the dense count
SPARSE_TARGETS = (0.2, 0.4, 0.6, 0.8)
# Pinned, like CPU_RECIPE: the geometric schedule at 25%/75% of compute, with events every 10 of the 480
# steps (20–25 events) rather than the config default of 100.
SPARSE_RECIPE = (
    ("sparsity.schedule", "geometric"),
    ("sparsity.start_fraction", 0.25),
    ("sparsity.end_fraction", 0.75),
    ("sparsity.every", 10),
)


def _shape(width: int) -> plan.Shape:
    return plan.Shape(width, LAYERS, HEADS)


def _tokens_tag(tokens: int) -> str:
    return f"D{round(tokens / 1e3)}k"


def planned_n_avg(base, overrides) -> float:
    """N_avg of a sparse point (its config's schedule over its steps), as the trainer reports it."""
    cfg = plan.configure(base, overrides)
    steps = steps_for(cfg, cfg.train.tokens)
    return sparsity.average_nonzero_params(cfg.model, sparsity.schedule_for(cfg.sparsity, steps), steps)


def twin_width(base, n_avg: float) -> int:
    """The width (a multiple of HEADS up to SPARSE_WIDTH, LAYERS deep) whose dense N is closest in log to n_avg."""
    widths = range(HEADS, SPARSE_WIDTH + 1, HEADS)

    def distance(width: int) -> float:
        return abs(math.log(flops.param_count(plan.configure(base, _shape(width).overrides()).model) / n_avg))

    return min(widths, key=distance)


def sparse_cpu() -> Sweep:
    """A dense ladder (4 widths × 3 token counts) and one shape sparse at 20–80%, each with its N_avg dense twin."""
    base = configs.get(CPU_BASE)
    recipe = CPU_RECIPE + FINAL_EVAL
    points = []

    def dense(name: str, width: int, tokens: int, twin_of: str | None) -> plan.Point:
        kind = "twin" if twin_of else "dense"
        overrides = _shape(width).overrides() + (("train.tokens", tokens),) + recipe
        return plan.Point(name, CPU_BASE, overrides, {"kind": kind, "target": 0.0, "twin_of": twin_of})

    for width in LADDER_WIDTHS:
        for steps in LADDER_STEPS:
            tokens = steps * STEP_TOKENS
            points.append(dense(f"dense_d{width}_{_tokens_tag(tokens)}", width, tokens, None))
    tokens = SPARSE_STEPS * STEP_TOKENS
    for target in SPARSE_TARGETS:
        overrides = (
            _shape(SPARSE_WIDTH).overrides()
            + (("train.tokens", tokens),)
            + recipe
            + (("sparsity.target", target),)
            + SPARSE_RECIPE
        )
        n_avg = planned_n_avg(base, overrides)
        name = f"sparse{round(100 * target)}_d{SPARSE_WIDTH}_{_tokens_tag(tokens)}"
        points.append(
            plan.Point(
                name,
                CPU_BASE,
                overrides,
                {"kind": "sparse", "target": target, "twin_of": None, "n_avg_plan": round(n_avg)},
            )
        )
        width = twin_width(base, n_avg)
        points.append(dense(f"twin{round(100 * target)}_d{width}_{_tokens_tag(tokens)}", width, tokens, name))
    return Sweep("sparse_cpu", sparse_cpu.__doc__, tuple(points), analysis="sparse")
