"""Learned chunk boundaries: labels from a model's own attention, a linear scorer fitted in NumPy.

A chunk is scored as a whole, so it should hold keys that later queries
treat alike. The label of position t says how differently they treat the
``window`` keys before t and the ``window`` keys from t on: over every query
i >= t + window (one that sees both windows whole) of a KV head's query
heads, with a_i / b_i the softmax mass query i puts on [t - w, t) / [t, t + w),

    label[t] = sum_i |a_i - b_i| / sum_i (a_i + b_i)     (0 where no mass)

High where the two sides are read differently (a boundary belongs there),
low inside a run of keys read alike. It is computed a block of queries at a
time, so memory is O(block * L), never L x L.

The scorer is linear in :func:`dhsa.reference.boundary_features` (the
centred window means that the cosine score compares, per dimension and as
norms), fitted by ridge regression on standardised features; the
standardisation is folded into the weights, so the C core needs only the
row (``dhsa_bmodel_len``: weights, bias, threshold). The threshold that
:func:`fit_boundary_model` sets gives as many chunks as the cosine chunking
of the same config; :func:`choose_thresholds` (what ``calibrate`` uses)
instead tries a few quantiles of each head's scores and keeps the one whose
selection keeps the most attention mass on the calibration text.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .. import reference
from ..analysis import recall_from_probabilities
from ..api import predict_selection
from ..config import DHSAConfig
from ..rules import masked_softmax, query_heads_of, softcap_logits, visible_rows

__all__ = ["boundary_labels", "choose_thresholds", "fit_boundary_model", "RIDGE",
           "THRESHOLD_QUANTILES"]

#: ridge strength, relative to the number of positions, on standardised features
RIDGE = 1e-3
#: thresholds tried per head by :func:`choose_thresholds`: these quantiles of its scores
THRESHOLD_QUANTILES = (0.8, 0.85, 0.9, 0.93, 0.96)


def boundary_labels(q: np.ndarray, k: np.ndarray, window: int, *, scale: Optional[float] = None,
                    softcap: Optional[float] = None, block: int = 256) -> np.ndarray:
    """label (Hkv, L) float64 of batch item 0 of q (B, H, L, D), k (B, Hkv, L, D)
    (causal self-attention, Lq = Lk); positions without a full window on
    both sides, or no later query, get 0."""
    q = np.asarray(q)[0]
    k = np.asarray(k)[0]
    H, L, D = q.shape
    Hkv = k.shape[0]
    if k.shape[1] != L:
        raise ValueError(f"boundary labels need Lq == Lk, got {L} and {k.shape[1]}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    w = int(window)
    labels = np.zeros((Hkv, L))
    if L < 3 * w:
        return labels
    t = np.arange(w, L - w + 1)                      # positions with both windows whole
    diff = np.zeros((Hkv, len(t)))
    mass = np.zeros((Hkv, len(t)))
    for g in range(Hkv):
        kg = k[g].astype(np.float64)
        for h in range(H)[query_heads_of(g, H, Hkv)]:
            for i0 in range(0, L, block):
                i1 = min(L, i0 + block)
                rows = np.arange(i0, i1)
                s = softcap_logits((q[h, i0:i1].astype(np.float64) @ kg.T) * scale,
                                   softcap or None)
                p = masked_softmax(s, visible_rows(L, L, i0, i1))
                C = np.zeros((i1 - i0, L + 1))
                np.cumsum(p, axis=1, out=C[:, 1:])
                a = C[:, t] - C[:, t - w]
                b = C[:, t + w] - C[:, t]
                seen = rows[:, None] >= (t + w)[None, :]
                diff[g] += (np.abs(a - b) * seen).sum(axis=0)
                mass[g] += ((a + b) * seen).sum(axis=0)
    labels[:, t] = np.divide(diff, mass, out=np.zeros_like(diff), where=mass > 0)
    return labels


def _cosine_count(k_heads: np.ndarray, config: DHSAConfig) -> int:
    sc = reference.boundary_scores(k_heads, config.boundary_window)
    return len(reference.find_boundaries(sc, config.threshold, config.min_chunk,
                                         config.max_chunk, config.nms_radius)) - 1


def fit_boundary_model(k_heads: np.ndarray, labels: np.ndarray, config: DHSAConfig,
                       ridge: float = RIDGE) -> np.ndarray:
    """The boundary model row (2 W + 6,) for one chunking group: k_heads
    (nheads, L, D) its keys, labels (L,) from :func:`boundary_labels`, the
    feature window ``config.boundary_window``; the threshold gives as many
    chunks as ``config``'s cosine chunking of the same keys. Deterministic."""
    F = reference.boundary_features(k_heads, config.boundary_window)
    labels = np.asarray(labels, dtype=np.float64)
    L = F.shape[0]
    used = labels > 0
    used[0] = False
    if used.sum() < 2:
        raise ValueError("too few labelled positions to fit a boundary model "
                         f"({int(used.sum())} of {L}); use a longer text")
    X, y = F[used], labels[used]
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd < 1e-12] = 1.0                                  # constant features weigh nothing
    Z = (X - mu) / sd
    beta = np.linalg.solve(Z.T @ Z + ridge * len(Z) * np.eye(Z.shape[1]), Z.T @ (y - y.mean()))
    weights = beta / sd
    bias = float(y.mean() - weights @ mu)
    score = F @ weights + bias
    score[0] = 0.0
    # the threshold: as many chunks as the cosine chunking (bisection; the
    # count falls as the threshold rises, up to NMS ties)
    target = _cosine_count(k_heads, config)

    def count(th: float) -> int:
        return len(reference.find_boundaries(score, th, config.min_chunk, config.max_chunk,
                                             config.nms_radius)) - 1

    lo, hi = float(score[1:].min()) - 1.0, float(score[1:].max()) + 1.0
    best = (abs(count(hi) - target), hi)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        n = count(mid)
        best = min(best, (abs(n - target), mid))
        if n > target:
            lo = mid
        else:
            hi = mid
    return np.concatenate([weights, [bias, best[1]]])


def choose_thresholds(q: np.ndarray, k: np.ndarray, P: np.ndarray, config: DHSAConfig,
                      models: np.ndarray, *, scale: Optional[float] = None,
                      softcap: Optional[float] = None,
                      quantiles=THRESHOLD_QUANTILES) -> np.ndarray:
    """``models`` (Hkv, 2 D + 6) with each row's threshold replaced by the
    quantile of its own scores (over the keys of batch item 0 of k) whose
    selection under ``config`` keeps the most attention mass of that KV head's
    query heads (P: their dense probabilities, (H, L, L), as
    :func:`dhsa.analysis.dense_probabilities` gives). Ties go to the lower
    quantile. Deterministic."""
    models = np.array(models, dtype=np.float64)
    Hkv = models.shape[0]
    scores = [reference.learned_boundary_scores(k[0, g:g + 1], config.boundary_window,
                                                models[g])[1:] for g in range(Hkv)]
    best = np.full(Hkv, -np.inf)
    chosen = models[:, -1].copy()
    for qu in quantiles:
        trial = models.copy()
        trial[:, -1] = [float(np.quantile(s, qu)) for s in scores]
        sel = predict_selection(q[:1], k[:1], config, scale=scale, softcap=softcap,
                                boundary_model=trial)
        rec = recall_from_probabilities(P, sel).reshape(Hkv, -1).mean(axis=1)
        better = rec > best
        best[better] = rec[better]
        chosen[better] = trial[better, -1]
    models[:, -1] = chosen
    return models
