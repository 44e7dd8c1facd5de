"""The rules of dhsa's attention, written once on the Python side.

Everything in Python that needs one of these rules calls it from here: the
executable specification (:mod:`dhsa.reference`), the baselines, the
analysis, the model patch and the benchmarks. The C core states the same
rules in ``csrc/`` and the tests hold the two to each other.

- causal visibility: queries are the last ``Lq`` of ``Lk`` positions; query
  ``i`` sits at position ``p = Lk - Lq + i`` and sees the keys
  ``[lo, hi)`` of :func:`visible_span` (causal: ``j <= p``; a window ``w``:
  ``j > p - w``, and without causality also ``j < p + w``);
- the query-block geometry (:func:`block_geometry`) and the sink + local +
  budget clamp of one block (:func:`forced_ranges`, :func:`budget_clamp`)
  and the dense tail (:func:`in_dense_tail`);
- the masked softmax (:func:`masked_softmax_weights`,
  :func:`masked_softmax`): masked logits are -inf, a fully masked row gives
  zeros, never NaN;
- the query-head -> KV-head mapping (GQA: query head ``h`` reads KV head
  ``h // (H // Hkv)``) and the selection groups of each granularity;
- pair counts: causally allowed query-key pairs, and counts per selection
  group turned into counts over query heads.

NumPy only; shapes as in :mod:`dhsa.reference` (q (B, H, Lq, D), k/v
(B, Hkv, Lk, D)). ``window`` is None (no window) or a positive int.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .config import GRANULARITIES

__all__ = [
    "GRANULARITIES",
    "BlockGeometry",
    "visible_span",
    "visible_rows",
    "visible_mask",
    "allowed_pairs",
    "block_geometry",
    "forced_ranges",
    "budget_clamp",
    "in_dense_tail",
    "softcap_logits",
    "masked_softmax_weights",
    "masked_softmax",
    "kv_head_of",
    "expand_kv",
    "selection_groups",
    "chunk_groups",
    "group_heads",
    "group_of_head",
    "selection_mask",
    "head_pairs",
]

# ---- causal visibility ------------------------------------------------------

def visible_span(first, last, Lk: int, causal: bool = True, window: Optional[int] = None):
    """Keys [lo, hi) that the queries at positions first..last may see
    together (first == last: one query). Works on ints and on arrays."""
    if window is not None:
        lo = np.maximum(0, first - window + 1)
    else:
        lo = np.zeros_like(first) if isinstance(first, np.ndarray) else 0
    if causal:
        hi = last + 1
    elif window is not None:
        hi = np.minimum(Lk, last + window)
    else:
        hi = np.full_like(last, Lk) if isinstance(last, np.ndarray) else Lk
    if not isinstance(first, np.ndarray):
        lo, hi = int(lo), int(hi)
    return lo, hi


def visible_rows(Lq: int, Lk: int, r0: int, r1: int, causal: bool = True,
                 window: Optional[int] = None) -> np.ndarray:
    """(r1 - r0, Lk) bool: the rows r0..r1-1 of :func:`visible_mask`."""
    p = np.arange(Lk - Lq + r0, Lk - Lq + r1)
    lo, hi = visible_span(p, p, Lk, causal, window)
    j = np.arange(Lk)[None, :]
    return (j >= lo[:, None]) & (j < hi[:, None])


def visible_mask(Lq: int, Lk: int, causal: bool = True, window: Optional[int] = None) -> np.ndarray:
    """(Lq, Lk) bool: key j visible to query i at position p = Lk - Lq + i.

    causal: j <= p. window w: j > p - w, and if not causal also j < p + w.
    """
    return visible_rows(Lq, Lk, 0, Lq, causal, window)


def allowed_pairs(Lq: int, Lk: Optional[int] = None, causal: bool = True,
                  window: Optional[int] = None) -> int:
    """Query-key pairs one head may compute: the last Lq of Lk positions
    under :func:`visible_span`. L(L+1)/2 for causal Lq = Lk = L."""
    Lk = Lq if Lk is None else Lk
    p = np.arange(Lk - Lq, Lk, dtype=np.int64)
    lo, hi = visible_span(p, p, Lk, causal, window)
    return int((hi - lo).sum())


# ---- query blocks -----------------------------------------------------------

class BlockGeometry(NamedTuple):
    """Query block ``qb``: rows [i0, i0 + nq), positions spos..epos, and the
    keys [lo, hi) its queries may see together."""

    i0: int
    nq: int
    spos: int
    epos: int
    lo: int
    hi: int


def block_geometry(Lq: int, Lk: int, block_size: int, qb: int, causal: bool = True,
                   window: Optional[int] = None) -> BlockGeometry:
    """The geometry of query block ``qb`` of ``block_size`` queries."""
    i0 = qb * block_size
    nq = min(block_size, Lq - i0)
    spos = Lk - Lq + i0
    epos = spos + nq - 1
    lo, hi = visible_span(spos, epos, Lk, causal, window)
    return BlockGeometry(i0, nq, spos, epos, lo, hi)


def forced_ranges(geom: BlockGeometry, sink: int, local: int) -> Tuple[int, int, int, int]:
    """(sink_end, loc_a, loc_b, forced): a block always keeps the sink
    [lo, sink_end) - the first ``sink`` keys it may see - and [loc_a, loc_b),
    the ``local`` keys before it and its own keys; ``forced`` keys in all."""
    sink_end = min(geom.lo + sink, geom.hi)
    loc_a = max(sink_end, geom.spos - local)
    loc_b = max(loc_a, min(geom.hi, geom.epos + 1))
    forced = (sink_end - geom.lo) + (loc_b - loc_a)
    return sink_end, loc_a, loc_b, forced


def budget_clamp(allowed: int, forced: int, *, mode: str, budget: int, density: float,
                 min_budget: int, max_budget: int) -> Tuple[int, int]:
    """(lo_clamp, hi_clamp): the fewest and the most keys a block keeps.

    tokens: ``budget``; density: ``ceil(density * allowed)``; adaptive:
    between ``min_budget`` and ``max_budget``; never fewer than the forced
    keys. A block whose allowed keys are at most ``lo_clamp`` runs dense.
    """
    if mode == "adaptive":
        return max(min_budget, forced), max(max_budget, forced)
    bud = budget if mode == "tokens" else int(math.ceil(density * allowed))
    return max(bud, forced), max(bud, forced)


def in_dense_tail(geom: BlockGeometry, Lq: int, dense_tail: int) -> bool:
    """Whether the block holds one of the last ``dense_tail`` of the ``Lq``
    queries: such a block keeps all its allowed keys."""
    return dense_tail > 0 and geom.i0 + geom.nq > Lq - dense_tail


# ---- the masked softmax -----------------------------------------------------

def softcap_logits(s: np.ndarray, softcap: Optional[float]) -> np.ndarray:
    """softcap * tanh(s / softcap) (Gemma-2 logit capping); s if softcap is None."""
    return s if softcap is None else softcap * np.tanh(s / softcap)


def masked_softmax_weights(s: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(p, l): unnormalised weights exp(s - rowmax) with masked logits at
    -inf, and their row sums (last axis). l == 0 on a fully masked row."""
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    return p, p.sum(axis=-1, keepdims=True)


def masked_softmax(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row softmax of s over the keys ``mask`` allows; zeros on fully masked rows."""
    p, z = masked_softmax_weights(s, mask)
    return np.divide(p, z, out=np.zeros_like(p), where=z > 0)


# ---- query heads, KV heads and selection groups -----------------------------

def kv_head_of(h: int, H: int, Hkv: int) -> int:
    """The KV head query head ``h`` reads (GQA: H // Hkv query heads per KV head)."""
    return h // (H // Hkv)


def query_heads_of(kv_head: int, H: int, Hkv: int) -> slice:
    """The query heads reading KV head ``kv_head``: [kv_head * G, (kv_head + 1) * G)."""
    G = H // Hkv
    return slice(kv_head * G, (kv_head + 1) * G)


def expand_kv(x: np.ndarray, H: int) -> np.ndarray:
    """(B, Hkv, L, D) -> (B, H, L, D): each KV head repeated for its query heads."""
    return np.repeat(x, H // x.shape[1], axis=1)


def selection_groups(granularity: str, H: int, Hkv: int) -> int:
    """Selection groups per batch item: 1 (layer), Hkv (kv_head) or H (query_head)."""
    return {"layer": 1, "kv_head": Hkv, "query_head": H}[granularity]


#: a learned boundary model row past its 2 W feature weights (W = heads * D of a
#: chunking group): the weights of 1 - cos, |a - b|, |a|, |b|, the bias, the threshold
#: (csrc/dhsa.h: DHSA_BMODEL_TAIL, dhsa_bmodel_len)
BMODEL_TAIL = 6


def bmodel_len(width: int) -> int:
    """Values in a boundary model row for W = heads * D key values per position."""
    return 2 * width + BMODEL_TAIL


def chunk_groups(granularity: str, Hkv: int) -> int:
    """Chunking groups per batch item: one for the layer, else one per KV head."""
    return 1 if granularity == "layer" else Hkv


def group_heads(granularity: str, H: int, Hkv: int, g: int) -> Tuple[List[int], List[int]]:
    """(query heads, the KV head of each) of selection group ``g``."""
    G = H // Hkv
    if granularity == "layer":
        heads = list(range(H))
    elif granularity == "kv_head":
        heads = list(range(g * G, (g + 1) * G))
    else:
        heads = [g]
    return heads, [h // G for h in heads]


def group_of_head(groups: int, H: int, h: int) -> int:
    """The selection group (of ``groups`` per batch item) query head ``h`` belongs to."""
    if groups == 1:
        return 0
    if groups == H:
        return h
    return h // (H // groups)


# ---- selections and pair counts -------------------------------------------------

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


def head_pairs(per_group: Sequence[int], groups: int, H: int) -> int:
    """Pairs over batch and query heads from counts per (batch, selection
    group): a group serves H / groups query heads."""
    groups = int(groups)
    if H % groups:
        raise ValueError(f"H={H} is not a multiple of the selection groups ({groups})")
    return int(np.asarray(per_group, dtype=np.int64).sum()) * (H // groups)
