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

__all__ = ["wilson", "bootstrap_mean", "mean_ci", "mcnemar_exact_p", "paired_binary_ci",
           "paired_ci"]

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
    the bootstrap; shares that are all alike get the Wilson interval of n
    samples instead of a zero-width one."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    m = float(x.mean())
    if scoring == "all":
        lo, hi = wilson(float(x.sum()), int(x.size))
    else:
        lo, hi = bootstrap_mean(x)
        if lo == hi and scoring == "share":  # every sample alike: the bootstrap has no spread,
            lo, hi = wilson(float(x.sum()), int(x.size))  # so bound it as n proportions
    return (m, lo, hi)


def paired_binary_ci(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """(low, high) 95% interval of mean(x) - mean(y) for paired 0/1 scores
    (Newcombe 1998, method 10)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired scores need two sequences of the same non-zero length")
    if not np.all(np.isin(a, (0.0, 1.0))) or not np.all(np.isin(b, (0.0, 1.0))):
        raise ValueError("paired_binary_ci takes 0/1 scores")
    n = a.size
    both = float(np.sum((a == 1) & (b == 1)))
    only_x = float(np.sum((a == 1) & (b == 0)))
    only_y = float(np.sum((a == 0) & (b == 1)))
    neither = n - both - only_x - only_y
    p1, p2 = (both + only_x) / n, (both + only_y) / n
    l1, u1 = wilson(both + only_x, n)
    l2, u2 = wilson(both + only_y, n)
    den = (both + only_x) * (only_y + neither) * (both + only_y) * (only_x + neither)
    phi = (both * neither - only_x * only_y) / math.sqrt(den) if den > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (max(-1.0, lo), min(1.0, hi))


def paired_ci(x: Sequence[float], y: Sequence[float], scoring: str) -> Tuple[float, float, float]:
    """(mean difference, low, high) of paired scores x - y: Newcombe's interval
    for 0/1 scores (``scoring == "all"``), else the bootstrap of the differences."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if scoring == "all":
        lo, hi = paired_binary_ci(a, b)
    else:
        lo, hi = bootstrap_mean(a - b)
    return (float(np.mean(a - b)), lo, hi)


def mcnemar_exact_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 scores: the binomial
    probability, under no difference, of a split of the discordant pairs at
    least as uneven as the observed one (1.0 when no pair is discordant)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    only_x = int(np.sum((a == 1) & (b == 0)))
    only_y = int(np.sum((a == 0) & (b == 1)))
    n = only_x + only_y
    if n == 0:
        return 1.0
    k = min(only_x, only_y)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)
