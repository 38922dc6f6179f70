"""Launchers: train a sweep's pending points here (subprocesses), on a Ray cluster, or as a SLURM array job.

Every launcher runs a point as the same experiments.run command (`command`) in the point's workdir, appending
its output to the point's log, under the point's lock (two launchers on one root never train a point at once),
skipping points that are done or diverged, and recording a divergence in root/diverged/ so it is not retried:
the local and Ray launchers through `run_point`, a SLURM array task through its script (flock(1) takes the same
lock). A killed point resumes from its checkpoint when its command runs again, so rerunning any launcher resumes
the sweep.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import itertools
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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # a launcher stops its points at a checkpoint on either


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


def lock_path(root: pathlib.Path, point: Point) -> pathlib.Path:
    """The file whose flock(2) lock a launcher holds while it trains the point."""
    return root / "logs" / f".{point.name}.lock"


@contextlib.contextmanager
def _point_lock(root: pathlib.Path, point: Point):
    """Yield True when this process holds the point's lock (another sweep on the same root may hold it)."""
    path = lock_path(root, point)
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


def record_divergence(path: str | os.PathLike, point: str, log: str | os.PathLike) -> str:
    """Record at `path` (the point's diverged_path) that the point diverged, so no launcher retries it; returns
    the error, its log's last one."""
    message = _last_error(pathlib.Path(log))
    atomic.write_json(path, {"point": point, "error": message}, indent=None)
    return message


def run_point(
    root: pathlib.Path, point: Point, cwd: pathlib.Path, children: dict, stopping: threading.Event
) -> Outcome:
    """Train one point under its lock unless it is done, diverged or `stopping`; the trainer is in `children`
    while it runs. Interrupted here (a cancelled Ray task's KeyboardInterrupt), it stops the trainer at a
    checkpoint before it lets the lock go."""
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
            try:
                if stopping.is_set():  # stopped while it started: the launcher's SIGTERMs may have missed it
                    child.send_signal(signal.SIGTERM)
                rc = _wait(child)
            except KeyboardInterrupt:
                _terminate({point.name: child})
                raise
            finally:
                children.pop(point.name, None)
        seconds = time.perf_counter() - start
        if status(root, point) == "done":
            return Outcome(point.name, "done", seconds)
        if rc == DIVERGED_STATUS:
            message = record_divergence(diverged_path(root, point), point.name, log)
            return Outcome(point.name, "diverged", seconds, message)
        return Outcome(point.name, "failed", seconds, f"exit {rc}: {_last_error(log)} (log: {log})")


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
    return run_point(root, point, cwd, {}, threading.Event())


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
    """A tally for the `todo` points' outcomes; meanwhile SIGINT and SIGTERM raise KeyboardInterrupt, whatever
    handled them before (a caller's handler that only sets a flag would swallow Ctrl-C; a shell's background job
    starts with SIGINT ignored)."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    done = len(sweep.points) - len(todo)
    bar = tqdm(total=len(sweep.points), initial=done, desc=sweep.name, unit="run", disable=not progress)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    try:
        yield _Tally(bar)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
        try:  # a Ctrl-C while the points are submitted stops them too
            futures = [pool.submit(run_point, root, p, cwd, children, stopping) for p in todo]
            for future in concurrent.futures.as_completed(futures):
                tally.add(future.result())
        except KeyboardInterrupt:
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            _terminate(children)
            raise
    return tally.outcomes


def preset_hosts(preset) -> int:
    """The hosts a mesh preset (chinchax.parallel.mesh.Preset) spans: its devices over its device's devices per
    host; 1 for a preset of one host or of all visible devices."""
    per_host = preset.device.devices_per_host
    if not per_host or preset.devices is None:
        return 1
    return -(-preset.devices // per_host)


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
    if preset_hosts(preset) > 1:
        raise SweepError(
            f"a preset of {preset.devices} {preset.device.name} spans {preset_hosts(preset)} hosts; the ray "
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
    # _launching's SIGINT / SIGTERM handlers go in after ray.init, which installs its own SIGTERM handler
    with _ray_connected(address), _launching(sweep, root, todo, progress) as tally:
        task = ray.remote(run_point_task)
        points = {}
        try:  # a Ctrl-C while the tasks are submitted cancels those submitted
            for p in todo:
                points[task.options(**_ray_options(resources[p.name])).remote(root, p, cwd)] = p
            while points:  # wait in short slices, so Ctrl-C / SIGTERM reach this loop at once
                ready, _ = ray.wait(list(points), timeout=1.0)
                for ref in ready:
                    tally.add(_ray_outcome(ref, points.pop(ref)))
        except KeyboardInterrupt:
            for ref in points:
                ray.cancel(ref)
            if points:
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


# A point of several hosts: process 0 runs on the allocation's first host (the host JAX's own SLURM detection
# picks), at the port JAX would pick from the job id unless JAX_COORDINATOR_PORT names one.
SLURM_COORDINATOR = (
    'host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)',
    'export JAX_COORDINATOR_ADDRESS="${host:-$(hostname)}:${JAX_COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}"',
)


def write_slurm(
    sweep: Sweep,
    root: pathlib.Path,
    cwd: pathlib.Path,
    sbatch_options: tuple[str, ...] = (),
    python: str = sys.executable,
    hosts: int = 1,
) -> pathlib.Path | None:
    """An array job, one task per pending point of `hosts` hosts each: root/slurm/sweep.sbatch
    (sweep-<hosts>hosts.sbatch for several) over a new root/slurm/commands-<n>.txt; None when none pends.

    A task does what `run_point` does: under the point's lock (held elsewhere: it leaves the point), unless the
    point is done or diverged, it runs experiments.run with `python` (by default this interpreter: a shared file
    system shows it to every node), appending to the point's log, and records a divergence. A point of several
    hosts runs under srun, one task per host, with JAX_COORDINATOR_ADDRESS set (SLURM numbers the processes:
    chinchax.parallel.distributed). SLURM's TERM two minutes before the time limit is forwarded to the trainer,
    which checkpoints. Resubmitting resumes those points: every submission reads its own commands file, so an
    earlier array's queued tasks still run the points they were submitted for (skipping those done meanwhile).
    """
    todo = pending(sweep, root)
    if not todo:
        return None
    folder = root / "slurm"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    commands = _new_commands_file(folder)
    atomic.write_text(commands, "".join(_task_line(root, p, python) + "\n" for p in todo))
    several = hosts > 1
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=1-{len(todo)}",
        f"#SBATCH --output={folder}/%A_%a.out",
        "#SBATCH --signal=B:TERM@120",  # time to checkpoint before the time limit
        *([f"#SBATCH --nodes={hosts}", "#SBATCH --ntasks-per-node=1"] if several else []),
        *[f"#SBATCH {option}" for option in sbatch_options],
    ]
    launcher = f"srun --nodes={hosts} --ntasks-per-node=1 " if several else ""
    record = "import sys; from chinchax.scaling import launch; launch.record_divergence(*sys.argv[1:])"
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(cwd))}",
        f'eval "set -- $(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(commands))})"',
        "point=$1 lock=$2 summary=$3 diverged=$4 log=$5",
        "shift 5  # the rest: the point's experiments.run command",
        'exec 9>"$lock"',
        'flock --nonblock 9 || { echo "$point: another sweep process is running it"; exit 0; }',
        'if [ -e "$summary" ] || [ -e "$diverged" ]; then exit 0; fi',
        *(SLURM_COORDINATOR if several else ()),
        f'{launcher}"$@" >> "$log" 2>&1 &',
        "trainer=$!",
        "trap 'kill -TERM \"$trainer\"' TERM",  # forward SLURM's warning: the trainer checkpoints and stops
        "status=0",
        'wait "$trainer" || wait "$trainer" || status=$?',  # a wait the trap cut short waits again
        f'if [ "$status" -eq {DIVERGED_STATUS} ]; then',
        f'  {shlex.quote(python)} -c {shlex.quote(record)} "$diverged" "$point" "$log"',
        "fi",
        'exit "$status"',
    ]
    script = folder / (f"sweep-{hosts}hosts.sbatch" if several else "sweep.sbatch")
    atomic.write_text(script, "\n".join(header + [""] + body) + "\n")
    return script


def _task_line(root: pathlib.Path, point: Point, python: str) -> str:
    """A commands file's line for the point, as shell words: its name, lock, summary.json, divergence record and
    log, then its command."""
    summary = workdir(root, point) / "summary.json"
    files = (lock_path(root, point), summary, diverged_path(root, point), log_path(root, point))
    return shlex.join([point.name, *map(str, files), *command(root, point, python)])


def _new_commands_file(folder: pathlib.Path) -> pathlib.Path:
    """folder/commands-<n>.txt for the first n not yet taken, created empty and exclusively (two writers never
    share one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = folder / f"commands-{n}.txt"
        try:
            path.touch(exist_ok=False)
        except FileExistsError:
            continue
        return path
