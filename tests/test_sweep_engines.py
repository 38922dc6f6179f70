"""Sweeps on real engines: the smoke sweep through a local Ray instance (2 CPUs) and through the SLURM array
script run task by task with bash (SLURM_ARRAY_TASK_ID set as SLURM sets it); reruns skip what is done.
A Ray launcher process stopped by Ctrl-C stops its trainers at a checkpoint (a stand-in trainer) and a rerun
resumes them."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import ray

from chinchax.parallel import mesh
from chinchax.scaling import launch
from chinchax.scaling import sweep as sweep_lib
from experiments.configs import sweeps
from tests.conftest import REPO
from tests.test_launch_signals import interrupt_then_resume
from tests.test_sweep import assert_trained_smoke_results


def sweep_cli(root: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    """`python -m experiments.sweep --sweep=smoke` on `root`; fails the test with its stderr if it fails."""
    cli = [sys.executable, "-m", "experiments.sweep", "--sweep=smoke", f"--root={root}", *flags]
    out = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def summary_times(root: pathlib.Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "runs").glob("*/summary.json")}


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance limited to 2 CPUs, shut down after the module's tests."""
    context = ray.init(num_cpus=2, include_dashboard=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def test_ray_resources_follow_the_mesh_preset():
    assert launch.ray_resources(mesh.preset("gpu-8")) == {"GPU": 8}
    assert launch.ray_resources(mesh.preset("tpu-v5p-4")) == {"TPU": 4}
    for spanning in ("tpu-v5e-16", "gpu-8x2"):  # several hosts: one Ray task cannot hold the point
        with pytest.raises(sweep_lib.SweepError, match="spans .* hosts") as error:
            launch.ray_resources(mesh.preset(spanning))
        assert "\n" not in str(error.value)
    assert launch.ray_resources(mesh.preset("cpu")) == {"CPU": 1}
    with pytest.raises(sweep_lib.SweepError, match="give them explicitly"):
        launch.ray_resources(mesh.preset("wse-16"))


def test_smoke_sweep_on_ray_trains_then_skips(tmp_path, ray_address):
    first = sweep_cli(tmp_path, "--launcher=ray", f"--ray_address={ray_address}")
    assert "2/2 done" in first.stdout and "ran 2 in" in first.stdout
    assert_trained_smoke_results(tmp_path)
    trained = summary_times(tmp_path)
    again = sweep_cli(tmp_path, "--launcher=ray", f"--ray_address={ray_address}")
    assert "2/2 done" in again.stdout and "ran 0 in" in again.stdout
    assert summary_times(tmp_path) == trained


def test_slurm_array_tasks_train_then_skip(tmp_path):
    sweep_cli(tmp_path, "--launcher=slurm", "--sbatch=--partition=gpu")
    script = tmp_path / "slurm" / "sweep.sbatch"
    assert "#SBATCH --array=1-2" in script.read_text()

    def task(index: int) -> None:
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index))
        subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True, capture_output=True)

    for index in (1, 2):
        task(index)
    sweep_lib.gather(sweeps.get("smoke"), tmp_path)
    assert_trained_smoke_results(tmp_path)
    trained = summary_times(tmp_path)
    log = (tmp_path / "logs" / "d16.log").read_text()
    task(1)
    assert summary_times(tmp_path) == trained
    assert (tmp_path / "logs" / "d16.log").read_text() == log


@pytest.mark.parametrize("env", [{}, {"LEFTOVER_HANDLERS": "1"}], ids=["", "after-a-trainer"])
def test_interrupted_ray_points_checkpoint_then_resume(tmp_path, ray_address, env):
    """Ctrl-C (a real SIGINT) to a launcher process on the cluster cancels its task, whose trainer checkpoints;
    also in a process where a trainer ran (its handlers, left behind, swallowed a simulated Ctrl-C: the cause
    of this test's misses when it interrupted a launch in the pytest process)."""
    interrupt_then_resume(tmp_path, signal.SIGINT, "ray", ray_address, started_within=90, **env)
