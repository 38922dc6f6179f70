"""What the benchmarks share: the median time of a step, and the check of the --shapes they are asked for."""

import statistics
import time
from collections.abc import Callable, Iterable

from absl import app


def median_step_seconds(run_step: Callable[[], None], steps: int) -> float:
    """The median of `steps` timed calls of run_step (which waits for its result), after two untimed ones
    (compilation or allocation, then a warm step)."""
    run_step()
    run_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_shapes(asked: Iterable[str], known: Iterable[str]) -> None:
    """A usage error naming the --shapes that are not among `known`."""
    unknown = set(asked) - set(known)
    if unknown:
        raise app.UsageError(f"--shapes: unknown {sorted(unknown)}; known: {', '.join(known)}")
