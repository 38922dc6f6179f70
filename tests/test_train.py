"""Training end to end: determinism, exact resume after SIGKILL, SIGTERM, and the fail-fast paths."""

import json
import os
import pathlib
import random
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from chinchax import config
from chinchax.training import checkpoint, train
from experiments import configs

STEPS = 24
TINY = {
    "data.seq_len": 64,
    "train.batch_size": 8,
    "train.tokens": 8 * 64 * STEPS,
    "train.log_every": 1,
    "train.checkpoint_every": 4,
    "train.eval_batches": 2,
    "train.warmup_tokens": 8 * 64 * 4,
}


def tiny_config(**overrides):
    cfg = configs.get("cpu_tiny")
    for key, value in {**TINY, **overrides}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return config.validate(cfg)


def run_args(workdir, **overrides):
    flags = [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
    return [sys.executable, "-m", "experiments.run", "--config=cpu_tiny", f"--workdir={workdir}", *flags]


def losses(workdir):
    return [json.loads(l)["loss"] for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def metrics_lines(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def logged_steps(workdir):
    return len(metrics_lines(workdir))


def complete_checkpoints(workdir):
    """Steps of the checkpoints written completely (orbax renames a temporary folder to <step> when done)."""
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def wait_until(condition, process, what, timeout=240, poll=0.05):
    """Poll until condition() holds; fail if the run exits or stalls first."""
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"the run exited (status {process.returncode}) before {what}:\n{stderr}")
        assert time.time() < deadline, f"training did not progress to {what}"
        time.sleep(poll)


def assert_same_params(dir_a, dir_b):
    _, a = checkpoint.load_params(dir_a)
    _, b = checkpoint.load_params(dir_b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run that the other tests compare with."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = train.train(tiny_config(), workdir, show_progress=False)
    return workdir, summary


def test_training_puts_back_the_callers_signal_handlers(tmp_path):
    """Within the loop SIGINT / SIGTERM only ask for a checkpoint and a stop; afterwards the caller's handlers
    are back (a launcher later in the same process must see Ctrl-C)."""

    def callers(signum, frame):
        raise RuntimeError("the caller's handler")

    before = {sig: signal.signal(sig, callers) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.train(tiny_config(**{"train.tokens": 8 * 64 * 6}), tmp_path, show_progress=False)
        assert {sig: signal.getsignal(sig) for sig in before} == {sig: callers for sig in before}
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_same_seed_gives_bit_identical_losses(reference_run, tmp_path):
    workdir, summary = reference_run
    again = train.train(tiny_config(), tmp_path, show_progress=False)
    assert losses(tmp_path) == losses(workdir)
    assert len(losses(workdir)) == STEPS
    assert again["final_eval_loss"] == summary["final_eval_loss"]
    other_seed = tmp_path / "seed1"
    train.train(tiny_config(**{"train.seed": 1}), other_seed, show_progress=False)
    assert losses(other_seed) != losses(workdir)


def test_loss_decreases_and_summary_contract(reference_run):
    workdir, summary = reference_run
    history = losses(workdir)
    assert np.mean(history[-4:]) < np.mean(history[:4]) - 0.3
    for key in (
        "final_train_loss",
        "final_eval_loss",
        "final_test_loss",
        "params",
        "tokens",
        "train_flops",
        "wall_seconds",
        "tokens_per_second",
        "mfu",
    ):
        assert key in summary, key
    assert summary["tokens"] == 8 * 64 * STEPS
    assert np.isfinite(summary["final_eval_loss"]) and np.isfinite(summary["final_test_loss"])  # the default
    assert (workdir / "config.json").exists() and (workdir / "tensorboard").is_dir()
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved["final_eval_loss"] == summary["final_eval_loss"]


def test_a_run_asked_for_validation_only_never_opens_the_test_split(tmp_path, monkeypatch, capsys):
    """train.final_eval='validation': the final evaluation reads the validation split only (the test split's
    loader is never made), the summary's test loss is null, the log names no test loss; and the summary's wall
    time holds its training time and the overhead's parts (disjoint spans of the same clock) without overlap."""
    opened = []
    make_loader = train.data.make_loader

    def recording_loader(store, split, *args, **kwargs):
        opened.append(split)
        return make_loader(store, split, *args, **kwargs)

    monkeypatch.setattr(train.data, "make_loader", recording_loader)
    steps = 4
    overrides = {"train.final_eval": "validation", "train.tokens": 8 * 64 * steps, "train.warmup_tokens": 0}
    summary = train.train(tiny_config(**overrides), tmp_path, show_progress=False)
    assert opened == ["train", "validation"], opened
    assert np.isfinite(summary["final_eval_loss"]) and summary["final_test_loss"] is None, summary
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_test_loss"] is None and saved["final_eval_loss"] == summary["final_eval_loss"]
    log = capsys.readouterr().err
    assert "final validation loss" in log and "test loss" not in log, log
    parts = ("startup_seconds", "first_step_seconds", "eval_seconds", "checkpoint_seconds")
    assert summary["train_seconds"] > 0 and all(summary[k] > 0 for k in parts), summary
    assert summary["wall_seconds"] >= summary["train_seconds"] + sum(summary[k] for k in parts), summary


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference_run, tmp_path):
    """Killed (SIGKILL) at a random step once a checkpoint is on disk, the rerun resumes from the newest
    complete checkpoint (not from 0) and ends bit-identical to the uninterrupted run."""
    workdir, summary = reference_run
    kill_after = random.randint(9, STEPS - 3)
    process = subprocess.Popen(
        run_args(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_until(
        lambda: logged_steps(tmp_path) >= kill_after and complete_checkpoints(tmp_path),
        process,
        f"step {kill_after} with a complete checkpoint on disk",
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    context = f"killed after step {logged_steps(tmp_path)} (aimed at {kill_after})"
    assert not (tmp_path / "summary.json").exists(), context
    saved = complete_checkpoints(tmp_path)
    assert saved, f"no complete checkpoint at the kill; {context}"
    resume_step = max(saved)
    assert 4 <= resume_step < STEPS, (saved, context)
    kept_records = metrics_lines(tmp_path)[:resume_step]
    assert len(kept_records) == resume_step, context

    resumed = subprocess.run(run_args(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {resume_step} in" in resumed.stderr, (context, resumed.stderr)
    # The records before the checkpoint are the killed run's, untouched (a rerun from step 0 rewrites them,
    # with other tokens_per_second timings).
    assert metrics_lines(tmp_path)[:resume_step] == kept_records, context
    assert (
        json.loads(resumed.stdout.strip().splitlines()[-1])["final_eval_loss"] == summary["final_eval_loss"]
    ), context
    assert losses(tmp_path) == losses(workdir), context
    assert_same_params(tmp_path, workdir)


def stop_with_sigterm(workdir, overrides, ready, what):
    """Start a run, send SIGTERM once ready(workdir) holds; return (steps logged at the signal, the step the
    run stopped at, checkpoint folders in flight at the signal)."""
    process = subprocess.Popen(
        run_args(workdir, **overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_until(lambda: ready(workdir), process, what, poll=0.002)
    folder = workdir / "checkpoints"
    in_flight = [p.name for p in folder.iterdir() if not p.name.isdigit()] if folder.is_dir() else []
    steps_at_signal = logged_steps(workdir)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    hint = stderr.split("Resume with:\n")[1].splitlines()[0]  # the same command: every override, this workdir
    flags = run_args(workdir, **overrides)[3:]
    assert shlex.split(hint) == ["python", "-m", "experiments.run", *flags[:1], *flags[2:], flags[1]], stderr
    stopped = int(stderr.split("stopped at step ")[1].split(";")[0])
    assert not (workdir / "summary.json").exists()
    return steps_at_signal, stopped, in_flight


def resume_and_compare(workdir, overrides, stopped, reference_run, context):
    """Rerun the stopped run to the end; it resumes from `stopped` and equals the uninterrupted run."""
    reference, summary = reference_run
    resumed = subprocess.run(run_args(workdir, **overrides), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped} in" in resumed.stderr, (context, resumed.stderr)
    assert (
        json.loads(resumed.stdout.strip().splitlines()[-1])["final_eval_loss"] == summary["final_eval_loss"]
    ), context
    assert losses(workdir) == losses(reference), context
    assert_same_params(workdir, reference)


def test_sigterm_saves_exits_within_one_step_and_resumes_bit_identical(reference_run, tmp_path):
    """SIGTERM between checkpoints: the run saves at the next step boundary, exits 0, and the rerun resumes
    there and ends bit-identical (losses in metrics.jsonl, final params) to the uninterrupted run."""
    overrides = {"train.checkpoint_every": 1000}
    signal_after = random.randint(3, STEPS - 4)
    steps_at_signal, stopped, _ = stop_with_sigterm(
        tmp_path, overrides, lambda w: logged_steps(w) >= signal_after, f"step {signal_after}"
    )
    context = f"signal after step {steps_at_signal} (aimed at {signal_after}), stopped at {stopped}"
    assert steps_at_signal <= stopped <= steps_at_signal + 1, context
    assert complete_checkpoints(tmp_path) == [stopped], context
    _, params = checkpoint.load_params(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    resume_and_compare(tmp_path, overrides, stopped, reference_run, context)


def test_sigterm_during_an_async_checkpoint_then_resume_is_bit_identical(reference_run, tmp_path):
    """SIGTERM while an asynchronous save is being written (its temporary folder is on disk; here saves take
    longer than a step, so one is almost always in flight), or else right after a checkpoint step's record
    (the loop starts that step's save next): the stop path saves with a save in flight, and the rerun
    resumes from the step it stopped at and ends bit-identical to the uninterrupted run."""
    overrides = {"train.checkpoint_every": 2}
    first = random.randint(4, STEPS - 8)

    def ready(workdir):
        folder = workdir / "checkpoints"
        writing = folder.is_dir() and any(not p.name.isdigit() for p in folder.iterdir())
        steps = logged_steps(workdir)
        return (steps >= first and writing) or steps >= first + 4

    steps_at_signal, stopped, in_flight = stop_with_sigterm(
        tmp_path, overrides, ready, f"step {first} with a save in flight"
    )
    context = f"signal after step {steps_at_signal} (from step {first}), saves in flight: {in_flight}"
    assert steps_at_signal <= stopped <= steps_at_signal + 1, context
    assert stopped in complete_checkpoints(tmp_path), context
    resume_and_compare(tmp_path, overrides, stopped, reference_run, context)


def test_resume_hint_repeats_the_command_with_its_overrides():
    argv = [
        "/repo/experiments/run.py",
        "--config=cpu_tiny",
        "--workdir",
        "old dir",
        "--config.sparsity.target=0.5",
        "--mesh=cpu",
        "--config.train.tokens=4096",
    ]
    assert train.resume_hint(argv, pathlib.Path("runs/a b")) == (
        "Resume with:\n  python -m experiments.run --config=cpu_tiny --config.sparsity.target=0.5 --mesh=cpu "
        "--config.train.tokens=4096 '--workdir=runs/a b'"
    )
    assert "--workdir" not in train.resume_hint(["/usr/bin/pytest", "-k", "x"], pathlib.Path("w"))


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(**{"train.peak_lr": 1e30, "train.warmup_tokens": 0, "train.checkpoint_every": 1})
    with pytest.raises(
        train.TrainingError, match=r"at step \d+: training diverged; the last good checkpoint"
    ):
        train.train(cfg, tmp_path, show_progress=False)
    _, params = checkpoint.load_params(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_too_big_for_this_host_fails_fast(tmp_path):
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--config=chinchilla_2.7b", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: chinchilla_2.7b needs about") and "--dry_run" in last, out.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "checkpoints").exists()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(reference_run, tmp_path, capsys):
    workdir, summary = reference_run
    cfg = tiny_config(**{"train.keep_checkpoints": 5})
    train.train(cfg, tmp_path, show_progress=False)
    newest = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    for f in (tmp_path / "checkpoints" / str(newest) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(os.urandom(max(f.stat().st_size, 8)))
    (tmp_path / "summary.json").unlink()
    _, fallback = checkpoint.load_params(tmp_path)
    assert "unreadable" in capsys.readouterr().err
    _, previous = checkpoint.load_params(tmp_path, step=newest - 4)
    for x, y in zip(jax.tree.leaves(fallback), jax.tree.leaves(previous), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    resumed = train.train(cfg, tmp_path, show_progress=False)  # redoes the last steps from the previous one
    assert resumed["final_eval_loss"] == summary["final_eval_loss"]


def test_resuming_with_another_config_is_refused(reference_run):
    workdir, _ = reference_run
    with pytest.raises(train.TrainingError, match="different config.*train.peak_lr"):
        train.train(tiny_config(**{"train.peak_lr": 1e-3}), workdir, show_progress=False)


def test_rerunning_a_finished_run_returns_its_summary(reference_run):
    workdir, summary = reference_run
    before = (workdir / "summary.json").read_text()
    assert train.train(tiny_config(), workdir, show_progress=False) == summary
    assert (workdir / "summary.json").read_text() == before
