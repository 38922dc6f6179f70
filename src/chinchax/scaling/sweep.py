"""Sweeps: what a sweep is, where its points' files live, and gathering and analysing their results.

A sweep is a list of planned points (chinchax.scaling.plan.Point) and the analysis that follows them; `seeded`
repeats points once per seed (`train.seed`: initialisation and data order) for analyses that average over seeds.
Under a root folder each point trains in `runs/<point>/` (experiments.run's workdir: a killed point resumes from
its checkpoint by rerunning the same command) with its output in `logs/<point>.log`; a point whose workdir holds
summary.json is done and skipped. chinchax.scaling.launch trains the pending points (local subprocesses, Ray
tasks on a local or existing cluster, a SLURM array job, printed commands). `results.csv` / `results.jsonl`
gather every done point's tags and summary, with where its trainer's wall time went (`timing_table`: training,
and the overhead around it), and `curves.csv` every point's training-loss curve; chinchax.scaling.report
analyses them (compute-law fit, one per model block, isoFLOP fit, μTransfer figure, sparse runs) into JSON and
plots in the root. Importing this module (and the sweep specs) draws nothing: no matplotlib.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
from collections.abc import Iterable, Sequence

from chinchax import atomic
from chinchax import config as config_lib
from chinchax.model import flops
from chinchax.scaling.plan import Point

ANALYSES = ("compute_law", "compute_law_by_block", "isoflop", "mutransfer", "sparse")
SUMMARY_COLUMNS = (
    "final_train_loss",
    "final_eval_loss",
    "params",
    "non_embedding_params",
    "tokens",
    "train_flops",
    "flops_per_token",
    "wall_seconds",
    "train_seconds",
    "tokens_per_second",
    "mfu",
)
# Where the rest of a point's wall time went (summaries written before these were recorded lack them: None).
OVERHEAD_COLUMNS = ("startup_seconds", "first_step_seconds", "eval_seconds", "checkpoint_seconds")
# A sparse run's (chinchax.training.sparsity): average non-zero parameters and kept fractions (dense: None).
SPARSITY_COLUMNS = ("n_avg", "average_density", "final_density")
SEED_KEY = "train.seed"  # the config field a sweep's seed axis sets


class SweepError(ValueError):
    """A sweep that cannot be run or analysed as asked; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Points to train and the analysis of their results (one of ANALYSES, or None)."""

    name: str
    description: str
    points: tuple[Point, ...]
    analysis: str | None = None

    def __post_init__(self):
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise SweepError(f"sweep {self.name!r}: point names repeat")
        if self.analysis not in (None, *ANALYSES):
            raise SweepError(f"sweep {self.name!r}: analysis {self.analysis!r} is not one of {ANALYSES}")


def seeded(points: Iterable[Point], seeds: Sequence[int]) -> tuple[Point, ...]:
    """Each point once per seed (seeds innermost): named `<point>_s<seed>`, with `train.seed` set and a `seed` tag.
    No seeds: the points unchanged (their names, overrides and tags)."""
    points = tuple(points)
    if not seeds:
        return points
    fixed = [p.name for p in points if any(key == SEED_KEY for key, _ in p.overrides)]
    if fixed:
        raise SweepError(f"point(s) {', '.join(fixed)} already set {SEED_KEY}; a seed axis sets it")
    return tuple(
        dataclasses.replace(
            point,
            name=f"{point.name}_s{seed}",
            overrides=point.overrides + ((SEED_KEY, seed),),
            tags={**point.tags, "seed": seed},
        )
        for point in points
        for seed in seeds
    )


def workdir(root: pathlib.Path, point: Point) -> pathlib.Path:
    return root / "runs" / point.name


def log_path(root: pathlib.Path, point: Point) -> pathlib.Path:
    return root / "logs" / f"{point.name}.log"


def diverged_path(root: pathlib.Path, point: Point) -> pathlib.Path:
    return root / "diverged" / f"{point.name}.json"


def status(root: pathlib.Path, point: Point) -> str:
    """'done' (summary.json written), 'diverged' (recorded, not retried) or 'pending'."""
    if (workdir(root, point) / "summary.json").is_file():
        return "done"
    return "diverged" if diverged_path(root, point).is_file() else "pending"


def write_manifest(sweep: Sweep, root: pathlib.Path) -> None:
    """root/sweep.json: the sweep's points with their experiments.run arguments and tags."""
    points = [
        {"name": p.name, "args": p.run_args(), "tags": dict(p.tags), "workdir": str(workdir(root, p))}
        for p in sweep.points
    ]
    manifest = {"sweep": sweep.name, "description": sweep.description, "analysis": sweep.analysis}
    atomic.write_json(root / "sweep.json", {**manifest, "points": points}, indent=1)


def gather(sweep: Sweep, root: pathlib.Path) -> list[dict]:
    """One row per done point (sweep order): point name, tags, summary.json fields, `overhead_seconds` (its
    trainer's wall time less its training time: start-up, compilation, evaluations, checkpoints), and `flops` /
    `loss` columns (train FLOPs, validation loss: None when the run did not evaluate validation) for the fits.
    Written atomically to root/results.{csv,jsonl}."""
    rows = []
    for point in sweep.points:
        path = workdir(root, point) / "summary.json"
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SweepError(f"{path}: not JSON ({error.msg})") from None
        missing = [c for c in SUMMARY_COLUMNS if c not in summary]
        if missing:
            raise SweepError(f"{path}: summary lacks {', '.join(missing)}")
        row = {"point": point.name, **point.tags, **{c: summary[c] for c in SUMMARY_COLUMNS}}
        row["overhead_seconds"] = summary["wall_seconds"] - summary["train_seconds"]
        row.update({c: summary.get(c) for c in OVERHEAD_COLUMNS})
        row.update({c: summary[c] for c in SPARSITY_COLUMNS if c in summary})
        row.update(flops=summary["train_flops"], loss=summary["final_eval_loss"])
        rows.append(row)
    atomic.write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write_csv(root / "results.csv", rows)
    _write_csv(root / "curves.csv", [c for row in rows for c in training_curve(root, row)])
    return rows


def training_curve(root: pathlib.Path, row: dict) -> list[dict]:
    """A done point's logged training loss against its FLOPs so far: rows for approach 1
    (`experiments.fit --results=ROOT/curves.csv --law=envelope`). FLOPs so far are tokens · flops_per_token, a
    sparse run's (one with `average_density`) what it spent, each step at its density (chinchax.model.flops,
    from the run's config.json). Mid-run losses of a decaying schedule lie above what a run that short would
    reach, so the envelope overestimates the optimal size."""
    run = root / "runs" / str(row["point"])
    path = run / "metrics.jsonl"
    records = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )
    spent = None
    if row.get("average_density") is not None:
        spent = flops.spent_flops(config_lib.from_json((run / "config.json").read_text()))
    sizes = {k: row[k] for k in ("params", "non_embedding_params")}
    return [
        {
            "run": row["point"],
            **sizes,
            "tokens": r["tokens"],
            "flops": r["tokens"] * row["flops_per_token"] if spent is None else float(spent[r["step"]]),
            "loss": r["loss"],
        }
        for r in records
        if "loss" in r and r["tokens"] > 0
    ]


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """rows as CSV (the union of their keys as columns, in first-seen order), written atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, text.getvalue())


def timing_table(rows: list[dict]) -> str:
    """Per gathered point: its trainer's wall time, training time and overhead (wall − training) in seconds, the
    overhead's parts (start-up, first step with its compilation, evaluations, checkpoints), and the totals."""
    width = max([len("point"), *(len(str(row["point"])) for row in rows)])
    titles = ("wall s", "train s", "overhead", "start-up", "1st step", "eval", "ckpt")
    keys = ("wall_seconds", "train_seconds", "overhead_seconds", *OVERHEAD_COLUMNS)

    def cells(values) -> str:
        return " ".join("       -" if v is None else f"{v:8.2f}" for v in values)

    lines = [f"{'point':{width}s} " + " ".join(f"{t:>8s}" for t in titles)]
    lines += [f"{str(row['point']):{width}s} " + cells(row.get(k) for k in keys) for row in rows]
    wall, train = (sum(row[k] for row in rows) for k in keys[:2])
    share = f" ({(wall - train) / wall:.0%} of wall)" if wall > 0 else ""
    lines.append(f"{'total':{width}s} " + cells((wall, train, wall - train)) + share)
    return "\n".join(lines)
