"""The executable specification: float64 NumPy versions of every stage.

Slow, simple and direct. The C core must agree with these functions: exactly
on chunk boundaries and selections, to float32 rounding on outputs. Shapes:
q (B, H, Lq, D); k, v (B, Hkv, Lk, D); queries are the last Lq positions.
A selection is CSR: ``offsets`` (B * G * NQB + 1) into ``starts``/``ends``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from .config import BUDGET_MODES, GRANULARITIES  # noqa: F401  (the names of the options)
# the rules (visibility, block geometry, clamp, softmax, head mapping) live in
# dhsa.rules; this module states the algorithm with them
from .rules import (BMODEL_TAIL, block_geometry, budget_clamp, chunk_groups, expand_kv,
                    forced_ranges, group_heads, in_dense_tail, masked_softmax_weights,
                    selection_groups, selection_mask, softcap_logits, visible_mask, visible_rows)

__all__ = [
    "visible_rows",
    "visible_mask",
    "dense_attention",
    "attention_with_selection",
    "boundary_scores",
    "boundary_features",
    "learned_boundary_scores",
    "find_boundaries",
    "prefix_sums",
    "predict",
    "count_pairs",
    "selection_mask",
    "cache_chunks",
    "decode_select",
]



def _attend(q, k, v, mask, scale, softcap):
    """q (H, Lq, D), k/v (H, Lk, D) float64, mask (H or 1, Lq, Lk)."""
    s = softcap_logits(np.einsum("hqd,hkd->hqk", q, k) * scale, softcap)
    p, l = masked_softmax_weights(s, mask)
    out = np.einsum("hqk,hkd->hqd", p, v)
    return np.divide(out, l, out=np.zeros_like(out), where=l > 0)


def dense_attention(q, k, v, causal: bool = True, scale: Optional[float] = None,
                    softcap: Optional[float] = None, window: Optional[int] = None) -> np.ndarray:
    """softmax(q k^T * scale [softcap] [mask]) v in float64, (B, H, Lq, D)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = expand_kv(k, H), expand_kv(v, H)
    mask = visible_mask(Lq, Lk, causal, window)[None]
    return np.stack([_attend(q[b], k[b], v[b], mask, scale, softcap) for b in range(B)])


def attention_with_selection(q, k, v, offsets, starts, ends, block_size: int,
                             causal: bool = True, scale: Optional[float] = None,
                             softcap: Optional[float] = None,
                             window: Optional[int] = None) -> np.ndarray:
    """Attention restricted to a selection (and the usual masks), float64."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nqb = -(-Lq // block_size)
    groups = (len(offsets) - 1) // (B * nqb)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    sel = selection_mask(offsets, starts, ends, B, groups, Lq, Lk, block_size)
    sel = expand_kv(sel, H)  # groups -> query heads, as KV heads are
    vis = visible_mask(Lq, Lk, causal, window)[None]
    k, v = expand_kv(k, H), expand_kv(v, H)
    return np.stack([_attend(q[b], k[b], v[b], sel[b] & vis, scale, softcap) for b in range(B)])


# ---- chunking -------------------------------------------------------------

def _window_means(k_heads: np.ndarray, window: int) -> Tuple[np.ndarray, np.ndarray]:
    """(a, b), each (Lk - 1, W) for t = 1 .. Lk-1 of one chunking group
    (k_heads (nheads, Lk, D), heads concatenated: W = nheads * D): the mean
    keys of the (at most) ``window`` positions left / right of t, each minus
    the mean of keys [0, t)."""
    k_heads = np.asarray(k_heads, dtype=np.float64)
    nh, Lk, D = k_heads.shape
    window = min(window, Lk)
    x = k_heads.transpose(1, 0, 2).reshape(Lk, nh * D)
    P = np.zeros((Lk + 1, nh * D))
    P[1:] = np.cumsum(x, axis=0)
    t = np.arange(1, Lk)
    wl = np.minimum(window, t)
    wr = np.minimum(window, Lk - t)
    mu = P[1:Lk] / t[:, None]
    a = (P[t] - P[t - wl]) / wl[:, None] - mu
    b = (P[t + wr] - P[t]) / wr[:, None] - mu
    return a, b


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1 - cos(a, b) per row, 0 where a vector is zero; |a|; |b|)."""
    nl, nr = np.sqrt((a * a).sum(1)), np.sqrt((b * b).sum(1))
    ok = (nl > 0) & (nr > 0)
    return np.where(ok, 1.0 - (a * b).sum(1) / np.where(ok, nl * nr, 1.0), 0.0), nl, nr


def boundary_features(k_heads: np.ndarray, window: int) -> np.ndarray:
    """features (Lk, 2 W + 4) of one chunking group, k_heads (nheads, Lk, D),
    W = nheads * D: with a = mL - mu and b = mR - mu (as in
    :func:`boundary_scores`), row t holds (a - b)**2 and a * b per dimension,
    then 1 - cos(a, b) (0 where a vector is zero), |a - b|, |a| and |b|. Row 0
    is zero. A learned boundary model weighs them linearly."""
    a, b = _window_means(k_heads, window)
    W = a.shape[1]
    cosd, nl, nr = _cosine_distance(a, b)
    F = np.zeros((a.shape[0] + 1, 2 * W + 4))
    F[1:, :W] = (a - b) ** 2
    F[1:, W:2 * W] = a * b
    F[1:, 2 * W] = cosd
    F[1:, 2 * W + 1] = np.sqrt(F[1:, :W].sum(1))
    F[1:, 2 * W + 2] = nl
    F[1:, 2 * W + 3] = nr
    return F


def learned_boundary_scores(k_heads: np.ndarray, window: int, model: np.ndarray) -> np.ndarray:
    """score (Lk,) = features . weights + bias (score[0] = 0) for one model row
    of ``2 W + 6`` values (see :func:`boundary_features`; the last value, the
    threshold, belongs to the scan)."""
    F = boundary_features(k_heads, window)
    model = np.asarray(model, dtype=np.float64)
    score = F @ model[:F.shape[1]] + model[F.shape[1]]
    score[0] = 0.0
    return score


def boundary_scores(k_heads: np.ndarray, window: int) -> np.ndarray:
    """score (Lk,) of one chunking group, k_heads (nheads, Lk, D).

    score[t] = 1 - cos(mL - mu, mR - mu), mL / mR the mean keys of the (at
    most) ``window`` positions left / right of t, mu the mean of keys [0, t),
    heads concatenated; 0 at t = 0 and where a vector is zero.
    """
    a, b = _window_means(k_heads, window)
    return np.concatenate([[0.0], _cosine_distance(a, b)[0]])


def find_boundaries(score: np.ndarray, threshold: float, min_len: int, max_len: int,
                    nms_radius: int, max_chunks: int = 0) -> np.ndarray:
    """Chunk bounds 0 = b0 < ... < bN = Lk from a left-to-right scan.

    t becomes a boundary when the open chunk has max_len keys, or when it
    has min_len keys and score[t] >= threshold beats every score within
    nms_radius (an earlier equal score wins). max_chunks > 0 caps the count
    exactly: the scan stops once max_chunks - 1 boundaries are placed and
    the last chunk takes the rest (so it may be longer than max_len).

    Causal: the decision at t reads score[:t + nms_radius + 1] and the count
    of earlier boundaries, never Lk (score[u] itself reads keys up to
    u + boundary_window), so appending keys moves no boundary before
    Lk - boundary_window - nms_radius. A cap that widened the lengths to
    ceil(Lk / max_chunks) would not be: any exact cap that holds for every
    Lk must let the last chunk grow without bound, and this is the simplest
    such rule.
    """
    Lk = len(score)
    inner_cap = max_chunks - 1 if max_chunks > 0 else Lk
    bounds = [0]
    last = 0
    for t in range(1, Lk):
        if len(bounds) - 1 >= inner_cap:
            break
        length = t - last
        take = length >= max_len
        if not take and length >= min_len and score[t] >= threshold:
            a, b = max(1, t - nms_radius), min(Lk - 1, t + nms_radius)
            left = score[a:t]
            right = score[t + 1:b + 1]
            take = not (np.any(left >= score[t]) or np.any(right > score[t]))
        if take:
            bounds.append(t)
            last = t
    bounds.append(Lk)
    return np.asarray(bounds, dtype=np.int64)


# ---- representations ------------------------------------------------------

def prefix_sums(x_heads: np.ndarray) -> np.ndarray:
    """(L + 1, D) running sums of the head mean of x_heads (nheads, L, D)."""
    x = np.asarray(x_heads, dtype=np.float64)
    mean = x[0].copy()
    for h in range(1, x.shape[0]):
        mean += x[h]
    mean /= x.shape[0]
    P = np.zeros((x.shape[1] + 1, x.shape[2]))
    P[1:] = np.cumsum(mean, axis=0)
    return P


def _norm(n: int, power: float) -> float:
    """n ** power, exactly as the C core computes it."""
    if power == 0.5:
        return math.sqrt(n)
    if power == 1.0:
        return float(n)
    if power == 0.0:
        return 1.0
    return float(n) ** power


def _repr(P: np.ndarray, a: int, b: int, power: float = 0.5) -> np.ndarray:
    """Representation of [a, b): sum / n ** power (0.5: mean * sqrt(n))."""
    return (P[b] - P[a]) / _norm(b - a, power)


# ---- selection ------------------------------------------------------------

def _take_best(pieces, sel: list, tokens: int, limit: int) -> int:
    """The budget rule of a fixed budget: pieces (score, a, b) sorted best
    first (ties: the earlier) appended to sel until ``limit`` keys, the last
    cut to its first keys. Returns the keys kept."""
    for _, a, b in pieces:
        if tokens >= limit:
            break
        take = min(b - a, limit - tokens)
        sel.append((a, a + take))
        tokens += take
    return tokens


def _merged(sel) -> list:
    """Sorted, merged ranges of sel."""
    merged = []
    for a, b in sorted(sel):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _select_block(rq, kP, bounds, geom, cfg, scale):
    """Ranges [(a, b), ...] of one query block (mirrors select_block in C)."""
    kn = cfg["key_norm"]
    i0, nq, spos, epos, lo, hi = geom
    allowed = hi - lo
    sink_end, loc_a, loc_b, forced = forced_ranges(geom, cfg["sink"], cfg["local"])
    mode = cfg["mode"]
    lo_clamp, hi_clamp = budget_clamp(allowed, forced, mode=mode, budget=cfg["budget"],
                                      density=cfg["density"], min_budget=cfg["min_budget"],
                                      max_budget=cfg["max_budget"])
    if allowed <= lo_clamp or in_dense_tail(geom, cfg["Lq"], cfg["dense_tail"]):
        return [(lo, hi)]

    # chunk_score "max": r_q . k_j of every key the block may see (k_j the
    # head-averaged key, a difference of the running sums as in C)
    by_key = np.diff(kP[:hi + 1], axis=0) @ rq if cfg["chunk_score"] == "max" else None
    pieces = []  # (score, a, b)
    for x, y in ((sink_end, loc_a), (loc_b, hi)):
        if x >= y:
            continue
        c = int(np.searchsorted(bounds, x, side="right")) - 1
        while c < len(bounds) - 1 and bounds[c] < y:
            a, b = max(x, bounds[c]), min(y, bounds[c + 1])
            score = float(rq @ _repr(kP, a, b, kn)) if by_key is None else float(by_key[a:b].max())
            pieces.append((score, a, b))
            c += 1
    pieces.sort(key=lambda p: (-p[0], p[1]))

    sel = []
    if sink_end > lo:
        sel.append((lo, sink_end))
    if loc_b > loc_a:
        sel.append((loc_a, loc_b))
    tokens = forced
    if mode != "adaptive":
        tokens = _take_best(pieces, sel, tokens, hi_clamp)
    else:
        def logm(a, b, sc):
            n = b - a
            return math.log(n) + scale * sc / (math.sqrt(nq) * _norm(n, 1.0 - kn))

        forced_lm = []
        for a, b in ((lo, min(sink_end, spos)), (loc_a, min(loc_b, spos))):
            forced_lm.append(logm(a, b, float(rq @ _repr(kP, a, b, kn))) if b > a else -math.inf)
        piece_lm = [logm(a, b, sc) for sc, a, b in pieces]
        mmax = max(forced_lm + piece_lm)
        acc = sum(math.exp(x - mmax) for x in forced_lm)
        total = acc + sum(math.exp(x - mmax) for x in piece_lm)
        target = cfg["mass"] * total
        for (sc, a, b), lm in zip(pieces, piece_lm):
            if tokens >= hi_clamp:
                break
            reached = acc >= target
            if reached and tokens >= lo_clamp:
                break
            limit = lo_clamp if reached else hi_clamp
            take = min(b - a, limit - tokens)
            sel.append((a, a + take))
            tokens += take
            acc += math.exp(lm - mmax) * take / (b - a)

    return _merged(sel)


def predict(q, k, *, block_size: int = 64, sink: int = 64, local: int = 256,
            mode: str = "tokens", budget: int = 2048, density: float = 0.125,
            mass: float = 0.95, min_budget: int = 512, max_budget: int = 4096,
            granularity: str = "kv_head", boundary_window: int = 16,
            threshold: float = 0.2, min_len: int = 4, max_len: int = 16,
            nms_radius: int = 4, max_chunks: int = 0, bounds=None, boundary_model=None,
            causal: bool = True, scale: Optional[float] = None,
            window: Optional[int] = None, key_norm: float = 0.5,
            dense_tail: int = 0, chunk_score: str = "mean") -> dict:
    """The whole DHSA prediction in float64 (mirrors dhsa_predict_* in C).

    Returns a dict with ``bounds`` (list of arrays, one per chunking group),
    ``offsets``, ``starts``, ``ends`` (CSR over (B, G, NQB)).
    ``boundary_model`` (CG, 2 W + 6): learned boundary scores and per-row
    thresholds instead of the cosine scores and ``threshold``.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    CG = chunk_groups(granularity, Hkv)
    SG = selection_groups(granularity, H, Hkv)
    if bounds is None:
        bounds = []
        for b in range(B):
            for cg in range(CG):
                kh = k[b] if granularity == "layer" else k[b, cg:cg + 1]
                th = threshold
                if boundary_model is None:
                    sc = boundary_scores(kh, boundary_window)
                else:
                    row = np.asarray(boundary_model, dtype=np.float64)[cg]
                    sc, th = learned_boundary_scores(kh, boundary_window, row), float(row[-1])
                bounds.append(find_boundaries(sc, th, min_len, max_len, nms_radius,
                                              max_chunks))
    cfg = dict(sink=sink, local=local, mode=mode, budget=budget, density=density, mass=mass,
               min_budget=min_budget, max_budget=max_budget, key_norm=key_norm,
               Lq=Lq, dense_tail=dense_tail, chunk_score=chunk_score)
    nqb = -(-Lq // block_size)
    offsets, starts, ends = [0], [], []
    for b in range(B):
        for sg in range(SG):
            heads, kvs = group_heads(granularity, H, Hkv, sg)
            kv = sorted(set(kvs))
            qh, kh = q[b, heads], k[b, kv]
            cg = 0 if granularity == "layer" else kv[0]
            qP, kP = prefix_sums(qh), prefix_sums(kh)
            bd = np.asarray(bounds[b * CG + cg])
            for qb in range(nqb):
                geom = block_geometry(Lq, Lk, block_size, qb, causal, window)
                i0, nq = geom[0], geom[1]
                rq = _repr(qP, i0, i0 + nq)
                for a, e in _select_block(rq, kP, bd, geom, cfg, scale):
                    starts.append(a)
                    ends.append(e)
                offsets.append(len(starts))
    return {
        "bounds": [np.asarray(x, dtype=np.int64) for x in bounds],
        "offsets": np.asarray(offsets, dtype=np.int64),
        "starts": np.asarray(starts, dtype=np.int32),
        "ends": np.asarray(ends, dtype=np.int32),
        "groups": SG,
    }


def count_pairs(offsets, starts, ends, B: int, groups: int, Lq: int, Lk: int,
                block_size: int, causal: bool = True,
                window: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(selected, allowed) query-key pairs per (batch, group)."""
    sel = selection_mask(offsets, starts, ends, B, groups, Lq, Lk, block_size)
    vis = visible_mask(Lq, Lk, causal, window)
    selected = (sel & vis).sum(axis=(2, 3)).reshape(-1)
    allowed = np.full(B * groups, vis.sum())
    return selected.astype(np.int64), allowed.astype(np.int64)


# ---- decoding from a KV cache ---------------------------------------------

def cache_chunks(bounds: np.ndarray, Lk: int, *, chunking: str = "dynamic",
                 boundary_window: int = 16, nms_radius: int = 4) -> np.ndarray:
    """The committed bounds of a KV cache holding Lk keys, from the bounds of
    the whole-sequence chunking of those keys (``predict``'s).

    A boundary at t is committed once the keys its decision reads have
    arrived: t + boundary_window + nms_radius <= Lk for dynamic chunking (the
    scan at t reads scores up to t + nms_radius, each reading keys up to
    boundary_window past it, see find_boundaries), t <= Lk for fixed chunks.
    The result starts at 0 and ends at the open chunk's start."""
    bounds = np.asarray(bounds, dtype=np.int64)
    limit = Lk - boundary_window - nms_radius if chunking == "dynamic" else Lk
    inner = bounds[(bounds > 0) & (bounds <= limit)]
    return np.concatenate([[0], inner]).astype(np.int64)


def decode_select(q, k, committed, *, budget: int, sink: int, local: int,
                  granularity: str = "kv_head", key_norm: float = 0.5,
                  window: Optional[int] = None, score_q=None, score: str = "mean",
                  scale: Optional[float] = None) -> dict:
    """The selection of one decode step (mirrors decode_select in decode.c).

    q (B, H, nq, D): the queries of the last nq of the Lk cached positions,
    one block; k (B, Hkv, Lk, D); ``committed``: the cache's bounds per
    (batch, chunking group) (``cache_chunks``). Kept: the sink, the local
    keys with the block's own, the open chunk [committed[-1], Lk); then closed
    chunks, clipped to the keys not yet kept, scored by r_q . r_c - r_q the
    group's head-mean queries summed over the block / sqrt(nq), r_c the
    chunk's head-mean key sum / n ** key_norm rounded to float32 (as the
    cache stores it) - best first (ties: the earlier), the last cut, until
    ``budget`` keys (0: every visible key). ``score="bounds"``
    (DHSAConfig.decode_score): a chunk scores sum_d max(r_q[d] lo[d], r_q[d]
    hi[d]) instead, lo / hi the per-dimension min / max of its head-mean keys
    rounded to float32; ``score="moments"``: scale r_q . mu + scale^2 / 2
    sum_d r_q[d]^2 var[d], mu / var their per-dimension mean and variance
    (sum m^2 / n - mu^2, at least 0) rounded to float32, ``scale`` the
    softmax scale (default 1 / sqrt(D)). ``score_q`` (default q): the
    queries r_q is made of - a step that reuses chunk scores
    (DHSAConfig.decode_reuse) scores with the queries of the step that made
    them. Returns offsets / starts / ends over (B, SG) groups of one block."""
    q = np.asarray(q, dtype=np.float64)
    sq = q if score_q is None else np.asarray(score_q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, H, nq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    CG = chunk_groups(granularity, Hkv)
    SG = selection_groups(granularity, H, Hkv)
    geom = block_geometry(nq, Lk, nq, 0, True, window)
    lo, hi = geom[4], geom[5]
    sink_end, loc_a, _, forced = forced_ranges(geom, min(sink, Lk), min(local, Lk))
    bud = min(budget, Lk) if budget > 0 else Lk
    lo_clamp, hi_clamp = budget_clamp(hi - lo, forced, mode="tokens", budget=bud,
                                      density=1.0, min_budget=1, max_budget=1)
    offsets, starts, ends = [0], [], []
    for b in range(B):
        for sg in range(SG):
            heads, kvs = group_heads(granularity, H, Hkv, sg)
            kv = sorted(set(kvs))
            cg = 0 if granularity == "layer" else kv[0]
            bd = np.asarray(committed[b * CG + cg], dtype=np.int64)
            if hi - lo <= lo_clamp:
                ranges = [(lo, hi)]
            else:
                open_a = max(int(bd[-1]), sink_end)
                tail_a = min(loc_a, open_a)
                kept = (sink_end - lo) + (hi - tail_a)
                sel = [(lo, sink_end)] if sink_end > lo else []
                sel.append((tail_a, hi))
                rq = sq[b, heads].mean(axis=0).sum(axis=0) / math.sqrt(sq.shape[2])
                kP = prefix_sums(k[b, kv])
                km = k[b, kv].mean(axis=0)
                pieces = []
                for c in range(len(bd) - 1):
                    a, e = max(sink_end, int(bd[c])), min(tail_a, int(bd[c + 1]))
                    if e <= a:
                        continue
                    if score == "bounds":
                        rows = km[int(bd[c]):int(bd[c + 1])]
                        kmin = rows.min(axis=0).astype(np.float32).astype(np.float64)
                        kmax = rows.max(axis=0).astype(np.float32).astype(np.float64)
                        sc = float(np.sum(rq * np.where(rq >= 0, kmax, kmin)))
                    elif score == "moments":
                        rows = km[int(bd[c]):int(bd[c + 1])]
                        cnt = float(len(rows))
                        mu = rows.sum(axis=0) / cnt
                        var = np.maximum(0.0, (rows * rows).sum(axis=0) / cnt - mu * mu)
                        mu = mu.astype(np.float32).astype(np.float64)
                        var = var.astype(np.float32).astype(np.float64)
                        s_ = float(np.float32(1.0 / math.sqrt(D) if scale is None else scale))
                        sc = s_ * float(rq @ mu) + 0.5 * s_ * s_ * float((rq * rq) @ var)
                    else:
                        rep = _repr(kP, int(bd[c]), int(bd[c + 1]), key_norm).astype(np.float32)
                        sc = float(rq @ rep.astype(np.float64))
                    pieces.append((sc, a, e))
                pieces.sort(key=lambda p: (-p[0], p[1]))
                _take_best(pieces, sel, kept, hi_clamp)
                ranges = _merged(sel)
            for a, e in ranges:
                starts.append(a)
                ends.append(e)
            offsets.append(len(starts))
    return {"offsets": np.asarray(offsets, dtype=np.int64),
            "starts": np.asarray(starts, dtype=np.int32),
            "ends": np.asarray(ends, dtype=np.int32), "groups": SG}
