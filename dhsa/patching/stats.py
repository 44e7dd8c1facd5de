"""Statistics of the patched attention: one :class:`CallRecord` per call,
the accumulator a call fills while it runs (:class:`CallStats`), and the
per-layer summaries a :class:`~dhsa.patching.PatchHandle` reports."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set

import numpy as np

from ..api import Selection
from ..rules import allowed_pairs

__all__ = ["PATHS", "CallRecord", "CallStats", "summarize", "mean_density", "format_summary"]

PATHS = ("sparse", "dense", "decode", "fallback")


@dataclass
class CallRecord:
    """One call of the attention function (one layer, one forward).

    ``density``: selected / causally allowed query-key pairs (1.0 for dense
    paths), weighted over batch items. Times in seconds: ``predict_seconds``
    (chunking + selection), ``attention_seconds`` (the kernels),
    ``total_seconds`` (the whole call, conversions and mask analysis included).
    ``reason`` says why a dense path was taken, or how the keys were read
    (e.g. ``"empty static cache slots"``).
    """

    layer: Optional[int]
    module: str
    path: str
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    density: float
    predict_seconds: float
    attention_seconds: float
    total_seconds: float
    window: Optional[int] = None
    softcap: Optional[float] = None
    padded: bool = False
    reason: str = ""
    selection: Optional[Selection] = None

    @property
    def key(self):
        return self.layer if self.layer is not None else self.module


@dataclass
class CallStats:
    """What the batch items of one call did, summed while the call runs."""

    keep_selection: bool = False
    predict: float = 0.0
    attention: float = 0.0
    selected: float = 0.0     # allowed pairs x density, summed over items
    allowed: float = 0.0      # allowed pairs, summed over items
    paths: Set[str] = field(default_factory=set)
    reasons: Set[str] = field(default_factory=set)
    selection: Optional[Selection] = None

    def item_pairs(self, batch: int, nq: int, nk: int, window: Optional[int]) -> float:
        """Count the allowed pairs of ``batch`` items of nq last queries over nk keys."""
        weight = float(allowed_pairs(nq, nk, True, window)) * batch
        self.allowed += weight
        return weight

    def dense(self, path: str, reason: str, weight: float, seconds: float) -> None:
        self.paths.add(path)
        self.reasons.add(reason)
        self.attention += seconds
        self.selected += weight

    def sparse(self, weight: float, info) -> None:
        self.paths.add("sparse")
        self.predict += info.predict_seconds
        self.attention += info.attention_seconds
        self.selected += weight * info.density
        if self.keep_selection and self.selection is None:
            self.selection = info.selection

    def path(self, Lq: int) -> str:
        for p in ("sparse", "dense", "decode"):
            if p in self.paths:
                return p
        return "dense" if Lq > 1 else "decode"

    @property
    def density(self) -> float:
        return self.selected / self.allowed if self.allowed > 0 else 1.0


def summarize(records: Iterable[CallRecord]) -> Dict[Any, Dict[str, Any]]:
    """Per layer (layer_idx or module name): ``calls``, calls per path,
    ``mean_density`` over prefill calls (sparse and dense; None if only
    decode calls), ``mean_sparse_density`` over sparse calls, summed
    ``predict_seconds`` / ``attention_seconds`` / ``total_seconds``."""
    out: Dict[Any, Dict[str, Any]] = {}
    for rec in records:
        s = out.setdefault(rec.key, {"calls": 0, **{p: 0 for p in PATHS},
                                     "_d": [], "_sd": [], "predict_seconds": 0.0,
                                     "attention_seconds": 0.0, "total_seconds": 0.0})
        s["calls"] += 1
        s[rec.path] += 1
        if rec.path != "decode":
            s["_d"].append(rec.density)
        if rec.path == "sparse":
            s["_sd"].append(rec.density)
        s["predict_seconds"] += rec.predict_seconds
        s["attention_seconds"] += rec.attention_seconds
        s["total_seconds"] += rec.total_seconds
    for s in out.values():
        d, sd = s.pop("_d"), s.pop("_sd")
        s["mean_density"] = float(np.mean(d)) if d else None
        s["mean_sparse_density"] = float(np.mean(sd)) if sd else None
    return out


def mean_density(records: Iterable[CallRecord], include_dense: bool = True) -> Optional[float]:
    """Mean density over prefill records (sparse only if not include_dense)."""
    d = [r.density for r in records
         if r.path == "sparse" or (include_dense and r.path in ("dense", "fallback"))]
    return float(np.mean(d)) if d else None


def format_summary(summary: Dict[Any, Dict[str, Any]]) -> str:
    """A :func:`summarize` result as a text table."""
    lines: List[str] = [f"{'layer':>8} {'calls':>5} {'sparse':>6} {'dense':>5} {'decode':>6} "
                        f"{'fallbk':>6} {'density':>8} {'predict_s':>9} {'attn_s':>8}"]
    for key, s in summary.items():
        dens = "-" if s["mean_density"] is None else f"{s['mean_density']:.3f}"
        lines.append(f"{str(key):>8} {s['calls']:>5} {s['sparse']:>6} {s['dense']:>5} "
                     f"{s['decode']:>6} {s['fallback']:>6} {dens:>8} "
                     f"{s['predict_seconds']:>9.4f} {s['attention_seconds']:>8.4f}")
    sparse = [key for key, s in summary.items() if s["sparse"]]
    if sparse:
        d = [s["mean_sparse_density"] for s in summary.values() if s["sparse"]]
        lines.append(f"sparse path in {len(sparse)} of {len(summary)} layers "
                     f"({', '.join(map(str, sparse))}); mean density over their sparse calls "
                     f"{float(np.mean(d)):.3f}")
    else:
        lines.append(f"sparse path in none of the {len(summary)} layers")
    return "\n".join(lines)
