"""glibc's malloc told to keep freed memory, so a train step's buffers are not faulted in anew every step.

XLA:CPU allocates a step's temporary buffers afresh each step. Under glibc's defaults the large ones are mmapped
and unmapped again, so every step page-faults its whole working set back in (shape c of
`benchmarks.train_throughput`: ~960 MB of minor faults per step, about a sixth of the step). One arena, no mmap
and no trimming keep those pages mapped from one step to the next. glibc reads these tunables only when a process
starts, so the entry points re-execute themselves once with them set, before their heavy imports.
"""

import os
import platform
import sys

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4611686018427387904"


def keep_freed_memory() -> None:
    """Re-executes this process (same interpreter, same command line) once with GLIBC_TUNABLES = TUNABLES.

    Does nothing off glibc, or when GLIBC_TUNABLES is already set (a re-executed process, or the user's own
    choice, which wins). Call it first thing in an entry point's `__main__`, never from library code."""
    if platform.libc_ver()[0] != "glibc" or "GLIBC_TUNABLES" in os.environ:
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, sys.orig_argv)
