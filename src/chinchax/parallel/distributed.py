"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment (no-op for one process).

JAX/XLA is the distributed engine; this module only decides how to call it. In order of precedence:
explicit arguments (run.py's --coordinator_address / --num_processes / --process_id flags), the
environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then a SLURM job with
more than one task (JAX reads SLURM_* itself), else a single process and nothing to do. Inside a SLURM job a
given coordinator takes the process count and id SLURM gives each task (SLURM_NTASKS / SLURM_PROCID): so
chinchax.scaling.launch's sbatch script starts a multi-host point, one task per host. A process given its
coordinator drives all its host's devices: JAX's cluster detection, which would narrow a SLURM task to device
SLURM_LOCALID, stays off (JAX_LOCAL_DEVICE_IDS still narrows it). Once initialised,
every process sees the global devices; `mesh.make_mesh` spans them and `mesh.global_batch` assembles each
step's batch from every process's rows (`mesh.process_batch_rows`). Every process computes the whole run;
only the writer (`is_writer`: process 0) writes its files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

from chinchax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run: mode is 'single', 'explicit' or 'slurm'."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Launch:
    """Decide the launch from arguments, then environment; ConfigError (one line) when they disagree."""
    env = os.environ if environ is None else environ
    coordinator = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _int(env, "JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _int(env, "JAX_PROCESS_ID")
    if coordinator and "SLURM_JOB_ID" in env:  # one of srun's tasks: SLURM numbers them
        count = count if count is not None else _int(env, "SLURM_NTASKS")
        index = index if index is not None else _int(env, "SLURM_PROCID")
    if coordinator or (count or 1) > 1:
        if not coordinator or count is None or index is None:
            raise ConfigError(
                "a multi-process run needs a coordinator address, the process count and this process's id "
                f"(got coordinator={coordinator!r}, num_processes={count}, process_id={index})"
            )
        if not 0 <= index < count:
            raise ConfigError(f"process_id={index} is not in 0..{count - 1} (num_processes={count})")
        return Launch("explicit", coordinator, count, index)
    if "SLURM_JOB_ID" in env and (_int(env, "SLURM_NTASKS") or 1) > 1:
        return Launch("slurm", None, _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID") or 0)
    return Launch("single")


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Launch:
    """Join the multi-process run if there is one (before any other JAX call); return how it was joined."""
    launch = resolve(coordinator_address, num_processes, process_id)
    if launch.mode == "explicit":
        jax.distributed.initialize(
            launch.coordinator_address,
            launch.num_processes,
            launch.process_id,
            cluster_detection_method="deactivate",
        )
    elif launch.mode == "slurm":
        jax.distributed.initialize()
    return launch


def is_writer() -> bool:
    """Whether this process writes the run's files (config.json, metrics, summary.json): process 0 only.

    The other processes compute the same run and join orbax's collective checkpoint saves and restores.
    """
    return jax.process_index() == 0
