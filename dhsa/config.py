"""DHSAConfig: every knob of the prediction and the sparse kernel, validated."""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["DHSAConfig", "GRANULARITIES", "BUDGET_MODES", "CHUNKINGS", "METHODS",
           "NORMALIZATIONS", "CHUNK_SCORES", "DECODE_SCORES"]

GRANULARITIES = ("layer", "kv_head", "query_head")
BUDGET_MODES = ("tokens", "density", "adaptive")
CHUNKINGS = ("dynamic", "fixed")
METHODS = ("dhsa", "block_topk", "streaming", "vertical_slash", "oracle")
NORMALIZATIONS = {"sqrt": 0.5, "mean": 1.0, "sum": 0.0}
CHUNK_SCORES = ("mean", "max")
DECODE_SCORES = ("mean", "bounds", "moments")


def _int(name: str, value, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"DHSAConfig.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"DHSAConfig.{name} must be >= {minimum}, got {value}")


def _float(name: str, value, lo: float, hi: float, lo_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"DHSAConfig.{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (v > lo if lo_open else v >= lo) or not v <= hi:
        bracket = "(" if lo_open else "["
        raise ValueError(f"DHSAConfig.{name} must be in {bracket}{lo}, {hi}], got {value}")


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"DHSAConfig.{name} must be one of {options}, got {value!r}")


@dataclass(frozen=True)
class DHSAConfig:
    """Configuration of Dynamic Hierarchical Sparse Attention.

    Budget (per query block of ``block_size`` queries), always counting the
    ``sink`` first keys, the ``local`` keys right before the block and the
    block's own keys:

    - ``budget_mode="tokens"``: ``budget`` keys per block;
    - ``budget_mode="density"``: ``density`` x the block's allowed keys;
    - ``budget_mode="adaptive"``: the fewest best chunks whose estimated
      attention mass reaches ``mass``, clamped to [min_budget, max_budget].

    Blocks that may see no more keys than their budget run densely, and so do
    the blocks holding the last ``dense_tail`` queries of a call (0: none):
    the question at the end of a prompt then reads every key, at a cost of
    about ``dense_tail`` x Lk pairs (the authors' code uses 64). In a model the
    tail is the end of each prefill call; a call of at most ``dense_tail``
    queries runs dense.

    Chunking of the keys: ``chunking="dynamic"`` places boundaries where the
    mean key of the ``boundary_window`` keys after a position departs from
    the mean of those before it (score = 1 - cosine of the two, centred,
    >= ``threshold``, a local maximum within ``nms_radius``), with chunks of
    ``min_chunk`` to ``max_chunk`` keys (the last chunk may be shorter) and at most ``max_chunks`` chunks (once ``max_chunks`` - 1 boundaries are placed, the last chunk takes the rest);
    ``chunking="fixed"`` cuts every ``chunk_size`` keys.

    ``granularity``: one selection per layer (heads averaged), per KV head
    (shared by its query heads) or per query head. ``normalization``: how a
    key chunk is represented, sum / n ** 0.5 (``"sqrt"``, DHSA), the plain
    ``"mean"`` or the ``"sum"``.

    ``chunk_score``: how a chunk (or a clipped piece of one) is scored for a
    query block: ``"mean"``, the product r_q . r_k of the two
    representations (the paper's), or ``"max"``, the largest r_q . k_j over
    the piece's keys k_j (head-averaged, like r_k) - a second, key-level
    look at the candidates: a single key the block points at lifts its
    chunk, where a mean dilutes it among its neighbours. ``"max"`` costs one
    product of the block representations with every key (Lk / block_size x
    the work of one query row over the keys) and works with the tokens and
    density budgets (the adaptive one estimates mass from mean scores).

    ``method`` picks the selection rule; every one produces the same ranges
    for the same kernel, at the same budget, sink and local rules:
    ``"dhsa"`` (this method), ``"block_topk"`` (fixed blocks of
    ``chunk_size`` keys, mean-pooled scores), ``"streaming"`` (sink + a
    local window filling the budget), ``"vertical_slash"`` (key columns and
    diagonals estimated from the last ``last_queries`` queries, as in
    MInference) and ``"oracle"`` (the keys with the most true attention
    mass; O(L^2), for short inputs and as an upper bound).

    ``calibration``: a file written by ``python -m dhsa calibrate`` (or a
    :class:`dhsa.Calibration`): density multipliers per layer and KV head
    fitted from the model's own attention, and layers kept exact. It needs
    ``budget_mode="density"`` and applies where the layer is known:
    :func:`dhsa.patch` runs each KV head of a layer at its own density
    (``Calibration.config_for``) and, where the file holds learned boundary
    models, chunks each KV head with its own (``Calibration.boundary_model_for``;
    they need dynamic chunking, a per-head granularity and the
    ``boundary_window`` they were fitted with); the NumPy functions refuse a config that
    carries one (they do not know the layer).

    ``decode_budget``: the keys one decode step reads from a
    :class:`dhsa.KVCache` (:func:`dhsa.decode_attention`): the ``sink`` first
    keys, the ``local`` last ones, the cache's open chunk (keys after its last
    committed boundary) and then its best closed chunks by r_q . r_k, until
    ``decode_budget`` keys. None (the default) keeps decode exact - every
    cached key. ``decode_reuse``: the decode steps one set of chunk scores
    serves (1, the default: every step scores the chunks anew; N: the scores
    of a step serve the next N - 1 single-query steps too, unless a chunk
    closes meanwhile; sink, local, the open chunk and the budget are applied
    anew every step). ``decode_score``: how a decode step scores a closed
    chunk for its query r_q: ``"mean"`` (the default), r_q . r_c as in the prefill,
    ``"bounds"``, sum_d max(r_q[d] lo[d], r_q[d] hi[d]) over the per-dimension
    min and max of the chunk's (head-mean) keys - the largest r_q . k any key
    of the chunk could reach, as Quest scores its pages: one outlying key
    lifts its chunk, where a mean dilutes it; or ``"moments"``, scale r_q .
    mu + scale^2 / 2 sum_d r_q[d]^2 var[d] over the per-dimension mean and
    variance of the chunk's keys - the log of the attention weight exp(scale
    r_q . k) one of its keys can expect were they normal: the weight per key
    that a token budget buys, where "mean"'s sum / sqrt(n) favours long
    chunks. Both keep 2 x D floats more per chunk in the cache. Measured
    (README, "Sparse decode"): "moments" keeps the most attention mass and
    the lowest perplexity, "mean" answers retrieval best.

    This class is the one place where the meaning of the options is checked
    (``__post_init__``). The C core reads the fields by these names
    (``dhsa._core`` converts a config into its ``dhsa_predict_params``, the
    string fields matched by name; ``max_chunks=None`` is no cap) and refuses
    only values unsafe for it. ``"dhsa"`` and ``"block_topk"`` run in C; the
    other methods are NumPy code (:mod:`dhsa.baselines`).
    """

    budget: int = 2048
    block_size: int = 64
    sink: int = 64
    local: int = 256
    budget_mode: str = "tokens"
    density: float = 0.125
    mass: float = 0.95
    min_budget: int = 512
    max_budget: int = 4096
    granularity: str = "kv_head"
    chunking: str = "dynamic"
    chunk_size: int = 32
    boundary_window: int = 16
    threshold: float = 0.2
    min_chunk: int = 4
    max_chunk: int = 16
    nms_radius: int = 4
    max_chunks: Optional[int] = None
    normalization: str = "sqrt"
    method: str = "dhsa"
    last_queries: int = 64
    dense_tail: int = 0
    chunk_score: str = "mean"
    decode_budget: Optional[int] = None
    decode_reuse: int = 1
    decode_score: str = "mean"
    calibration: Optional[Union[str, "os.PathLike", "Calibration"]] = None

    def __post_init__(self) -> None:
        if self.calibration is not None:
            from .calibration import Calibration, load_calibration
            if isinstance(self.calibration, (str, os.PathLike)):
                object.__setattr__(self, "calibration", load_calibration(self.calibration))
            elif not isinstance(self.calibration, Calibration):
                raise TypeError("DHSAConfig.calibration must be a file path, a "
                                f"dhsa.Calibration or None, got {type(self.calibration).__name__}")
            if self.budget_mode != "density":
                raise ValueError("DHSAConfig.calibration scales density budgets: it needs "
                                 f"budget_mode='density', got {self.budget_mode!r}")
        _choice("method", self.method, METHODS)
        _choice("normalization", self.normalization, tuple(NORMALIZATIONS))
        _int("last_queries", self.last_queries, 1)
        _int("dense_tail", self.dense_tail, 0)
        _choice("chunk_score", self.chunk_score, CHUNK_SCORES)
        if self.chunk_score == "max" and self.budget_mode == "adaptive":
            raise ValueError("DHSAConfig.chunk_score='max' needs budget_mode 'tokens' or "
                             "'density': the adaptive budget estimates mass from mean scores")
        _int("budget", self.budget, 1)
        _int("block_size", self.block_size, 1)
        if self.block_size > 4096:
            raise ValueError(f"DHSAConfig.block_size must be <= 4096, got {self.block_size}")
        _int("sink", self.sink, 0)
        _int("local", self.local, 0)
        _choice("budget_mode", self.budget_mode, BUDGET_MODES)
        _float("density", self.density, 0.0, 1.0)
        _float("mass", self.mass, 0.0, 1.0)
        _int("min_budget", self.min_budget, 1)
        _int("max_budget", self.max_budget, 1)
        if self.max_budget < self.min_budget:
            raise ValueError(
                f"DHSAConfig.max_budget ({self.max_budget}) must be >= min_budget ({self.min_budget})")
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("chunking", self.chunking, CHUNKINGS)
        _int("chunk_size", self.chunk_size, 1)
        _int("boundary_window", self.boundary_window, 1)
        _float("threshold", self.threshold, 0.0, 2.0, lo_open=False)
        _int("min_chunk", self.min_chunk, 1)
        _int("max_chunk", self.max_chunk, 1)
        if self.max_chunk < self.min_chunk:
            raise ValueError(
                f"DHSAConfig.max_chunk ({self.max_chunk}) must be >= min_chunk ({self.min_chunk})")
        _int("nms_radius", self.nms_radius, 0)
        _int("max_chunks", self.max_chunks, 1, optional=True)
        _int("decode_budget", self.decode_budget, 1, optional=True)
        _int("decode_reuse", self.decode_reuse, 1)
        _choice("decode_score", self.decode_score, DECODE_SCORES)
        if self.decode_budget is not None and self.decode_budget < self.sink + self.local + 1:
            raise ValueError(
                f"DHSAConfig.decode_budget ({self.decode_budget}) must be >= sink + local + 1 "
                f"({self.sink + self.local + 1}): those keys are always kept")
        fixed = self.sink + self.local + self.block_size
        if self.budget_mode == "tokens" and self.budget < fixed:
            raise ValueError(
                f"DHSAConfig.budget ({self.budget}) must be >= sink + local + block_size ({fixed}): "
                "those keys are always kept")
        if self.method == "dhsa" and self.chunking == "dynamic" and self.local < self.lookahead:
            raise ValueError(
                f"DHSAConfig.local ({self.local}) must be >= boundary_window + nms_radius "
                f"({self.lookahead}) so that no key after a query decides its selection")
        if self.calibration is not None:
            self.calibration.check_config(self)  # learned boundaries fit this chunking

    @property
    def lookahead(self) -> int:
        """Keys past a position that dynamic chunking reads to place a boundary there."""
        return self.boundary_window + self.nms_radius

    @property
    def key_norm(self) -> float:
        """Exponent of the key chunk length in r_k = sum / n ** key_norm."""
        return NORMALIZATIONS[self.normalization]

    def replace(self, **changes) -> "DHSAConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
