"""glibc's malloc told to keep freed memory, so a train step's buffers are not faulted in anew every step.

XLA:CPU allocates a step's temporary buffers afresh each step. Under glibc's defaults the large ones are mmapped
and unmapped again, so every step page-faults its whole working set back in (shape c of
`benchmarks.train_throughput`: ~960 MB of minor faults per step, about a sixth of the step). One arena, no mmap
and no trimming keep those pages mapped from one step to the next. glibc reads these tunables only when a process
starts, so the entry points re-execute themselves once with them set, before their heavy imports. Only where JAX
will run on the CPU: on a GPU or TPU host the step's buffers live on the device, and one arena would only make the
host's loader threads contend for it.
"""

import importlib.metadata
import os
import platform
import re
import sys

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4611686018427387904"


# Distributions that give JAX an accelerator backend (jax-cuda12-plugin, jax-rocm7-plugin, libtpu, ...).
ACCELERATOR_PLUGIN = re.compile(r"jax[-_](cuda|rocm)\d*[-_]plugin|libtpu", re.IGNORECASE)


def runs_on_cpu() -> bool:
    """Whether JAX will run on the CPU, told without importing it: JAX_PLATFORMS names cpu first, or it is unset
    and no accelerator plugin is installed (with one installed and no device, JAX falls back to the CPU and this
    says False: such a process only keeps glibc's defaults)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return not any(ACCELERATOR_PLUGIN.fullmatch(name) for name in names)


def keep_freed_memory() -> None:
    """Re-executes this process (same interpreter, same command line) once with GLIBC_TUNABLES = TUNABLES.

    Does nothing off glibc, when JAX will not run on the CPU (`runs_on_cpu`), or when GLIBC_TUNABLES is already
    set (a re-executed process, or the user's own choice, which wins). Call it first thing in an entry point's
    `__main__`, never from library code."""
    if platform.libc_ver()[0] != "glibc" or "GLIBC_TUNABLES" in os.environ or not runs_on_cpu():
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, sys.orig_argv)
