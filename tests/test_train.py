"""Training end to end: determinism, exact resume after SIGKILL, SIGTERM, and the fail-fast paths."""

import json
import os
import pathlib
import random
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


def logged_steps(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(workdir, steps, process, timeout=240):
    deadline = time.time() + timeout
    while logged_steps(workdir) < steps:
        assert process.poll() is None, process.stderr.read() if process.stderr else "exited early"
        assert time.time() < deadline, "training did not progress"
        time.sleep(0.05)


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
    assert (workdir / "config.json").exists() and (workdir / "tensorboard").is_dir()
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved["final_eval_loss"] == summary["final_eval_loss"]


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference_run, tmp_path):
    workdir, summary = reference_run
    kill_after = random.randint(9, STEPS - 3)
    process = subprocess.Popen(
        run_args(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(tmp_path, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "summary.json").exists()
    complete = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    resumed = subprocess.run(run_args(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    if complete:  # an async save may still have been in flight at the kill
        assert f"resumed from step {max(map(int, complete))}" in resumed.stderr
    assert (
        json.loads(resumed.stdout.strip().splitlines()[-1])["final_eval_loss"] == summary["final_eval_loss"]
    )
    assert losses(tmp_path) == losses(workdir), f"killed after step {kill_after}"
    assert_same_params(tmp_path, workdir)


def test_sigterm_saves_and_exits_within_one_step(tmp_path):
    process = subprocess.Popen(
        run_args(tmp_path, **{"train.checkpoint_every": 1000}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(tmp_path, 3, process)
    steps_at_signal = logged_steps(tmp_path)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    stopped = int(stderr.split("stopped at step ")[1].split(";")[0])
    assert steps_at_signal <= stopped <= steps_at_signal + 1
    assert "Resume with" in stderr
    _, params = checkpoint.load_params(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert (tmp_path / "checkpoints" / str(stopped)).is_dir()


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
