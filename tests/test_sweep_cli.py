"""`python -m experiments.sweep` flags that train nothing: --list, --launcher=print with --python, --launcher=gather
on a sweep with nothing done, and a bad --ray_resources refused in one line before any work."""

import re
import subprocess
import sys

import pytest

from experiments.configs import sweeps
from tests.conftest import REPO


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_list_names_every_sweep_and_plans_the_ladder_at_20_tokens_per_parameter():
    out = _sweep("--list")
    assert out.returncode == 0, out.stderr[-2000:]
    headers = re.findall(r"^(\S+): (\d+) points", out.stdout, re.MULTILINE)
    assert [name for name, _ in headers] == list(sweeps.SWEEPS)
    for name, count in headers:
        assert int(count) == len(sweeps.get(name).points), name
    ladder = out.stdout.split("cpu_ladder:")[1].split(f"\n{list(sweeps.SWEEPS)[1]}:")[0]
    rows = re.findall(r"params\s+([\d,]+)\s+tokens\s+([\d,]+)", ladder)
    assert len(rows) == len(sweeps.get("cpu_ladder").points)
    for params, tokens in rows:
        params, tokens = int(params.replace(",", "")), int(tokens.replace(",", ""))
        assert abs(tokens / params - 20) < 0.5, (params, tokens)  # whole steps of a few thousand tokens


def test_print_writes_one_command_per_pending_point_with_the_given_python(tmp_path):
    out = _sweep("--sweep=smoke", f"--root={tmp_path}", "--launcher=print", "--python=/opt/elsewhere/python")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(sweeps.get("smoke").points)
    for line, point in zip(lines, sweeps.get("smoke").points, strict=True):
        assert line.startswith(f"cd {REPO} && /opt/elsewhere/python -m experiments.run "), line
        assert f"--workdir={tmp_path / 'runs' / point.name}" in line


def test_gather_on_a_sweep_with_nothing_done_trains_nothing(tmp_path):
    out = _sweep("--sweep=smoke", f"--root={tmp_path}", "--launcher=gather")
    assert out.returncode == 0, out.stderr[-2000:]
    points = len(sweeps.get("smoke").points)
    assert f"smoke: 0/{points} done, 0 diverged, {points} pending; ran 0" in out.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "fit.json").exists()


@pytest.mark.parametrize("resources", ["not json", '{"TPU": -1}', "[4]"])
def test_bad_ray_resources_are_one_line_of_error(tmp_path, resources):
    out = _sweep("--sweep=smoke", f"--root={tmp_path}", "--launcher=ray", f"--ray_resources={resources}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        out.stderr.strip() == f"error: --ray_resources={resources} is not a JSON object of resource amounts"
    )
    assert not (tmp_path / "runs").exists()
