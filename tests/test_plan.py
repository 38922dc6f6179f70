"""Compute-optimal planning against independent numbers: the Cerebras-GPT family, Chinchilla's Table 3, scipy."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize

from chinchax.model import flops
from chinchax.scaling import fit, plan
from experiments import configs
from tests.conftest import REPO

# Hoffmann et al. 2022, Table 3 (C = 6ND): (FLOPs, parameters, tokens) at about 20 tokens per parameter.
CHINCHILLA_TABLE3 = ((1.92e19, 400e6, 8.0e9), (1.21e20, 1e9, 20.2e9), (1.23e22, 10e9, 205.1e9))


@pytest.mark.parametrize("size", ["111M", "256M", "590M", "1.3B", "2.7B"])
def test_budget_of_a_cerebras_model_plans_its_size(cerebras_reference, size):
    """At the 6ND budget of a published model (the paper's own steps × batch × 2048 tokens), the planner picks
    a shape of the same size at the Cerebras aspect ratio."""
    row = next(r for r in cerebras_reference["sp"] if r["name"] == size)
    tokens = row["steps"] * row["batch"] * 2048
    budget = 6.0 * row["params"] * tokens
    base = configs.get("chinchilla_111m")
    point = plan.compute_optimal(base, "chinchilla_111m", budget, count="6n")
    planned = plan.describe(base, point)
    assert planned["params"] == pytest.approx(row["params"], rel=0.03)
    assert 6.0 * planned["params"] * planned["tokens"] == pytest.approx(budget, rel=0.01)
    aspect = planned["d_model"] / planned["n_layers"]
    assert 1 / plan.ASPECT_TOLERANCE <= aspect / plan.CEREBRAS_ASPECT_RATIO <= plan.ASPECT_TOLERANCE
    assert planned["d_model"] % 64 == 0 and planned["d_model"] // planned["n_heads"] == 64


def test_exact_cerebras_shape_is_recovered_from_its_detailed_budget(cerebras_reference):
    row = next(r for r in cerebras_reference["sp"] if r["name"] == "1.3B")
    base = configs.get("chinchilla_1.3b")
    point = plan.compute_optimal(base, "chinchilla_1.3b", flops.plan(base).train_flops)
    planned = plan.describe(base, point)
    assert (planned["d_model"], planned["n_layers"], planned["params"]) == (
        row["d_model"],
        row["n_layers"],
        row["params"],
    )


def test_aspect_ratio_constant_matches_the_family_table(cerebras_reference):
    small = [r for r in cerebras_reference["sp"] if r["name"] in ("111M", "256M")]
    measured = np.mean([r["d_model"] / r["n_layers"] for r in small])
    assert plan.CEREBRAS_ASPECT_RATIO == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize(("budget", "params", "tokens"), CHINCHILLA_TABLE3)
def test_chinchilla_table3_allocation(budget, params, tokens):
    base = configs.get("chinchilla_111m")
    planned = plan.describe(base, plan.compute_optimal(base, "chinchilla_111m", budget, count="6n"))
    assert planned["params"] == pytest.approx(params, rel=0.05)
    assert planned["tokens"] == pytest.approx(tokens, rel=0.05)


@pytest.mark.parametrize("budget", [3e18, 7e19, 2e21])
def test_detailed_budget_is_spent_at_twenty_tokens_per_param(budget):
    base = configs.get("chinchilla_111m")
    planned = plan.describe(base, plan.compute_optimal(base, "chinchilla_111m", budget))
    assert planned["train_flops"] == pytest.approx(budget, rel=0.01)
    assert planned["tokens_per_param"] == pytest.approx(20.0, rel=0.1)


def test_fitted_allocation_is_followed():
    """With a fitted Chinchilla law, the planned N is the law's N_opt(C): the closed form of Hoffmann et al.
    (Eq. 4, C = 6ND) and scipy's minimum of L = E + A/N^α + B/D^β along the budget, both written here."""
    A, B, E, alpha, beta = 482.01, 2085.43, 1.8172, 0.3478, 0.3658  # Hoffmann et al.'s published fit
    law = fit.ChinchillaLaw(A=A, B=B, E=E, alpha=alpha, beta=beta)
    seed = int(np.random.SeedSequence().entropy % 2**31)
    budget = 10.0 ** np.random.default_rng(seed).uniform(19.5, 21.5)  # a fresh budget around 1e20–3e21

    def loss_along_budget(log_n):
        n = np.exp(log_n)
        return E + A / n**alpha + B / (budget / (6 * n)) ** beta

    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n_closed = g * (budget / 6) ** (beta / (alpha + beta))
    res = optimize.minimize_scalar(
        loss_along_budget, bounds=(10, 40), method="bounded", options={"xatol": 1e-10}
    )
    assert math.exp(res.x) == pytest.approx(n_closed, rel=1e-4), seed
    base = configs.get("chinchilla_111m")
    point = plan.compute_optimal(base, "chinchilla_111m", budget, law.optimal_params(), count="6n")
    planned = plan.describe(base, point)
    # the planner rounds N_opt to a GPT shape (d_model a multiple of 64 at the Cerebras aspect ratio)
    assert planned["params"] == pytest.approx(n_closed, rel=0.03), (seed, budget)
    assert 6.0 * planned["params"] * planned["tokens"] == pytest.approx(budget, rel=0.01), (seed, budget)


def test_isoflop_grid_shares_the_budget():
    base = configs.get("chinchilla_111m")
    budget = 4e19
    grid = plan.isoflop_grid(base, "chinchilla_111m", budget, sizes=5, tokens_per_param=(5.0, 80.0))
    rows = [plan.describe(base, p) for p in grid]
    params = [r["params"] for r in rows]
    assert len(set(params)) == 5 and params == sorted(params)
    assert all(r["train_flops"] == pytest.approx(budget, rel=0.01) for r in rows)
    # D / N = budget / (flops_per_token · N) against each target 80, 40, 20, 10, 5 (shapes are discrete)
    for row, target in zip(rows, (80.0, 40.0, 20.0, 10.0, 5.0), strict=True):
        ratio = budget / (row["flops_per_token"] * row["params"])
        assert row["tokens_per_param_target"] == pytest.approx(target)
        assert ratio == pytest.approx(row["tokens_per_param"], rel=0.01) and 1 / 1.3 < ratio / target < 1.3, (
            row
        )


def test_isoflop_cpu_spans_its_tokens_per_param_range():
    from experiments.configs import sweeps

    rows = [plan.describe(configs.get(p.base), p) for p in sweeps.isoflop_cpu().points]
    budgets = sorted({r["budget"] for r in rows})
    low, high = sweeps.ISOFLOP_TOKENS_PER_PARAM
    assert len(budgets) >= 3 and len(rows) == sweeps.ISOFLOP_SIZES * len(budgets) >= 5 * len(budgets)
    for budget in budgets:
        tpp = sorted(r["tokens_per_param"] for r in rows if r["budget"] == budget)
        assert tpp[0] < 1.3 * low and 0.75 * high < tpp[-1] < 2 * high, (budget, tpp)
        centre = math.sqrt(low * high)
        assert 0.7 * centre < math.exp(np.mean(np.log(tpp))) < 1.4 * centre, (budget, tpp)  # log-centred


def test_counting_conventions_change_the_plan():
    """20 tokens per non-embedding parameter with C = 6·N·D (Kaplan's count) against the Cerebras count."""
    base = configs.get("cpu_tiny")
    budget = 1e12
    cerebras = plan.describe(base, plan.compute_optimal(base, "cpu_tiny", budget, d_head=16, tolerance=3.0))
    kaplan_point = plan.compute_optimal(
        base, "cpu_tiny", budget, d_head=16, tolerance=3.0, count="6n", params_count="non_embedding"
    )
    kaplan = plan.describe(base, kaplan_point)
    assert cerebras["counting"] == "total/detailed" and kaplan["counting"] == "non_embedding/6n"
    n = kaplan["non_embedding_params"]
    assert 6.0 * n * kaplan["tokens"] == pytest.approx(budget, rel=0.02)
    assert kaplan["tokens"] / n == pytest.approx(20.0, rel=0.35)  # the nearest shape on a coarse grid
    assert (
        kaplan["params"] > cerebras["params"]
    )  # without the embeddings in N, the same C buys a larger model


def test_cpu_ladder_spans_the_decades_it_promises():
    from experiments.configs import sweeps

    ladder = sweeps.cpu_ladder()
    rows = [plan.describe(configs.get(p.base), p) for p in ladder.points]
    budgets = [r["train_flops"] for r in rows]
    assert len(rows) >= 6 and math.log10(max(budgets) / min(budgets)) >= 2.5
    for row in rows:
        assert row["train_flops"] == pytest.approx(row["budget"], rel=0.02)
        assert row["tokens_per_param"] == pytest.approx(20.0, rel=0.05)
    # Cerebras-style shapes: d_model / n_layers within 1.5x of 77 (one layer below d_model 77 / 1.5), and the
    # largest point deeper than one layer.
    shapes = [dict(p.overrides) for p in ladder.points]
    for shape in shapes:
        ratio = shape["model.d_model"] / shape["model.n_layers"]
        assert shape["model.n_layers"] == 1 or 77 / 1.5 <= ratio <= 77 * 1.5, shape
    assert shapes[-1]["model.n_layers"] >= 2, shapes[-1]


def test_bad_requests_fail_in_one_line():
    base = configs.get("cpu_tiny")
    with pytest.raises(plan.PlanError, match="budget must be finite and > 0"):
        plan.compute_optimal(base, "cpu_tiny", -1.0)
    with pytest.raises(plan.PlanError, match="unknown config key"):
        plan.compute_optimal(base, "cpu_tiny", 1e11, extra=[("model.widht", 3)])
    with pytest.raises(plan.PlanError, match="plan the same shape"):
        plan.ladder(base, "cpu_tiny", [1e11, 1.01e11], d_head=16)
    with pytest.raises(plan.PlanError, match="FLOP count"):
        plan.compute_optimal(base, "cpu_tiny", 1e11, count="7n")


def test_planned_point_round_trips_through_the_dry_run():
    """The point's experiments.run arguments (formatted overrides) give the planned numbers."""
    base = configs.get("cpu_tiny")
    point = plan.compute_optimal(base, "cpu_tiny", 7.3e11, d_head=16, extra=[("train.peak_lr", 1.7e-3)])
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", *point.run_args(), "--dry_run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    planned = plan.describe(base, point)
    for key in ("params", "tokens", "train_flops", "flops_per_token"):
        assert report[key] == planned[key]
    assert report["train_flops"] == pytest.approx(7.3e11, rel=0.02)


def llama_params(vocab: int, d: int, layers: int, heads: int, kv: int, multiple: int) -> int:
    """The Llama block's parameter count written out (HF's LlamaForCausalLM, untied, no biases): embedding and
    head V·d each, per layer q and o d², k and v d·kv·d_head each, SwiGLU's three d·ffn (ffn = 8/3·d rounded up
    to `multiple`) and two RMSNorm gains, and the final gain."""
    ffn = math.ceil(8 * d / 3 / multiple) * multiple
    per_layer = 2 * d * d + 2 * d * kv * (d // heads) + 3 * d * ffn + 2 * d
    return 2 * vocab * d + layers * per_layer + d


def test_a_grouped_query_base_plans_shapes_that_keep_its_group():
    """llama_111m (12 heads, 3 kv heads: 4 query heads per kv head) planned to a fresh 6ND budget: the planned
    shape keeps 4 query heads per kv head, and it is the shape a brute-force search over every GQA shape at the
    Cerebras aspect ratio picks with the parameter count written out here (N closest in log to √(C/120))."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    budget = 10.0 ** np.random.default_rng(seed).uniform(18.5, 21.0)
    base = configs.get("llama_111m")
    planned = plan.describe(base, plan.compute_optimal(base, "llama_111m", budget, count="6n"))
    heads, kv = planned["n_heads"], planned["kv_heads"]
    assert heads % 4 == 0 and kv == heads // 4 and planned["d_model"] == 64 * heads, (seed, planned)
    assert planned["params"] == llama_params(
        50257, planned["d_model"], planned["n_layers"], heads, kv, 256
    ), (seed, planned)
    assert 6.0 * planned["params"] * planned["tokens"] == pytest.approx(budget, rel=0.01), (seed, planned)
    shapes = [
        (d, layers, d // 64)
        for d in range(256, 64 * 512 + 1, 256)  # heads a multiple of the group 4
        for layers in range(1, 1000)
        if 77 / 1.5 <= d / layers <= 77 * 1.5
    ]
    best = min(
        shapes,
        key=lambda s: abs(
            math.log(llama_params(50257, s[0], s[1], s[2], s[2] // 4, 256) / math.sqrt(budget / 120))
        ),
    )
    assert (planned["d_model"], planned["n_layers"], planned["n_heads"]) == best, (seed, budget, planned)


@pytest.mark.parametrize("budget", [3e18, 7e19, 2e21])
def test_a_grouped_query_base_spends_its_detailed_budget_at_twenty_tokens_per_param(budget):
    base = configs.get("llama_111m")
    point = plan.compute_optimal(base, "llama_111m", budget)
    planned = plan.describe(base, point)
    assert dict(point.overrides)["model.kv_heads"] == planned["n_heads"] // 4 == planned["kv_heads"]
    assert planned["train_flops"] == pytest.approx(budget, rel=0.01)
    assert planned["tokens_per_param"] == pytest.approx(20.0, rel=0.1)


def test_candidate_shapes_skip_head_counts_the_group_does_not_divide():
    for group in (1, 3):
        widths = list(plan.candidate_shapes(8, group=group))
        assert [shapes[0].n_heads for shapes in widths] == list(range(group, plan.MAX_HEADS + 1, group))
        for shape in (s for shapes in widths for s in shapes):
            assert shape.d_model == 8 * shape.n_heads
            assert shape.kv_heads == (shape.n_heads // group if group > 1 else 0), shape


def test_the_shape_sets_kv_heads_over_the_base_and_the_extras():
    """A base whose kv_heads comes from the extras (cpu_tiny's 2 heads, 1 kv head: group 2) plans every point with
    its own kv heads; a base with one kv head per query head set explicitly plans kv_heads back to 0."""
    base = configs.get("cpu_tiny")
    grouped = plan.isoflop_grid(
        base, "cpu_tiny", 1e12, sizes=4, d_head=8, tolerance=3.0, extra=[("model.kv_heads", 1)]
    )
    for point in grouped:
        cfg = plan.configure(base, point.overrides)
        assert cfg.model.n_heads == 2 * cfg.model.kv_heads and cfg.model.n_heads % 2 == 0, point
    base.model.kv_heads = 2  # one kv head per query head, set explicitly: group 1
    point = plan.compute_optimal(base, "cpu_tiny", 1e12, d_head=16)
    planned = plan.configure(base, point.overrides).model
    assert planned.n_heads == 4 and planned.kv_heads == 0, point  # not 2 kv heads for 4 query heads
    assert plan.describe(base, point)["train_flops"] == pytest.approx(1e12, rel=0.02)
