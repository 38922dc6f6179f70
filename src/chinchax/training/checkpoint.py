"""Checkpoints of a run: train state + data-iterator state + config, through an orbax CheckpointManager.

Layout: workdir/config.json and workdir/checkpoints/<step>/{state,data,config}. Saves are asynchronous and
atomic (orbax writes a temporary folder and renames it when complete), so a killed process never leaves a
checkpoint that looks complete. Restoring takes the newest checkpoint that reads back; a corrupt one is
reported and the previous one is used.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import time

import grain
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from chinchax import atomic
from chinchax import config as config_lib
from chinchax.model import gpt
from chinchax.parallel import distributed
from chinchax.training import state as train_state


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was needed."""


def write_config(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> None:
    """workdir/config.json, written atomically by the writing process (`distributed.is_writer`)."""
    if not distributed.is_writer():
        return
    atomic.write_text(workdir / "config.json", cfg.to_json(indent=2))


def read_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The validated config of a run directory."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {workdir} is not a chinchax run directory")
    return config_lib.from_json(path.read_text())


def manager(workdir: pathlib.Path, keep: int = 3, kept_steps=()) -> ocp.CheckpointManager:
    """An async CheckpointManager over workdir/checkpoints keeping the newest `keep` and those at `kept_steps`."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(
            [policies.LatestN(n=keep), policies.CustomSteps(steps=kept_steps)]
        ),
        enable_async_checkpointing=True,
        create=True,
    )
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints",
        options=options,
        item_names=("state", "data"),
    )


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
    """Start an asynchronous save of `state` (and the data iterator's position) at `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def _restore_newest(mngr: ocp.CheckpointManager, args_at, set_aside: bool = False):
    """(step, restored items) from the newest checkpoint `mngr.restore(step, args=args_at(step))` can read,
    or None. With set_aside, an unreadable checkpoint is moved to workdir/corrupt_checkpoints/<step> (kept for
    inspection, out of the way of the run that redoes its steps)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, mngr.restore(step, args=args_at(step))
        except Exception as error:  # any unreadable checkpoint: fall back to the one before
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            print(
                f"warning: checkpoint {step} in {mngr.directory} is unreadable ({reason}); "
                "trying the previous one",
                file=sys.stderr,
            )
            if set_aside:
                if distributed.is_writer():  # one process moves it; the others wait until it has
                    corrupt = pathlib.Path(mngr.directory).parent / "corrupt_checkpoints"
                    corrupt.mkdir(exist_ok=True)
                    shutil.move(
                        pathlib.Path(mngr.directory) / str(step), corrupt / f"{step}-{time.time_ns()}"
                    )
                multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
                mngr.reload()
    return None


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iterator=None, set_aside: bool = False):
    """(step, state) from the newest readable checkpoint (the iterator is restored in place), or None."""

    def args_at(step: int) -> ocp.args.Composite:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and (pathlib.Path(mngr.directory) / str(step) / "data").exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return ocp.args.Composite(**items)

    found = _restore_newest(mngr, args_at, set_aside)
    return None if found is None else (found[0], found[1]["state"])


def load_params(workdir: str | pathlib.Path, step: int | None = None):
    """(config, params) of a run: the given step's checkpoint, or the newest readable one.

    Restores the parameters alone (orbax partial restore): reading weights builds no optimizer.
    """
    workdir = pathlib.Path(workdir)
    cfg = read_config(workdir)
    target = {"params": gpt.param_shapes(cfg.model)}
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    args = ocp.args.Composite(state=restore)
    with manager(workdir) as mngr:
        if step is not None:
            return cfg, mngr.restore(step, args=args)["state"]["params"]
        found = _restore_newest(mngr, lambda _: args)
    if found is None:
        raise CheckpointError(f"no readable checkpoint in {workdir / 'checkpoints'}")
    return cfg, found[1]["state"]["params"]


def save_params(workdir: str | pathlib.Path, cfg: ml_collections.ConfigDict, params) -> None:
    """A run directory holding `params` at step 0 with a fresh optimizer state (experiments.run continues it)."""
    workdir = pathlib.Path(workdir)
    write_config(workdir, cfg)
    state = train_state.new_state(cfg, params)
    with manager(workdir) as mngr:
        save(mngr, 0, state)
        mngr.wait_until_finished()
