"""Bootstrap resampling of fitted points and percentile confidence intervals."""

from __future__ import annotations

import numpy as np


def resample_counts(num_points: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, num_points) multiplicities of a draw of num_points points with replacement, per resample.

    Used as per-point weights, they make a weighted fit equal to the fit on the resampled set.
    """
    return rng.multinomial(num_points, np.full(num_points, 1.0 / num_points), size=resamples).astype(
        np.float64
    )


def resample_within_groups(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a resample with replacement inside each group (each group keeps its size)."""
    picks = [rng.choice(np.flatnonzero(groups == g), size=(groups == g).sum()) for g in np.unique(groups)]
    return np.concatenate(picks)


def percentile_intervals(samples: dict[str, np.ndarray], level: float) -> dict[str, tuple[float, float]]:
    """Central `level` percentile interval of each named sample (non-finite draws left out)."""
    tail = 50.0 * (1.0 - level)
    intervals = {}
    for name, values in samples.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            low, high = np.percentile(values, [tail, 100.0 - tail])
            intervals[name] = (float(low), float(high))
    return intervals
