"""Train one scale point: `python -m experiments.run --config=NAME [--workdir=DIR] [--config.a.b=v] [--dry_run]`.

NAME is a named scale point (chinchilla_111m … chinchilla_13b, mup_111m … mup_2.7b, mup_40m, cpu_*) or a
config file `experiments/configs/x.py[:arg]`. With no --config the embedded CPU default trains.

`--from=TRUNK_DIR[:STEP]` starts from another run's checkpoint at STEP (parameters, optimizer state, data position)
and goes on under this config's schedule, e.g. a WSD cooldown branched off a constant-LR trunk; the trunk is only
read (chinchax.training.branch).

`--dry_run` trains nothing and allocates no training state: it prints the plan and, last, its JSON. On a pod
preset (`--mesh`) it compiles the step against a virtual mesh of fake CPU devices; on the cpu preset it compiles
the step when this machine can hold it and predicts it kernel by kernel from matmuls timed here (those too large
to run here as bounded slices, scaled up by FLOPs), so any point's plan prints in seconds.
"""

from chinchax import malloc

if __name__ == "__main__":  # before the heavy imports: glibc reads its tunables at process start
    malloc.keep_freed_memory()

import json

from absl import flags, logging
from ml_collections import config_flags

from chinchax import config as config_lib
from chinchax.dryrun import aot
from chinchax.dryrun import report as dry_run
from chinchax.parallel import distributed, mesh
from chinchax.scaling import launch
from chinchax.training import checkpoint, train
from experiments import STARTED, configs
from experiments import cli as cli_lib


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
            if key == "train.microbatches" and arg.endswith("=auto"):
                arg = f"--config.train.microbatches={config_lib.AUTO}"
        resolved.append(arg)
    return resolved


_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.config_path(configs.DEFAULT), "Scale point name or config file."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory, default runs/NAME; resumes from its checkpoints."
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Cluster preset (cpu, gpu-8, gpu-8xN, tpu-v5e-N, tpu-v5p-N, wse-N, ...); sets config.mesh.preset.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_FROM = flags.DEFINE_string(
    "from",
    None,
    "TRUNK_DIR[:STEP]: start from that run's checkpoint at STEP (default its newest), e.g. a WSD cooldown branch.",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the plan, the predicted step and its JSON; allocate no training state."
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    if _MESH.value:
        cfg.mesh.preset = _MESH.value
    cfg = config_lib.validate(cfg)
    if _DRY_RUN.value:
        pod = cfg.mesh.preset != "cpu"
        if pod:  # the step compiles against a virtual mesh of the preset's size
            aot.use_virtual_devices(mesh.preset(cfg.mesh.preset).devices or 1)
        report, resolved = dry_run.report(cfg)
        hlo = None
        if pod or report["fits"]:  # a step this machine cannot hold is not compiled here
            step = aot.compile_step(resolved)
            report, hlo = dry_run.add_xla(report, aot.analysis(step)), step.compiled.as_text()
        report = dry_run.add_prediction(report, resolved, hlo)
        print(dry_run.format_plan(report))
        print(json.dumps(report))
        return
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.enable_compilation_cache()
    workdir = _WORKDIR.value or f"runs/{cfg.name}"
    summary = train.train(cfg, workdir, started=STARTED, branch_from=_FROM.value)
    if summary is not None:
        print(json.dumps(summary))


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(
        main,
        (config_lib.ConfigError, ValueError, train.TrainingError, checkpoint.CheckpointError),
        statuses={train.Diverged: launch.DIVERGED_STATUS},
        prepare_argv=resolve_config_argv,
    )


if __name__ == "__main__":
    cli()
