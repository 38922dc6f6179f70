"""The sweep launcher: runs, skips done points, records divergence, gathers summaries, writes SLURM / commands.

Fast tests swap experiments.run for a stand-in script that writes a summary computed from its arguments; the
slow test trains the real `smoke` sweep twice through the CLI.
"""

import csv
import json
import pathlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from chinchax.scaling import launch, plan
from chinchax.scaling import sweep as sweep_lib
from tests.conftest import REPO

# The stand-in trainer: loss from a known compute law of the point's FLOPs (given as tokens · 1e6), an
# invocation log, and failures on request (an lr of 99 diverges, an lr of 98 crashes).
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
    summary = dict(name=args["config.name"], final_train_loss=loss * 0.99, final_eval_loss=loss, params=tokens // 20,
                   non_embedding_params=tokens // 40, tokens=tokens, train_flops=flops, flops_per_token=1e6,
                   wall_seconds=0.1, tokens_per_second=tokens / 0.1, mfu=0.3)
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
    assert rows == jsonl


def test_compute_law_analysis_recovers_the_exponent(fake_runner):
    root = fake_runner
    sweep = ladder_sweep(np.zeros(7))
    launch.run_local(sweep, root, REPO, progress=False)
    summary = sweep_lib.analyse(sweep, root, sweep_lib.gather(sweep, root), resamples=20)
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


def test_mutransfer_reports_the_best_lr_per_width(fake_runner):
    root = fake_runner
    lrs = (0.001, 0.003, 0.01, 0.03, 99.0)
    points = tuple(
        plan.Point(
            f"{par}_w{w}_lr{lr:g}",
            "cpu_tiny",
            (("train.tokens", 10**6 * w), ("train.peak_lr", lr)),
            {"parametrization": par, "width": w, "lr": lr},
        )
        for par in ("sp", "mup")
        for w in (64, 128)
        for lr in lrs
    )
    sweep = sweep_lib.Sweep("mt", "test", points, analysis="mutransfer")
    launch.run_local(sweep, root, REPO, parallel=2, progress=False)
    summary = sweep_lib.analyse(sweep, root, sweep_lib.gather(sweep, root))
    assert summary["best_lr"] == {p: {"64": 0.01, "128": 0.01} for p in ("mup", "sp")}
    assert len(summary["diverged"]) == 4
    assert pathlib.Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_slurm_and_print_cover_only_pending_points(fake_runner):
    root = fake_runner
    sweep = ladder_sweep(np.zeros(7))
    done = sweep_lib.Sweep("part", "test", sweep.points[:3])
    launch.run_local(done, root, REPO, progress=False)
    script = launch.write_slurm(sweep, root, REPO, ("--partition=gpu",))
    text = script.read_text()
    assert "#SBATCH --array=1-4" in text and "#SBATCH --partition=gpu" in text
    commands = (root / "slurm" / "commands.txt").read_text().splitlines()
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
        out.stderr.strip() == "error: unknown sweep 'nope'; known: cpu_ladder, isoflop_cpu, mutransfer, smoke"
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


def assert_trained_smoke_results(root: pathlib.Path) -> None:
    """results.csv lists both smoke points with their summary.json values; their losses are finite, < 6 nats."""
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["d16", "d32"]
    for row in table:
        summary = json.loads((root / "runs" / row["point"] / "summary.json").read_text())
        assert summary["name"] == row["point"]
        for key in sweep_lib.SUMMARY_COLUMNS:
            assert float(row[key]) == summary[key]
        assert np.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] < 6.0
