"""Sparse decode: a KV cache that chunks its keys as they arrive, and
attention of the newest queries over it.

::

    cache = dhsa.KVCache(dhsa.DHSAConfig(decode_budget=2048), num_kv_heads=3, head_dim=64)
    out = dhsa.sparse_attention(q, k, v, config, cache=cache)   # prefill fills it
    cache.append(k_new, v_new)                                  # (B, Hkv, 1, D)
    out = dhsa.decode_attention(q_new, cache)                   # (B, H, 1, D)

The chunking is the prefill's (:func:`dhsa.predict_selection`): the cache
commits a boundary once the keys it looks ahead at have arrived, so its
closed chunks are those of the prefill over the same keys, however they were
appended, and the keys after the last committed boundary (a few dozen) form
its open chunk, which every decode step keeps. A decode step reads the
``sink`` first keys, the ``local`` last ones, the open chunk and then the
closed chunks whose representation scores best against the step's queries,
until ``config.decode_budget`` keys (None: every key, exact decode).
With ``config.decode_reuse`` N > 1 the chunk scores of a step serve the next
N - 1 steps while no chunk closes (kept in the cache; dropped by ``crop`` and
``reorder``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ._loader import _core
from .config import DHSAConfig

__all__ = ["KVCache", "DecodeInfo", "decode_attention", "CHUNKING_FIELDS"]

#: the DHSAConfig fields that decide a cache's chunks: a prefill through a
#: cache must agree with it on these
CHUNKING_FIELDS = ("method", "granularity", "chunking", "chunk_size", "boundary_window",
                   "threshold", "min_chunk", "max_chunk", "nms_radius", "normalization")

_DTYPES = {np.dtype(np.float32): False, np.dtype(np.float16): True}


class KVCache:
    """Keys and values of one attention layer, with DHSA's chunk state.

    ``config`` gives the chunking (``chunking``, ``boundary_window``,
    ``threshold``, ``min_chunk``, ``max_chunk``, ``nms_radius``,
    ``chunk_size``, ``normalization``, ``method``, ``granularity``) and the
    decode budget (``decode_budget``, ``sink``, ``local``). ``dtype`` is the
    storage: float32, or float16 (kept as float16, widened per tile).
    ``boundary_model`` is a learned boundary model as in
    :func:`dhsa.predict_selection` (one row per chunking group).

    The batch size is fixed by the first :meth:`append`. A cache serves one
    call at a time: a second thread calling into it meanwhile gets a
    RuntimeError.
    """

    def __init__(self, config: DHSAConfig, num_kv_heads: int, head_dim: int,
                 dtype=np.float32, *, boundary_model: Optional[np.ndarray] = None) -> None:
        if not isinstance(config, DHSAConfig):
            raise TypeError(f"config must be a DHSAConfig, got {type(config).__name__}")
        if config.method not in ("dhsa", "block_topk"):
            raise ValueError(f"KVCache chunks the keys: config.method must be 'dhsa' or "
                             f"'block_topk', got {config.method!r}")
        if config.max_chunks is not None:
            raise ValueError("KVCache needs config.max_chunks=None: a cap on chunks would "
                             "leave the open chunk growing without end")
        if config.calibration is not None:
            raise ValueError("config.calibration holds per-layer settings: give the layer's "
                             "own config (Calibration.config_for) and boundary_model")
        for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if head_dim > 256:
            raise ValueError(f"head_dim must be <= 256, got {head_dim}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float16, got {dtype!r}") from None
        if dt not in _DTYPES:
            raise TypeError(f"dtype must be float32 or float16, got {dt}")
        self.config = config
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.dtype = dt
        self._boundary_model = (None if boundary_model is None
                                else np.array(boundary_model, dtype=np.float64))
        self._c = None  # made by the first append, when the batch size is known
        # every option checked now, not at the first append (the batch size
        # plays no part in them)
        _core.KVCache(config, 1, self.num_kv_heads, self.head_dim, _DTYPES[dt],
                      boundary_model=self._boundary_model)

    # -- contents ------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self._c is None else self._c.length()

    @property
    def batch_size(self) -> Optional[int]:
        """Batch size, fixed by the first append (None before)."""
        return None if self._c is None else self._batch

    @property
    def chunk_groups(self) -> int:
        """Chunking groups per batch item: 1 for granularity "layer", else num_kv_heads."""
        return 1 if self.config.granularity == "layer" else self.num_kv_heads

    def append(self, k: np.ndarray, v: np.ndarray, *, num_threads: Optional[int] = None) -> None:
        """Append k and v, (B, Hkv, n, D) in the cache's dtype. NaN / Inf are
        refused with nothing appended."""
        if self._c is None:
            if not isinstance(k, np.ndarray) or k.ndim != 4 or k.shape[0] < 1:
                raise ValueError("k must be a 4-D array (batch, num_kv_heads, length, head_dim)")
            c = _core.KVCache(self.config, int(k.shape[0]), self.num_kv_heads, self.head_dim,
                              _DTYPES[self.dtype], boundary_model=self._boundary_model)
            c.append(k, v, num_threads=num_threads)
            self._c, self._batch = c, int(k.shape[0])
            return
        self._c.append(k, v, num_threads=num_threads)

    def keys(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """A copy of the keys at positions [start, stop), (B, Hkv, n, D)."""
        return self._read(start, stop)[0]

    def values(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """A copy of the values at positions [start, stop), (B, Hkv, n, D)."""
        return self._read(start, stop)[1]

    def _read(self, start: int, stop: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
        if self._c is None:
            raise ValueError("KVCache is empty")
        return self._c.read(int(start), len(self) if stop is None else int(stop))

    def chunk_bounds(self, b: int = 0, group: int = 0) -> np.ndarray:
        """Committed chunk bounds of chunking group ``group`` of batch item
        ``b``: 0 = b0 < ... < b_last, b_last the open chunk's start."""
        if self._c is None:
            return np.zeros(1, dtype=np.int64)
        if not (0 <= b < self._batch and 0 <= group < self.chunk_groups):
            raise IndexError(f"(b={b}, group={group}) out of range "
                             f"({self._batch}, {self.chunk_groups})")
        return self._c.chunks(b * self.chunk_groups + group)

    def prefill_boundaries(self) -> np.ndarray:
        """The bounds a prediction over every cached key uses, (B * CG, len + 1)
        with their counts: the committed ones, then the open chunk chunked as
        the whole-sequence scan does (shortened windows at the end)."""
        if self._c is None:
            raise ValueError("KVCache is empty")
        return self._c.prefill_bounds()

    def nbytes(self) -> dict:
        """Memory held: ``kv`` (the K/V storage, capacity included) and
        ``chunk_state`` (scores, bounds, representations, running sums)."""
        kv, state = (0, 0) if self._c is None else self._c.nbytes()
        return {"kv": kv, "chunk_state": state}

    # -- edits that follow a generation cache -------------------------------------
    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (assisted decoding, retries):
        the chunk state becomes that of a cache given only those."""
        if self._c is None:
            if length != 0:
                raise ValueError(f"length must be <= the cache's 0 keys, got {length}")
            return
        self._c.crop(length)

    def reorder(self, index) -> None:
        """Batch item i becomes item ``index[i]`` (beam search); the batch size
        becomes ``len(index)``."""
        if self._c is None:
            raise ValueError("KVCache is empty")
        idx = np.asarray(index)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError("index must be a 1-D array of ints")
        self._c.reorder(idx.astype(np.int64))
        self._batch = int(idx.shape[0])

    def reset(self) -> None:
        """Drop every key (a new sequence)."""
        self._c = None

    def __repr__(self) -> str:
        return (f"KVCache(length={len(self)}, batch={self.batch_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype.name}, decode_budget={self.config.decode_budget})")


class DecodeInfo:
    """What :func:`decode_attention` selected: ``ranges(b, g)`` (n, 2) key
    ranges of selection group g of batch item b, ``density`` (selected /
    visible pairs), the bounds it saw, and the time of each stage."""

    def __init__(self, d: dict, batch: int) -> None:
        self.offsets, self.starts, self.ends = d["offsets"], d["starts"], d["ends"]
        self.groups = int(d["select_groups"])
        self.batch = batch
        nb = d["num_bounds"]
        self.boundaries = [d["bounds"][i, :nb[i]].copy() for i in range(len(nb))]
        self.pairs_selected, self.pairs_allowed = d["pairs_selected"], d["pairs_allowed"]
        self.select_seconds = float(d["predict_seconds"])
        #: selection groups whose chunk scores came from an earlier step
        self.reused_groups = int(d.get("reused_groups", 0))
        self.attention_seconds = float(d["attention_seconds"])

    def ranges(self, b: int = 0, g: int = 0) -> np.ndarray:
        if not (0 <= b < self.batch and 0 <= g < self.groups):
            raise IndexError(f"(b={b}, g={g}) out of range ({self.batch}, {self.groups})")
        i = b * self.groups + g
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return np.stack([self.starts[lo:hi], self.ends[lo:hi]], axis=1).astype(np.int64)

    @property
    def keys_selected(self) -> np.ndarray:
        """Keys read per (batch, group) for the step's last query."""
        return np.array([int((r[:, 1] - r[:, 0]).sum()) for r in
                         (self.ranges(b, g) for b in range(self.batch)
                          for g in range(self.groups))])

    @property
    def density(self) -> float:
        return float(self.pairs_selected.sum() / max(1, self.pairs_allowed.sum()))


def decode_attention(q: np.ndarray, cache: KVCache, *, scale: Optional[float] = None,
                     softcap: Optional[float] = None, window: Optional[int] = None,
                     num_threads: Optional[int] = None, return_info: bool = False):
    """Attention of q (B, H, n, D), the queries of the cache's last n
    positions (append their keys first), over the cache: causal, GQA (H a
    multiple of the cache's KV heads), ``scale`` / ``softcap`` / ``window``
    as in :func:`dhsa.dense_attention`. With ``cache.config.decode_budget``
    None every visible key is read (exact); otherwise the selection of the
    module docstring, made once for the n queries together (with
    ``cache.config.decode_reuse`` N > 1, a one-query step reuses the chunk
    scores of the last N - 1 positions' steps while no chunk closed:
    ``DecodeInfo.reused_groups`` counts the groups that did). Returns the
    output in float16 when q and the cache are both float16, else float32,
    and a :class:`DecodeInfo` with ``return_info``."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a dhsa.KVCache, got {type(cache).__name__}")
    if cache._c is None:
        raise ValueError("cache is empty: append the keys of the queries' positions first")
    cfg = cache.config
    res = _core.decode_attention(q, cache._c, budget=cfg.decode_budget or 0, sink=cfg.sink,
                                 local=cfg.local, reuse=cfg.decode_reuse, scale=scale, softcap=softcap, window=window,
                                 num_threads=num_threads, return_info=bool(return_info))
    if not return_info:
        return res
    out, d = res
    return out, DecodeInfo(d, cache.batch_size)
