"""Resuming a sparse run: killed (SIGKILL) after a pruning event and before the last, then rerun, it ends
bit-identical to the uninterrupted run: the same losses and per-step densities in metrics.jsonl, the same final
state (parameters, masks, optimizer moments and counts) and the same summary (final density, pruning steps,
N_avg, losses).

Bit-identical, no tolerance: both runs execute the same compiled step on the same (CPU) devices over the same
batches, so any difference is state the resume lost or rebuilt (a mask, the pruner's step count, a moment).
"""

import json
import os
import random
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_train import complete_checkpoints, logged_steps, metrics_lines, wait_until

# Two CPU devices with weights streamed (FSDP) over both, so the masks are sharded as on a pod.
DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
STEPS, BATCH, SEQ = 40, 8, 64
EVENTS = [7, 17, 27]  # the pruning steps of sparsity.every=10 over 40 steps (checked against the summary)
SPARSE = {
    "mesh.preset": "wse-2",
    "data.seq_len": SEQ,
    "train.batch_size": BATCH,
    "train.tokens": BATCH * SEQ * STEPS,
    "train.warmup_tokens": BATCH * SEQ * 4,
    "train.log_every": 1,
    "train.checkpoint_every": 6,
    "train.eval_batches": 2,
    "train.final_eval": "validation",
    "sparsity.target": 0.5,
    "sparsity.every": 10,
}
ENV = {**os.environ, **DEVICES}
SAME_IN_SUMMARY = (
    "final_train_loss",
    "final_eval_loss",
    "tokens",
    "steps",
    "train_flops",
    "final_density",
    "average_density",
    "n_avg",
    "pruning_steps",
)


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def run_args(workdir, **overrides) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in {**SPARSE, **overrides}.items()]
    return [sys.executable, "-m", "experiments.run", "--config=cpu_tiny", f"--workdir={workdir}", *flags]


def start(workdir) -> subprocess.Popen:
    """The sparse run, started in the background on DEVICES."""
    return subprocess.Popen(
        run_args(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )


def run(workdir, **overrides) -> subprocess.CompletedProcess:
    """The sparse run (with these overrides) to its end on DEVICES."""
    done = subprocess.run(
        run_args(workdir, **overrides), capture_output=True, text=True, timeout=300, env=ENV
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(workdir) -> list[tuple]:
    """(step, loss, density, grad_norm, lr) of every metrics.jsonl record (timings left out)."""
    keys = ("step", "loss", "density", "grad_norm", "lr")
    return [tuple(json.loads(line)[k] for k in keys) for line in metrics_lines(workdir)]


def saved_state(workdir, step: int) -> tuple[dict, dict]:
    """The whole train state of checkpoint `step` (params, masks, moments, counts) as numpy, and the mesh axes
    each array was saved sharded over: ({path: array}, {path: partition spec})."""
    with warnings.catch_warnings():  # orbax takes the shardings from the checkpoint, and says so
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    return {p: np.asarray(x) for p, x in leaves}, {p: x.sharding.spec for p, x in leaves}


def masks_of(state: dict) -> dict:
    masks = {path: m for path, m in state.items() if path.startswith("['opt_state']['masks']")}
    assert len(masks) == 4 and all(m.dtype == bool for m in masks.values()), list(state)
    return masks


def mask_density(state: dict) -> float:
    masks = masks_of(state).values()
    return sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (workdir, its summary); it saves its last step only (saves take time)."""
    workdir = tmp_path_factory.mktemp("sparse_reference")
    run(workdir, **{"train.checkpoint_every": 1000})
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["pruning_steps"] == EVENTS and summary["steps"] == STEPS, summary
    return workdir, summary


def test_sparse_run_killed_between_pruning_events_resumes_bit_identical(reference, tmp_path):
    """SIGKILL at a random step once a checkpoint after the first pruning event is complete (checkpoints every 6
    steps: the newest is at step 12, 18 or 24, before or after the second event, before the last); the rerun
    resumes from it and ends as the uninterrupted run, bit for bit."""
    ref, ref_summary = reference
    ref_density = {r[0]: r[2] for r in records(ref)}  # the density each step of the reference ran at
    seed = fresh_seed()
    kill_after = random.Random(seed).randint(EVENTS[0] + 3, EVENTS[2] - 8)
    process = start(tmp_path)
    wait_until(
        lambda: (
            logged_steps(tmp_path) >= kill_after
            and max(complete_checkpoints(tmp_path), default=0) > EVENTS[0]
        ),
        process,
        f"step {kill_after} with a checkpoint after step {EVENTS[0]} on disk",
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    resume_step = max(complete_checkpoints(tmp_path))
    context = f"seed {seed}: killed after step {logged_steps(tmp_path)} (aimed at {kill_after})"
    context += f", resumes from step {resume_step}"
    assert not (tmp_path / "summary.json").exists(), context
    assert EVENTS[0] <= resume_step < EVENTS[2], context  # pruned at least once, the last event to come
    saved, specs = saved_state(tmp_path, resume_step)
    assert all("fsdp" in specs[path] for path in masks_of(saved)), (specs, context)  # sharded masks
    assert int(saved["['opt_state']['count']"]) == int(saved["['step']"]) == resume_step, context
    assert mask_density(saved) == pytest.approx(ref_density[resume_step], rel=1e-6), context
    assert ref_density[EVENTS[2]] < ref_density[resume_step] < 1, context

    resumed = run(tmp_path)
    assert f"resumed from step {resume_step} in" in resumed.stderr, (context, resumed.stderr[-3000:])
    assert records(tmp_path) == records(ref), context  # losses, densities, grad norms, learning rates
    assert [r[0] for r in records(tmp_path)] == list(range(1, STEPS + 1)), context
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {k: summary[k] for k in SAME_IN_SUMMARY} == {k: ref_summary[k] for k in SAME_IN_SUMMARY}, context
    (final, _), (ref_final, _) = saved_state(tmp_path, STEPS), saved_state(ref, STEPS)
    assert list(final) == list(ref_final), context
    for path, value in ref_final.items():  # params, masks, moments, counts
        np.testing.assert_array_equal(final[path], value, err_msg=f"{path}; {context}")
    assert mask_density(final) == pytest.approx(0.5, abs=1e-3), context
    for path, mask in masks_of(final).items():  # a pruned weight is exactly zero
        weights = final[path.replace("['opt_state']['masks']", "['params']")]
        assert not np.any(weights[~mask]), (path, context)
