"""95% confidence intervals for the harness's scores.

Exact-match scores are successes out of n samples: a Wilson score interval
(it stays inside [0, 1] and is sensible at 0/n and n/n, where the normal
approximation collapses to a point). Shares (a fraction of several values
found) and losses are means of per-sample numbers: a percentile bootstrap
over samples, seeded so that a table renders the same every time. Paired
differences (a method minus dense on the same samples) are bootstrapped
on the per-sample differences, which is what makes a small gap visible.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

__all__ = ["wilson", "bootstrap_mean", "mean_ci"]

_Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = _Z95) -> Tuple[float, float]:
    """(low, high) Wilson score interval of a proportion successes / n."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if successes == 0 else max(0.0, mid - half)
    hi = 1.0 if successes == n else min(1.0, mid + half)
    return (lo, hi)


def bootstrap_mean(values: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> Tuple[float, float]:
    """(low, high) percentile-bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    return (float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a)))


def mean_ci(values: Sequence[float], scoring: str) -> Tuple[float, float, float]:
    """(mean, low, high): Wilson for 0/1 scores (``scoring == "all"``), else
    the bootstrap."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    m = float(x.mean())
    if scoring == "all":
        lo, hi = wilson(float(x.sum()), int(x.size))
    else:
        lo, hi = bootstrap_mean(x)
    return (m, lo, hi)
