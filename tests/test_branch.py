"""WSD cooldown branches (`experiments.run --from=TRUNK:STEP`): a branch off a constant-LR trunk equals the same
WSD run trained from step 0, bit for bit; the trunk's files are untouched; a branch killed mid-cooldown resumes
bit-identically; bad branches are one line."""

import hashlib
import json
import pathlib
import re
import signal
import subprocess

import pytest

from chinchax.training import train
from tests.test_train import (
    assert_same_params,
    complete_checkpoints,
    logged_steps,
    run_args,
    tiny_config,
    wait_until,
)

BRANCH_STEP = 8
STEP_TOKENS = 8 * 64  # cpu_tiny at 64-token sequences, 8 a step (tests.test_train.TINY)
WSD = {"train.decay": "wsd", "train.cooldown_fraction": 0.2, "train.warmup_tokens": 2 * STEP_TOKENS}
# constant from step 2 to 16; every 4th step checkpointed (TINY), the newest kept, and step 8 kept for branches
TRUNK = {
    **WSD,
    "train.tokens": 20 * STEP_TOKENS,
    "train.keep_checkpoints": 1,
    "train.checkpoint_steps": (BRANCH_STEP,),
}
# 16 steps cooling down over the second half: constant to step 8, then 8 steps of cooldown (time to kill one)
SHORT = {
    **WSD,
    "train.tokens": 16 * STEP_TOKENS,
    "train.cooldown_fraction": 0.5,
    "train.checkpoint_every": 1,
}


def files_digest(folder: pathlib.Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def records(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k in ("step", "tokens", "loss", "grad_norm", "lr")}
        for line in lines
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(trunk dir, the 16-step WSD run from step 0, its summary)."""
    trunk = tmp_path_factory.mktemp("trunk")
    train.train(tiny_config(**TRUNK), trunk, show_progress=False)
    scratch = tmp_path_factory.mktemp("scratch")
    return trunk, scratch, train.train(tiny_config(**SHORT), scratch, show_progress=False)


def test_a_cooldown_branch_equals_the_wsd_run_from_step_zero_and_leaves_the_trunk(runs, tmp_path):
    trunk, scratch, summary = runs
    before = files_digest(trunk)
    branched = train.train(
        tiny_config(**SHORT), tmp_path, show_progress=False, branch_from=f"{trunk}:{BRANCH_STEP}"
    )
    assert files_digest(trunk) == before
    assert branched["branched_from"] == {"trunk": str(trunk.resolve()), "step": BRANCH_STEP}
    assert summary["branched_from"] is None
    assert records(tmp_path) == records(scratch)[BRANCH_STEP:]  # steps 9 … 16: the cooldown
    assert branched["final_eval_loss"] == summary["final_eval_loss"]
    assert_same_params(tmp_path, scratch)


def test_a_branch_killed_mid_cooldown_resumes_bit_identically(runs, tmp_path):
    trunk, scratch, summary = runs
    start = [*run_args(tmp_path, **SHORT), f"--from={trunk}:{BRANCH_STEP}"]
    process = subprocess.Popen(start, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until(
        lambda: BRANCH_STEP + 1 in complete_checkpoints(tmp_path), process, "step 9's checkpoint", poll=0.002
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    resume_step = max(complete_checkpoints(tmp_path))
    assert not (tmp_path / "summary.json").exists() and BRANCH_STEP < resume_step < 16, resume_step
    assert logged_steps(tmp_path) < 16 - BRANCH_STEP
    resumed = subprocess.run(start, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {resume_step} in" in resumed.stderr, resumed.stderr
    assert (
        json.loads(resumed.stdout.strip().splitlines()[-1])["final_eval_loss"] == summary["final_eval_loss"]
    )
    assert records(tmp_path) == records(scratch)[BRANCH_STEP:]
    assert_same_params(tmp_path, scratch)


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        ("{trunk}:7", SHORT, r"has no checkpoint at step 7 \(has \[8, 20\]\)"),
        ("{trunk}:8", {**SHORT, "model.d_model": 64}, "differs from its trunk in model.d_model"),
        ("{trunk}:20", SHORT, "the branch's 16 steps end at or before its start, step 20"),
        ("{trunk}/nowhere:8", SHORT, "config.json does not exist"),
    ],
)
def test_a_branch_that_cannot_start_is_one_line_before_training(runs, tmp_path, spec, overrides, message):
    trunk, _, _ = runs
    out = subprocess.run(
        [*run_args(tmp_path, **overrides), f"--from={spec.format(trunk=trunk)}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written
