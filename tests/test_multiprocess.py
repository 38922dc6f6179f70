"""Two processes on localhost (2 fake CPU devices each) train as one run: the same losses as one process.

Each process joins through chinchax.parallel.distributed (jax.distributed.initialize), builds the (2, 2, 1) mesh over
all 4 devices, feeds only its rows of each global batch (jax.make_array_from_process_local_data), and saves
and restores the sharded state collectively with orbax. The reference is the same steps run unsharded on one
device in this process. Then both processes run `train.train` into one workdir: only process 0 writes the
run's files, and both return the same summary.
"""

import json
import os
import pathlib
import random
import socket
import subprocess
import sys

import jax
import multiprocess_worker as worker
import numpy as np
import pytest

from chinchax.config import ConfigError
from chinchax.parallel import distributed
from chinchax.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _single_device_losses(seed: int) -> list[float]:
    cfg = worker.config(seed)
    step = jax.jit(train.make_train_step(cfg))  # one device: nothing is sharded
    state = train.init_state(cfg, jax.random.key(cfg.train.seed))
    losses = []
    for batch in worker.batches(cfg, worker.STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def _run_two_workers(out_dir: pathlib.Path, seed: int) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    script = REPO / "tests" / "multiprocess_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), "2", str(port), str(out_dir), str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed (seed={seed}):\n{out[-3000:]}"


def test_two_processes_match_one(tmp_path):
    seed = random.randrange(2**31)  # fresh per run: initialisation, batches and data order
    _run_two_workers(tmp_path, seed)
    why = f"(seed={seed})"

    result = json.loads((tmp_path / "losses.json").read_text())
    assert result["process_count"] == 2 and result["devices"] == 4
    assert result["rows"] == [0, 2], "process 0 holds the first half of each microbatch's sequences"
    reference = _single_device_losses(seed)
    np.testing.assert_allclose(result["losses"], reference, rtol=0, atol=1e-5, err_msg=why)
    assert result["losses"][0] != result["losses"][-1], f"the state must change between steps {why}"
    # The restored checkpoint continues exactly as the state it was saved from.
    assert result["resumed_last_loss"] == pytest.approx(result["losses"][-1], abs=1e-6), why

    # One run in one workdir: process 0 alone wrote its files, each once (process 1 joined the checkpoints).
    writes = [json.loads((tmp_path / f"writes_{i}.json").read_text()) for i in range(2)]
    assert writes[1] == [], f"process 1 wrote run files: {writes[1]} {why}"
    assert any(w.endswith(" metrics.jsonl") for w in writes[0]), f"the audit hook saw: {writes[0]} {why}"
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir())
    assert names == ["checkpoints", "config.json", "metrics.jsonl", "summary.json", "tensorboard"], why
    assert len(list((run / "tensorboard").iterdir())) == 1, f"one TensorBoard events file {why}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, worker.RUN_STEPS + 1)), f"each step once {why}"
    stray = [str(p.relative_to(run)) for p in run.rglob("*") if "tmp" in p.name]
    assert not stray, f"temporary files left behind: {stray} {why}"
    written = json.loads((run / "summary.json").read_text())
    returned = [json.loads((tmp_path / f"summary_{i}.json").read_text()) for i in range(2)]
    for key in ("final_train_loss", "final_eval_loss", "final_test_loss", "tokens", "devices"):
        assert written[key] == returned[0][key] == returned[1][key], f"{key} {why}"
    assert written["final_train_loss"] == records[-1]["loss"], why


def test_launch_from_flags_env_and_slurm():
    explicit = distributed.resolve("10.0.0.1:1234", 4, 3, environ={})
    assert (explicit.mode, explicit.num_processes, explicit.process_id) == ("explicit", 4, 3)
    env = {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    from_env = distributed.resolve(environ=env)
    assert (from_env.coordinator_address, from_env.num_processes, from_env.process_id) == ("host:99", 2, 1)
    assert distributed.resolve(process_id=0, environ=env).process_id == 0, "flags win over the environment"
    slurm = distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "5"})
    assert (slurm.mode, slurm.num_processes, slurm.process_id) == ("slurm", 16, 5)
    assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).mode == "single"
    assert distributed.resolve(environ={}).mode == "single"


@pytest.mark.parametrize(
    "args, match",
    [
        (("host:1", 2, None), "needs a coordinator address"),
        ((None, 2, 0), "needs a coordinator address"),
        (("host:1", 2, 2), "not in 0..1"),
    ],
)
def test_launch_errors_are_one_line(args, match):
    with pytest.raises(ConfigError, match=match) as error:
        distributed.resolve(*args, environ={})
    assert "\n" not in str(error.value)
