"""μTransfer measured on real training: the shipped `mutransfer` sweep's points, trained in-process.

The sweep (experiments/configs/sweeps.py `mutransfer()`) is widths 32/64/128 × a half-decade grid of 7 peak
learning rates × SP and μP (base width 32) × 3 seeds, 40 steps of 8 × 128 bytes of the embedded corpus each,
scored by the validation loss averaged over the seeds. μP's claim is that the best learning rate found at the
base width stays the best at every width; under SP it moves (wider models want a smaller one). Both are checked
on the sweep's own points.

How it runs: every point of one (parametrization, width) differs from the others only in `train.peak_lr`, and
the optimizer's update is linear in the peak learning rate (clip → Adam → decoupled weight decay → −schedule →
per-role multipliers), so one step compiled with the learning rate as an argument trains every point of that
shape; a real `train.train` run of one point checks that this loop gives the trainer's loss. The loop takes
the trainer's batches (the same loader and seed), its initial state, optimizer and loss; the validation loss is
the mean over the first `train.eval_batches` validation batches in order, as `train.make_evaluate` computes it.

Seeds are fixed, not drawn: this is a measurement of where the optimum lies. Each point is trained with its
config's `train.seed`, the sweep's seeds 0, 1 and 2 (initialisation and data order), and
report.best_learning_rates averages their validation losses as the sweep's analysis does: at 40 steps one run's
loss moves by a few hundredths of a nat with the seed, about as much as μP's optimum stands out from its
neighbour. Measured on the 2-core CPU with seeds 0–4, one run each: μP's best learning rate was 10^-1.25 at
every width in seeds 0, 1, 2 and 4 (by 0.046–0.096 nats over the next grid point), and in seed 3 at widths 64
and 128, while at width 32 seed 3's best was 10^-1.75 by 0.007; averaged over any two of the five seeds it was
10^-1.25 at every width. SP's best was 10^-2.25, 10^-1.75 or 10^-1.25 at width 32 and 10^-2.75 at width 128 in
every seed (by ≥ 0.012 nats), falling with width.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chinchax import data
from chinchax.model import flops, gpt
from chinchax.scaling import plan, report
from chinchax.training import state as train_state
from chinchax.training import train
from experiments import configs
from experiments.configs import sweeps


def point_configs():
    """{(parametrization, width): {seed: [(lr, validated config), ...]}} for the shipped sweep's points."""
    shapes = {}
    for point in sweeps.mutransfer().points:
        cfg = plan.configure(configs.get(point.base), point.overrides)
        key = (point.tags["parametrization"], point.tags["width"])
        shapes.setdefault(key, {}).setdefault(point.tags["seed"], []).append((point.tags["lr"], cfg))
    return shapes


def without_lr(cfg) -> dict:
    flat = cfg.to_dict()
    flat["train"] = {k: v for k, v in flat["train"].items() if k != "peak_lr"}
    return flat


def train_batches(cfg, steps: int, seed: int) -> list[dict]:
    """The trainer's first `steps` batches with train.seed = seed (its loader and split; one microbatch a step)."""
    store = data.resolve_store(cfg.data.dataset, cfg.data.tokenizer, progress=False)
    loader = data.make_loader(store, "train", cfg.data.seq_len, cfg.train.batch_size, seed)
    return [next(loader) for _ in range(steps)]


def validation_batches(cfg) -> list[dict]:
    store = data.resolve_store(cfg.data.dataset, cfg.data.tokenizer, progress=False)
    loader = data.make_loader(
        store,
        "validation",
        cfg.data.seq_len,
        cfg.train.batch_size,
        cfg.train.seed,
        num_epochs=1,
        shuffle=False,
    )
    return [b for _, b in zip(range(cfg.train.eval_batches), loader, strict=False)]


def sweep_shape(points: list[tuple[float, object]], batches: list[dict], validation: list[dict]) -> dict:
    """{lr: final validation loss (inf if the run went non-finite)} for the points of one shape and seed,
    initialised and fed as the trainer does with their train.seed (batches: that seed's train batches)."""
    cfg = points[0][1]
    for _, other in points:
        assert without_lr(other) == without_lr(cfg), (
            "points of one shape and seed differ beyond train.peak_lr"
        )
    unit = cfg.copy_and_resolve_references()
    unit.train.peak_lr = 1.0  # the update at peak LR η is η × the update at peak LR 1
    planned = flops.plan(unit)
    assert planned.steps == len(batches), (planned.steps, len(batches))
    schedule = train_state.run_schedule(unit)
    opt = train_state.optimizer(unit, gpt.param_shapes(unit.model), schedule)
    loss = train.loss_fn(unit)

    def mean_loss(params, inputs, targets):
        total, count = loss(params, inputs, targets)
        return total / count

    @jax.jit
    def step(state, inputs, targets, lr):
        value, grads = jax.value_and_grad(mean_loss)(state.params, inputs, targets)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: lr * u, updates)
        return train_state.TrainState(
            state.step + 1, optax.apply_updates(state.params, updates), opt_state
        ), value

    evaluate = jax.jit(mean_loss)
    start = train_state.init_state(unit, jax.random.key(unit.train.seed), schedule)
    losses = {}
    for lr, _ in points:
        state, train_losses = start, []
        for batch in batches:
            state, value = step(state, batch["inputs"], batch["targets"], jnp.float32(lr))
            train_losses.append(value)
        final = float(np.mean([float(evaluate(state.params, b["inputs"], b["targets"])) for b in validation]))
        finite = np.isfinite(np.asarray(jax.device_get(train_losses))).all() and math.isfinite(final)
        losses[lr] = final if finite else math.inf  # the trainer stops such a run as diverged
    return losses


def loss_table(losses: dict) -> str:
    """Loss per (parametrization, width) row and learning-rate column."""
    lrs = sorted({lr for by_lr in losses.values() for lr in by_lr})
    lines = ["lr:        " + " ".join(f"{lr:8.1e}" for lr in lrs)]
    for (parametrization, width), by_lr in sorted(losses.items()):
        lines.append(f"{parametrization:>4} w{width:<4} " + " ".join(f"{by_lr[lr]:8.3f}" for lr in lrs))
    return "\n".join(lines)


def test_sweep_covers_both_parametrizations_at_every_width():
    shapes = point_configs()
    assert set(shapes) == set(itertools.product(("sp", "mup"), sweeps.MUTRANSFER_WIDTHS))
    for (parametrization, width), by_seed in shapes.items():
        assert sorted(by_seed) == sorted(sweeps.MUTRANSFER_SEEDS)
        for seed, points in by_seed.items():
            assert sorted(lr for lr, _ in points) == sorted(sweeps.MUTRANSFER_LRS)
            for _, cfg in points:
                assert (cfg.model.parametrization, cfg.model.d_model) == (parametrization, width)
                assert cfg.train.seed == seed
                if parametrization == "mup":
                    assert cfg.model.mup_base_width == sweeps.MUTRANSFER_WIDTHS[0]


@pytest.mark.slow  # about 8 min wall on the shared 2-core machine: 126 runs of 40 steps
def test_mup_best_learning_rate_transfers_and_sp_best_moves(tmp_path):
    """Train every point of the sweep (each with its seed) and average each learning rate's validation losses
    over the seeds; μP's best learning rate is one grid point at widths 32, 64 and 128 (and not an edge of the
    grid), SP's best is smaller at width 128 than at 32. First, one point trained by train.train (the loader,
    the jitted step on the mesh, the evaluation) must give this loop's loss."""
    shapes = point_configs()
    seeds = sweeps.MUTRANSFER_SEEDS
    first = next(iter(shapes.values()))[seeds[0]][0][1]
    steps, validation = flops.plan(first).steps, validation_batches(first)
    runs = {}  # seed → {(parametrization, width): {lr: loss}}
    for seed in seeds:
        batches = train_batches(first, steps, seed)
        runs[seed] = {key: sweep_shape(by_seed[seed], batches, validation) for key, by_seed in shapes.items()}
    losses = {
        key: {lr: float(np.mean([runs[seed][key][lr] for seed in seeds])) for lr in by_lr}
        for key, by_lr in runs[seeds[0]].items()
    }
    context = "\n".join(
        [f"validation loss after {steps} steps, mean of seeds {seeds}:", loss_table(losses)]
        + [line for seed in seeds for line in (f"seed {seed}:", loss_table(runs[seed]))]
    )
    print("\n" + context)

    lr, cfg = shapes[("mup", 32)][seeds[0]][len(sweeps.MUTRANSFER_LRS) // 2]
    summary = train.train(cfg, tmp_path / "run", show_progress=False)
    one_run = runs[cfg.train.seed][("mup", 32)][lr]
    assert summary["final_eval_loss"] == pytest.approx(one_run, abs=2e-3), (lr, summary, context)

    rows = [
        {"parametrization": p, "width": w, "lr": lr, "seed": seed, "loss": loss}
        for seed, by_shape in runs.items()
        for (p, w), by_lr in by_shape.items()
        for lr, loss in by_lr.items()
        if math.isfinite(loss)  # the sweep's report sees diverged points only as crosses
    ]
    best = report.best_learning_rates(rows)
    context = f"best learning rates {best}\n{context}"
    for by_lr in losses.values():  # every shape learned: its best run is far below the uniform ln(257)
        assert min(by_lr.values()) < math.log(257) - 2.0, context
    grid, widths = sorted(sweeps.MUTRANSFER_LRS), [str(w) for w in sweeps.MUTRANSFER_WIDTHS]
    mup, sp = best["mup"], best["sp"]
    assert grid[0] < mup[widths[0]] < grid[-1], f"μP's best is at the edge of the grid; {context}"
    assert {mup[w] for w in widths} == {mup[widths[0]]}, (
        f"μP's best learning rate moved with width; {context}"
    )
    assert sp[widths[-1]] < sp[widths[0]], f"SP's best learning rate did not fall with width; {context}"
