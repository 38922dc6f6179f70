"""Train one scale point: `python -m experiments.run --config=NAME [--workdir=DIR] [--config.a.b=v] [--dry_run]`.

NAME is a named scale point (chinchilla_111m … chinchilla_13b, mup_111m … mup_2.7b, mup_40m, cpu_*) or a
config file `experiments/configs/x.py[:arg]`. With no --config the embedded CPU default trains.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from chinchax import checkpoint, dry_run, train
from chinchax import config as config_lib
from experiments import configs


def resolve_config_argv(argv: list[str]) -> list[str]:
    """Turn `--config=NAME` into the config_flags form `--config=<file>.py:NAME`; reject unknown keys."""
    resolved = []
    for arg in argv:
        if arg.startswith("--config="):
            arg = "--config=" + configs.config_path(arg.split("=", 1)[1])
        elif arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in config_lib.SCHEMA:
                raise config_lib.ConfigError(f"unknown config key {key!r} in {arg!r}")
        resolved.append(arg)
    return resolved


_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.config_path(configs.DEFAULT), "Scale point name or config file."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory, default runs/NAME; resumes from its checkpoints."
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan and its JSON; build nothing on devices.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = config_lib.validate(_CONFIG.value)
    if _DRY_RUN.value:
        report = dry_run.report(cfg)
        print(dry_run.format_plan(report))
        print(json.dumps(report))
        return
    workdir = _WORKDIR.value or f"runs/{cfg.name}"
    summary = train.train(cfg, workdir)
    if summary is not None:
        print(json.dumps(summary))


def cli():
    """Entry point with one-line errors for configs that cannot run."""
    try:
        sys.argv = resolve_config_argv(sys.argv)
        app.run(main)
    except (config_lib.ConfigError, ValueError, train.TrainingError, checkpoint.CheckpointError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
