"""The sweep launcher: runs, skips done points, records divergence, gathers summaries, writes SLURM / commands.

Fast tests swap experiments.run for a stand-in script that writes a summary computed from its arguments; the
μTransfer analysis is checked on rows with a known argmin, and on several seeds against numpy's mean and argmin; the real `smoke` sweep trains twice through the
CLI, and one of its points, killed at a checkpoint, resumes bit-identically when the sweep is rerun.
"""

import csv
import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorstore as ts

from chinchax import config, data
from chinchax.scaling import launch, plan, report
from chinchax.scaling import sweep as sweep_lib
from experiments import configs
from experiments.configs import sweeps
from tests.conftest import REPO

# The stand-in trainer: loss from a known compute law of the point's FLOPs (given as tokens · 1e6), an
# invocation log, and failures on request (an lr of 99 diverges, an lr of 98 crashes); a run whose
# train.final_eval leaves out validation has a null validation loss; wall time = training + the overhead's parts.
FAKE_RUN = textwrap.dedent(
    """
    import json, pathlib, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    workdir = pathlib.Path(args["workdir"])
    with open(workdir.parents[1] / "invocations.txt", "a") as f:
        f.write(workdir.name + "\\n")
    lr = float(args.get("config.train.peak_lr", 0))
    if lr == 99:
        print("error: loss nan at step 3: training diverged; the last good checkpoint is step None")
        sys.exit(3)  # experiments.run's status for a diverged run (launch.DIVERGED_STATUS)
    if lr == 98:
        sys.exit("error: something else went wrong")
    tokens = int(args["config.train.tokens"])
    flops = tokens * 1e6
    loss = (flops / 1e16) ** -0.1 + 1.5 + float(args.get("config.train.seed", 0)) * 1e-3 + 0.3 * (lr - 0.01) ** 2
    workdir.mkdir(parents=True, exist_ok=True)
    validated = "validation" in args.get("config.train.final_eval", "validation,test")
    parts = dict(startup_seconds=0.25, first_step_seconds=0.5, eval_seconds=0.125, checkpoint_seconds=0.0625)
    train_seconds = tokens / 1e6
    summary = dict(name=args["config.name"], final_train_loss=loss * 0.99, final_eval_loss=loss if validated else None,
                   params=tokens // 20, non_embedding_params=tokens // 40, tokens=tokens, train_flops=flops,
                   flops_per_token=1e6, wall_seconds=train_seconds + sum(parts.values()) + 0.03125,
                   train_seconds=train_seconds, **parts, tokens_per_second=1e6, mfu=0.3)
    (workdir / "summary.json").write_text(json.dumps(summary))
    """
)


@pytest.fixture
def fake_runner(tmp_path, monkeypatch):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    monkeypatch.setattr(launch, "RUNNER", (str(script),))
    return tmp_path / "root"


def invocations(root: pathlib.Path) -> list[str]:
    path = root / "invocations.txt"
    return path.read_text().split() if path.exists() else []


def ladder_sweep(seed_noise) -> sweep_lib.Sweep:
    points = tuple(
        plan.Point(
            f"p{i}", "cpu_tiny", (("train.tokens", int(t)), ("train.seed", int(s))), {"budget": t * 1e6}
        )
        for i, (t, s) in enumerate(zip(np.logspace(5, 8, 7).round(), seed_noise, strict=True))
    )
    return sweep_lib.Sweep("fake_ladder", "test", points, analysis="compute_law")


def test_run_skip_and_gather(fake_runner):
    root = fake_runner
    rng = np.random.default_rng()
    sweep = ladder_sweep(rng.integers(0, 5, 7))
    outcomes = launch.run_local(sweep, root, REPO, parallel=2, progress=False)
    assert sorted(o.status for o in outcomes) == ["done"] * 7
    assert sorted(invocations(root)) == sorted(p.name for p in sweep.points)

    again = launch.run_local(sweep, root, REPO, parallel=2, progress=False)
    assert again == [] and len(invocations(root)) == 7

    rows = sweep_lib.gather(sweep, root)
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    jsonl = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert [r["point"] for r in table] == [p.name for p in sweep.points] == [r["point"] for r in jsonl]
    for point, csv_row, json_row in zip(sweep.points, table, jsonl, strict=True):
        summary = json.loads((root / "runs" / point.name / "summary.json").read_text())
        for key in sweep_lib.SUMMARY_COLUMNS:
            assert float(csv_row[key]) == summary[key] == json_row[key]
        assert float(csv_row["loss"]) == summary["final_eval_loss"]
        assert float(csv_row["flops"]) == summary["train_flops"]
        assert float(csv_row["budget"]) == point.tags["budget"]
        overhead = summary["wall_seconds"] - summary["train_seconds"]
        assert json_row["overhead_seconds"] == overhead == float(csv_row["overhead_seconds"]) > 0
        for key in sweep_lib.OVERHEAD_COLUMNS:
            assert json_row[key] == summary[key] == float(csv_row[key])
    assert rows == jsonl
    table = sweep_lib.timing_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    for row, line in zip(rows, table[1:], strict=False):
        assert line.split() == [row["point"]] + [
            f"{row[k]:.2f}"
            for k in ("wall_seconds", "train_seconds", "overhead_seconds", *sweep_lib.OVERHEAD_COLUMNS)
        ]
    wall, train = sum(r["wall_seconds"] for r in rows), sum(r["train_seconds"] for r in rows)
    assert table[-1].split()[:4] == ["total", f"{wall:.2f}", f"{train:.2f}", f"{wall - train:.2f}"]


def test_an_analysis_refuses_points_without_a_validation_loss(fake_runner):
    """A point whose run left validation out of train.final_eval gathers with a null loss; the fit refuses it
    in one line naming the point rather than fitting without it."""
    root = fake_runner
    sweep = ladder_sweep(np.zeros(7))
    test_only = dataclasses.replace(
        sweep.points[2], overrides=sweep.points[2].overrides + (("train.final_eval", "test"),)
    )
    sweep = dataclasses.replace(sweep, points=sweep.points[:2] + (test_only,) + sweep.points[3:])
    launch.run_local(sweep, root, REPO, progress=False)
    rows = sweep_lib.gather(sweep, root)
    assert [r["point"] for r in rows if r["loss"] is None] == ["p2"]
    with pytest.raises(
        sweep_lib.SweepError, match=r"needs a validation loss; p2 did not evaluate validation"
    ):
        report.analyse(sweep, root, rows, resamples=20)


def test_shipped_sweeps_ask_only_for_the_validation_loss():
    """The sweeps' analyses (and the smoke checks) read final_eval_loss only: every point's run evaluates the
    validation split at the end and not the test split."""
    for name in sweeps.SWEEPS:
        for point in sweeps.get(name).points:
            cfg = plan.configure(configs.get(point.base), point.overrides)
            assert config.final_eval_splits(cfg.train) == ("validation",), (name, point.name)


def test_compute_law_analysis_recovers_the_exponent(fake_runner):
    root = fake_runner
    sweep = ladder_sweep(np.zeros(7))
    launch.run_local(sweep, root, REPO, progress=False)
    summary = report.analyse(sweep, root, sweep_lib.gather(sweep, root), resamples=20)
    saved = json.loads((root / "fit.json").read_text())
    assert saved["alpha"] == pytest.approx(0.1, rel=0.02) and saved["E"] == pytest.approx(1.5, rel=0.02)
    assert saved["r2"] > 0.999 and summary["alpha"] == saved["alpha"]
    assert saved["ci"]["alpha"][0] <= saved["alpha"] <= saved["ci"]["alpha"][1]
    for path in saved["plots"].values():
        assert pathlib.Path(path).read_bytes()[:4] == b"\x89PNG"


def test_divergence_is_recorded_and_failure_reported(fake_runner):
    root = fake_runner
    points = tuple(
        plan.Point(name, "cpu_tiny", (("train.tokens", 10**6), ("train.peak_lr", lr)), {"lr": lr})
        for name, lr in (("ok", 0.01), ("nan", 99.0), ("crash", 98.0))
    )
    sweep = sweep_lib.Sweep("fail", "test", points)
    outcomes = {o.point: o for o in launch.run_local(sweep, root, REPO, progress=False)}
    assert outcomes["ok"].status == "done" and outcomes["nan"].status == "diverged"
    assert outcomes["crash"].status == "failed"
    assert (
        "something else went wrong" in outcomes["crash"].message and "crash.log" in outcomes["crash"].message
    )
    retried = launch.run_local(sweep, root, REPO, progress=False)
    assert [o.point for o in retried] == ["crash"]  # diverged points are not retried, failed ones are
    assert [r["point"] for r in sweep_lib.gather(sweep, root)] == ["ok"]


def test_mutransfer_reports_the_argmin_lr_per_width(tmp_path):
    """Given rows of (parametrization, width, lr, loss) with a known argmin per width (fresh random losses, rows
    shuffled, one diverged lr per width left out of the rows), the μTransfer analysis reports those lrs."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    root = tmp_path / "root"
    lrs = sorted(10.0 ** rng.uniform(-4, -0.5, 6))
    points, rows, diverged, expected = [], [], [], {}
    for par in ("sp", "mup"):
        for width in (32, 64, 128):
            lost = int(rng.integers(len(lrs)))  # this lr diverged: it has no row
            losses = rng.uniform(2.0, 4.0, len(lrs))
            for i, (lr, loss) in enumerate(zip(lrs, losses, strict=True)):
                name = f"{par}_w{width}_lr{i}"
                points.append(
                    plan.Point(name, "cpu_tiny", (), {"parametrization": par, "width": width, "lr": lr})
                )
                if i == lost:
                    diverged.append(name)
                    (root / "diverged").mkdir(parents=True, exist_ok=True)
                    (root / "diverged" / f"{name}.json").write_text(json.dumps({"point": name}))
                    continue
                rows.append(
                    {"point": name, "parametrization": par, "width": width, "lr": lr, "loss": float(loss)}
                )
            kept = [(loss, lr) for i, (lr, loss) in enumerate(zip(lrs, losses, strict=True)) if i != lost]
            expected.setdefault(par, {})[str(width)] = min(kept)[1]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    sweep = sweep_lib.Sweep("mt", "test", tuple(points), analysis="mutransfer")
    summary = report.analyse(sweep, root, rows)
    assert summary["best_lr"] == expected, seed
    assert sorted(summary["diverged"]) == sorted(diverged), seed
    saved = json.loads((root / "mutransfer.json").read_text())
    assert saved["best_lr"] == expected and sorted(saved["diverged"]) == sorted(diverged), seed
    assert pathlib.Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_mutransfer_averages_losses_over_seeds(tmp_path):
    """Rows of (parametrization, width, lr, seed, loss) where seed 0 alone has its least loss a grid point away
    from the least mean loss (fresh random losses, rows shuffled, one seed of one lr diverged): the analysis
    reports the argmin of the mean over seeds, as numpy computes it (an lr missing a seed is no candidate), and
    each point's mean, standard deviation and number of seeds."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    root = tmp_path / "root"
    parametrizations, widths, seeds = ("sp", "mup"), (32, 64, 128), (0, 1, 2)
    lrs = sorted(float(lr) for lr in 10.0 ** rng.uniform(-4, -0.5, 6))
    # losses[p, w, lr, seed]: a parabola in the lr's index around a best index, seed noise, and a dip of seed 0
    # one index away from the best (0.2 nats below the parabola's 0.1: the mean there stays ≥ 0.03 above)
    centres = rng.integers(1, len(lrs) - 1, (len(parametrizations), len(widths)))
    index = np.arange(len(lrs))
    losses = 3.0 + 0.1 * (index[None, None, :, None] - centres[..., None, None]) ** 2
    losses = losses + rng.normal(0.0, 0.005, (len(parametrizations), len(widths), len(lrs), len(seeds)))
    dips = centres + rng.choice((-1, 1), centres.shape)
    for (i, j), dip in np.ndenumerate(dips):
        losses[i, j, dip, 0] -= 0.2
    lost = (int(rng.integers(len(parametrizations))), int(rng.integers(len(widths))))
    losses[(*lost, centres[lost], 2)] = np.nan  # seed 2 of the mean's best lr diverged
    single = np.argmin(losses[..., 0], axis=-1)
    averaged = np.nanargmin(losses.mean(axis=-1), axis=-1)  # an lr missing a seed has a nan mean
    elsewhere = np.ones(single.shape, dtype=bool)
    elsewhere[lost] = False  # there the dip is the best complete lr
    assert (single != averaged)[elsewhere].all(), f"seed {seed}: seed 0 should disagree with the mean"

    base = [
        plan.Point(f"{p}_w{w}_lr{k}", "cpu_tiny", (), {"parametrization": p, "width": w, "lr": lr})
        for p in parametrizations
        for w in widths
        for k, lr in enumerate(lrs)
    ]
    points = sweep_lib.seeded(base, seeds)
    rows = []
    for point in points:
        tags = point.tags
        cell = (parametrizations.index(tags["parametrization"]), widths.index(tags["width"]))
        loss = losses[(*cell, lrs.index(tags["lr"]), seeds.index(tags["seed"]))]
        if np.isnan(loss):
            (root / "diverged").mkdir(parents=True, exist_ok=True)
            (root / "diverged" / f"{point.name}.json").write_text(json.dumps({"point": point.name}))
        else:
            rows.append({"point": point.name, **tags, "loss": float(loss)})
    rows = [rows[i] for i in rng.permutation(len(rows))]
    expected = {
        p: {str(w): lrs[averaged[i, j]] for j, w in enumerate(widths)} for i, p in enumerate(parametrizations)
    }
    sweep = sweep_lib.Sweep("mt", "test", points, analysis="mutransfer")
    summary = report.analyse(sweep, root, rows)
    saved = json.loads((root / "mutransfer.json").read_text())
    assert report.best_learning_rates(rows) == expected, f"seed {seed}: {summary['text']}"
    assert summary["best_lr"] == saved["best_lr"] == expected, f"seed {seed}: {summary['text']}"
    assert saved["seeds"] == len(seeds), f"seed {seed}"
    assert saved["diverged"] == [f"{parametrizations[lost[0]]}_w{widths[lost[1]]}_lr{centres[lost]}_s2"], (
        f"seed {seed}"
    )
    for i, p in enumerate(parametrizations):
        for j, w in enumerate(widths):
            ran = losses[i, j]
            reference = [
                {
                    "lr": lr,
                    "loss": pytest.approx(np.nanmean(ran[k]), rel=1e-12),
                    "loss_std": pytest.approx(np.nanstd(ran[k], ddof=1), rel=1e-12),
                    "seeds": int(np.isfinite(ran[k]).sum()),
                }
                for k, lr in enumerate(lrs)
            ]
            assert saved["losses"][p][str(w)] == reference, f"seed {seed}: {p} width {w}"
    assert pathlib.Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_a_seed_axis_runs_each_point_once_per_seed(fake_runner):
    """seeded() gives every point one run per seed: its own name and workdir, train.seed set (the stand-in's loss
    moves by 1e-3 per unit of seed) and a seed tag in the gathered rows; without seeds the points are unchanged,
    and a point that sets train.seed itself is refused."""
    root = fake_runner
    base = (
        plan.Point("a", "cpu_tiny", (("train.tokens", 10**6),), {"width": 32}),
        plan.Point("b", "cpu_tiny", (("train.tokens", 2 * 10**6),), {"width": 64}),
    )
    assert sweep_lib.seeded(base, ()) == base
    seeds = (0, 3, 7)
    points = sweep_lib.seeded(base, seeds)
    assert [p.name for p in points] == ["a_s0", "a_s3", "a_s7", "b_s0", "b_s3", "b_s7"]
    for point, (parent, seed) in zip(points, [(b, s) for b in base for s in seeds], strict=True):
        assert point.run_args() == parent.run_args() + [f"--config.train.seed={seed}"]
        assert point.tags == {**parent.tags, "seed": seed}
    sweep = sweep_lib.Sweep("seeded", "test", points)
    launch.run_local(sweep, root, REPO, parallel=2, progress=False)
    assert sorted(invocations(root)) == sorted(p.name for p in points)
    rows = {row["point"]: row for row in sweep_lib.gather(sweep, root)}
    for parent in base:
        first = rows[f"{parent.name}_s0"]["loss"]
        for seed in seeds:
            row = rows[f"{parent.name}_s{seed}"]
            assert row["seed"] == seed and row["width"] == parent.tags["width"], row
            assert row["loss"] - first == pytest.approx(seed * 1e-3, abs=1e-12), row
    with pytest.raises(sweep_lib.SweepError, match=r"point\(s\) a_s0 already set train.seed"):
        sweep_lib.seeded(points[:1], seeds)


def test_mutransfer_sweep_trains_every_point_with_each_seed():
    """The shipped mutransfer sweep: each (parametrization, width, lr) once per MUTRANSFER_SEEDS seed (at least
    two), named by its seed and configured with it; sweeps without seeds set no seed and keep their names."""
    sweep = sweeps.mutransfer()
    assert len(sweeps.MUTRANSFER_SEEDS) >= 2
    runs: dict = {}
    for point in sweep.points:
        key = tuple(point.tags[k] for k in ("parametrization", "width", "lr"))
        seed = point.tags.get("seed")
        runs.setdefault(key, []).append(seed)
        cfg = plan.configure(configs.get(point.base), point.overrides)
        assert cfg.train.seed == seed and point.name.endswith(f"_s{seed}"), point.name
    assert len(runs) == 2 * len(sweeps.MUTRANSFER_WIDTHS) * len(sweeps.MUTRANSFER_LRS)
    assert all(seeds == list(sweeps.MUTRANSFER_SEEDS) for seeds in runs.values())
    assert len({p.name for p in sweep.points}) == len(sweep.points)
    smoke = sweeps.smoke()
    assert [p.name for p in smoke.points] == ["d16", "d32"]
    assert all("seed" not in p.tags and sweep_lib.SEED_KEY not in dict(p.overrides) for p in smoke.points)


def test_slurm_and_print_cover_only_pending_points(fake_runner):
    root = fake_runner
    sweep = ladder_sweep(np.zeros(7))
    done = sweep_lib.Sweep("part", "test", sweep.points[:3])
    launch.run_local(done, root, REPO, progress=False)
    script = launch.write_slurm(sweep, root, REPO, ("--partition=gpu",))
    text = script.read_text()
    assert "#SBATCH --array=1-4" in text and "#SBATCH --partition=gpu" in text
    commands = (root / "slurm" / "commands-1.txt").read_text().splitlines()
    assert [c.split("--workdir=")[1].split()[0] for c in commands] == [
        str(root / "runs" / p.name) for p in sweep.points[3:]
    ]
    printed = launch.print_commands(sweep, root, REPO).splitlines()
    assert [line.split("--config.name=")[1].split()[0] for line in printed] == ["p3", "p4", "p5", "p6"]
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_cli_unknown_sweep_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--sweep=nope", f"--root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert (
        out.stderr.strip()
        == "error: unknown sweep 'nope'; known: cpu_ladder, blocks_cpu, isoflop_cpu, mutransfer, smoke, sparse_cpu"
    )


def test_smoke_sweep_trains_then_resumes_by_skipping(tmp_path):
    """Two real points through the CLI; the rerun skips both in seconds; results.csv equals the summaries."""
    cli = [sys.executable, "-m", "experiments.sweep", "--sweep=smoke", f"--root={tmp_path}"]
    subprocess.run(cli, cwd=REPO, check=True, capture_output=True)
    start = time.perf_counter()
    out = subprocess.run(cli, cwd=REPO, check=True, capture_output=True, text=True)
    assert time.perf_counter() - start < 20
    assert "2/2 done" in out.stdout and "ran 0 in" in out.stdout
    assert_trained_smoke_results(tmp_path)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    printed = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    for row in table:
        summary = json.loads((tmp_path / "runs" / row["point"] / "summary.json").read_text())
        wall, train, overhead = (float(row[k]) for k in ("wall_seconds", "train_seconds", "overhead_seconds"))
        assert train > 0 and overhead == wall - train >= sum(
            float(row[k]) for k in sweep_lib.OVERHEAD_COLUMNS
        )
        assert printed[row["point"]][:3] == [f"{wall:.2f}", f"{train:.2f}", f"{overhead:.2f}"], out.stdout
        assert summary["final_test_loss"] is None, summary  # the sweep asked for validation only
        assert "test loss" not in (tmp_path / "logs" / f"{row['point']}.log").read_text()


def assert_trained_smoke_results(root: pathlib.Path) -> None:
    """results.csv lists both smoke points with their summary.json values; each point trained: its validation
    loss is finite and clearly below log 257 (an untrained model: its near-zero logits give every byte and EOS
    the same probability). 8 steps do not reach the validation split's unigram entropy (≈ 3.2 nats); the
    summary's figure for it is checked against numpy here, and test_killed_point_resumes_from_its_checkpoint
    trains a smoke point long enough to get clearly below it."""
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["d16", "d32"]
    for row in table:
        summary = json.loads((root / "runs" / row["point"] / "summary.json").read_text())
        assert summary["name"] == row["point"]
        for key in sweep_lib.SUMMARY_COLUMNS:
            assert float(row[key]) == summary[key]
        assert np.isfinite(summary["final_eval_loss"]), summary
        assert summary["final_eval_loss"] < math.log(257) - UNTRAINED_MARGIN, summary
        assert summary["validation_unigram_entropy"] == pytest.approx(validation_unigram_entropy(), rel=1e-12)
    # curves.csv: every logged training loss of every point, at its FLOPs so far (approach 1's input)
    with open(root / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    for row in table:
        logged = [json.loads(line) for line in (root / "runs" / row["point"] / "metrics.jsonl").open()]
        mine = [c for c in curves if c["run"] == row["point"]]
        assert len(mine) == len(logged) > 0
        for curve, record in zip(mine, logged, strict=True):
            assert float(curve["loss"]) == record["loss"] and float(curve["tokens"]) == record["tokens"]
            assert float(curve["flops"]) == record["tokens"] * float(row["flops_per_token"])
            assert curve["params"] == row["params"]


UNTRAINED_MARGIN = 0.2  # nats below log 257 (the 8-step smoke points reach 0.35 and 0.7 below)


@functools.cache
def validation_unigram_entropy() -> float:
    """Entropy (nats/token, float64) of the token frequencies of the embedded corpus's byte-level validation split,
    read from the token store's zarr array with tensorstore and counted with numpy."""
    store = data.resolve_store("embedded", "bytes", progress=False)  # where the store is, not what it holds
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "validation")}}
    tokens = ts.open(spec, read=True).result().read().result()
    counts = np.bincount(np.asarray(tokens, np.int64), minlength=257).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# The smoke sweep's d32 point trained longer, logging every step and checkpointing every CHECKPOINT_EVERY steps.
RESUME_STEPS = 200
CHECKPOINT_EVERY = 40
RESUME_OVERRIDES = (
    ("train.tokens", RESUME_STEPS * 8 * 256),
    ("train.log_every", 1),
    ("train.checkpoint_every", CHECKPOINT_EVERY),
    ("train.keep_checkpoints", RESUME_STEPS // CHECKPOINT_EVERY),
)
# What two runs of one point share bit for bit (wall times, rates and MFU differ).
DETERMINISTIC_RECORD = ("step", "tokens", "loss", "lr", "grad_norm", "eval_loss")
DETERMINISTIC_SUMMARY = (
    "final_train_loss",
    "final_eval_loss",
    "final_test_loss",
    "validation_unigram_entropy",
    "params",
    "non_embedding_params",
    "tokens",
    "steps",
    "train_flops",
)


def trainer_pid(workdir: pathlib.Path) -> int | None:
    """The pid of this process's child that runs experiments.run in `workdir` (read from /proc)."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and f"--workdir={workdir}".encode() in argv:
            return int(entry.name)
    return None


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the complete checkpoints (orbax renames a temporary folder to <step> when one is done)."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def kill_at_first_checkpoint(workdir: pathlib.Path, killed: dict, limit: float = 300.0) -> threading.Thread:
    """A thread that SIGKILLs the point's trainer once a complete checkpoint is in its workdir."""

    def watch():
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            pid = trainer_pid(workdir)
            if pid is not None and checkpoint_steps(workdir):
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def deterministic_records(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in DETERMINISTIC_RECORD} for line in lines]


def test_killed_point_resumes_from_its_checkpoint(tmp_path):
    """The local launcher on a smoke point: its trainer SIGKILLed once its first checkpoint is on disk is a
    failed point; rerunning the sweep resumes it from its newest checkpoint, and it ends bit-identical to an
    uninterrupted run of the same point, with a validation loss clearly below the unigram entropy."""
    smoke = sweeps.get("smoke")
    point = next(p for p in smoke.points if p.name == "d32")
    point = dataclasses.replace(point, overrides=point.overrides + RESUME_OVERRIDES)
    sweep = sweep_lib.Sweep("smoke_resume", "test", (point,))
    killed_root, straight_root = tmp_path / "killed", tmp_path / "straight"
    workdir = killed_root / "runs" / point.name

    killed: dict = {}
    watcher = kill_at_first_checkpoint(workdir, killed)
    outcomes = launch.run_local(sweep, killed_root, REPO, progress=False)
    watcher.join(timeout=5)
    log = (killed_root / "logs" / f"{point.name}.log").read_text()
    assert "pid" in killed, f"the trainer was never killed at a checkpoint:\n{log[-3000:]}"
    assert [(o.point, o.status) for o in outcomes] == [(point.name, "failed")], (outcomes, log[-3000:])
    assert "exit -9" in outcomes[0].message, outcomes
    assert not (workdir / "summary.json").exists()
    saved = checkpoint_steps(workdir)  # the trainer is dead: nothing changes these any more
    assert saved and max(saved) < RESUME_STEPS and max(saved) % CHECKPOINT_EVERY == 0, saved
    resume_step = max(saved)

    again = launch.run_local(sweep, killed_root, REPO, progress=False)
    assert [(o.point, o.status) for o in again] == [(point.name, "done")], again
    log = (killed_root / "logs" / f"{point.name}.log").read_text()
    commands = [line for line in log.splitlines() if line.startswith("$ ")]  # the launcher's line per start
    assert len(commands) == 2 and f"resumed from step {resume_step} in {workdir}" in log, log[-3000:]
    assert log.count("resumed from step") == 1, log[-3000:]

    straight = launch.run_local(sweep, straight_root, REPO, progress=False)
    assert [(o.point, o.status) for o in straight] == [(point.name, "done")], straight
    reference = straight_root / "runs" / point.name
    assert "resumed from step" not in (straight_root / "logs" / f"{point.name}.log").read_text()

    resumed_records, reference_records = deterministic_records(workdir), deterministic_records(reference)
    assert [r["step"] for r in reference_records] == list(range(1, RESUME_STEPS + 1))
    assert resumed_records == reference_records  # bit-exact: floats compared by ==
    resumed_summary = json.loads((workdir / "summary.json").read_text())
    reference_summary = json.loads((reference / "summary.json").read_text())
    for key in DETERMINISTIC_SUMMARY:
        assert resumed_summary[key] == reference_summary[key], key
    entropy = validation_unigram_entropy()
    assert reference_summary["validation_unigram_entropy"] == pytest.approx(entropy, rel=1e-12)
    assert reference_summary["final_eval_loss"] < entropy - TRAINED_MARGIN, (reference_summary, entropy)


TRAINED_MARGIN = 0.3  # nats below the unigram entropy after RESUME_STEPS steps (measured: about 0.7 below)
