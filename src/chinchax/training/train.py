"""Training: the jit'd step (gradient accumulation over microbatches) and the loop around it.

The loop resumes from the newest readable checkpoint in the workdir (train state and data position), logs
metrics, evaluates, checkpoints, stops cleanly on SIGTERM/SIGINT and refuses NaNs, then evaluates the splits
train.final_eval names and writes summary.json, with where the process's wall time went (start-up, first step,
training, evaluations, checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import shlex
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from chinchax import data
from chinchax.config import batch_size_at, final_eval_splits, flatten, microbatch_size, tokens_before
from chinchax.model import flops, gpt
from chinchax.model import loss as loss_lib
from chinchax.parallel import hardware, memory_plan, mesh
from chinchax.training import checkpoint, optim, sparsity
from chinchax.training.metrics import RunLog
from chinchax.training.state import TrainState, init_state, optimizer, total_tokens

__all__ = ["TrainState", "init_state", "make_train_step", "train"]


class TrainingError(RuntimeError):
    """A run that cannot go on."""


class Diverged(TrainingError):
    """The loss or gradient norm went non-finite (experiments.run exits with launch.DIVERGED_STATUS)."""


def loss_fn(cfg: ml_collections.ConfigDict):
    """The run's loss (chinchax.model.loss): (params, inputs, targets) → (summed cross-entropy, token count)."""
    return loss_lib.summed_cross_entropy(cfg.model)


def make_train_step(cfg: ml_collections.ConfigDict, tokens: int | None = None):
    """step(state, batch) → (state, metrics); batch arrays are (microbatches, sequences, seq_len).

    tokens: the run's training tokens (the schedule's span) when the caller has planned them already.

    Gradients are averaged over the step's real tokens (padding rows excluded) with a scan over microbatches
    (one compiled body; no scan for a single microbatch; with several, each data-parallel replica sums its
    own rows' gradients and the replicas reduce them once: `mesh.summed_over_replicas`); the metrics are the mean
    loss, the global norm of the gradients the clip sees (a sparse run's masked ones, without the pruned
    weights) before clipping, the step's learning rate and, for a sparse run, the density of the prunable
    weights once the step is done.
    """
    loss = loss_fn(cfg)
    tokens = tokens or total_tokens(cfg)
    opt = optimizer(cfg, gpt.param_shapes(cfg.model), tokens)
    lr = optim.learning_rate(cfg, tokens)

    def mean_share(params, microbatch, tokens_in_step):
        """A microbatch's summed loss as its share of the step's mean over real tokens."""
        return loss(params, microbatch["inputs"], microbatch["targets"])[0] / tokens_in_step

    def summed_shares(shared, batch):
        """(loss, gradients) of each of batch's microbatches in turn, summed (one compiled body, a scan)."""
        params, tokens_in_step = shared

        def accumulate(carry, microbatch):
            share = jax.value_and_grad(mean_share)(params, microbatch, tokens_in_step)
            return jax.tree.map(jnp.add, carry, share), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(accumulate, zeros, batch)[0]

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        tokens_in_step = jnp.sum(batch["targets"] != loss_lib.IGNORE).astype(jnp.float32)
        if batch["inputs"].shape[0] == 1:  # one microbatch: no accumulator, one gradient reduction either way
            first = jax.tree.map(lambda x: x[0], batch)
            mean_loss, grads = jax.value_and_grad(mean_share)(state.params, first, tokens_in_step)
        else:  # each data-parallel replica sums its own microbatches; the replicas reduce once
            shares = mesh.summed_over_replicas(summed_shares)
            mean_loss, grads = shares((state.params, tokens_in_step), batch)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        new_state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        sparse = isinstance(opt_state, sparsity.SparsityState)
        clipped = sparsity.gated(state.opt_state.masks, grads) if sparse else grads
        metrics = {"loss": mean_loss, "grad_norm": optax.global_norm(clipped), "lr": lr(state.step)}
        if sparse:
            metrics["density"] = sparsity.density(opt_state.masks)
        return new_state, metrics

    return step


def make_eval_step(cfg: ml_collections.ConfigDict, devices):
    """(params, batch) → mean loss of one (1, sequences, seq_len) global batch, under the mesh's rules."""
    loss = loss_fn(cfg)

    def mean_loss(params, batch):
        total, count = loss(params, batch["inputs"][0], batch["targets"][0])
        return total / count

    jitted = jax.jit(mean_loss)

    def eval_step(params, batch):
        with jax.set_mesh(devices), nn.logical_axis_rules(mesh.rules(cfg.mesh)):
            return jitted(params, batch)

    return eval_step


def evaluate(cfg, eval_step, devices, params, store: pathlib.Path, split: str) -> float:
    """Mean loss over the first train.eval_batches batches of a split (in order, the same every time)."""
    micro = microbatch_size(cfg.train)
    loader = data.make_loader(
        store,
        split,
        cfg.data.seq_len,
        micro // jax.process_count(),
        cfg.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        num_epochs=1,
        shuffle=False,
    )
    batches = zip(range(cfg.train.eval_batches), loader, strict=False)
    losses = [float(eval_step(params, _global_batch(devices, [b], micro))) for _, b in batches]
    return float(np.mean(losses))


def enable_compilation_cache() -> None:
    """Keep compiled programs in JAX's persistent cache (<chinchax cache>/jax, unless JAX_COMPILATION_CACHE_DIR
    names another), so a rerun or a sweep point of the same shape compiles nothing."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(data.default_cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def fit_to_devices(cfg: ml_collections.ConfigDict, devices) -> tuple[ml_collections.ConfigDict, object]:
    """cfg with 'auto' microbatches / remat resolved for this mesh and the memory plan's choice; ConfigError
    in one line, before anything is allocated, when no choice fits the devices' memory."""
    preset = mesh.preset(cfg.mesh.preset)
    resolved, choice = memory_plan.choose(
        cfg, dict(devices.shape), preset.device, memory_plan.run_budget(preset)
    )
    memory_plan.check(choice, cfg)
    return resolved, choice


@contextlib.contextmanager
def _timed(seconds: dict, key: str):
    """Adds the block's wall time to seconds[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] += time.perf_counter() - start


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def _same_run(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> None:
    """A workdir holds one run: resuming with a different config is refused, naming the differences."""
    if not (workdir / "config.json").exists():
        return
    saved = checkpoint.read_config(workdir)
    if saved.to_json() != cfg.to_json():
        ours, theirs = flatten(cfg), flatten(saved)
        diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise TrainingError(f"{workdir} holds a run with a different config (differs in {', '.join(diff)})")


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    show_progress: bool = True,
    started: float | None = None,
) -> dict | None:
    """Train (or resume) the run in `workdir`; return the summary, or None when stopped by a signal.

    started: the time.perf_counter() at which this process began (experiments.run passes it), so that the
    summary's wall_seconds and startup_seconds count the imports too; default: this call.
    """
    wall_start = time.perf_counter() if started is None else started
    spent = dict.fromkeys(("startup", "first_step", "eval", "checkpoint"), 0.0)
    workdir = pathlib.Path(workdir)
    devices = mesh.make_mesh(cfg.mesh)
    requested, (cfg, choice) = cfg, fit_to_devices(cfg, devices)
    _same_run(workdir, requested)
    if (workdir / "summary.json").exists():  # a finished run: nothing to do
        print(f"{workdir} holds a finished run; its summary:", file=sys.stderr)
        return json.loads((workdir / "summary.json").read_text())
    store = data.resolve_store(cfg.data.dataset, cfg.data.tokenizer, progress=show_progress)
    plan = flops.plan(cfg)
    checkpoint.write_config(workdir, requested)
    micro = microbatch_size(cfg.train)
    loader = data.make_loader(
        store,
        "train",
        cfg.data.seq_len,
        micro // jax.process_count(),
        cfg.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    rng = jax.random.key(cfg.train.seed)
    init = functools.partial(init_state, tokens=plan.tokens)
    target = mesh.sharded_shapes(cfg, devices, jax.eval_shape(lambda: init(cfg, rng)))
    step_fn = mesh.jit_train_step(cfg, devices, make_train_step(cfg, plan.tokens), target)
    mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
    found = checkpoint.restore_latest(mngr, target, loader, set_aside=True)
    state = found[1] if found else mesh.init_sharded_state(cfg, devices, init, rng, target)
    start = int(state.step)
    eval_step = make_eval_step(cfg, devices)
    peak, peak_source = hardware.peak_flops_per_device(cfg.train.peak_flops_per_device)
    peak *= jax.device_count()
    log = RunLog(workdir, plan.steps, start, show_progress)
    log.note(f"step: {choice.reason}")
    if found:
        log.note(f"resumed from step {start} in {workdir}")
    stop = StopRequest()
    tokens = tokens_before(cfg, start)
    window_loss, window_steps, window_tokens = 0.0, 0, 0
    timer_start, timed_tokens, timed_seconds = time.perf_counter(), 0, 0.0
    last_saved, final_train_loss = (start if found else None), None
    spent["startup"] = timer_start - wall_start

    for step in range(start, plan.steps):
        sequences = batch_size_at(cfg, step)
        batch = _global_batch(devices, [next(loader) for _ in range(sequences // micro)], micro)
        state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            mngr.wait_until_finished()
            mngr.close()
            log.close()
            raise Diverged(
                f"loss {metrics['loss']} / grad norm {metrics['grad_norm']} at step {step + 1}: training "
                f"diverged; the last good checkpoint is step {last_saved} in {workdir / 'checkpoints'}"
            )
        step_tokens = sequences * cfg.data.seq_len
        tokens += step_tokens
        window_loss, window_steps, window_tokens = (
            window_loss + float(metrics["loss"]),
            window_steps + 1,
            window_tokens + step_tokens,
        )
        if step > start:  # the first step of a process includes compilation
            timed_tokens += step_tokens
            timed_seconds += time.perf_counter() - timer_start
        else:
            spent["first_step"] = time.perf_counter() - timer_start
        log.advance()
        done = step + 1
        if done % cfg.train.log_every == 0 or done == plan.steps:
            record = {
                "step": done,
                "tokens": tokens,
                "loss": window_loss / window_steps,
                "lr": float(metrics["lr"]),
                "grad_norm": float(metrics["grad_norm"]),
            }
            per_token = plan.flops_per_token
            if "density" in metrics:  # sparse: the block matmuls at the running density
                record["density"] = float(metrics["density"])
                per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len, record["density"])
            if timed_seconds > 0:
                rate = timed_tokens / timed_seconds
                record.update(tokens_per_second=rate, mfu=rate * per_token / peak)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < plan.steps:
                with _timed(spent, "eval"):
                    record["eval_loss"] = evaluate(cfg, eval_step, devices, state.params, store, "validation")
            log.record(record)
            final_train_loss = record["loss"]
            window_loss, window_steps, window_tokens = 0.0, 0, 0
        if done % cfg.train.checkpoint_every == 0 or done == plan.steps or stop.requested:
            with _timed(spent, "checkpoint"):
                checkpoint.save(mngr, done, state, loader)
            last_saved = done
        if stop.requested and done < plan.steps:
            mngr.wait_until_finished()
            mngr.close()
            log.close()
            print(
                f"stopped at step {done}; checkpoint saved. {resume_hint(sys.argv, workdir)}", file=sys.stderr
            )
            return None
        timer_start = time.perf_counter()  # evaluation and checkpoint starts are not training time

    with _timed(spent, "checkpoint"):
        mngr.wait_until_finished()
        mngr.close()
    with _timed(spent, "eval"):  # only the splits asked for; a split not evaluated is null in the summary
        final = {
            s: evaluate(cfg, eval_step, devices, state.params, store, s) for s in final_eval_splits(cfg.train)
        }
    if final:
        log.note("final " + ", ".join(f"{split} loss {loss:.4f}" for split, loss in final.items()))
    rate = timed_tokens / timed_seconds if timed_seconds else float("nan")
    sparse = {}
    if cfg.sparsity.target > 0:  # N_avg counts the dense parameters as they are
        schedule = sparsity.schedule_for(cfg.sparsity, plan.steps)
        sparse = {
            "train_flops_dense": plan.train_flops_dense,
            "final_density": schedule.density_at(plan.steps),
            "average_density": flops.average_density(schedule, plan.steps),
            "n_avg": sparsity.average_nonzero_params(cfg.model, schedule, plan.steps),
            "pruning_steps": list(schedule.steps),
        }
    summary = {
        "name": cfg.name,
        "final_train_loss": final_train_loss,
        "final_eval_loss": final.get("validation"),
        "final_test_loss": final.get("test"),
        "validation_unigram_entropy": (
            data.open_store(store).unigram_entropy("validation") if "validation" in final else None
        ),
        "params": plan.params,
        "non_embedding_params": plan.non_embedding_params,
        "tokens": tokens,
        "steps": plan.steps,
        "train_flops": plan.train_flops,  # spent: a sparse run's block matmuls at each step's density
        "flops_per_token": plan.flops_per_token,
        **sparse,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": timed_seconds,
        **{f"{key}_seconds": seconds for key, seconds in spent.items()},
        "tokens_per_second": rate,
        "mfu": rate * plan.train_flops / plan.tokens / peak,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "devices": jax.device_count(),
        "microbatches": choice.microbatches,
        "remat": choice.remat,
    }
    log.write_summary(summary)
    log.close()
    return summary


def resume_hint(argv: list[str], workdir: pathlib.Path) -> str:
    """How to resume a stopped run: experiments.run's own command line (argv: sys.argv) with every --config.*
    override and flag as given, and --workdir set to the run's; a caller other than experiments.run is told to
    call train again with the same config and workdir."""
    if pathlib.Path(argv[0]).parts[-2:] != ("experiments", "run.py"):
        return f"Resume by calling chinchax.training.train.train again with the same config and {workdir}."
    args, given = [], iter(argv[1:])
    for arg in given:
        if arg == "--workdir":  # its value is the next argument
            next(given, None)
        elif not arg.startswith("--workdir="):
            args.append(arg)
    args.append(f"--workdir={workdir}")
    return "Resume with:\n  " + shlex.join([*"python -m experiments.run".split(), *args])


def _global_batch(devices, local_batches: list[dict], micro: int) -> dict:
    """This process's loader batches stacked to (microbatches, sequences, seq_len), as one global array whose
    microbatch is padded to split evenly over the batch shards (padding rows have loss.IGNORE targets)."""
    padded = mesh.padded_microbatch(devices, micro)
    pad = (padded - micro) // jax.process_count()
    local = {key: np.stack([b[key] for b in local_batches]) for key in ("inputs", "targets")}
    local = {
        "inputs": np.pad(local["inputs"], ((0, 0), (0, pad), (0, 0))),
        "targets": np.pad(local["targets"], ((0, 0), (0, pad), (0, 0)), constant_values=loss_lib.IGNORE),
    }
    return mesh.global_batch(devices, local, padded)
