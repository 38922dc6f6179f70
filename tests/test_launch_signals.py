"""Stopping a launch with real signals: SIGINT (Ctrl-C) or SIGTERM sent to a launcher process reaches its running
trainer as SIGTERM, the trainer (a stand-in) checkpoints and stops, the launcher ends by KeyboardInterrupt, and
rerunning it resumes the point. The Ray launcher's case is in test_sweep_engines (it needs the Ray instance
there), the SLURM array script's in test_slurm."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO

# A stand-in `experiments.run` (found first on the path when its folder is the cwd): it records a SIGTERM
# as a checkpoint and stops (exit 0, as experiments.run does); started again on a checkpoint, it writes
# summary.json. Each start appends a line to workdir/started once its SIGTERM handler is in.
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
    with open(workdir / "started", "a") as started:
        started.write("started\\n")
    time.sleep(120)
    sys.exit("error: never stopped")
    """
)

# A launcher process: launch.run_local or launch.run_ray (argv: local|ray ROOT CWD [RAY_ADDRESS]) on one point
# "p" of the stand-in; prints the outcomes as JSON. LEFTOVER_HANDLERS=1 first installs SIGINT / SIGTERM handlers
# that swallow the signals, as a trainer run in the same process left behind before train.StopRequest put the
# caller's handlers back.
LAUNCHER = textwrap.dedent(
    """
    import json, os, pathlib, signal, sys
    from chinchax.scaling import launch, plan
    from chinchax.scaling import sweep as sweep_lib
    if os.environ.get("LEFTOVER_HANDLERS"):  # handlers that only set a flag
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
    engine, root, cwd = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    sweep = sweep_lib.Sweep("stop", "test", (plan.Point("p", "cpu_tiny"),))
    if engine == "local":
        outcomes = launch.run_local(sweep, root, cwd, progress=False)
    else:
        outcomes = launch.run_ray(sweep, root, cwd, {"p": {"CPU": 1}}, sys.argv[4], progress=False)
    print(json.dumps([[o.point, o.status] for o in outcomes]))
    """
)


def stoppable_repo(tmp_path: pathlib.Path) -> pathlib.Path:
    """A cwd whose experiments.run is STOPPABLE_RUN."""
    cwd = tmp_path / "repo"
    (cwd / "experiments").mkdir(parents=True)
    (cwd / "experiments" / "__init__.py").touch()
    (cwd / "experiments" / "run.py").write_text(STOPPABLE_RUN)
    return cwd


def wait_for_starts(workdir: pathlib.Path, count: int, process: subprocess.Popen, limit: float) -> None:
    """Until `count` trainers have started in `workdir`; fails the test if `process` ends first or time runs out."""
    deadline = time.monotonic() + limit
    path = workdir / "started"
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        if process.poll() is not None:
            pytest.fail(
                f"ended (exit {process.returncode}) before its trainer started:\n{process.communicate()[0]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no trainer started in {workdir} within {limit} s")
        time.sleep(0.05)


def stop(process: subprocess.Popen, sig: int, limit: float = 30) -> tuple[int, str, float]:
    """Send `sig` to the process alone; its exit status, output and seconds to exit. Its process group is killed
    if it runs past `limit` seconds."""
    start = time.monotonic()
    os.kill(process.pid, sig)
    try:
        output = process.communicate(timeout=limit)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(
            f"still running {limit} s after {signal.Signals(sig).name}:\n{process.communicate()[0][-3000:]}"
        )
    return process.returncode, output, time.monotonic() - start


def start_launcher(*argv: str, **env: str) -> subprocess.Popen:
    """LAUNCHER with argv in a new session (so that a test can kill it with its trainers), output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *argv],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def interrupt_then_resume(
    tmp_path: pathlib.Path, sig: int, *argv: str, started_within: float, **env: str
) -> None:
    """Launch (LAUNCHER `argv` on tmp_path/root), send `sig` to the launcher once its trainer runs; the trainer
    must checkpoint, the launcher end by KeyboardInterrupt within seconds, and a second launch resume it."""
    cwd, root = stoppable_repo(tmp_path), tmp_path / "root"
    workdir = root / "runs" / "p"
    launcher = start_launcher(argv[0], str(root), str(cwd), *argv[1:], **env)
    wait_for_starts(workdir, 1, launcher, started_within)
    rc, output, seconds = stop(launcher, sig)
    # Python ends on an uncaught KeyboardInterrupt by killing itself with SIGINT (a shell's status 130)
    assert rc == -signal.SIGINT and "KeyboardInterrupt" in output, f"exit {rc}:\n{output[-3000:]}"
    assert seconds < 15, f"the launcher took {seconds:.1f} s to stop"
    assert (workdir / "checkpoint").read_text() == "saved", "the trainer got SIGTERM and checkpointed"
    assert not (workdir / "summary.json").exists()

    again = subprocess.run(
        [sys.executable, "-c", LAUNCHER, argv[0], str(root), str(cwd), *argv[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.splitlines()[-1]) == [["p", "done"]]
    assert json.loads((workdir / "summary.json").read_text()) == {"resumed": True}
    assert len((workdir / "started").read_text().splitlines()) == 1, "the rerun resumed, not restarted"


@pytest.mark.parametrize(
    ("sig", "env"),
    [
        (signal.SIGINT, {}),
        (signal.SIGTERM, {}),
        (signal.SIGINT, {"LEFTOVER_HANDLERS": "1"}),  # Ctrl-C still stops a launcher run after a trainer
    ],
    ids=["SIGINT", "SIGTERM", "SIGINT-after-a-trainer"],
)
def test_signalled_local_launcher_stops_its_trainer_at_a_checkpoint_then_resumes(tmp_path, sig, env):
    interrupt_then_resume(tmp_path, sig, "local", started_within=60, **env)
