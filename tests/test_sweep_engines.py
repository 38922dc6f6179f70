"""Sweeps on real engines: the smoke sweep through a local Ray instance (2 CPUs) and through the SLURM array
script run task by task with bash (SLURM_ARRAY_TASK_ID set as SLURM sets it); reruns skip what is done.
An interrupted Ray launch stops its trainers at a checkpoint (a stand-in trainer) and a rerun resumes them."""

import _thread
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import ray

from chinchax.parallel import mesh
from chinchax.scaling import launch, plan
from chinchax.scaling import sweep as sweep_lib
from experiments.configs import sweeps
from tests.conftest import REPO
from tests.test_sweep import assert_trained_smoke_results


def sweep_cli(root: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    """`python -m experiments.sweep --sweep=smoke` on `root`; fails the test with its stderr if it fails."""
    cli = [sys.executable, "-m", "experiments.sweep", "--sweep=smoke", f"--root={root}", *flags]
    out = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def summary_times(root: pathlib.Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "runs").glob("*/summary.json")}


# A stand-in `experiments.run` (found first on the path when its folder is the cwd): it records a SIGTERM
# as a checkpoint and stops; started again on a checkpoint, it writes summary.json.
STOPPABLE_RUN = textwrap.dedent(
    """
    import json, pathlib, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    workdir = pathlib.Path(args["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "checkpoint").exists():
        (workdir / "summary.json").write_text(json.dumps({"resumed": True}))
        sys.exit(0)
    def stop(signum, frame):
        (workdir / "checkpoint").write_text("saved")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    (workdir / "started").touch()
    time.sleep(120)
    sys.exit("error: never stopped")
    """
)


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


def interrupt_once(path: pathlib.Path, limit: float = 60.0) -> None:
    """Ctrl-C for the main thread as soon as `path` exists (after `limit` seconds at the latest)."""

    def watch():
        deadline = time.monotonic() + limit
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _thread.interrupt_main()

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.slow  # the simulated Ctrl-C (_thread.interrupt_main) did not always reach the launcher under
# pytest-xdist in clean-clone runs (1 miss in 4); run it alone: pytest -m slow -k interrupted
def test_interrupted_ray_points_checkpoint_then_resume(tmp_path, ray_address):
    cwd = tmp_path / "repo"
    (cwd / "experiments").mkdir(parents=True)
    (cwd / "experiments" / "__init__.py").touch()
    (cwd / "experiments" / "run.py").write_text(STOPPABLE_RUN)
    root = tmp_path / "root"
    sweep = sweep_lib.Sweep("stop", "test", (plan.Point("p", "cpu_tiny"),))
    resources = {"p": {"CPU": 1}}
    interrupt_once(root / "runs" / "p" / "started")
    with pytest.raises(KeyboardInterrupt):
        launch.run_ray(sweep, root, cwd, resources, progress=False)
    assert (root / "runs" / "p" / "checkpoint").read_text() == "saved"
    assert not (root / "runs" / "p" / "summary.json").exists()
    outcomes = launch.run_ray(sweep, root, cwd, resources, progress=False)
    assert [(o.point, o.status) for o in outcomes] == [("p", "done")]
    assert json.loads((root / "runs" / "p" / "summary.json").read_text()) == {"resumed": True}
