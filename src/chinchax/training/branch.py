"""Branches: a run that starts from another run's checkpoint, as a WSD cooldown starts off a constant-LR trunk.

`python -m experiments.run --workdir=NEW --from=TRUNK[:STEP]`: before training, the trunk's checkpoint at STEP (its
newest when no step is given) is copied into NEW/checkpoints (train state and data position: write-then-rename),
and NEW/branch.json records where it came from. Training then resumes from that checkpoint as from any other,
under the branch's own schedule; a killed branch resumes from its own newest checkpoint. The trunk is only read.

A branch may differ from its trunk only in MAY_DIFFER: its schedule from the branch point on, the loop, and how
the step runs (mesh, microbatches, remat, attention kernel). Anything else (the model, data, batch size, peak LR,
warmup, optimizer, seed) is refused, naming the fields.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import ml_collections
from jax.experimental import multihost_utils

from chinchax import atomic, config
from chinchax.parallel import distributed
from chinchax.training import checkpoint

RECORD = "branch.json"  # in the branch's workdir: {"trunk": path, "step": step}

# Config fields a branch may set otherwise than its trunk.
MAY_DIFFER = (
    "name",
    "train.tokens",
    "train.tokens_per_param",
    "train.decay",
    "train.end_lr_fraction",
    "train.cooldown_fraction",
    "train.cooldown_shape",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.final_eval",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.checkpoint_steps",
    "train.peak_flops_per_device",
    "train.microbatches",
    "model.remat",
    "model.attention",
    "model.layer_loop",
    "model.loss",
    "mesh.preset",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
)


class BranchError(ValueError):
    """A branch that cannot start from the trunk it names; the message is one line."""


def parse(spec: str) -> tuple[pathlib.Path, int | None]:
    """'TRUNK_DIR[:STEP]' → (the trunk's run directory, the step, or None for its newest checkpoint)."""
    path, colon, step = spec.rpartition(":")
    if colon and step.isdigit():
        return pathlib.Path(path), int(step)
    return pathlib.Path(spec), None


def start(workdir: pathlib.Path, cfg: ml_collections.ConfigDict, spec: str, steps: int) -> dict:
    """Check the branch against its trunk and, unless the branch has begun already, copy the trunk's checkpoint
    into workdir; return the record {trunk, step}. steps: the branch's own optimizer steps."""
    trunk, step = parse(spec)
    trunk_cfg = checkpoint.read_config(trunk)
    ours, theirs = config.flatten(cfg.to_dict()), config.flatten(trunk_cfg.to_dict())
    differ = sorted(k for k in ours if k not in MAY_DIFFER and ours[k] != theirs.get(k))
    if differ:
        raise BranchError(
            f"--from={spec}: the branch differs from its trunk in {', '.join(differ)}; a branch may change "
            "only its schedule, loop and mesh"
        )
    saved = _steps(trunk)
    step = step if step is not None else (saved[-1] if saved else None)
    if step is None or step not in saved:
        raise BranchError(
            f"--from={spec}: {trunk / 'checkpoints'} has no checkpoint at step {step} (has {saved})"
        )
    if step >= steps:
        raise BranchError(
            f"--from={spec}: the branch's {steps} steps end at or before its start, step {step}"
        )
    record = {"trunk": str(trunk.resolve()), "step": step}
    kept = read(workdir)
    if kept is not None and kept != record:
        raise BranchError(f"{workdir} is a branch of {kept['trunk']} at step {kept['step']}, not of {spec}")
    if kept is None and _steps(workdir):
        raise BranchError(
            f"{workdir} holds checkpoints of a run of its own: a branch starts in a new workdir"
        )
    if distributed.is_writer():
        atomic.write_json(workdir / RECORD, record)
        if not _steps(workdir):  # the first start (or one killed during the copy)
            partial = workdir / f".branch-{step}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(trunk / "checkpoints" / str(step), partial)
            (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
            os.replace(partial, workdir / "checkpoints" / str(step))
    multihost_utils.sync_global_devices("chinchax branch copied")
    return record


def read(workdir: pathlib.Path) -> dict | None:
    """The branch record of a run directory, or None for a run that did not branch."""
    path = pathlib.Path(workdir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the complete checkpoints in workdir/checkpoints (orbax names a finished one by its step)."""
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
