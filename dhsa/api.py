"""The public NumPy API: dense and sparse attention, the DHSA prediction."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np

from ._loader import _core
from .config import DHSAConfig

__all__ = [
    "dense_attention",
    "sparse_attention",
    "predict_selection",
    "Selection",
    "AttentionInfo",
    "build_info",
    "force_scalar",
]

_BASELINES = ("streaming", "vertical_slash", "oracle")  # NumPy selections (baselines.py)

Boundaries = Union[None, np.ndarray, Sequence[np.ndarray]]


def dense_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = True,
                    scale: Optional[float] = None, softcap: Optional[float] = None,
                    window: Optional[int] = None,
                    num_threads: Optional[int] = None) -> np.ndarray:
    """Exact attention, tiled with an online softmax (never Lq x Lk in memory).

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D) with H a multiple of Hkv (GQA),
    Lq <= Lk (queries are the last Lq positions), D <= 256; float32 or
    float16 (accumulated in float32, returned in the input dtype).
    ``scale`` defaults to 1/sqrt(D); ``softcap`` applies
    softcap * tanh(logit / softcap); ``window`` lets each query see only the
    last ``window`` keys. ``num_threads`` defaults to all available cores.

    Raises TypeError / ValueError naming the argument for a wrong type,
    dtype, shape or option, for NaN / Inf in q, k or v, and for q and k so
    large that a float32 logit could overflow
    (scale * D * max|q| * max|k| > 2**126). Any finite v is fine.
    """
    return _core.dense_attention(q, k, v, causal=bool(causal), scale=scale, softcap=softcap,
                                 window=window, num_threads=num_threads)


@dataclass
class Selection:
    """Key ranges kept per (batch, group, query block), CSR-style.

    ``ranges(b, g, qb)`` gives an (n, 2) array of [start, end) key ranges;
    ``boundaries[b * chunk_groups + c]`` the chunk bounds a chunking group
    used (None for selections not made by chunking).
    """

    offsets: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    block_size: int
    batch: int
    groups: int
    num_blocks: int
    granularity: str
    boundaries: Optional[List[np.ndarray]] = None
    chunk_groups: int = 1
    chunk_scores: Optional[np.ndarray] = None
    pairs_selected: Optional[np.ndarray] = None
    pairs_allowed: Optional[np.ndarray] = None

    def ranges(self, b: int = 0, g: int = 0, qb: int = 0) -> np.ndarray:
        """[start, end) key ranges of one query block, shape (n, 2)."""
        if not (0 <= b < self.batch and 0 <= g < self.groups and 0 <= qb < self.num_blocks):
            raise IndexError(f"block (b={b}, g={g}, qb={qb}) out of range "
                             f"({self.batch}, {self.groups}, {self.num_blocks})")
        i = (b * self.groups + g) * self.num_blocks + qb
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return np.stack([self.starts[lo:hi], self.ends[lo:hi]], axis=1).astype(np.int64)

    def keys_per_block(self) -> np.ndarray:
        """(batch, groups, num_blocks) number of selected keys."""
        lengths = (self.ends.astype(np.int64) - self.starts).astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(lengths)])
        per = csum[self.offsets[1:]] - csum[self.offsets[:-1]]
        return per.reshape(self.batch, self.groups, self.num_blocks)

    @property
    def density(self) -> float:
        """Selected / causally allowed query-key pairs, over everything."""
        if self.pairs_selected is None or self.pairs_allowed is None:
            raise ValueError("pair counts are unknown for this selection")
        return float(self.pairs_selected.sum()) / float(self.pairs_allowed.sum())

    def to_mask(self, Lq: int, Lk: int) -> np.ndarray:
        """(batch, groups, Lq, Lk) bool mask of the selected keys (small inputs only)."""
        from .rules import selection_mask
        return selection_mask(self.offsets, self.starts, self.ends, self.batch, self.groups,
                              Lq, Lk, self.block_size)


@dataclass
class AttentionInfo:
    """What ``sparse_attention(..., return_info=True)`` saw and did."""

    selection: Selection
    predict_seconds: float
    attention_seconds: float
    density: float = field(init=False)

    def __post_init__(self) -> None:
        self.density = self.selection.density

    @property
    def boundaries(self) -> Optional[List[np.ndarray]]:
        return self.selection.boundaries


def _check_config(config) -> DHSAConfig:
    if config is None:
        return DHSAConfig()
    if not isinstance(config, DHSAConfig):
        raise TypeError(f"config must be a DHSAConfig or None, got {type(config).__name__}")
    if config.calibration is not None:
        raise ValueError("config.calibration holds budgets per layer and KV head, which this "
                         "call cannot know: use dhsa.patch, or pass "
                         "config.calibration.config_for(config, layer, kv_head) per head")
    return config


def _selection(res: dict, config: DHSAConfig, batch: int, Lq: int) -> Selection:
    """A Selection from the dict of ``_core.predict`` / ``_core.sparse_attention``."""
    nb = res["num_bounds"]
    return Selection(
        offsets=res["offsets"], starts=res["starts"], ends=res["ends"],
        block_size=config.block_size, batch=batch, groups=res["select_groups"],
        num_blocks=-(-Lq // config.block_size), granularity=config.granularity,
        boundaries=[res["bounds"][i, :nb[i]].copy() for i in range(len(nb))],
        chunk_groups=res["chunk_groups"], chunk_scores=res["chunk_scores"],
        pairs_selected=res["pairs_selected"], pairs_allowed=res["pairs_allowed"])


def predict_selection(q: np.ndarray, k: np.ndarray, config: Optional[DHSAConfig] = None, *,
                      causal: bool = True, scale: Optional[float] = None,
                      window: Optional[int] = None, boundaries: Boundaries = None,
                      return_scores: bool = False, softcap: Optional[float] = None,
                      num_threads: Optional[int] = None,
                      boundary_model: Optional[np.ndarray] = None) -> Selection:
    """The DHSA prediction alone: chunk the keys, score chunks per query
    block, and select each block's key ranges under the budget.

    ``config.method`` picks a baseline instead (see :class:`DHSAConfig`);
    ``softcap`` matters only to the baselines that look at true attention
    (``"vertical_slash"``, ``"oracle"``).

    ``boundaries`` overrides the chunking: one 1-D array of bounds
    (0 = b0 < ... < bN = Lk) for every chunking group, or one per (batch,
    chunk group). ``return_scores=True`` also fills ``chunk_scores``
    (groups, blocks, chunks; NaN for chunks that start after the block's last
    allowed key; chunks inside the sink or local window are scored too, though
    always kept) - meant for inspection of short inputs.

    ``boundary_model`` replaces the cosine boundary scores of dynamic chunking
    by a learned linear score (fitted by ``python -m dhsa calibrate``, see
    :meth:`dhsa.Calibration.boundary_model_for`): a float64 array of one row
    per chunking group, ``2 * heads * D + 6`` long (heads = keys heads per
    group: 1, or Hkv for ``granularity="layer"``); each row carries its own
    scan threshold. It reads the same keys as the cosine, so the chunking
    stays as causal.
    """
    config = _check_config(config)
    _check_boundary_model(config, boundary_model)
    if config.method in _BASELINES:
        return _baseline_selection(q, k, config, causal=causal, scale=scale, softcap=softcap,
                                   window=window, num_threads=num_threads)
    # the core checks q and k (types, shapes, values): q is a valid array after it
    res = _core.predict(q, k, config, causal=bool(causal), scale=scale, window=window,
                        boundaries=boundaries, return_scores=bool(return_scores),
                        num_threads=num_threads, boundary_model=boundary_model)
    return _selection(res, config, q.shape[0], q.shape[2])


def _check_boundary_model(config: DHSAConfig, boundary_model) -> None:
    """A boundary model belongs to DHSA's own dynamic chunking (the core
    checks its shape and values)."""
    if boundary_model is not None and config.method in _BASELINES:
        raise ValueError(f"boundary_model feeds DHSA's chunking; config.method "
                         f"{config.method!r} does not chunk the keys")


def _baseline_selection(q, k, config: DHSAConfig, *, causal, scale, softcap, window,
                        num_threads=None) -> Selection:
    from .baselines import baseline_ranges

    # the same argument checks and input scan as every core call
    _core.check_inputs(q, k, causal=bool(causal), scale=scale, softcap=softcap, window=window,
                       num_threads=num_threads)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    offsets, starts, ends, groups = baseline_ranges(
        config.method, np.asarray(q, dtype=np.float32), np.asarray(k, dtype=np.float32), config,
        causal=bool(causal), scale=scale, softcap=softcap, window=window)
    bs = min(config.block_size, Lq)
    sel_, all_ = _core.count_pairs(offsets, starts, ends, block_size=bs, B=B, H=H, Hkv=Hkv,
                                   Lq=Lq, Lk=Lk, causal=bool(causal), window=window,
                                   num_threads=num_threads)
    return Selection(offsets=offsets, starts=starts, ends=ends, block_size=bs, batch=B,
                     groups=groups, num_blocks=-(-Lq // bs), granularity=config.granularity,
                     boundaries=None, chunk_groups=0, pairs_selected=sel_, pairs_allowed=all_)


def sparse_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     config: Optional[DHSAConfig] = None, *, causal: bool = True,
                     scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None, num_threads: Optional[int] = None,
                     return_info: bool = False, boundaries: Boundaries = None,
                     selection: Optional[Selection] = None,
                     boundary_model: Optional[np.ndarray] = None, cache=None):
    """DHSA attention: predict each query block's keys, attend only to them.

    Same shapes, dtypes and options as :func:`dense_attention`. A
    ``selection`` (from :func:`predict_selection` or built by hand) skips the
    prediction. With ``return_info=True`` returns ``(out, AttentionInfo)``
    holding the chunk boundaries, the per-block ranges, the achieved density
    (selected / allowed pairs) and the time of each stage. ``boundaries`` and
    ``boundary_model`` are those of :func:`predict_selection`.

    With a :class:`dhsa.KVCache` as ``cache``, k and v are the keys of the
    new positions: they are appended to the cache first, and q (the last
    Lq positions) attends over everything it holds, chunked by the cache
    (its bounds over all keys are the ones this prediction would compute, so
    the output is that of the same call without a cache on the whole
    sequence). The config must chunk as ``cache.config`` does.
    """
    config = _check_config(config)
    if cache is not None:
        k, v, boundaries = _through_cache(cache, config, k, v, boundaries, boundary_model,
                                          selection, num_threads)
    _check_boundary_model(config, boundary_model)
    if selection is not None and boundary_model is not None:
        raise TypeError("boundary_model feeds the prediction; a given selection skips it")
    opts = dict(causal=bool(causal), scale=scale, softcap=softcap, window=window,
                num_threads=num_threads, return_info=bool(return_info))
    predict_seconds = 0.0
    if selection is None and config.method not in _BASELINES:
        # prediction and attention in one core call, q, k, v scanned once
        res = _core.sparse_attention(q, k, v, config=config, boundaries=boundaries,
                                     boundary_model=boundary_model, **opts)
        if not return_info:
            return res
        out, d = res
        return out, AttentionInfo(selection=_selection(d, config, q.shape[0], q.shape[2]),
                                  predict_seconds=d["predict_seconds"],
                                  attention_seconds=d["attention_seconds"])
    if selection is None:
        t0 = time.perf_counter()
        selection = predict_selection(q, k, config, causal=causal, scale=scale, window=window,
                                      softcap=softcap, num_threads=num_threads)
        predict_seconds = time.perf_counter() - t0
    elif not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection, got {type(selection).__name__}")
    res = _core.sparse_attention(q, k, v, offsets=selection.offsets, starts=selection.starts,
                                 ends=selection.ends, block_size=selection.block_size, **opts)
    if not return_info:
        return res
    out, d = res
    # pair counts under this call's masks, in a new Selection: the caller's object is
    # never changed, and counts it carries from other options never reach the info
    selection = dataclasses.replace(selection, pairs_selected=d["pairs_selected"],
                                    pairs_allowed=d["pairs_allowed"])
    return out, AttentionInfo(selection=selection, predict_seconds=predict_seconds,
                              attention_seconds=d["attention_seconds"])


def _through_cache(cache, config: DHSAConfig, k, v, boundaries, boundary_model, selection,
                   num_threads):
    """Append k, v to the cache; the whole sequence and the cache's bounds."""
    from .decode import CHUNKING_FIELDS, KVCache

    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a dhsa.KVCache, got {type(cache).__name__}")
    if boundaries is not None or boundary_model is not None or selection is not None:
        raise TypeError("a cache chunks the keys itself: give no boundaries, boundary_model "
                        "or selection with it")
    differ = [f for f in CHUNKING_FIELDS if getattr(config, f) != getattr(cache.config, f)]
    if differ:
        raise ValueError(f"config chunks differently from cache.config ({', '.join(differ)})")
    before = len(cache)
    cache.append(k, v, num_threads=num_threads)
    if before:
        k, v = cache.keys(), cache.values()
    bounds, nb = cache.prefill_boundaries()
    return k, v, [bounds[i, :nb[i]] for i in range(len(nb))]


def build_info() -> dict:
    """How the core was built and what it runs on (SIMD path, BLAS, threads)."""
    return dict(_core.build_info())


def force_scalar(enabled: bool = True) -> None:
    """Route the vectorised row kernels (softmax max / exp-sum, softcap,
    scaling, float16 widening) to their plain scalar twins, for comparison.

    The tile matrix products (S = Q K^T, O += P V) do not go to their scalar
    twins under it: with the vector tile kernels off they run through
    OpenBLAS sgemm (``_core.tile_path("scalar")`` selects the scalar tile
    kernels). ``build_info()["simd_path"]`` reports "scalar" meanwhile."""
    _core.force_scalar(bool(enabled))
