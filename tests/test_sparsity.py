"""Sparse pre-training: the schedules against the published runs, and the masks under the real optimizer."""

import json

import jax
import numpy as np
import optax
import pytest

from chinchax import config
from chinchax.model import flops, gpt
from chinchax.training import checkpoint, optim, sparsity, train
from chinchax.training.state import run_schedule
from experiments import configs

# The HF model cards of the sparse 1B runs: (name, steps, first event, last event, final sparsity, the
# geometric schedule's average density as published). Events every 100 steps.
CARDS = [
    ("1b-20p", 11_200, 2_500, 8_100, 0.2, 0.8928),
    ("1b-40p", 13_050, 2_500, 8_875, 0.4, 0.7649),
    ("1b-60p", 16_375, 2_500, 10_100, 0.6, 0.6096),
    ("1b-80p", 25_050, 2_500, 12_600, 0.8, 0.3992),
]
EVERY = 100


@pytest.mark.parametrize("name, steps, start, end, target, published", CARDS, ids=[c[0] for c in CARDS])
def test_geometric_schedule_matches_the_published_runs(name, steps, start, end, target, published):
    schedule = flops.make_schedule("geometric", target, start, end, EVERY)
    assert flops.average_density(schedule, steps) == pytest.approx(published, abs=1e-3)
    assert schedule.densities[-1] == pytest.approx(1 - target)
    spent = flops.compute_fractions(schedule, steps)
    assert spent[start] == pytest.approx(0.25, abs=0.005)
    assert spent[end] == pytest.approx(0.75, abs=0.005)
    cubic = flops.make_schedule("cubic", target, start, end, EVERY)
    assert abs(flops.average_density(cubic, steps) - published) > 0.02
    assert cubic.densities[-1] == pytest.approx(1 - target)


@pytest.mark.parametrize("name, steps, start, end, target, published", CARDS, ids=[c[0] for c in CARDS])
def test_compute_fractions_solve_to_the_published_steps(name, steps, start, end, target, published):
    solved_start, solved_end = flops.solve_steps("geometric", target, steps, 0.25, 0.75, EVERY)
    assert abs(solved_start - start) <= EVERY and abs(solved_end - end) <= EVERY
    spent = flops.compute_fractions(
        flops.make_schedule("geometric", target, solved_start, solved_end, EVERY), steps
    )
    assert spent[solved_start] == pytest.approx(0.25, abs=0.005)
    assert spent[solved_end] == pytest.approx(0.75, abs=0.005)


def test_one_shot_prunes_once_at_the_start_fraction():
    start, end = flops.solve_steps("one_shot", 0.5, 1000, 0.25, 0.75, EVERY)
    schedule = flops.make_schedule("one_shot", 0.5, start, end, EVERY)
    assert schedule.steps == (start,) and schedule.densities == (0.5,)
    assert flops.compute_fractions(schedule, 1000)[start] == pytest.approx(0.25, abs=0.005)


def test_masks_under_adamw_with_weight_decay():
    """100 steps of the project's AdamW (clip, decay 0.1) wrapped by the pruner: 5 events to 70% sparsity.

    Random gradients stand in for the loss: every weight gets a push each step, pruned ones included.
    """
    cfg = configs.get("cpu_tiny")
    cfg.train.update(weight_decay=0.1, peak_lr=1e-2, tokens=100 * cfg.train.batch_size * cfg.data.seq_len)
    cfg = config.validate(cfg)
    params = gpt.init_params(cfg.model, jax.random.key(0))
    schedule = flops.make_schedule("geometric", 0.7, 20, 60, 10)
    opt = sparsity.prune(optim.make_optimizer(cfg, params, run_schedule(cfg)), schedule)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        grads = tree.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    prunable = {
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if sparsity.is_prunable(path)
    }
    assert prunable == {f"['blocks']['{m}']['kernel']" for m in ("qkv", "attn_out", "fc1", "fc2")}
    total = flops.matmul_params(cfg.model)
    initial, previous_masks = params, state.masks
    for i in range(100):
        params, state = step(params, state, jax.random.key(i))
        masks = jax.device_get(state.masks)
        for path, mask in jax.tree_util.tree_leaves_with_path(masks):  # masks only shrink ...
            kernel = np.asarray(params["blocks"][path[1].key]["kernel"])
            assert not (mask & ~_at(previous_masks, path)).any()
            assert (kernel[~mask].view(np.uint32) == 0).all(), (i, path)  # ... and what they drop is +0.0
        kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
        assert kept == round(schedule.density_at(i + 1) * total), i
        previous_masks = masks
    zeros = sum(
        int((np.asarray(params["blocks"][m]["kernel"]) == 0).sum()) for m in ("qkv", "attn_out", "fc1", "fc2")
    )
    assert zeros == total - round(0.3 * total)  # exactly 70% of the prunable weights
    for name in ("token_embed", "position_embed", "ln_f"):  # never pruned, still trained
        for before, after in zip(jax.tree.leaves(initial[name]), jax.tree.leaves(params[name]), strict=True):
            assert (np.asarray(after) != 0).all() and not np.array_equal(before, after), name


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_ranking_is_global_over_all_prunable_tensors():
    """Two kernels at scales 1 and 0.1: one threshold over both (computed here with numpy) prunes the small one
    far more; masks only shrink at the second event; the embedding, bias and norm are left alone."""
    rng = np.random.default_rng(0)
    params = {
        "big": {"kernel": rng.normal(0, 1.0, (32, 48)).astype(np.float32), "bias": np.ones(48, np.float32)},
        "small": {"kernel": rng.normal(0, 0.1, (3, 16, 40)).astype(np.float32)},
        "embed": {"embedding": rng.normal(0, 0.01, (50, 8)).astype(np.float32)},
        "norm": {"scale": np.full(8, 1e-3, np.float32)},
    }
    original = jax.tree.map(np.copy, params)
    schedule = flops.Schedule(steps=(1, 2), densities=(0.5, 0.2))
    opt = sparsity.prune(optax.identity(), schedule)
    state = opt.init(params)
    big, small = np.abs(params["big"]["kernel"]), np.abs(params["small"]["kernel"])
    expected = {"big": np.ones(big.shape, bool), "small": np.ones(small.shape, bool)}
    for density in schedule.densities:
        updates, state = opt.update(jax.tree.map(np.zeros_like, params), state, params)
        params = jax.device_get(optax.apply_updates(params, updates))
        alive = np.concatenate([big[expected["big"]], small[expected["small"]]])
        threshold = np.sort(alive)[::-1][round(density * (big.size + small.size)) - 1]
        expected = {
            "big": expected["big"] & (big >= threshold),
            "small": expected["small"] & (small >= threshold),
        }
        for name in ("big", "small"):
            np.testing.assert_array_equal(np.asarray(state.masks[name]["kernel"]), expected[name])
            np.testing.assert_array_equal(
                params[name]["kernel"], np.where(expected[name], original[name]["kernel"], 0)
            )
    assert expected["small"].mean() < 0.02 < 0.4 < expected["big"].mean()  # per-tensor ranking: 0.2 and 0.2
    assert state.masks["big"]["bias"] is None and state.masks["embed"]["embedding"] is None
    for name, leaf in (("big", "bias"), ("embed", "embedding"), ("norm", "scale")):
        np.testing.assert_array_equal(params[name][leaf], original[name][leaf])


def test_a_sparse_run_logs_density_and_n_avg(tmp_path):
    """A 24-step cpu_tiny run pruned to 50% every 4 steps: measured densities follow the schedule, the summary
    carries N_avg and the FLOPs at the running density, the checkpoint holds exactly 50% zeros."""
    cfg = configs.get("cpu_tiny")
    cfg.data.seq_len = 64
    cfg.train.update(batch_size=8, tokens=8 * 64 * 24, log_every=1, eval_batches=1, final_eval="validation")
    cfg.sparsity.update(target=0.5, every=4)
    cfg = config.validate(cfg)
    summary = train.train(cfg, tmp_path, show_progress=False)
    schedule = sparsity.schedule_for(cfg.sparsity, 24)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    prunable, params = flops.matmul_params(cfg.model), flops.param_count(cfg.model)
    assert len(schedule.steps) >= 3
    for record in records:  # kept counts, from the masks on the device
        assert round(record["density"] * prunable) == round(schedule.density_at(record["step"]) * prunable)
    average = np.mean([schedule.density_at(step) for step in range(24)])
    assert summary["n_avg"] == pytest.approx(params - prunable * (1 - average))
    assert summary["final_density"] == 0.5 and summary["average_density"] == pytest.approx(average)
    dense_flops = flops.plan(cfg).train_flops_dense
    assert summary["train_flops_dense"] == dense_flops
    assert summary["train_flops"] == pytest.approx(dense_flops - 6 * prunable * (1 - average) * 8 * 64 * 24)
    _, saved = checkpoint.load_params(tmp_path)
    kernels = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(saved)
        if sparsity.is_prunable(path)
    ]
    assert sum(int((k == 0).sum()) for k in kernels) == prunable // 2


@pytest.mark.parametrize(
    "field, value",
    [
        ("target", 1.0),
        ("target", -0.1),
        ("schedule", "linear"),
        ("start_fraction", 0.0),
        ("end_fraction", 0.1),
        ("every", 0),
    ],
)
def test_bad_sparsity_config_is_refused(field, value):
    cfg = configs.get("cpu_tiny")
    cfg.sparsity[field] = value
    with pytest.raises(config.ConfigError, match=f"sparsity.{field}"):
        config.validate(cfg)
