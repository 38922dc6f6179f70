"""What a sparse run is planned to cost: FLOPs at each step's density (the plan, the dry run, the planner,
curves.csv), the masks and the pruner's copy in the memory plan, the gradient norm the clip sees, exact counts.

References are computed here by hand: a step's FLOPs per token 6·L·12d²·density + 12·L·S·d + 6·d·V (d_ffn = 4d),
its density the geometric kept fraction (1 − s)^((k + 1)/n) after event k of n (only the event steps are taken
from chinchax.model.flops), memory bytes from the kernels' shapes and the mesh split, norms and counts in numpy.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chinchax import config
from chinchax.dryrun import aot, report
from chinchax.model import flops
from chinchax.model import loss as loss_lib
from chinchax.parallel import memory_plan, mesh
from chinchax.scaling import plan, sweep
from chinchax.training import sparsity, train
from chinchax.training.state import init_state
from experiments import configs

STEPS, BATCH, SEQ = 40, 8, 64


def sparse_tiny(target: float = 0.5, **train_fields):
    cfg = configs.get("cpu_tiny")
    cfg.data.seq_len = SEQ
    cfg.train.update(batch_size=BATCH, tokens=BATCH * SEQ * STEPS, **train_fields)
    cfg.sparsity.update(target=target, every=4)
    return config.validate(cfg)


def densities_by_hand(cfg, steps: int) -> np.ndarray:
    """The density each step runs at: 1, then (1 − s)^((k + 1)/n) from event k's step on."""
    events = flops.schedule_for(cfg.sparsity, steps).steps
    density = np.ones(steps)
    for k, step in enumerate(events):
        density[step:] = (1 - cfg.sparsity.target) ** ((k + 1) / len(events))
    return density


def per_token_by_hand(cfg, density):
    m = cfg.model
    d, layers = m.d_model, m.n_layers
    return 6 * layers * 12 * d * d * density + 12 * layers * cfg.data.seq_len * d + 6 * d * m.vocab_size


def test_plan_and_dry_run_count_the_flops_the_sparse_run_spends():
    cfg = sparse_tiny()
    density = densities_by_hand(cfg, STEPS)
    assert len(set(density)) >= 4  # several events
    expected = float(np.sum(BATCH * SEQ * per_token_by_hand(cfg, density)))
    dense = BATCH * SEQ * STEPS * per_token_by_hand(cfg, 1.0)
    got = flops.plan(cfg)
    assert got.train_flops == pytest.approx(expected, rel=1e-12)
    assert got.train_flops_dense == pytest.approx(dense, rel=1e-12)
    assert got.average_density == pytest.approx(np.mean(density), rel=1e-12)
    assert got.train_flops < 0.9 * dense
    dry, _ = report.report(cfg)  # the dry run's plan (and its JSON) carries both figures
    assert dry["train_flops"] == pytest.approx(expected, rel=1e-12)
    assert dry["train_flops_dense"] == pytest.approx(dense, rel=1e-12)
    assert f"{expected:.3e} FLOPs of the dense {dense:.3e}" in report.format_plan(dry)
    dense_cfg = sparse_tiny(target=0.0)
    assert flops.plan(dense_cfg).train_flops == flops.plan(dense_cfg).train_flops_dense == dense


def test_planner_trains_a_sparse_point_for_its_budget():
    """A sparse point spends the budget (within one step) at its densities, so it trains on more tokens than
    the dense point of the same budget."""
    base = sparse_tiny()
    budget = 3e11
    point = plan.compute_optimal(base, "cpu_tiny", budget)
    cfg = plan.configure(base, point.overrides)
    steps = cfg.train.tokens // (BATCH * SEQ)
    assert steps * BATCH * SEQ == cfg.train.tokens
    spent = float(np.sum(BATCH * SEQ * per_token_by_hand(cfg, densities_by_hand(cfg, steps))))
    assert abs(spent - budget) <= BATCH * SEQ * per_token_by_hand(cfg, 1.0)
    assert plan.describe(base, point)["train_flops"] == pytest.approx(spent, rel=1e-12)
    dense = plan.compute_optimal(sparse_tiny(target=0.0), "cpu_tiny", budget)
    assert cfg.train.tokens > 1.1 * dict(dense.overrides)["train.tokens"]


def test_curves_count_a_sparse_runs_flops_so_far(tmp_path):
    cfg = sparse_tiny()
    run = tmp_path / "runs" / "p"
    run.mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    logged = [5, 17, 29, STEPS]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "tokens": s * BATCH * SEQ, "loss": 1.0 / s}) + "\n" for s in logged)
    )
    row = {"point": "p", "params": 1, "non_embedding_params": 1, "flops_per_token": 1, "average_density": 0.7}
    per_step = BATCH * SEQ * per_token_by_hand(cfg, densities_by_hand(cfg, STEPS))
    curve = sweep.training_curve(tmp_path, row)
    assert [c["flops"] for c in curve] == pytest.approx([np.sum(per_step[:s]) for s in logged], rel=1e-12)


def _kernel_elements_per_device(cfg, fsdp: int) -> int:
    """QKV (d, 3d), attn-out (d, d), fc1 (d, 4d), fc2 (4d, d) per layer, each split over fsdp on its d axis."""
    d = cfg.model.d_model
    return cfg.model.n_layers * (3 * d * d + d * d + 4 * d * d + 4 * d * d) // fsdp


def test_memory_plan_counts_the_masks_and_the_pruners_copy():
    """wse-8 (weights streamed) and gpu-8 (state on the device), fsdp 8: masks are 1 byte per prunable weight
    on the device, the pruner's fp32 candidate 4 bytes; XLA's state arguments hold the masks too."""
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    for preset, holds_state in (("gpu-8", True), ("wse-8", False)):
        cfg = sparse_tiny(microbatches=1)
        cfg.mesh.preset = preset
        dense_cfg = config.validate(plan.configure(cfg, [("sparsity.target", 0.0)]))
        device = mesh.preset(preset).device
        elements = memory_plan.param_shard_elements(cfg, sizes)
        sparse, dense = (memory_plan.plan(c, sizes, device, elements) for c in (cfg, dense_cfg))
        kernels = _kernel_elements_per_device(cfg, 8)
        assert (sparse.masks, sparse.pruner) == (kernels, 4 * kernels)
        assert (dense.masks, dense.pruner) == (0, 0)
        assert sparse.state == dense.state + kernels
        assert sparse.total - dense.total == (5 * kernels if holds_state else 0), preset
    compiled = aot.compile_plan(cfg, "wse-8", devices=8)  # the last preset's (fsdp 8)
    scalars = 4 * 4  # the step, the pruner's count and optax's two int32 counts
    assert compiled["state_bytes_per_device"] == sparse.state + scalars


def test_logged_grad_norm_is_the_norm_the_clip_sees():
    """One train step with a quarter of the kernels' weights masked: the logged grad_norm is the norm of the
    gradients with the masked entries left out (numpy, from jax.grad of the loss)."""
    cfg = sparse_tiny()
    state = jax.jit(lambda key: init_state(cfg, key))(jax.random.key(0))
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda m: rng.random(m.shape) < 0.75, state.opt_state.masks)
    state = state.replace(opt_state=state.opt_state._replace(masks=masks))
    tokens = rng.integers(0, cfg.model.vocab_size, (1, BATCH, SEQ + 1), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    _, metrics = jax.jit(train.make_train_step(cfg))(state, batch)  # one device: no mesh needed

    def mean_loss(params):
        total, count = loss_lib.summed_cross_entropy(cfg.model)(
            params, batch["inputs"][0], batch["targets"][0]
        )
        return total / count

    grads = jax.jit(jax.grad(mean_loss))(state.params)
    squares = 0.0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g, np.float64)
        kept = masks["blocks"][path[1].key]["kernel"] if sparsity.is_prunable(path) else True
        squares += np.sum(np.where(kept, g, 0.0) ** 2)
    unmasked = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert float(metrics["grad_norm"]) == pytest.approx(np.sqrt(squares), rel=1e-5)
    assert np.sqrt(squares) < 0.99 * unmasked  # the masks leave a visible part out


def test_counts_are_exact_above_two_to_the_24():
    """4099 × 4097 weights (above 2^24, where fp32 cannot count one by one): the kept count is exact, and a prune
    keeps exactly the asked number of weights, those of largest magnitude (distinct floats from 1 upwards)."""
    rows, columns = 4099, 4097
    mask = np.ones((rows, columns), bool)
    mask[0, :2] = False
    high, low = jax.jit(sparsity.count_true)([mask])
    assert int(high) * sparsity.WORD + int(low) == rows * columns - 2  # odd: no fp32 holds it
    rank = np.random.default_rng(0).permutation(rows * columns).astype(np.uint32).reshape(rows, columns)
    weights = (rank + np.uint32(0x3F800000)).view(np.float32)  # bit patterns of 1.0 and up: monotone in rank
    keep = 2**24 + 1
    kept = jax.jit(sparsity.shrink)(
        {"kernel": jnp.ones((rows, columns), bool)}, {"kernel": weights}, (jnp.uint32(0), jnp.uint32(keep))
    )["kernel"]
    assert np.array_equal(np.asarray(kept), rank >= rows * columns - keep)
