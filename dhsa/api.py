"""The public NumPy API: dense and sparse attention, the DHSA prediction."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

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

_GRAN_CODE = {"layer": 0, "kv_head": 1, "query_head": 2}
_MODE_CODE = {"tokens": 0, "density": 1, "adaptive": 2}

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
        from .reference import selection_mask
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
    return config


def _shape_of(name: str, x) -> Tuple[int, ...]:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (batch, heads, length, head_dim), "
                         f"got {x.ndim}")
    return x.shape


def _bounds_arrays(boundaries: Boundaries, n_groups: int, Lk: int) -> Tuple[np.ndarray, np.ndarray]:
    """Caller boundaries -> padded (n_groups, Lk + 1) array and counts."""
    if isinstance(boundaries, np.ndarray) and boundaries.ndim == 1:
        rows = [boundaries] * n_groups
    else:
        try:
            rows = list(boundaries)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("boundaries must be a 1-D integer array or a sequence of them") from None
        if len(rows) != n_groups:
            raise ValueError(f"boundaries must give {n_groups} arrays (batch x chunk groups), "
                             f"got {len(rows)}")
    out = np.zeros((n_groups, Lk + 1), dtype=np.int64)
    counts = np.zeros(n_groups, dtype=np.int64)
    for i, r in enumerate(rows):
        r = np.asarray(r)
        if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
            raise TypeError("boundaries must hold 1-D integer arrays")
        if len(r) < 2 or len(r) > Lk + 1 or r[0] != 0 or r[-1] != Lk or np.any(np.diff(r) <= 0):
            raise ValueError(f"boundaries[{i}] must rise strictly from 0 to Lk={Lk}")
        out[i, :len(r)] = r
        counts[i] = len(r)
    return out, counts


def predict_selection(q: np.ndarray, k: np.ndarray, config: Optional[DHSAConfig] = None, *,
                      causal: bool = True, scale: Optional[float] = None,
                      window: Optional[int] = None, boundaries: Boundaries = None,
                      return_scores: bool = False, softcap: Optional[float] = None,
                      num_threads: Optional[int] = None) -> Selection:
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
    """
    config = _check_config(config)
    qs, ks = _shape_of("q", q), _shape_of("k", k)
    B, H, Lq, _ = qs
    Hkv, Lk = ks[1], ks[2]
    if config.method in ("streaming", "vertical_slash", "oracle"):
        return _baseline_selection(q, k, config, causal=causal, scale=scale, softcap=softcap,
                                   window=window, num_threads=num_threads)
    n_cg = B * (1 if config.granularity == "layer" else max(1, Hkv))
    key_norm = config.key_norm
    if config.method == "block_topk":
        key_norm = 1.0  # mean-pooled blocks
        if boundaries is None:
            boundaries = np.append(np.arange(0, Lk, config.chunk_size), Lk).astype(np.int64)
    if boundaries is None and config.chunking == "fixed":
        boundaries = np.append(np.arange(0, Lk, config.chunk_size), Lk).astype(np.int64)
    bounds = num_bounds = None
    if boundaries is not None:
        bounds, num_bounds = _bounds_arrays(boundaries, n_cg, Lk)
    res = _core.predict(
        q, k, causal=bool(causal), scale=scale, window=window,
        granularity=_GRAN_CODE[config.granularity], block_size=config.block_size,
        sink=config.sink, local=config.local, mode=_MODE_CODE[config.budget_mode],
        budget=config.budget, density=config.density, mass=config.mass,
        min_budget=config.min_budget, max_budget=config.max_budget,
        boundary_window=config.boundary_window, threshold=config.threshold,
        min_len=config.min_chunk, max_len=config.max_chunk, nms_radius=config.nms_radius,
        max_chunks=config.max_chunks or 0, bounds=bounds, num_bounds=num_bounds,
        return_scores=bool(return_scores), num_threads=num_threads, key_norm=key_norm)
    nb = res["num_bounds"]
    return Selection(
        offsets=res["offsets"], starts=res["starts"], ends=res["ends"],
        block_size=config.block_size, batch=B, groups=res["select_groups"],
        num_blocks=-(-Lq // config.block_size), granularity=config.granularity,
        boundaries=[res["bounds"][i, :nb[i]].copy() for i in range(len(nb))],
        chunk_groups=res["chunk_groups"], chunk_scores=res["chunk_scores"],
        pairs_selected=res["pairs_selected"], pairs_allowed=res["pairs_allowed"])


def _baseline_selection(q, k, config: DHSAConfig, *, causal, scale, softcap, window,
                        num_threads=None) -> Selection:
    from .baselines import baseline_ranges

    # the C wrapper validates tensors and options: a trivial prediction (one
    # dense block, O(L * D)) makes bad input fail the same way for every method
    _core.predict(q, k, causal=bool(causal), scale=scale, window=window, granularity=0,
                  block_size=q.shape[2], sink=0, local=0, mode=0, budget=k.shape[2],
                  density=1.0, mass=1.0, min_budget=1, max_budget=1, boundary_window=1,
                  threshold=0.0, min_len=1, max_len=1, nms_radius=0, max_chunks=0)
    if softcap is not None:
        _core.dense_attention(q[:1, :1, :1, :1], k[:1, :1, :1, :1], k[:1, :1, :1, :1],
                              softcap=softcap)
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
                     selection: Optional[Selection] = None):
    """DHSA attention: predict each query block's keys, attend only to them.

    Same shapes, dtypes and options as :func:`dense_attention`. A
    ``selection`` (from :func:`predict_selection` or built by hand) skips the
    prediction. With ``return_info=True`` returns ``(out, AttentionInfo)``
    holding the chunk boundaries, the per-block ranges, the achieved density
    (selected / allowed pairs) and the time of each stage.
    """
    config = _check_config(config)
    t0 = time.perf_counter()
    if selection is None:
        selection = predict_selection(q, k, config, causal=causal, scale=scale, window=window,
                                      boundaries=boundaries, softcap=softcap,
                                      num_threads=num_threads)
    elif not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection, got {type(selection).__name__}")
    t1 = time.perf_counter()
    out = _core.sparse_attention(q, k, v, selection.offsets, selection.starts, selection.ends,
                                 selection.block_size, causal=bool(causal), scale=scale,
                                 softcap=softcap, window=window, num_threads=num_threads)
    t2 = time.perf_counter()
    if not return_info:
        return out
    if selection.pairs_selected is None:
        qs, ks = q.shape, k.shape
        selection.pairs_selected, selection.pairs_allowed = _core.count_pairs(
            selection.offsets, selection.starts, selection.ends,
            block_size=selection.block_size, B=qs[0], H=qs[1], Hkv=ks[1], Lq=qs[2], Lk=ks[2],
            causal=bool(causal), window=window, num_threads=num_threads)
    return out, AttentionInfo(selection=selection, predict_seconds=t1 - t0,
                              attention_seconds=t2 - t1)


def build_info() -> dict:
    """How the core was built and what it runs on (SIMD path, BLAS, threads)."""
    return dict(_core.build_info())


def force_scalar(enabled: bool = True) -> None:
    """Route every vectorised kernel to its plain scalar twin (for comparison)."""
    _core.force_scalar(bool(enabled))
