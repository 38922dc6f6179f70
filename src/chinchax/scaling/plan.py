"""Compute-optimal planning: the scale point (shape + tokens) for a FLOP budget, and isoFLOP grids.

A planned point is a base scale point (a name `experiments.run --config=` takes) plus `--config.a.b=v`
overrides. Shapes follow Cerebras-GPT: a fixed head width, d_model a multiple of it, and d_model / n_layers
near the family's aspect ratio (its small members sit at ≈ 77: 768/10 and 1088/14). For a budget C the planner
counts parameters and FLOPs per token exactly (chinchax.model.flops) for every candidate shape, picks the one whose
allocation matches C best, and trains it for C / flops_per_token tokens (whole steps), so the point's FLOPs
equal the budget while tokens per parameter land near the target. Any block is planned (the counts know every
switch); a grouped-query base (model.kv_heads < n_heads) keeps its query heads per key/value head (its group): a
shape gets n_heads / group kv heads, and head counts the group does not divide are skipped. A sparse base
(sparsity.target > 0) is counted as it spends: its block matmuls at the run's mean density
(chinchax.model.flops.mean_density), so it trains for more tokens than a dense point of the same budget.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Iterable, Iterator, Mapping

import ml_collections

from chinchax import config as config_lib
from chinchax.model import flops
from chinchax.scaling import fit

# d_model / n_layers of Cerebras-GPT 111M (768/10) and 256M (1088/14), the family's smallest members.
CEREBRAS_ASPECT_RATIO = 77.0
ASPECT_TOLERANCE = 1.5  # candidate shapes have d_model / n_layers within this factor of the target
TOKENS_PER_PARAM = 20.0  # Chinchilla / Cerebras-GPT
# Counting conventions: C as the detailed count (attention and logits included) or 6·N per token; N with the
# embeddings (`total`, Cerebras-GPT's and Chinchilla's count) or without (`non_embedding`, Kaplan's). The
# defaults are Cerebras-GPT's: detailed C, total N.
FLOP_COUNTS = ("detailed", "6n")
PARAM_COUNTS = ("total", "non_embedding")
ISOFLOP_TOKENS_PER_PARAM = (5.0, 80.0)  # an isoFLOP grid's span, log-centred on TOKENS_PER_PARAM
MAX_HEADS = 512
OVERSHOOT = math.log(4.0)  # the search stops at widths whose every shape overshoots the target this much
DENSITY_ITERATIONS = 20  # of tokens_for_budget (a sparse run's tokens and mean density set each other)


class PlanError(ValueError):
    """A plan request that cannot be met; the message is one line saying what."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: `experiments.run --config=<base> --config.<key>=<value> ...`, plus tags for tables."""

    name: str
    base: str
    overrides: tuple[tuple[str, object], ...] = ()
    tags: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def run_args(self) -> list[str]:
        """The experiments.run arguments, workdir aside."""
        return [f"--config={self.base}"] + [f"--config.{k}={format_value(v)}" for k, v in self.overrides]


def format_value(value: object) -> str:
    """A config value as config_flags parses it back (floats round-trip through repr)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def configure(
    base: ml_collections.ConfigDict, overrides: Iterable[tuple[str, object]]
) -> ml_collections.ConfigDict:
    """A validated copy of `base` with the dotted-key overrides applied (unknown keys fail, one line)."""
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.lock()
    overrides = dict(overrides)
    unknown = sorted(set(overrides) - set(config_lib.SCHEMA))
    if unknown:
        raise PlanError(f"unknown config key(s) in overrides: {', '.join(unknown)}")
    cfg.update_from_flattened_dict(overrides)
    return config_lib.validate(cfg)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape: width, depth, heads, and key/value heads (0: one per query head)."""

    d_model: int
    n_layers: int
    n_heads: int
    kv_heads: int = 0

    def overrides(self) -> tuple[tuple[str, object], ...]:
        """The shape's config overrides (model.kv_heads only for a grouped-query shape)."""
        grouped = (("model.kv_heads", self.kv_heads),) if self.kv_heads else ()
        return (
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
        ) + grouped


SHAPE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.kv_heads")


def kv_group(base: ml_collections.ConfigDict) -> int:
    """Query heads per key/value head of the base config (1: every head its own)."""
    return base.model.n_heads // config_lib.kv_heads(base.model)


def candidate_shapes(
    d_head: int,
    aspect_ratio: float = CEREBRAS_ASPECT_RATIO,
    tolerance: float = ASPECT_TOLERANCE,
    group: int = 1,
) -> Iterator[list[Shape]]:
    """Per width d_model = k·d_head (k = 1 … MAX_HEADS, ascending, k a multiple of `group`), the shapes whose
    d_model / n_layers is within `tolerance` of `aspect_ratio`, with k / group kv heads when group > 1; widths too
    narrow for one layer at that ratio get one layer."""
    if d_head <= 0:
        raise PlanError(f"d_head must be > 0, got {d_head}")
    if aspect_ratio <= 0 or tolerance < 1:
        raise PlanError(f"need aspect_ratio={aspect_ratio} > 0 and tolerance={tolerance} >= 1")
    if group < 1:
        raise PlanError(f"query heads per kv head must be >= 1, got {group}")
    for heads in range(group, MAX_HEADS + 1, group):
        d = heads * d_head
        low = max(1, math.ceil(d / (aspect_ratio * tolerance)))
        high = max(1, math.floor(d * tolerance / aspect_ratio))
        kv = heads // group if group > 1 else 0
        yield [Shape(d, layers, heads, kv) for layers in range(low, high + 1)]


def _search(
    value, target: float, d_head: int, aspect_ratio: float, tolerance: float, group: int = 1
) -> list[tuple[float, Shape]]:
    """(log value − target, shape) for candidate shapes by ascending width, stopping once a whole width
    overshoots `target` by more than OVERSHOOT (values grow with width)."""
    found = []
    for shapes in candidate_shapes(d_head, aspect_ratio, tolerance, group):
        errors = [(value(s) - target, s) for s in shapes]
        found += errors
        if min(e for e, _ in errors) > OVERSHOOT:
            break
    return found


def per_token(
    model, seq_len: int, count: str = "detailed", params_count: str = "total", density: float = 1
) -> float:
    """Training FLOPs per token: the detailed count, or 6·N with N counted as `params_count` says; the block
    matmuls' weights at `density` (a sparse run's mean kept fraction; 1 when dense)."""
    if count == "detailed":
        return flops.flops_per_token(model, seq_len, density)
    return 6 * (counted_params(model, params_count) - (1 - density) * flops.matmul_params(model))


def counted_params(model, params_count: str = "total") -> int:
    """N under the convention: all parameters, or without the token and position embeddings."""
    total = flops.param_count(model)
    return total if params_count == "total" else total - flops.embedding_params(model)


def tokens_for_budget(
    cfg: ml_collections.ConfigDict, budget: float, count: str = "detailed", params_count: str = "total"
) -> int:
    """Training tokens that spend `budget` FLOPs, rounded to whole steps of the first batch size (≥ 1 step); a
    sparse run's at the mean density of a run of those tokens (iterated to a fixed point)."""
    step_tokens = cfg.train.batch_size * cfg.data.seq_len
    tokens, density = None, 1.0
    for _ in range(DENSITY_ITERATIONS):
        flops_per_token = per_token(cfg.model, cfg.data.seq_len, count, params_count, density)
        found = max(1, round(budget / flops_per_token / step_tokens)) * step_tokens
        if found == tokens:
            break
        tokens, density = found, flops.mean_density(cfg, found)
    return tokens


def _check_budget(budget: float, count: str, params_count: str = "total") -> None:
    if not (math.isfinite(budget) and budget > 0):
        raise PlanError(f"FLOP budget must be finite and > 0, got {budget!r}")
    if count not in FLOP_COUNTS:
        raise PlanError(f"FLOP count {count!r} is not one of {FLOP_COUNTS}")
    if params_count not in PARAM_COUNTS:
        raise PlanError(f"parameter count {params_count!r} is not one of {PARAM_COUNTS}")


def _with_shape(base: ml_collections.ConfigDict, shape: Shape) -> types.SimpleNamespace:
    """The base model fields with the shape's (a plain namespace: the counts in chinchax.model.flops read attributes)."""
    fields = base.model.to_dict()
    fields.update(
        d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads, kv_heads=shape.kv_heads
    )
    return types.SimpleNamespace(**fields)


def solve_shape(
    base: ml_collections.ConfigDict,
    budget: float,
    allocation: float | fit.PowerLaw = TOKENS_PER_PARAM,
    *,
    d_head: int = 64,
    aspect_ratio: float = CEREBRAS_ASPECT_RATIO,
    tolerance: float = ASPECT_TOLERANCE,
    count: str = "detailed",
    params_count: str = "total",
) -> Shape:
    """The candidate shape whose compute-optimal budget is closest (in log) to `budget`.

    `allocation` is tokens per parameter (the shape's budget is then tpp·N·flops_per_token), or a fitted
    N_opt(C) power law (the shape with N closest to N_opt(budget)); N and flops_per_token are counted as
    `params_count` and `count` say.
    """
    _check_budget(budget, count, params_count)
    if isinstance(allocation, fit.PowerLaw):
        target = math.log(float(allocation(budget)))
    elif allocation > 0:
        target = math.log(budget)
    else:
        raise PlanError(f"tokens per parameter must be > 0, got {allocation!r}")

    def value(shape: Shape) -> float:
        model = _with_shape(base, shape)
        params = counted_params(model, params_count)
        if isinstance(allocation, fit.PowerLaw):
            return math.log(params)
        density = flops.mean_density(base, allocation * params)
        return math.log(
            allocation * params * per_token(model, base.data.seq_len, count, params_count, density)
        )

    found = _search(value, target, d_head, aspect_ratio, tolerance, kv_group(base))
    return min(found, key=lambda found: abs(found[0]))[1]


def budget_tag(budget: float) -> str:
    """A short name for a budget, e.g. 1.6e+11 → 'c1.6e11'."""
    mantissa, exponent = f"{budget:.2g}".split("e") if "e" in f"{budget:.2g}" else (f"{budget:.2g}", "0")
    return f"c{mantissa}e{int(exponent)}"


def _point(
    base: ml_collections.ConfigDict,
    base_name: str,
    name: str,
    shape: Shape,
    budget: float,
    count: str,
    params_count: str,
    extra: tuple[tuple[str, object], ...],
    tags: Mapping[str, object],
) -> Point:
    """The point training `shape` on `budget` FLOPs; the shape's keys win over the same keys in `extra` (a shape
    with a head per kv head resets a base's explicit model.kv_heads to 0)."""
    extra = tuple((k, v) for k, v in extra if k not in SHAPE_KEYS)
    shape_overrides = shape.overrides()
    if not shape.kv_heads and configure(base, extra).model.kv_heads:
        shape_overrides += (("model.kv_heads", 0),)
    cfg = configure(base, shape_overrides + extra)
    tokens = tokens_for_budget(cfg, budget, count, params_count)
    return Point(
        name=name,
        base=base_name,
        overrides=shape_overrides + (("train.tokens", tokens),) + extra,
        tags={"budget": budget, "counting": f"{params_count}/{count}", **tags},
    )


def compute_optimal(
    base: ml_collections.ConfigDict,
    base_name: str,
    budget: float,
    allocation: float | fit.PowerLaw = TOKENS_PER_PARAM,
    *,
    d_head: int = 64,
    aspect_ratio: float = CEREBRAS_ASPECT_RATIO,
    tolerance: float = ASPECT_TOLERANCE,
    count: str = "detailed",
    params_count: str = "total",
    extra: Iterable[tuple[str, object]] = (),
) -> Point:
    """The compute-optimal point for `budget` FLOPs (see solve_shape), trained for budget / flops_per_token tokens.

    `extra` overrides (learning rate, batch size, …) apply on top of the shape; they may change the count.
    """
    extra = tuple(extra)
    shape = solve_shape(
        configure(base, extra),
        budget,
        allocation,
        d_head=d_head,
        aspect_ratio=aspect_ratio,
        tolerance=tolerance,
        count=count,
        params_count=params_count,
    )
    name = f"{budget_tag(budget)}_d{shape.d_model}_l{shape.n_layers}"
    return _point(base, base_name, name, shape, budget, count, params_count, extra, {})


def ladder(
    base: ml_collections.ConfigDict,
    base_name: str,
    budgets: Iterable[float],
    allocation: float | fit.PowerLaw = TOKENS_PER_PARAM,
    **options,
) -> list[Point]:
    """One compute-optimal point per budget; fails (one line) when two budgets land on the same shape."""
    points = [compute_optimal(base, base_name, b, allocation, **options) for b in budgets]
    shapes = [p.overrides[:3] for p in points]
    for i, shape in enumerate(shapes):
        if shape in shapes[:i]:
            raise PlanError(
                f"budgets {points[shapes.index(shape)].tags['budget']:.3g} and "
                f"{points[i].tags['budget']:.3g} plan the same shape {dict(shape)}; space them further"
            )
    return points


def isoflop_grid(
    base: ml_collections.ConfigDict,
    base_name: str,
    budget: float,
    sizes: int = 5,
    tokens_per_param: tuple[float, float] = ISOFLOP_TOKENS_PER_PARAM,
    *,
    d_head: int = 64,
    aspect_ratio: float = CEREBRAS_ASPECT_RATIO,
    tolerance: float = ASPECT_TOLERANCE,
    count: str = "detailed",
    params_count: str = "total",
    extra: Iterable[tuple[str, object]] = (),
) -> list[Point]:
    """`sizes` distinct shapes at one budget whose tokens per parameter are log-spaced over `tokens_per_param`
    (low, high): centred (in log) on the planner's optimum when the span is, e.g. 5–80 around 20.

    Each is the free candidate with tokens/param closest (in log) to its target, D = budget / flops_per_token;
    every point trains for those tokens, so all share the budget.
    """
    low, high = tokens_per_param
    if sizes < 2 or not 0 < low < high:
        raise PlanError(
            f"an isoFLOP grid needs sizes={sizes} >= 2 and 0 < {low} < {high} tokens per parameter"
        )
    _check_budget(budget, count, params_count)
    extra = tuple(extra)
    cfg = configure(base, extra)
    targets = [high * (low / high) ** (i / (sizes - 1)) for i in range(sizes)]  # small N (many tokens) first

    def log_allocation(shape: Shape) -> float:
        """log(N · flops per token): budget / this is the shape's tokens per parameter."""
        model = _with_shape(cfg, shape)
        return math.log(
            counted_params(model, params_count) * per_token(model, cfg.data.seq_len, count, params_count)
        )

    found = _search(log_allocation, math.log(budget / low), d_head, aspect_ratio, tolerance, kv_group(cfg))
    candidates = {s: value for value, s in ((e + math.log(budget / low), s) for e, s in found)}
    if len(candidates) < sizes:
        raise PlanError(
            f"only {len(candidates)} shapes near {budget:.3g} FLOPs; ask for fewer than {sizes} sizes"
        )
    chosen: list[tuple[Shape, float]] = []
    for target in targets:
        free = [s for s in candidates if s not in {c for c, _ in chosen}]
        chosen.append((min(free, key=lambda s: abs(candidates[s] - math.log(budget / target))), target))
    chosen.sort(key=lambda pair: counted_params(_with_shape(cfg, pair[0]), params_count))
    return [
        _point(
            base,
            base_name,
            f"{budget_tag(budget)}_d{s.d_model}_l{s.n_layers}",
            s,
            budget,
            count,
            params_count,
            extra,
            {"tokens_per_param_target": target},
        )
        for s, target in chosen
    ]


def describe(base: ml_collections.ConfigDict, point: Point) -> dict:
    """The planned numbers of a point (flops.plan of its config: `train_flops` what it spends, a sparse point's
    block matmuls at each step's density, beside `train_flops_dense`), as a JSON-ready dict."""
    cfg = configure(base, point.overrides)
    plan = flops.plan(cfg)
    return {
        "name": point.name,
        **{k: v for k, v in point.tags.items()},
        "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers,
        "n_heads": cfg.model.n_heads,
        "kv_heads": config_lib.kv_heads(cfg.model),
        **dataclasses.asdict(plan),
    }
