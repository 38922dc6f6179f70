"""The SLURM launcher's array scripts, run as SLURM runs them: bash with an array task's environment (a stand-in
sbatch reads the script's #SBATCH nodes and tasks), `srun` and `scontrol` stand-ins first on the PATH. The
stand-in srun starts a step's tasks as local processes numbered as srun numbers them (SLURM_PROCID /
SLURM_NTASKS / SLURM_NODEID / SLURM_LOCALID), so a point of two hosts trains as two processes on localhost, with
one process's losses. A resubmission's queued tasks keep their points; a task takes the local launcher's point
lock and records a divergence as the local launcher does; SLURM's warning TERM to the batch shell reaches the
trainer, which checkpoints, and the resubmitted task resumes it."""

import contextlib
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from chinchax.scaling import launch, plan
from chinchax.scaling import sweep as sweep_lib
from tests.conftest import REPO
from tests.test_launch_signals import stoppable_repo, wait_for_starts

SRUN = textwrap.dedent(
    """\
    import os, signal, subprocess, sys
    args, options = sys.argv[1:], {}
    while args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        options[key] = value
    nodes = int(options.get("nodes", os.environ["SLURM_NNODES"]))
    per_node = int(options.get("ntasks-per-node", os.environ["SLURM_NTASKS_PER_NODE"]))
    if nodes > int(os.environ["SLURM_NNODES"]):
        sys.exit(f"srun: error: {nodes} nodes requested, the allocation has {os.environ['SLURM_NNODES']}")
    step = {"SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"]}
    tasks = [
        subprocess.Popen(args, env={**os.environ, **step, "SLURM_PROCID": str(i), "SLURM_NODEID": str(i // per_node),
                                    "SLURM_LOCALID": str(i % per_node)})
        for i in range(nodes * per_node)
    ]
    signal.signal(signal.SIGTERM, lambda *_: [task.send_signal(signal.SIGTERM) for task in tasks])
    sys.exit(max(task.wait() for task in tasks))
    """
)
SCONTROL = '#!/bin/sh\ntest "$1 $2" = "show hostnames" && echo "$3" | tr , "\\n"\n'

# A stand-in `experiments.run` (found first on the path when its folder is the cwd): it counts its starts in
# the workdir; point "nan…" diverges, point "slow…" waits for workdir/release; the others write summary.json.
FAKE_RUN = textwrap.dedent(
    """
    import json, pathlib, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    name, workdir = args["config.name"], pathlib.Path(args["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "starts", "a") as starts:
        starts.write("started\\n")
    if name.startswith("nan"):
        print("error: loss is nan at step 3")
        sys.exit(3)
    deadline = time.monotonic() + 30
    while name.startswith("slow") and not (workdir / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (workdir / "summary.json").write_text(json.dumps({"point": name}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm_bin(tmp_path) -> pathlib.Path:
    """A folder with the srun and scontrol stand-ins."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("srun", f"#!{sys.executable}\n{SRUN}"), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def fake_repo(tmp_path) -> pathlib.Path:
    """A cwd whose experiments.run is FAKE_RUN."""
    cwd = tmp_path / "repo"
    (cwd / "experiments").mkdir(parents=True)
    (cwd / "experiments" / "__init__.py").touch()
    (cwd / "experiments" / "run.py").write_text(FAKE_RUN)
    return cwd


def start_task(script: pathlib.Path, index: int, slurm_bin: pathlib.Path, **env: str) -> subprocess.Popen:
    """Array task `index` of a submitted script, as sbatch starts it on the allocation's first node (localhost)."""
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script.read_text(), re.MULTILINE))
    nodes, per_node = int(options.get("nodes", 1)), int(options.get("ntasks-per-node", 1))
    allocation = {
        "PATH": f"{slurm_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": str(random.randrange(10_000, 99_999)),
        "SLURM_ARRAY_TASK_ID": str(index),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_PROCID": "0",
    }
    return subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, **allocation, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(task: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """The task's exit status and output; its process group is killed after `timeout` seconds."""
    try:
        output = task.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(task.pid, signal.SIGKILL)
        pytest.fail(f"the array task ran past {timeout} s:\n{task.communicate()[0][-3000:]}")
    return task.returncode, output


def run_task(script: pathlib.Path, index: int, slurm_bin: pathlib.Path, status: int = 0) -> None:
    """Run array task `index` to its end; it must exit with `status`."""
    rc, output = finish(start_task(script, index, slurm_bin))
    assert rc == status, f"task {index} of {script.name} exited {rc}:\n{output[-3000:]}"


def starts(root: pathlib.Path, name: str) -> int:
    path = root / "runs" / name / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def losses(workdir: pathlib.Path) -> list[float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_two_host_point_runs_one_srun_task_per_host_with_one_process_losses(tmp_path, slurm_bin):
    seed = random.randrange(2**31)
    steps, seq_len = 4, 32
    tiny = (
        ("data.seq_len", seq_len),
        ("train.batch_size", 8),
        ("train.tokens", 8 * seq_len * steps),
        ("train.warmup_tokens", 8 * seq_len),
        ("train.log_every", 1),
        ("train.eval_batches", 1),
        ("train.final_eval", ""),
        ("train.seed", seed),
    )
    point = plan.Point("p", "cpu_tiny", tiny)
    root = tmp_path / "root"
    script = launch.write_slurm(sweep_lib.Sweep("two", "test", (point,)), root, REPO, hosts=2)
    assert script.name == "sweep-2hosts.sbatch"
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    task = start_task(script, 1, slurm_bin, JAX_COORDINATOR_PORT=str(_free_port()), **two_devices)
    rc, output = finish(task, timeout=300)
    log = sweep_lib.log_path(root, point)
    assert rc == 0, f"seed={seed}: {output[-2000:]}\n{log.read_text()[-3000:]}"
    summary = json.loads((sweep_lib.workdir(root, point) / "summary.json").read_text())
    assert summary["devices"] == 4, "two processes of two devices each"

    reference = tmp_path / "reference"
    one_device = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        launch.command(reference, point), cwd=REPO, env=one_device, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = losses(sweep_lib.workdir(reference, point))
    assert len(expected) == steps
    np.testing.assert_allclose(
        losses(sweep_lib.workdir(root, point)), expected, rtol=0, atol=1e-5, err_msg=f"seed={seed}"
    )


def test_queued_tasks_of_an_earlier_submission_run_their_own_points(tmp_path, slurm_bin, fake_repo):
    root = tmp_path / "root"
    sweep = sweep_lib.Sweep("two", "test", (plan.Point("a", "cpu_tiny"), plan.Point("b", "cpu_tiny")))
    first = tmp_path / "first.sbatch"  # sbatch keeps the script as it was submitted
    first.write_text(launch.write_slurm(sweep, root, fake_repo).read_text())
    run_task(first, 1, slurm_bin)
    second = launch.write_slurm(sweep, root, fake_repo)  # resubmitted while task 2 of the first is queued
    assert "#SBATCH --array=1-1" in second.read_text()

    run_task(first, 2, slurm_bin)
    assert starts(root, "b") == 1, "task 2 of the first submission trains b"
    assert json.loads((root / "runs" / "b" / "summary.json").read_text()) == {"point": "b"}
    run_task(second, 1, slurm_bin)
    assert (starts(root, "a"), starts(root, "b")) == (1, 1), "the second submission skips b, done meanwhile"


def test_array_task_holds_the_point_lock_of_the_local_launcher(tmp_path, slurm_bin, fake_repo):
    root = tmp_path / "root"
    sweep = sweep_lib.Sweep("one", "test", (plan.Point("slow", "cpu_tiny"),))
    task = start_task(launch.write_slurm(sweep, root, fake_repo), 1, slurm_bin)
    deadline = time.monotonic() + 30
    while not starts(root, "slow") and time.monotonic() < deadline:
        time.sleep(0.05)
    outcomes = launch.run_local(sweep, root, fake_repo, progress=False)
    assert [(o.point, o.status) for o in outcomes] == [("slow", "busy")]
    (root / "runs" / "slow" / "release").touch()
    rc, output = finish(task)
    assert rc == 0, output[-3000:]
    assert starts(root, "slow") == 1


def test_array_task_records_a_divergence_as_the_local_launcher_does(tmp_path, slurm_bin, fake_repo):
    sweep = sweep_lib.Sweep("one", "test", (plan.Point("nan", "cpu_tiny"),))
    local = tmp_path / "local"
    assert [o.status for o in launch.run_local(sweep, local, fake_repo, progress=False)] == ["diverged"]
    root = tmp_path / "root"
    script = launch.write_slurm(sweep, root, fake_repo)
    run_task(script, 1, slurm_bin, launch.DIVERGED_STATUS)
    assert sweep_lib.status(root, sweep.points[0]) == "diverged"
    recorded = sweep_lib.diverged_path(root, sweep.points[0]).read_text()
    assert recorded == sweep_lib.diverged_path(local, sweep.points[0]).read_text()
    run_task(script, 1, slurm_bin)
    assert starts(root, "nan") == 1, "a recorded divergence is not retried"


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (a bash trap): the SigCgt mask of /proc/PID/status."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)
    return bool(caught >> (sig - 1) & 1)


@pytest.mark.parametrize("hosts", [1, 2])
def test_term_to_an_array_task_reaches_its_trainer_which_checkpoints_then_resumes(tmp_path, slurm_bin, hosts):
    """`#SBATCH --signal=B:TERM@120` signals the batch shell alone; its trap forwards the TERM to the trainer
    (srun, for several hosts, forwards it to every task), waits for it, and exits with its status."""
    root = tmp_path / "root"
    sweep = sweep_lib.Sweep("stop", "test", (plan.Point("p", "cpu_tiny"),))
    script = launch.write_slurm(sweep, root, stoppable_repo(tmp_path), hosts=hosts)
    workdir = root / "runs" / "p"
    task = start_task(script, 1, slurm_bin)
    try:
        wait_for_starts(workdir, hosts, task, limit=30)
        deadline = time.monotonic() + 5  # the trap is set right after the trainer starts
        while not catches(task.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(task.pid, signal.SIGTERM)
        rc, output = finish(task, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(task.pid, signal.SIGKILL)  # a trainer the TERM did not stop
    assert rc == 0, (
        f"the task exits with its trainer's status (0: stopped at a checkpoint), got {rc}:\n{output}"
    )
    assert (workdir / "checkpoint").read_text() == "saved", "the trainer got TERM and checkpointed"
    assert not (workdir / "summary.json").exists()
    assert sweep_lib.status(root, sweep.points[0]) == "pending"

    run_task(script, 1, slurm_bin)  # resubmitted
    assert json.loads((workdir / "summary.json").read_text()) == {"resumed": True}
    assert len((workdir / "started").read_text().splitlines()) == hosts, "the rerun resumed, not restarted"


def test_srun_task_given_a_coordinator_keeps_all_its_devices():
    """SLURM numbers the task; JAX's cluster detection would narrow it to GPU SLURM_LOCALID (1 here)."""
    code = (
        "import jax; from chinchax.parallel import distributed; launch = distributed.initialize(); "
        "print(launch.mode, launch.num_processes, launch.process_id, jax.config.read('jax_cuda_visible_devices'))"
    )
    slurm_task = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "1",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **slurm_task},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["explicit", "1", "0", "all"]
