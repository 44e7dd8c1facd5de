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

__all__ = [
    "visible_mask",
    "dense_attention",
    "attention_with_selection",
    "boundary_scores",
    "find_boundaries",
    "prefix_sums",
    "predict",
    "count_pairs",
    "selection_mask",
]

GRANULARITIES = ("layer", "kv_head", "query_head")
BUDGET_MODES = ("tokens", "density", "adaptive")


def visible_rows(Lq: int, Lk: int, r0: int, r1: int, causal: bool = True,
                 window: Optional[int] = None) -> np.ndarray:
    """(r1 - r0, Lk) bool: the rows r0..r1-1 of :func:`visible_mask`."""
    p = np.arange(Lk - Lq + r0, Lk - Lq + r1)[:, None]
    j = np.arange(Lk)[None, :]
    m = np.ones((r1 - r0, Lk), dtype=bool)
    if causal:
        m &= j <= p
    if window is not None:
        m &= j > p - window
        if not causal:
            m &= j < p + window
    return m


def visible_mask(Lq: int, Lk: int, causal: bool = True, window: Optional[int] = None) -> np.ndarray:
    """(Lq, Lk) bool: key j visible to query i at position p = Lk - Lq + i.

    causal: j <= p. window w: j > p - w, and if not causal also j < p + w.
    """
    return visible_rows(Lq, Lk, 0, Lq, causal, window)


def _attend(q, k, v, mask, scale, softcap):
    """q (H, Lq, D), k/v (H, Lk, D) float64, mask (H or 1, Lq, Lk)."""
    s = np.einsum("hqd,hkd->hqk", q, k) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,hkd->hqd", p, v)
    return np.divide(out, l, out=np.zeros_like(out), where=l > 0)


def _expand_kv(x: np.ndarray, H: int) -> np.ndarray:
    return np.repeat(x, H // x.shape[1], axis=1)


def dense_attention(q, k, v, causal: bool = True, scale: Optional[float] = None,
                    softcap: Optional[float] = None, window: Optional[int] = None) -> np.ndarray:
    """softmax(q k^T * scale [softcap] [mask]) v in float64, (B, H, Lq, D)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    mask = visible_mask(Lq, Lk, causal, window)[None]
    return np.stack([_attend(q[b], k[b], v[b], mask, scale, softcap) for b in range(B)])


def selection_mask(offsets, starts, ends, B: int, groups: int, Lq: int, Lk: int,
                   block_size: int) -> np.ndarray:
    """(B, groups, Lq, Lk) bool: keys each query block's ranges select."""
    nqb = -(-Lq // block_size)
    m = np.zeros((B, groups, Lq, Lk), dtype=bool)
    for b in range(B):
        for g in range(groups):
            for qb in range(nqb):
                i = (b * groups + g) * nqb + qb
                rows = slice(qb * block_size, min(Lq, (qb + 1) * block_size))
                for r in range(offsets[i], offsets[i + 1]):
                    m[b, g, rows, starts[r]:ends[r]] = True
    return m


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
    if groups != H:
        sel = np.repeat(sel, H // groups, axis=1)
    vis = visible_mask(Lq, Lk, causal, window)[None]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    return np.stack([_attend(q[b], k[b], v[b], sel[b] & vis, scale, softcap) for b in range(B)])


# ---- chunking -------------------------------------------------------------

def boundary_scores(k_heads: np.ndarray, window: int) -> np.ndarray:
    """score (Lk,) of one chunking group, k_heads (nheads, Lk, D).

    score[t] = 1 - cos(mL - mu, mR - mu), mL / mR the mean keys of the (at
    most) ``window`` positions left / right of t, mu the mean of keys [0, t),
    heads concatenated; 0 at t = 0 and where a vector is zero.
    """
    k_heads = np.asarray(k_heads, dtype=np.float64)
    nh, Lk, D = k_heads.shape
    window = min(window, Lk)
    x = k_heads.transpose(1, 0, 2).reshape(Lk, nh * D)
    P = np.zeros((Lk + 1, nh * D))
    P[1:] = np.cumsum(x, axis=0)
    score = np.zeros(Lk)
    for t in range(1, Lk):
        wl, wr = min(window, t), min(window, Lk - t)
        mu = P[t] / t
        a = (P[t] - P[t - wl]) / wl - mu
        b = (P[t + wr] - P[t]) / wr - mu
        nl, nr = float(a @ a), float(b @ b)
        score[t] = 1.0 - float(a @ b) / (math.sqrt(nl) * math.sqrt(nr)) if nl > 0 and nr > 0 else 0.0
    return score


def find_boundaries(score: np.ndarray, threshold: float, min_len: int, max_len: int,
                    nms_radius: int, max_chunks: int = 0) -> np.ndarray:
    """Chunk bounds 0 = b0 < ... < bN = Lk from a left-to-right scan.

    t becomes a boundary when the open chunk has max_len keys, or when it
    has min_len keys and score[t] >= threshold beats every score within
    nms_radius (an earlier equal score wins). max_chunks > 0 widens the
    lengths to at least ceil(Lk / max_chunks), which caps the count.
    """
    Lk = len(score)
    if max_chunks > 0:
        need = -(-Lk // max_chunks)
        min_len = max(min_len, need)
        max_len = max(max_len, min_len)
    bounds = [0]
    last = 0
    for t in range(1, Lk):
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

def _block_geometry(Lq, Lk, block_size, qb, causal, window):
    i0 = qb * block_size
    nq = min(block_size, Lq - i0)
    spos = Lk - Lq + i0
    epos = spos + nq - 1
    lo = max(0, spos - window + 1) if window else 0
    if causal:
        hi = epos + 1
    else:
        hi = min(Lk, epos + window) if window else Lk
    return i0, nq, spos, epos, lo, hi


def _select_block(rq, kP, bounds, geom, cfg, scale):
    kn = cfg["key_norm"]
    """Ranges [(a, b), ...] of one query block (mirrors select_block in C)."""
    i0, nq, spos, epos, lo, hi = geom
    allowed = hi - lo
    sink_end = min(lo + cfg["sink"], hi)
    loc_a = max(sink_end, spos - cfg["local"])
    loc_b = max(loc_a, min(hi, epos + 1))
    forced = (sink_end - lo) + (loc_b - loc_a)
    mode = cfg["mode"]
    if mode == "adaptive":
        lo_clamp = max(cfg["min_budget"], forced)
        hi_clamp = max(cfg["max_budget"], forced)
    else:
        bud = cfg["budget"] if mode == "tokens" else int(math.ceil(cfg["density"] * allowed))
        lo_clamp = hi_clamp = max(bud, forced)
    if allowed <= lo_clamp:
        return [(lo, hi)]

    pieces = []  # (score, a, b)
    for x, y in ((sink_end, loc_a), (loc_b, hi)):
        if x >= y:
            continue
        c = int(np.searchsorted(bounds, x, side="right")) - 1
        while c < len(bounds) - 1 and bounds[c] < y:
            a, b = max(x, bounds[c]), min(y, bounds[c + 1])
            pieces.append((float(rq @ _repr(kP, a, b, kn)), a, b))
            c += 1
    pieces.sort(key=lambda p: (-p[0], p[1]))

    sel = []
    if sink_end > lo:
        sel.append((lo, sink_end))
    if loc_b > loc_a:
        sel.append((loc_a, loc_b))
    tokens = forced
    if mode != "adaptive":
        for _, a, b in pieces:
            if tokens >= hi_clamp:
                break
            take = min(b - a, hi_clamp - tokens)
            sel.append((a, a + take))
            tokens += take
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

    sel.sort()
    merged = []
    for a, b in sel:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def predict(q, k, *, block_size: int = 64, sink: int = 64, local: int = 256,
            mode: str = "tokens", budget: int = 2048, density: float = 0.125,
            mass: float = 0.95, min_budget: int = 512, max_budget: int = 4096,
            granularity: str = "kv_head", boundary_window: int = 16,
            threshold: float = 0.2, min_len: int = 4, max_len: int = 16,
            nms_radius: int = 4, max_chunks: int = 0, bounds=None,
            causal: bool = True, scale: Optional[float] = None,
            window: Optional[int] = None, key_norm: float = 0.5) -> dict:
    """The whole DHSA prediction in float64 (mirrors dhsa_predict_* in C).

    Returns a dict with ``bounds`` (list of arrays, one per chunking group),
    ``offsets``, ``starts``, ``ends`` (CSR over (B, G, NQB)).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    CG = 1 if granularity == "layer" else Hkv
    SG = {"layer": 1, "kv_head": Hkv, "query_head": H}[granularity]
    if bounds is None:
        bounds = []
        for b in range(B):
            for cg in range(CG):
                kh = k[b] if granularity == "layer" else k[b, cg:cg + 1]
                sc = boundary_scores(kh, boundary_window)
                bounds.append(find_boundaries(sc, threshold, min_len, max_len, nms_radius,
                                              max_chunks))
    cfg = dict(sink=sink, local=local, mode=mode, budget=budget, density=density, mass=mass,
               min_budget=min_budget, max_budget=max_budget, key_norm=key_norm)
    nqb = -(-Lq // block_size)
    offsets, starts, ends = [0], [], []
    for b in range(B):
        for sg in range(SG):
            if granularity == "layer":
                qh, cg, kh = q[b], 0, k[b]
            elif granularity == "kv_head":
                qh, cg, kh = q[b, sg * G:(sg + 1) * G], sg, k[b, sg:sg + 1]
            else:
                qh, cg, kh = q[b, sg:sg + 1], sg // G, k[b, sg // G:sg // G + 1]
            qP, kP = prefix_sums(qh), prefix_sums(kh)
            bd = np.asarray(bounds[b * CG + cg])
            for qb in range(nqb):
                geom = _block_geometry(Lq, Lk, block_size, qb, causal, window)
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
