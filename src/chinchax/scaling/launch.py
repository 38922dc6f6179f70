"""Launchers: train a sweep's pending points here (subprocesses), on a Ray cluster, or as a SLURM array job.

Every launcher runs a point as the same experiments.run command (`command`) in the point's workdir, appending
its output to the point's log. The local and Ray launchers run it through `run_point`: under the point's lock
(two launchers on one root never train a point at once), skipping points that are done or diverged, and
recording a divergence in root/diverged/ so it is not retried. A killed point resumes from its checkpoint when
its command runs again, so rerunning any launcher resumes the sweep.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from tqdm import tqdm

from chinchax import atomic
from chinchax.scaling.plan import Point
from chinchax.scaling.sweep import Sweep, SweepError, diverged_path, log_path, status, workdir

RUNNER = ("-m", "experiments.run")
DIVERGED_STATUS = 3  # experiments.run's exit status for a run whose loss went non-finite
RAY_ACCELERATORS = {"gpu": "GPU", "tpu": "TPU"}  # preset platform → Ray's resource name


def command(root: pathlib.Path, point: Point, python: str = sys.executable) -> list[str]:
    """experiments.run for the point, with its name and workdir."""
    return [
        python,
        *RUNNER,
        *point.run_args(),
        f"--config.name={point.name}",
        f"--workdir={workdir(root, point)}",
    ]


def pending(sweep: Sweep, root: pathlib.Path) -> list[Point]:
    """The points neither done nor diverged, in sweep order."""
    return [p for p in sweep.points if status(root, p) == "pending"]


@dataclasses.dataclass
class Outcome:
    point: str
    status: str  # done | diverged | failed | busy
    seconds: float
    message: str = ""


@contextlib.contextmanager
def _point_lock(root: pathlib.Path, point: Point):
    """Yield True when this process holds the point's lock (another sweep on the same root may hold it)."""
    path = root / "logs" / f".{point.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _last_error(log: pathlib.Path) -> str:
    """The run's last `error: ...` line, else its last non-empty line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_point(
    root: pathlib.Path, point: Point, cwd: pathlib.Path, children: dict, stopping: threading.Event
) -> Outcome:
    """Train one point under its lock unless it is done, diverged or `stopping`; the trainer is in `children`
    while it runs."""
    start = time.perf_counter()
    with _point_lock(root, point) as mine:
        if not mine:
            return Outcome(point.name, "busy", 0.0, "another sweep process is running it")
        if status(root, point) != "pending" or stopping.is_set():
            return Outcome(point.name, status(root, point), 0.0)
        log = log_path(root, point)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "a") as out:
            out.write(f"\n$ {shlex.join(command(root, point))}\n")
            out.flush()
            child = subprocess.Popen(
                command(root, point), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
            children[point.name] = child
            rc = _wait(child)
            children.pop(point.name, None)
        seconds = time.perf_counter() - start
        if status(root, point) == "done":
            return Outcome(point.name, "done", seconds)
        message = _last_error(log)
        if rc == DIVERGED_STATUS:
            atomic.write_json(
                diverged_path(root, point), {"point": point.name, "error": message}, indent=None
            )
            return Outcome(point.name, "diverged", seconds, message)
        return Outcome(point.name, "failed", seconds, f"exit {rc}: {message} (log: {log})")


def _wait(child: subprocess.Popen) -> int:
    """The child's exit code. Waits in short polls: a cancelled Ray task's KeyboardInterrupt (simulated, no real
    signal) is only raised between Python instructions, never inside a blocking waitpid."""
    while True:
        try:
            return child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def _terminate(children: dict) -> None:
    """SIGTERM every running trainer (each checkpoints and stops) and wait for them."""
    for child in list(children.values()):
        child.send_signal(signal.SIGTERM)
    for child in list(children.values()):
        child.wait()


def run_point_task(root: pathlib.Path, point: Point, cwd: pathlib.Path) -> Outcome:
    """run_point as a Ray task: cancelling the task (KeyboardInterrupt) stops the trainer at a checkpoint."""
    # Ray cancels through the SIGINT handler, which a worker started from a background shell lacks.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    children: dict[str, subprocess.Popen] = {}
    try:
        return run_point(root, point, cwd, children, threading.Event())
    except KeyboardInterrupt:
        _terminate(children)
        raise


@dataclasses.dataclass
class _Tally:
    """The outcomes of one launch, shown on a progress bar as they arrive."""

    bar: tqdm
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{outcome.point}: {outcome.status} ({outcome.seconds:.0f} s)")
        if outcome.status == "failed":
            tqdm.write(f"failed: {outcome.point}: {outcome.message}", file=sys.stderr)


@contextlib.contextmanager
def _launching(sweep: Sweep, root: pathlib.Path, todo: list[Point], progress: bool):
    """A tally for the `todo` points' outcomes; meanwhile SIGTERM raises KeyboardInterrupt, as SIGINT does."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    done = len(sweep.points) - len(todo)
    bar = tqdm(total=len(sweep.points), initial=done, desc=sweep.name, unit="run", disable=not progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield _Tally(bar)
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_local(
    sweep: Sweep, root: pathlib.Path, cwd: pathlib.Path, parallel: int = 1, progress: bool = True
) -> list[Outcome]:
    """Train every pending point, `parallel` at a time; returns the outcomes of the points it tried.

    SIGINT / SIGTERM reach the running points as SIGTERM (they checkpoint and stop); rerunning resumes them.
    """
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    todo = pending(sweep, root)
    children: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()
    with (
        _launching(sweep, root, todo, progress) as tally,
        concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool,
    ):
        futures = [pool.submit(run_point, root, p, cwd, children, stopping) for p in todo]
        try:
            for future in concurrent.futures.as_completed(futures):
                tally.add(future.result())
        except KeyboardInterrupt:
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            _terminate(children)
            raise
    return tally.outcomes


def ray_resources(preset) -> dict[str, float]:
    """A point's Ray resources from its mesh preset (chinchax.parallel.mesh.Preset): the preset's GPUs or TPUs, or one
    CPU for a CPU preset."""
    platform = preset.device.platform
    if platform == "cpu":
        return {"CPU": 1}
    if platform not in RAY_ACCELERATORS or preset.devices is None:
        raise SweepError(
            f"no Ray resources known for a {platform} preset of {preset.devices} devices; give them explicitly"
        )
    per_host = preset.device.devices_per_host
    if per_host and preset.devices > per_host:
        raise SweepError(
            f"a preset of {preset.devices} {preset.device.name} spans {preset.devices // per_host} hosts; the ray "
            f"launcher runs a point as one task on one node of up to {per_host} (use the slurm launcher, or run "
            "the point on every host with --coordinator_address)"
        )
    return {RAY_ACCELERATORS[platform]: preset.devices}


def _ray_options(resources: Mapping[str, float]) -> dict:
    """Ray task options for {resource: amount}: CPU and GPU as num_cpus / num_gpus (1 CPU unless given)."""
    custom = dict(resources)
    return {"num_cpus": custom.pop("CPU", 1), "num_gpus": custom.pop("GPU", 0), "resources": custom}


@contextlib.contextmanager
def _ray_connected(address: str | None):
    """Connected to Ray within the block: to `address`, or to a new local instance when None. A connection this
    process already has is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    try:
        yield
    finally:
        ray.shutdown()


def _ray_outcome(ref, point: Point) -> Outcome:
    """The task's outcome; a task Ray could not run (its node died, it raised) is a failed point."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        return Outcome(point.name, "failed", 0.0, f"ray: {str(error).strip().splitlines()[-1]}")


def run_ray(
    sweep: Sweep,
    root: pathlib.Path,
    cwd: pathlib.Path,
    resources: Mapping[str, Mapping[str, float]],
    address: str | None = None,
    progress: bool = True,
) -> list[Outcome]:
    """Train every pending point as a Ray task holding `resources[point name]`; returns the outcomes of the
    points it tried.

    Connects to the cluster at `address` ('auto', 'ray://head:10001', ...), or starts a local Ray instance (a
    connection this process already has is used as it is).
    Each task runs `run_point` on its node, so every node must see `root` and the repository at `cwd` (a shared
    file system). SIGINT / SIGTERM cancel the tasks, whose trainers checkpoint and stop; rerunning resumes them.
    """
    import ray

    todo = pending(sweep, root)
    # _launching's SIGTERM handler goes in after ray.init, which installs its own
    with _ray_connected(address), _launching(sweep, root, todo, progress) as tally:
        task = ray.remote(run_point_task)
        points = {task.options(**_ray_options(resources[p.name])).remote(root, p, cwd): p for p in todo}
        try:
            while points:  # wait in short slices, so Ctrl-C / SIGTERM reach this loop at once
                ready, _ = ray.wait(list(points), timeout=1.0)
                for ref in ready:
                    tally.add(_ray_outcome(ref, points.pop(ref)))
        except KeyboardInterrupt:
            for ref in points:
                ray.cancel(ref)
            ray.wait(list(points), num_returns=len(points))
            raise
    return tally.outcomes


def print_commands(sweep: Sweep, root: pathlib.Path, cwd: pathlib.Path, python: str = sys.executable) -> str:
    """One shell line per pending point (run each on every host of a pod slice, or feed them to xargs -P)."""
    lines = [
        f"cd {shlex.quote(str(cwd))} && {shlex.join(command(root, p, python))} >> {shlex.quote(str(log_path(root, p)))} 2>&1"
        for p in pending(sweep, root)
    ]
    return "\n".join(lines)


def write_slurm(
    sweep: Sweep,
    root: pathlib.Path,
    cwd: pathlib.Path,
    sbatch_options: tuple[str, ...] = (),
    python: str = sys.executable,
) -> pathlib.Path | None:
    """root/slurm/{commands.txt, sweep.sbatch}: an array job, one task per pending point; None when none pends.

    Each task skips its point if summary.json appeared meanwhile and appends to the point's log; `python` runs
    experiments.run (by default this interpreter: a shared file system shows it to every node). SLURM's TERM
    two minutes before the time limit is forwarded to the trainer, which checkpoints; resubmitting (this
    command writes a new array over what is still pending) resumes those points from their checkpoints.
    """
    todo = pending(sweep, root)
    if not todo:
        return None
    folder = root / "slurm"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    lines = [
        f"test -f {shlex.quote(str(workdir(root, p) / 'summary.json'))} || "
        f"exec {shlex.join(command(root, p, python))} >> {shlex.quote(str(log_path(root, p)))} 2>&1"
        for p in todo
    ]
    atomic.write_text(folder / "commands.txt", "\n".join(lines) + "\n")
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=1-{len(todo)}",
        f"#SBATCH --output={folder}/%A_%a.out",
        "#SBATCH --signal=B:TERM@120",  # time to checkpoint before the time limit
        *[f"#SBATCH {option}" for option in sbatch_options],
    ]
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(cwd))}",
        f'line=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(folder / "commands.txt"))})',
        'bash -c "$line" &',  # `exec` in the line makes this child the trainer itself
        "trainer=$!",
        "trap 'kill -TERM \"$trainer\"' TERM",  # forward SLURM's warning: the trainer checkpoints and stops
        'wait "$trainer" || wait "$trainer"',
    ]
    script = folder / "sweep.sbatch"
    atomic.write_text(script, "\n".join(header + [""] + body) + "\n")
    return script
