"""Run a sweep: `python -m experiments.sweep --sweep=NAME [--root=DIR]
[--launcher=local|ray|slurm|print|gather] [--parallel=K] [--ray_address=ADDR] [--ray_resources=JSON]`.

local trains every pending point (experiments.run in a subprocess, output in ROOT/logs/<point>.log), then
gathers ROOT/results.{csv,jsonl} (each point's wall, training and overhead seconds are also printed as a table)
and runs the sweep's analysis (fit.json / blocks.json / mutransfer.json / sparse.json and PNGs in ROOT).
Points with summary.json are skipped, so rerunning resumes a sweep (a killed point from its checkpoint).
ray does the same with each pending point as a Ray task holding its mesh preset's GPUs or TPUs (one CPU on
the cpu preset; --ray_resources overrides), on the cluster at --ray_address or on a new local Ray instance.
slurm writes ROOT/slurm/sweep.sbatch (an array job over the pending points; sweep-<N>hosts.sbatch for
points whose mesh preset spans N hosts, each run by srun as one task per host); print prints one command per
pending point (for the hosts of a pod, or xargs -P); gather only gathers and analyses what is done.
Sweeps: experiments/configs/sweeps.py (--list names them).
"""

import dataclasses
import json
import pathlib
import sys
import time

from absl import app, flags

from chinchax.config import ConfigError
from chinchax.parallel import mesh
from chinchax.scaling import fit_io, launch, plan, report
from chinchax.scaling import sweep as sweep_lib
from experiments import cli as cli_lib
from experiments import configs
from experiments.configs import sweeps

REPO = pathlib.Path(__file__).resolve().parents[1]

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep name (see --list).")
_ROOT = flags.DEFINE_string("root", None, "Sweep folder (default: runs/sweeps/NAME).")
_LAUNCHER = flags.DEFINE_enum(
    "launcher", "local", ["local", "ray", "slurm", "print", "gather"], "How to run points."
)
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Points trained at once by the local launcher.", lower_bound=1
)
_BOOTSTRAP = flags.DEFINE_integer(
    "bootstrap", report.BOOTSTRAP, "Bootstrap resamples for the fit CIs.", lower_bound=0
)
_RAY_ADDRESS = flags.DEFINE_string(
    "ray_address", None, "Ray cluster to run on ('auto', 'ray://head:10001'); default: a new local instance."
)
_RAY_RESOURCES = flags.DEFINE_string(
    "ray_resources",
    None,
    "Ray resources of every point as JSON, e.g. '{\"TPU\": 4}' (default: from its preset).",
)
_SBATCH = flags.DEFINE_multi_string("sbatch", [], "Extra #SBATCH option, e.g. --sbatch=--partition=gpu.")
_PYTHON = flags.DEFINE_string(
    "python", sys.executable, "Interpreter of the slurm and print commands (default: this one)."
)
_LIST = flags.DEFINE_bool("list", False, "List the sweeps with their points' planned budgets and exit.")


def list_sweeps() -> str:
    lines = []
    for name in sweeps.SWEEPS:
        sweep = sweeps.get(name)
        lines.append(f"{name}: {len(sweep.points)} points, analysis {sweep.analysis} — {sweep.description}")
        for point in sweep.points:
            row = plan.describe(configs.get(point.base), point)
            lines.append(
                f"  {point.name:28s} params {row['params']:>9,}  tokens {row['tokens']:>11,}  "
                f"FLOPs {row['train_flops']:.3g}  tokens/param {row['tokens_per_param']:.1f}"
            )
    return "\n".join(lines)


def point_preset(point: plan.Point) -> mesh.Preset:
    """The point's mesh preset."""
    cfg = plan.configure(configs.get(point.base), point.overrides)
    return mesh.preset(cfg.mesh.preset)


def point_resources(point: plan.Point) -> dict[str, float]:
    """The Ray resources of the point's mesh preset."""
    return launch.ray_resources(point_preset(point))


def write_slurm(sweep: sweep_lib.Sweep, root: pathlib.Path) -> list[pathlib.Path]:
    """One SLURM array script per number of hosts the pending points span (an array's tasks share one shape)."""
    by_hosts: dict[int, list[plan.Point]] = {}
    for point in sweep.points:
        by_hosts.setdefault(launch.preset_hosts(point_preset(point)), []).append(point)
    scripts = [
        launch.write_slurm(
            dataclasses.replace(sweep, points=tuple(points)),
            root,
            REPO,
            tuple(_SBATCH.value),
            _PYTHON.value,
            hosts,
        )
        for hosts, points in by_hosts.items()
    ]
    return [script for script in scripts if script]


def parse_resources(text: str) -> dict[str, float]:
    """--ray_resources: a JSON object of resource amounts."""
    try:
        resources = json.loads(text)
    except json.JSONDecodeError:
        resources = None
    amounts = resources.values() if isinstance(resources, dict) else [None]
    if not all(isinstance(v, int | float) and v >= 0 for v in amounts):
        raise sweep_lib.SweepError(f"--ray_resources={text} is not a JSON object of resource amounts")
    return resources


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _LIST.value:
        print(list_sweeps())
        return
    if not _SWEEP.value:
        raise sweep_lib.SweepError(f"--sweep is required; known: {', '.join(sweeps.SWEEPS)}")
    sweep = sweeps.get(_SWEEP.value)
    root = pathlib.Path(_ROOT.value or f"runs/sweeps/{sweep.name}").resolve()
    sweep_lib.write_manifest(sweep, root)
    if _LAUNCHER.value == "print":
        print(launch.print_commands(sweep, root, REPO, _PYTHON.value))
        return
    if _LAUNCHER.value == "slurm":
        scripts = write_slurm(sweep, root)
        print("\n".join(f"submit with: sbatch {s}" for s in scripts) or f"{sweep.name}: every point is done")
        return
    start = time.perf_counter()
    outcomes = []
    if _LAUNCHER.value == "local":
        outcomes = launch.run_local(sweep, root, REPO, _PARALLEL.value)
    elif _LAUNCHER.value == "ray":
        fixed = parse_resources(_RAY_RESOURCES.value) if _RAY_RESOURCES.value else None
        resources = {p.name: fixed or point_resources(p) for p in sweep.points}
        outcomes = launch.run_ray(sweep, root, REPO, resources, _RAY_ADDRESS.value)
    rows = sweep_lib.gather(sweep, root)
    counts = {
        s: sum(sweep_lib.status(root, p) == s for p in sweep.points) for s in ("done", "diverged", "pending")
    }
    print(
        f"{sweep.name}: {counts['done']}/{len(sweep.points)} done, {counts['diverged']} diverged, "
        f"{counts['pending']} pending; ran {len(outcomes)} in {time.perf_counter() - start:.0f} s; "
        f"results: {root / 'results.csv'}"
    )
    if rows:
        print(sweep_lib.timing_table(rows))
    failed = [o for o in outcomes if o.status == "failed"]
    if counts["pending"] == 0:
        summary = report.analyse(sweep, root, rows, _BOOTSTRAP.value)
        if summary is not None:
            print(summary.pop("text"))
            print(json.dumps(fit_io.printable(summary)))
    if failed:
        sys.exit(f"error: {len(failed)} point(s) failed, first: {failed[0].point}: {failed[0].message}")


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (sweep_lib.SweepError, plan.PlanError, fit_io.FitDataError, ConfigError))


if __name__ == "__main__":
    cli()
