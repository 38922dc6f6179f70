"""How the entry points end: one line `error: ...` and an exit status a launcher can act on."""

import json
import os
import subprocess
import sys

import pytest

from chinchax.scaling import launch
from tests.conftest import REPO


def _run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_a_diverged_run_exits_with_the_status_sweeps_record(tmp_path):
    out = _run(
        "--config=cpu_tiny",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.peak_lr=1e30",
        "--config.train.warmup_tokens=0",
        "--config.train.tokens=40960",
        cwd=REPO,
    )
    assert out.returncode == launch.DIVERGED_STATUS == 3, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "training diverged" in last


def test_bad_input_is_one_line_and_status_1(tmp_path):
    for args, expected in [
        (("--config=cpu_tiny", "--config.train.no_such_key=1"), "unknown config key 'train.no_such_key'"),
        (("--config=no_such_point",), "unknown scale point 'no_such_point'"),
        (
            ("--config=cpu_tiny", "--config.train.final_eval=validation,train"),
            "train.final_eval='validation,train' must name each of ('validation', 'test') at most once",
        ),
        (
            ("--config=llama_111m", "--config.model.kv_heads=5", "--dry_run"),
            "model.kv_heads=5 must divide model.n_heads=12",
        ),
    ]:
        out = _run(*args, f"--workdir={tmp_path / 'x'}", cwd=REPO)
        assert out.returncode == 1, out.stderr[-2000:]
        assert out.stderr.strip().splitlines() == [f"error: {out.stderr.strip()[7:]}"]
        assert expected in out.stderr


@pytest.mark.slow  # 32-43 s (two processes, each compiling or loading the step)
def test_a_second_run_of_the_same_shape_compiles_nothing(tmp_path):
    """JAX's persistent compilation cache: the second run adds no cache entry; the peak is not re-measured."""
    cache = tmp_path / "jax_cache"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    args = ["--config=cpu_tiny", "--config.train.tokens=40960"]

    def run(name):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.run", *args, f"--workdir={tmp_path / name}"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    run("first")
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run stored its compiled programs"
    second = run("second")
    assert sorted(p.name for p in cache.iterdir()) == entries, "the second run compiled something new"
    assert "cached in" in second["peak_flops_source"]
