"""`python -m experiments.plan` from the command line: the family table, the pod table BUILD.md carries, and a
budget in device-hours. References: the paper's table (reference/cerebras_gpt.json), BUILD.md as committed, and
the device table's H100 peak with the arithmetic of device-hours written here."""

import json
import os
import subprocess
import sys

import pytest

from experiments import plan as plan_cli
from tests.conftest import REPO

H100_BF16_PEAK = 989e12  # dense bf16, NVIDIA H100 SXM datasheet


def _plan(*args: str, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the command picks its virtual devices
    out = subprocess.run(
        [sys.executable, "-m", "experiments.plan", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_plan_with_no_flags_lists_the_family_with_the_papers_parameters(cerebras_reference):
    rows = {row["name"]: row for row in map(json.loads, _plan("--json").splitlines())}
    for ref in cerebras_reference["sp"]:
        row = rows[f"chinchilla_{ref['name'].lower()}"]
        assert row["params"] == ref["params"], ref["name"]
        assert row["tokens"] == pytest.approx(20 * ref["params"], rel=0.01), ref["name"]
    assert {"cpu_tiny", "cpu_default", "mup_40m"} <= rows.keys()


def _pod_rows(text: str, name: str) -> list[str]:
    """The pod table's lines of one scale point in a Markdown text."""
    start, end = (text.index(marker) for marker in plan_cli.MARKERS)
    return [line for line in text[start:end].splitlines() if line.startswith(f"| {name} |")]


@pytest.mark.parametrize(
    "name",
    # 33-41 s each (a compile and a prediction per pod row): CI's second job runs them
    [pytest.param(n, marks=pytest.mark.slow) for n in ("chinchilla_111m", "chinchilla_13b", "mup_2.7b")],
)
def test_pods_write_gives_the_table_build_md_carries(tmp_path, name):
    """`--pods --write` into a copy of BUILD.md writes the rows BUILD.md holds for the point: the committed table
    is the one the code generates today (regenerate with `python -m experiments.plan --pods --write=BUILD.md`)."""
    committed = (REPO / "BUILD.md").read_text()
    copy = tmp_path / "BUILD.md"
    copy.write_text(committed)
    _plan("--pods", f"--points={name}", f"--write={copy}")
    written = copy.read_text()
    assert _pod_rows(written, name) == _pod_rows(committed, name) != []
    assert written.split(plan_cli.MARKERS[0])[0] == committed.split(plan_cli.MARKERS[0])[0]
    assert written.split(plan_cli.MARKERS[1])[1] == committed.split(plan_cli.MARKERS[1])[1]


@pytest.mark.slow  # up to four compiles of a billion-parameter step (about a minute); the rounds are unit-tested
def test_a_budget_in_device_hours_is_spent_at_the_predicted_mfu():
    """--budget=500 --unit=device_hours --mesh=gpu-8: the chosen point's model FLOPs over 8 H100s at the peak
    times its predicted MFU take the predicted device-hours, within the planner's tolerance of the budget."""
    out = _plan("--budget=500", "--unit=device_hours", "--mesh=gpu-8")
    got = json.loads(out.strip().splitlines()[-1])
    prediction = got["prediction"]
    hours = got["train_flops"] / (H100_BF16_PEAK * prediction["mfu"]) / 3600
    assert prediction["device_hours"] == pytest.approx(hours, rel=0.02)
    if got["converged"]:
        assert abs(hours / 500 - 1) <= plan_cli.BUDGET_TOLERANCE + 0.02
    assert got["tokens_per_param"] == pytest.approx(20, rel=0.02)
    assert got["run_args"][-1] == "--config.mesh.preset=gpu-8"
    assert f"point: python -m experiments.run {' '.join(got['run_args'])}" in out
