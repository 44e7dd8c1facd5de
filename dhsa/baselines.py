"""Baseline selections in DHSA's format, so one kernel runs every method.

Each baseline keeps DHSA's rules: per query block of ``block_size`` queries,
only causally (and window-) allowed keys, always the first ``sink`` of them,
the ``local`` keys before the block and the block's own keys, at most the
block's budget in all, and a dense block when the budget covers every allowed
key. They differ in how they fill the rest of the budget:

- ``block_topk``: fixed key blocks, mean-pooled block scores (the C predictor
  with fixed chunks and plain means; see :func:`dhsa.predict_selection`);
- ``streaming``: the local window grows to fill the budget (A-shape);
- ``vertical_slash``: MInference's pattern: the key columns ("vertical") and
  diagonals ("slash") that the last ``last_queries`` queries of the group
  weight most, half of the free budget each;
- ``oracle``: the keys with the most true attention mass for the block (sum
  over its queries and the group's heads), token by token; O(L^2).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np

from .config import DHSAConfig
from .rules import (block_geometry, budget_clamp, forced_ranges, group_heads, in_dense_tail,
                    masked_softmax, selection_groups, softcap_logits, visible_rows)

__all__ = ["baseline_ranges"]

Range = Tuple[int, int]


def _merge(ranges: List[Range]) -> List[Range]:
    out: List[Range] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _runs(idx: np.ndarray) -> List[Range]:
    """Sorted key indices -> [start, end) runs."""
    if idx.size == 0:
        return []
    idx = np.sort(idx)
    cut = np.nonzero(np.diff(idx) > 1)[0]
    starts = np.concatenate([[idx[0]], idx[cut + 1]])
    ends = np.concatenate([idx[cut] + 1, [idx[-1] + 1]])
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def _logits(q, k, scale, softcap):
    return softcap_logits((q.astype(np.float64) @ k.astype(np.float64).T) * scale, softcap)


def baseline_ranges(method: str, q: np.ndarray, k: np.ndarray, cfg: DHSAConfig, *,
                    causal: bool = True, scale: Optional[float] = None,
                    softcap: Optional[float] = None,
                    window: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """CSR selection (offsets, starts, ends, groups) of a NumPy baseline:
    ``"streaming"``, ``"vertical_slash"`` or ``"oracle"``."""
    if method not in ("streaming", "vertical_slash", "oracle"):
        raise ValueError(f"method must be streaming, vertical_slash or oracle, got {method!r}")
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if window is not None:
        window = min(int(window), Lk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bs = min(cfg.block_size, Lq)
    nqb = -(-Lq // bs)
    groups = selection_groups(cfg.granularity, H, Hkv)
    offsets, starts, ends = [0], [], []
    for b in range(B):
        for g in range(groups):
            heads, kvs = group_heads(cfg.granularity, H, Hkv, g)
            pattern = None
            if method == "vertical_slash":
                pattern = _vertical_slash_scores(q[b], k[b], heads, kvs, cfg, scale, softcap,
                                                 causal, window)
            for qb in range(nqb):
                geom = block_geometry(Lq, Lk, bs, qb, causal, window)
                i0, nq, spos, epos, lo, hi = geom
                allowed = hi - lo
                sink_end, loc_a, loc_b, forced = forced_ranges(geom, cfg.sink, cfg.local)
                # adaptive: no mass estimate here, so the ceiling (max_budget)
                budget = budget_clamp(allowed, forced, mode=cfg.budget_mode, budget=cfg.budget,
                                      density=cfg.density, min_budget=cfg.min_budget,
                                      max_budget=cfg.max_budget)[1]
                if allowed <= budget or in_dense_tail(geom, Lq, cfg.dense_tail):
                    ranges = [(lo, hi)]
                else:
                    free = budget - forced
                    fixed = [(lo, sink_end), (loc_a, loc_b)]
                    cand = np.concatenate([np.arange(sink_end, loc_a), np.arange(loc_b, hi)])
                    if method == "streaming":
                        # the window before the block grows; non-causal: after it too
                        before = np.arange(sink_end, loc_a)[::-1]
                        after = np.arange(loc_b, hi)
                        order = np.empty(before.size + after.size, dtype=np.int64)
                        n = min(before.size, after.size)
                        order[:2 * n:2], order[1:2 * n:2] = before[:n], after[:n]
                        order[2 * n:] = before[n:] if before.size > n else after[n:]
                        chosen = order[:free]
                    elif method == "oracle":
                        mass = np.zeros(Lk)
                        vis = visible_rows(Lq, Lk, i0, i0 + nq, causal, window)
                        for h, kv in zip(heads, kvs):
                            p = masked_softmax(_logits(q[b, h, i0:i0 + nq], k[b, kv], scale,
                                                      softcap), vis)
                            mass += p.sum(axis=0)
                        m = mass[cand]
                        order = np.lexsort((cand, -m))  # most mass first, then earliest
                        chosen = cand[order[:free]]
                    else:
                        chosen = _vertical_slash_pick(pattern, cand, spos, epos, free)
                    ranges = _merge(fixed + _runs(np.asarray(chosen, dtype=np.int64)))
                for a, e in ranges:
                    starts.append(a)
                    ends.append(e)
                offsets.append(len(starts))
    return (np.asarray(offsets, dtype=np.int64), np.asarray(starts, dtype=np.int32),
            np.asarray(ends, dtype=np.int32), groups)


def _vertical_slash_scores(qb, kb, heads, kvs, cfg, scale, softcap, causal, window):
    """(vertical (Lk,), slash (2 Lk,), offsets best first): attention mass of
    the last queries per key column and per diagonal offset (query position
    - key position, stored at offset + Lk)."""
    H, Lq, D = qb.shape
    Lk = kb.shape[1]
    n = min(cfg.last_queries, Lq)
    r0 = Lq - n
    vis = visible_rows(Lq, Lk, r0, Lq, causal, window)
    vertical = np.zeros(Lk)
    slash = np.zeros(2 * Lk)  # offsets -Lk+1 .. Lk-1, index offset + Lk
    pos = np.arange(Lk - n, Lk)[:, None]
    off = (pos - np.arange(Lk)[None, :]) + Lk
    for h, kv in zip(heads, kvs):
        p = masked_softmax(_logits(qb[h, r0:], kb[kv], scale, softcap), vis)
        vertical += p.sum(axis=0)
        np.add.at(slash, off.ravel(), p.ravel())
    # ranked once here, not per block
    return vertical, slash, np.argsort(-slash, kind="stable") - Lk


def _vertical_slash_pick(pattern, cand: np.ndarray, spos: int, epos: int, free: int):
    """Half the free budget to the best diagonals (each a run of keys at a
    fixed distance from the block's queries), the rest to the best columns."""
    vertical, slash, offsets = pattern
    Lk = vertical.size
    cand_set = np.zeros(Lk, dtype=bool)
    cand_set[cand] = True
    chosen = np.zeros(Lk, dtype=bool)
    want_slash = free // 2
    taken = 0
    for o in offsets:
        if taken >= want_slash or slash[o + Lk] <= 0:
            break
        a, e = max(0, spos - o), min(Lk, epos - o + 1)
        if e <= a:
            continue
        run = np.arange(a, e)
        run = run[cand_set[run] & ~chosen[run]]
        run = run[:want_slash - taken]
        chosen[run] = True
        taken += run.size
    left = free - taken
    if left > 0:
        cols = cand[~chosen[cand]]
        order = np.lexsort((cols, -vertical[cols]))
        chosen[cols[order[:left]]] = True
    return np.nonzero(chosen)[0]
