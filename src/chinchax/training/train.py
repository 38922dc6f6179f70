"""Training: the jit'd step (gradient accumulation over microbatches) and the loop around it.

The loop resumes from the newest readable checkpoint in the workdir (train state and data position), logs
metrics, evaluates, checkpoints, stops cleanly on SIGTERM/SIGINT and refuses NaNs, then evaluates the splits
train.final_eval names and writes summary.json, with where the process's wall time went (start-up, first step,
training, evaluations, checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from chinchax.config import TrainSchedule, final_eval_splits, flatten
from chinchax.model import flops, gpt
from chinchax.model import loss as loss_lib
from chinchax.parallel import hardware, memory_plan, mesh
from chinchax.training import branch, checkpoint, optim, sparsity
from chinchax.training.metrics import RunLog
from chinchax.training.state import TrainState, init_state, optimizer, run_schedule

__all__ = ["TrainState", "init_state", "make_train_step", "run_schedule", "train"]


class TrainingError(RuntimeError):
    """A run that cannot go on."""


class Diverged(TrainingError):
    """The loss or gradient norm went non-finite (experiments.run exits with launch.DIVERGED_STATUS)."""


def loss_fn(cfg: ml_collections.ConfigDict):
    """The run's loss (chinchax.model.loss): (params, inputs, targets) → (summed cross-entropy, token count)."""
    return loss_lib.summed_cross_entropy(cfg.model)


def make_train_step(cfg: ml_collections.ConfigDict, schedule: TrainSchedule | None = None):
    """step(state, batch) → (state, metrics); batch arrays are (microbatches, sequences, seq_len).

    schedule: the run's tokens, steps and batches (`state.run_schedule`) when the caller has derived them.

    Gradients are averaged over the step's real tokens (padding rows excluded) with a scan over microbatches
    (one compiled body; no scan for a single microbatch; with several, each data-parallel replica sums its
    own rows' gradients and the replicas reduce them once: `mesh.summed_over_replicas`); the metrics are the mean
    loss, the global norm of the gradients the clip sees (a sparse run's masked ones, without the pruned
    weights) before clipping, the step's learning rate and, for a sparse run, the density of the prunable
    weights once the step is done.
    """
    loss = loss_fn(cfg)
    schedule = schedule or run_schedule(cfg)
    opt = optimizer(cfg, gpt.param_shapes(cfg.model), schedule)
    lr = optim.learning_rate(cfg, schedule)

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


def _loader(cfg: ml_collections.ConfigDict, store: pathlib.Path, split: str, micro: int, **options):
    """This process's share of a split's sequences, a microbatch of `micro` sequences (all processes together)
    at a time; options: data.make_loader's (num_epochs, shuffle)."""
    return data.make_loader(
        store,
        split,
        cfg.data.seq_len,
        micro // jax.process_count(),
        cfg.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        **options,
    )


def make_evaluate(cfg: ml_collections.ConfigDict, devices, store: pathlib.Path, micro: int):
    """(params, split) → mean loss over the split's first train.eval_batches batches of `micro` sequences (in
    order, the same every time)."""
    eval_step = make_eval_step(cfg, devices)

    def evaluate(params, split: str) -> float:
        loader = _loader(cfg, store, split, micro, num_epochs=1, shuffle=False)
        batches = zip(range(cfg.train.eval_batches), loader, strict=False)
        losses = [float(eval_step(params, _global_batch(devices, [b], micro))) for _, b in batches]
        return float(np.mean(losses))

    return evaluate


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
    """Within `with`, SIGTERM / SIGINT set a flag the loop checks after each step; the handlers before are put
    back on leaving (a launcher later in the same process must see Ctrl-C again)."""

    def __enter__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

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


@dataclasses.dataclass
class _Progress:
    """What the loop has counted: tokens seen; the summed mean loss (nats/token) and steps of the current logging
    window and the last window's mean; the tokens and seconds of the timed steps (not a process's first step,
    which compiles); and where the rest of the wall time went (seconds by phase)."""

    tokens: int
    window_loss: float = 0.0
    window_steps: int = 0
    last_loss: float | None = None
    timed_tokens: int = 0
    timed_seconds: float = 0.0
    spent: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("startup", "first_step", "eval", "checkpoint"), 0.0)
    )

    def add(self, loss: float, tokens: int) -> None:
        """A step done: its mean loss and its tokens."""
        self.tokens += tokens
        self.window_loss += loss
        self.window_steps += 1

    def end_window(self) -> float:
        """The logging window's mean loss, kept as the last one; the next window starts empty."""
        self.last_loss = self.window_loss / self.window_steps
        self.window_loss, self.window_steps = 0.0, 0
        return self.last_loss

    def rate(self) -> float:
        """Tokens per second over the timed steps (nan before any)."""
        return self.timed_tokens / self.timed_seconds if self.timed_seconds else float("nan")


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    show_progress: bool = True,
    started: float | None = None,
    branch_from: str | None = None,
) -> dict | None:
    """Train (or resume) the run in `workdir`; return the summary, or None when stopped by a signal.

    branch_from: 'TRUNK_DIR[:STEP]': start from that run's checkpoint (chinchax.training.branch) instead of step 0.

    started: the time.perf_counter() at which this process began (experiments.run passes it), so that the
    summary's wall_seconds and startup_seconds count the imports too; default: this call.
    """
    wall_start = time.perf_counter() if started is None else started
    workdir = pathlib.Path(workdir)
    devices = mesh.make_mesh(cfg.mesh)
    requested, (cfg, choice) = cfg, fit_to_devices(cfg, devices)
    _same_run(workdir, requested)
    if (workdir / "summary.json").exists():  # a finished run: nothing to do
        print(f"{workdir} holds a finished run; its summary:", file=sys.stderr)
        return json.loads((workdir / "summary.json").read_text())
    store = data.resolve_store(cfg.data.dataset, cfg.data.tokenizer, progress=show_progress)
    plan, schedule = flops.plan(cfg), run_schedule(cfg)
    if branch_from is not None:  # checked before anything is written; then the trunk's checkpoint is copied
        branch.start(workdir, requested, branch_from, schedule.steps)
    checkpoint.write_config(workdir, requested)
    loader = _loader(cfg, store, "train", schedule.microbatch)
    step_fn, mngr, state, resumed = _start(cfg, devices, schedule, loader, workdir)
    start = int(state.step)
    evaluate = make_evaluate(cfg, devices, store, schedule.microbatch)
    peak, peak_source = hardware.peak_flops_per_device(cfg.train.peak_flops_per_device)
    peak *= jax.device_count()
    log = RunLog(workdir, schedule.steps, start, show_progress)
    log.note(f"step: {choice.reason}")
    if resumed:
        log.note(f"resumed from step {start} in {workdir}")
    progress = _Progress(tokens=schedule.tokens_before(start))
    last_saved = start if resumed else None
    timer_start = time.perf_counter()
    progress.spent["startup"] = timer_start - wall_start

    with StopRequest() as stop:
        for step in range(start, schedule.steps):
            local = [next(loader) for _ in range(schedule.microbatches_at(step))]
            state, metrics = step_fn(state, _global_batch(devices, local, schedule.microbatch))
            metrics = jax.device_get(metrics)
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                _close(mngr, log)
                raise Diverged(
                    f"loss {metrics['loss']} / grad norm {metrics['grad_norm']} at step {step + 1}: training "
                    f"diverged; the last good checkpoint is step {last_saved} in {workdir / 'checkpoints'}"
                )
            step_tokens = schedule.batch_size_at(step) * cfg.data.seq_len
            progress.add(float(metrics["loss"]), step_tokens)
            if step > start:  # the first step of a process includes compilation
                progress.timed_tokens += step_tokens
                progress.timed_seconds += time.perf_counter() - timer_start
            else:
                progress.spent["first_step"] = time.perf_counter() - timer_start
            log.advance()
            done = step + 1
            if done % cfg.train.log_every == 0 or done == schedule.steps:
                record = _record(cfg, plan, metrics, done, progress.end_window(), progress, peak)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < schedule.steps:
                    with _timed(progress.spent, "eval"):
                        record["eval_loss"] = evaluate(state.params, "validation")
                log.record(record)
            every = done % cfg.train.checkpoint_every == 0 or done in cfg.train.checkpoint_steps
            if every or done == schedule.steps or stop.requested:
                with _timed(progress.spent, "checkpoint"):
                    checkpoint.save(mngr, done, state, loader)
                last_saved = done
            if stop.requested and done < schedule.steps:
                _close(mngr, log)
                print(
                    f"stopped at step {done}; checkpoint saved. {resume_hint(sys.argv, workdir)}",
                    file=sys.stderr,
                )
                return None
            timer_start = time.perf_counter()  # evaluation and checkpoint starts are not training time

    with _timed(progress.spent, "checkpoint"):
        mngr.wait_until_finished()
        mngr.close()
    # only the splits asked for; a split not evaluated is null in the summary
    with _timed(progress.spent, "eval"):
        final = {split: evaluate(state.params, split) for split in final_eval_splits(cfg.train)}
    if final:
        log.note("final " + ", ".join(f"{split} loss {loss:.4f}" for split, loss in final.items()))
    summary = _summary(cfg, plan, choice, progress, final, store, wall_start, peak, peak_source)
    summary["branched_from"] = branch.read(workdir)  # {trunk, step}, or None for a run from step 0
    log.write_summary(summary)
    log.close()
    return summary


def _start(cfg: ml_collections.ConfigDict, devices, schedule: TrainSchedule, loader, workdir: pathlib.Path):
    """(the jitted step, the checkpoint manager, the state to start from, whether it was restored): the newest
    readable checkpoint's state (the loader's position restored with it), else a fresh step 0's."""
    rng = jax.random.key(cfg.train.seed)
    init = functools.partial(init_state, schedule=schedule)
    target = mesh.sharded_shapes(cfg, devices, jax.eval_shape(lambda: init(cfg, rng)))
    step_fn = mesh.jit_train_step(cfg, devices, make_train_step(cfg, schedule), target)
    mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints, cfg.train.checkpoint_steps)
    found = checkpoint.restore_latest(mngr, target, loader, set_aside=True)
    state = found[1] if found else mesh.init_sharded_state(cfg, devices, init, rng, target)
    return step_fn, mngr, state, bool(found)


def _close(mngr, log: RunLog) -> None:
    """A run that ends early: pending checkpoint writes finished, the manager and the log closed."""
    mngr.wait_until_finished()
    mngr.close()
    log.close()


def _record(
    cfg: ml_collections.ConfigDict,
    plan: flops.Plan,
    metrics: dict,
    done: int,
    loss: float,
    progress: _Progress,
    peak: float,
) -> dict:
    """The metrics.jsonl record after `done` steps: tokens seen, the window's mean loss, the step's learning
    rate and gradient norm, a sparse run's density, and once steps are timed tokens/s and the MFU at the
    step's FLOPs per token (peak: FLOP/s of all devices)."""
    record = {
        "step": done,
        "tokens": progress.tokens,
        "loss": loss,
        "lr": float(metrics["lr"]),
        "grad_norm": float(metrics["grad_norm"]),
    }
    per_token = plan.flops_per_token
    if "density" in metrics:  # sparse: the block matmuls at the running density
        record["density"] = float(metrics["density"])
        per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len, record["density"])
    if progress.timed_seconds > 0:
        rate = progress.rate()
        record.update(tokens_per_second=rate, mfu=rate * per_token / peak)
    return record


def _sparse_summary(cfg: ml_collections.ConfigDict, plan: flops.Plan) -> dict:
    """A sparse run's summary fields (N_avg counts the dense parameters as they are); {} for a dense run."""
    if cfg.sparsity.target == 0:
        return {}
    pruning = sparsity.schedule_for(cfg.sparsity, plan.steps)
    return {
        "train_flops_dense": plan.train_flops_dense,
        "final_density": pruning.density_at(plan.steps),
        "average_density": flops.average_density(pruning, plan.steps),
        "n_avg": sparsity.average_nonzero_params(cfg.model, pruning, plan.steps),
        "pruning_steps": list(pruning.steps),
    }


def _summary(
    cfg: ml_collections.ConfigDict,
    plan: flops.Plan,
    choice: memory_plan.Choice,
    progress: _Progress,
    final: dict[str, float],
    store: pathlib.Path,
    wall_start: float,
    peak: float,
    peak_source: str,
) -> dict:
    """summary.json: the final losses (final: by split), the plan's counts, the tokens seen, where the wall time
    went, throughput and MFU (peak: FLOP/s of all devices), and the step's microbatches and remat."""
    rate = progress.rate()
    return {
        "name": cfg.name,
        "final_train_loss": progress.last_loss,
        "final_eval_loss": final.get("validation"),
        "final_test_loss": final.get("test"),
        "validation_unigram_entropy": (
            data.open_store(store).unigram_entropy("validation") if "validation" in final else None
        ),
        "params": plan.params,
        "non_embedding_params": plan.non_embedding_params,
        "tokens": progress.tokens,
        "steps": plan.steps,
        "train_flops": plan.train_flops,  # spent: a sparse run's block matmuls at each step's density
        "flops_per_token": plan.flops_per_token,
        **_sparse_summary(cfg, plan),
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": progress.timed_seconds,
        **{f"{key}_seconds": seconds for key, seconds in progress.spent.items()},
        "tokens_per_second": rate,
        "mfu": rate * plan.train_flops / plan.tokens / peak,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "devices": jax.device_count(),
        "microbatches": choice.microbatches,
        "remat": choice.remat,
    }


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
