"""The shipped sweeps: `python -m experiments.sweep --sweep=NAME`.

Every point is a base scale point (experiments/configs/) plus `--config.a.b=v` overrides, planned by
chinchax.scaling.plan. CPU sweeps start from `cpu_tiny` (bytes, 256-token sequences) with CPU_RECIPE (8 × 256 tokens
a step; experiments/configs/cpu.py holds both).
"""

from __future__ import annotations

import dataclasses
import itertools

from chinchax.config import LLAMA_BLOCK
from chinchax.scaling import plan
from chinchax.scaling.sweep import Sweep, SweepError, seeded
from experiments import configs
from experiments.configs.cpu import CPU_BASE, CPU_RECIPE, FINAL_EVAL
from experiments.configs.sparse_cpu import sparse_cpu

CPU_HEAD = 16  # d_head at CPU widths (16–128): widths in steps of 16 give budgets about 2× apart

# Budgets where the Cerebras-aspect shapes (d_model / n_layers near 77) d16 … d96 with one layer, then d112 with
# two, are compute-optimal at 20 tokens/parameter: 7 points over 3.0 decades, ≈ 2.6e13 FLOPs in all. A second
# layer fits the aspect ratio from d112 on; the next two-layer point (d128, 2.6e13) would add ~4 minutes.
LADDER_BUDGETS = (2.1e10, 1.3e11, 4.1e11, 1.0e12, 2.0e12, 3.6e12, 1.9e13)
# Four budgets over 1.5 decades, six sizes each at 10–320 tokens per parameter (log-centred on 57): a first run
# at 5–80 (centred on the planner's 20) found the least loss at the most tokens per parameter at every budget, so
# the grid moved up to bracket the minimum. Heads of 4 give widths in steps of 4, fine enough for six distinct
# sizes at 1e11 FLOPs.
ISOFLOP_BUDGETS = (1e11, 3e11, 1e12, 3e12)
ISOFLOP_TOKENS_PER_PARAM = (10.0, 320.0)
ISOFLOP_SIZES = 6
ISOFLOP_HEAD = 4
# The block comparison: the GPT-3 block and the Llama block (LLAMA_CPU) planned onto the ladder's first six budgets
# (the seventh, a two-layer d112, would add several minutes). Heads of 8 for both blocks: the Llama block's
# grouped-query attention (two query heads per kv head) needs an even head count, and with heads of 16 its widths
# would step by 32, so that the first two budgets plan the same shape; at heads of 8 both blocks get the same
# widths, d16 … d96.
BLOCK_BUDGETS = LADDER_BUDGETS[:6]
BLOCK_HEAD = 8
# The Llama block at CPU widths: LLAMA_BLOCK (RMSNorm, rotary positions, SwiGLU, no biases, an untied head) with
# SwiGLU's hidden 8/3·d up to a multiple of 16, and two query heads per kv head (cpu_tiny's 2 heads → 1 kv head:
# the planner keeps the ratio).
LLAMA_CPU = tuple((f"model.{key}", value) for key, value in LLAMA_BLOCK.items()) + (
    ("model.d_ffn_multiple", 16),
    ("model.kv_heads", 1),
)
BLOCKS = {"gpt3": (), "llama": LLAMA_CPU}
MUTRANSFER_WIDTHS = (32, 64, 128)
# A half-decade log grid (5.6e-4 … 0.56) placed so that a point (10^-1.25 ≈ 0.056) sits at μP's measured optimum
# on this recipe: on the grid a quarter-decade lower, μP's best point at width 128 won by only 0.006 nats.
MUTRANSFER_LRS = tuple(10.0**e for e in (-3.25, -2.75, -2.25, -1.75, -1.25, -0.75, -0.25))
# Every μTransfer point trains once per seed and the analysis takes the mean loss: at 40 steps one run's loss moves by
# a few hundredths of a nat with the seed, as much as μP's optimum stands out from its neighbour (seed 3 alone put
# μP's best at width 32 one grid point low, by 0.007 nats; the mean of any two of seeds 0–4 did not).
MUTRANSFER_SEEDS = (0, 1, 2)
MUTRANSFER_SHORT = (
    ("model.n_layers", 2),
    ("data.seq_len", 128),
    ("train.batch_size", 8),
    ("train.tokens", 40 * 8 * 128),
    ("train.warmup_tokens", 5 * 8 * 128),
    ("train.eval_batches", 8),
)
MUP = (
    ("model.parametrization", "mup"),
    ("model.mup_base_width", MUTRANSFER_WIDTHS[0]),
    ("model.init_std", 0.08),
)


def smoke() -> Sweep:
    """Two one-layer points of 8 steps each: checks a machine and the launcher in about a minute."""
    short = (
        CPU_RECIPE
        + FINAL_EVAL
        + (
            ("train.tokens", 8 * 8 * 256),
            ("train.warmup_tokens", 2 * 8 * 256),
            ("train.eval_batches", 2),
        )
    )
    points = tuple(
        plan.Point(f"d{d}", CPU_BASE, plan.Shape(d, 1, d // CPU_HEAD).overrides() + short, {"width": d})
        for d in (16, 32)
    )
    return Sweep("smoke", smoke.__doc__, points)


def cpu_ladder() -> Sweep:
    """Compute-optimal points (20 tokens/param) over 3.0 decades of FLOPs, then L(C) = (C/C_c)^-alpha + E."""
    base = configs.get(CPU_BASE)
    points = plan.ladder(base, CPU_BASE, LADDER_BUDGETS, d_head=CPU_HEAD, extra=CPU_RECIPE + FINAL_EVAL)
    return Sweep("cpu_ladder", cpu_ladder.__doc__, tuple(points), analysis="compute_law")


def blocks_cpu() -> Sweep:
    """The GPT-3 and the Llama block on the first six ladder budgets (20 tokens/param each), then one compute law
    per block, drawn together."""
    base = configs.get(CPU_BASE)
    points = [
        dataclasses.replace(point, name=f"{block}_{point.name}", tags={**point.tags, "block": block})
        for block, switches in BLOCKS.items()
        for point in plan.ladder(
            base, CPU_BASE, BLOCK_BUDGETS, d_head=BLOCK_HEAD, extra=CPU_RECIPE + FINAL_EVAL + switches
        )
    ]
    return Sweep("blocks_cpu", blocks_cpu.__doc__, tuple(points), analysis="compute_law_by_block")


def isoflop_cpu() -> Sweep:
    """Four budgets × six sizes (10–320 tokens/param at equal FLOPs), then Chinchilla approach 2 under both counts."""
    base = configs.get(CPU_BASE)
    points = [
        p
        for budget in ISOFLOP_BUDGETS
        for p in plan.isoflop_grid(
            base,
            CPU_BASE,
            budget,
            sizes=ISOFLOP_SIZES,
            tokens_per_param=ISOFLOP_TOKENS_PER_PARAM,
            d_head=ISOFLOP_HEAD,
            tolerance=3.0,
            extra=CPU_RECIPE + FINAL_EVAL,
        )
    ]
    return Sweep("isoflop_cpu", isoflop_cpu.__doc__, tuple(points), analysis="isoflop")


def mutransfer() -> Sweep:
    """Widths 32/64/128 × 7 learning rates × 3 seeds, SP and μP (base width 32), 40 short steps each: the μTransfer
    figure (the mean loss over seeds)."""
    points = []
    for parametrization, width, lr in itertools.product(("sp", "mup"), MUTRANSFER_WIDTHS, MUTRANSFER_LRS):
        shape = plan.Shape(width, 2, width // 32).overrides()
        extra = MUP if parametrization == "mup" else ()
        points.append(
            plan.Point(
                f"{parametrization}_w{width}_lr{lr:.0e}",
                CPU_BASE,
                shape
                + MUTRANSFER_SHORT
                + FINAL_EVAL
                + (("train.peak_lr", lr), ("model.max_positions", 128))
                + extra,
                {"parametrization": parametrization, "width": width, "lr": lr},
            )
        )
    return Sweep("mutransfer", mutransfer.__doc__, seeded(points, MUTRANSFER_SEEDS), analysis="mutransfer")


SWEEPS = {f.__name__: f for f in (cpu_ladder, blocks_cpu, isoflop_cpu, mutransfer, smoke, sparse_cpu)}


def get(name: str) -> Sweep:
    """The sweep of that name (planned now: planning is analytic and takes about a second)."""
    if name not in SWEEPS:
        raise SweepError(f"unknown sweep {name!r}; known: {', '.join(SWEEPS)}")
    return SWEEPS[name]()
