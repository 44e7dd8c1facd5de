"""Calibration: budgets per layer and KV head, fitted from a model's own attention.

Heads differ: some attend to the keys just before them, and every key past
the local window is wasted on them; others retrieve from anywhere and lose
mass at every key they do not get. A :class:`Calibration` holds, per layer
and KV head, a multiplier of the density budget, chosen offline so that the
average density stays at its target while the attention mass kept (recall)
is as high as a greedy allocation over measured recall curves finds
(:func:`allocate`, the one home of that rule). It also names layers that
stay exact.

It can also hold a learned boundary model per layer and KV head
(:mod:`dhsa.harness.boundaries`): a linear scorer of the keys around a
position that replaces the cosine score of dynamic chunking, fitted to
where the model's own attention changes.

It is applied where the layer is known - by :func:`dhsa.patch`, given
``DHSAConfig(calibration=FILE)`` - as one density-mode config per KV head
(:meth:`Calibration.config_for`). The file is small JSON, versioned and tied
to the model's shape (layers, query and KV heads, head size); a corrupt file
or one made for another model is refused with a ValueError naming what does
not match. ``python -m dhsa calibrate`` writes one
(:mod:`dhsa.harness.calibrate`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .rules import bmodel_len

__all__ = ["Calibration", "FORMAT", "READS", "VERSION", "allocate", "load_calibration"]

FORMAT = "dhsa-calibration"
VERSION = 2
#: versions this dhsa reads (1: budgets only; 2 adds learned boundaries)
READS = (1, 2)


def allocate(density: np.ndarray, recall: np.ndarray, target: float) -> np.ndarray:
    """Index of the budget step each head takes: (heads,) ints.

    ``density`` and ``recall`` are (heads, steps) curves measured at the same
    budget steps, each row non-decreasing in density (a step whose density is
    not higher than an earlier one is skipped). Every head starts at step 0;
    then, while the mean density stays at most ``target``, the head and step
    with the best recall gained per density spent is raised (ties: the lower
    head, then the lower step). Deterministic; the mean density of the result
    is <= target whenever the all-zeros start is."""
    density = np.asarray(density, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    if density.ndim != 2 or density.shape != recall.shape or density.shape[1] < 1:
        raise ValueError(f"density and recall must be (heads, steps) arrays of one shape, got "
                         f"{density.shape} and {recall.shape}")
    if not (np.isfinite(density).all() and np.isfinite(recall).all()):
        raise ValueError("density and recall curves must be finite")
    n, steps = density.shape
    idx = np.zeros(n, dtype=np.int64)
    spent = float(density[:, 0].sum())
    limit = target * n + 1e-12
    while True:
        best = None  # (gain per density, -head, -step)
        for h in range(n):
            j = idx[h]
            for j2 in range(j + 1, steps):
                cost = density[h, j2] - density[h, j]
                if cost <= 0.0 or spent + cost > limit:
                    continue
                gain = (recall[h, j2] - recall[h, j]) / cost
                key = (gain, -h, -j2)
                if best is None or key > best:
                    best = key
        if best is None:
            return idx
        h, j2 = -best[1], -best[2]
        spent += density[h, j2] - density[h, idx[h]]
        idx[h] = j2


@dataclass(frozen=True)
class Calibration:
    """Budgets per layer and KV head of one model (see the module docstring).

    ``scales[i]`` holds the density multipliers of layer ``layers[i]``, one
    per KV head; a layer not listed keeps the config's density. ``base`` is
    the DHSAConfig fields the curves were measured with: the multipliers
    scale that config's density, so use the calibration with it;
    ``target_density`` is the average achieved density the allocation kept
    (the uncalibrated config's); ``fit`` what the fit saw (text, length,
    recall before and after). ``boundary_models[i]`` holds the learned
    boundary model rows of layer ``boundary_layers[i]``, one per KV head
    (see :meth:`boundary_model_for`), fitted with ``boundary_window`` and
    ``boundary_nms_radius`` (the scan's: its thresholds were chosen with it)."""

    model: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    target_density: float
    layers: Tuple[int, ...]
    scales: Tuple[Tuple[float, ...], ...]
    dense_layers: Tuple[int, ...] = ()
    base: Tuple[Tuple[str, object], ...] = ()
    fit: Tuple[Tuple[str, object], ...] = field(default=(), compare=False)
    boundary_window: Optional[int] = None
    boundary_nms_radius: Optional[int] = None
    boundary_layers: Tuple[int, ...] = ()
    boundary_models: Tuple[Tuple[Tuple[float, ...], ...], ...] = ()

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"calibration {name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"calibration num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        t = self.target_density
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ValueError(f"calibration target_density must be in (0, 1], got {t!r}")
        if len(self.layers) != len(self.scales):
            raise ValueError(f"calibration has {len(self.layers)} layers but {len(self.scales)} "
                             "rows of scales")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("calibration layers repeat")
        for li, row in zip(self.layers, self.scales):
            if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < self.num_layers:
                raise ValueError(f"calibration layer {li!r} is not in [0, {self.num_layers})")
            if len(row) != self.num_kv_heads:
                raise ValueError(f"calibration layer {li} has {len(row)} KV-head scales, the "
                                 f"model has {self.num_kv_heads} KV heads")
            for s in row:
                if isinstance(s, bool) or not isinstance(s, (int, float)) or \
                        not (math.isfinite(s) and s > 0):
                    raise ValueError(f"calibration layer {li}: scales must be finite and > 0, "
                                     f"got {s!r}")
        for li in self.dense_layers:
            if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < self.num_layers:
                raise ValueError(f"calibration dense layer {li!r} is not in "
                                 f"[0, {self.num_layers})")
        self._check_boundaries()

    def _check_boundaries(self) -> None:
        if not self.boundary_layers and not self.boundary_models:
            return
        w = self.boundary_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"calibration boundary window must be a positive int, got {w!r}")
        r = self.boundary_nms_radius
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"calibration boundary nms_radius must be an int >= 0, got {r!r}")
        if len(self.boundary_layers) != len(self.boundary_models):
            raise ValueError(f"calibration has {len(self.boundary_layers)} boundary layers but "
                             f"{len(self.boundary_models)} boundary models")
        if len(set(self.boundary_layers)) != len(self.boundary_layers):
            raise ValueError("calibration boundary layers repeat")
        n = bmodel_len(self.head_dim)
        for li, rows in zip(self.boundary_layers, self.boundary_models):
            if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < self.num_layers:
                raise ValueError(f"calibration boundary layer {li!r} is not in "
                                 f"[0, {self.num_layers})")
            if len(rows) != self.num_kv_heads:
                raise ValueError(f"calibration layer {li} has {len(rows)} boundary models, the "
                                 f"model has {self.num_kv_heads} KV heads")
            for row in rows:
                if len(row) != n:
                    raise ValueError(f"calibration layer {li}: a boundary model has {len(row)} "
                                     f"values, head_dim {self.head_dim} needs {n}")
                if not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                           and math.isfinite(x) for x in row):
                    raise ValueError(f"calibration layer {li}: boundary models must hold "
                                     "finite numbers")

    # -- applying it ------------------------------------------------------------------
    def scales_of(self, layer: Optional[int]) -> Optional[Tuple[float, ...]]:
        """The KV-head multipliers of a layer, None where it has none."""
        if layer is None or layer not in self.layers:
            return None
        return self.scales[self.layers.index(layer)]

    def config_for(self, config, layer: Optional[int], kv_head: Optional[int] = None):
        """The plain DHSAConfig (no calibration) of one KV head of a layer, or
        of the whole layer (``kv_head=None``: the mean multiplier, for the
        "layer" granularity): density x multiplier, at most 1; where the layer
        has learned boundaries, also the ``boundary_window`` they read and the
        ``nms_radius`` their thresholds were chosen with."""
        cfg = self.chunking_for(config, layer)
        row = self.scales_of(layer)
        if row is None:
            return cfg
        s = float(np.mean(row)) if kv_head is None else float(row[kv_head])
        return cfg.replace(density=min(1.0, cfg.density * s))

    def boundary_model_for(self, layer: Optional[int],
                           kv_head: Optional[int] = None) -> Optional[np.ndarray]:
        """The learned boundary model of a layer for ``predict_selection`` /
        ``sparse_attention(boundary_model=...)``: (num_kv_heads, 2 D + 6)
        float64, or the one row (1, 2 D + 6) of ``kv_head``; None where the
        layer has none (it keeps the cosine scores)."""
        if layer is None or layer not in self.boundary_layers:
            return None
        rows = np.asarray(self.boundary_models[self.boundary_layers.index(layer)],
                          dtype=np.float64)
        return rows if kv_head is None else rows[kv_head:kv_head + 1].copy()

    def check_config(self, config) -> None:
        """ValueError where ``config`` cannot use this calibration's learned
        boundaries: they score dynamic chunks of one KV head with the feature
        window they were fitted with (which :meth:`config_for` sets)."""
        if not self.boundary_layers:
            return
        where = f"the calibration for {self.model!r} holds learned boundaries"
        if config.chunking != "dynamic":
            raise ValueError(f"{where}; they need chunking='dynamic', the config has "
                             f"{config.chunking!r}")
        if config.granularity == "layer":
            raise ValueError(f"{where} per KV head; granularity='layer' chunks all KV heads "
                             "together (use 'kv_head' or 'query_head')")

    def chunking_for(self, config, layer: Optional[int]):
        """``config`` without a calibration and, where the layer has learned
        boundaries, with the ``boundary_window`` and ``nms_radius`` they were
        fitted with (the budgets as given: :meth:`config_for` adds those)."""
        cfg = config.replace(calibration=None) if config.calibration is not None else config
        if layer is not None and layer in self.boundary_layers and \
                (cfg.boundary_window, cfg.nms_radius) != (self.boundary_window,
                                                          self.boundary_nms_radius):
            cfg = cfg.replace(boundary_window=self.boundary_window,
                              nms_radius=self.boundary_nms_radius)
        return cfg

    def check_shape(self, num_heads: int, num_kv_heads: int, head_dim: int,
                    layer: Optional[int] = None) -> None:
        """ValueError naming what differs between this calibration and a call."""
        got = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, v in got.items():
            if getattr(self, name) != v:
                raise ValueError(f"the calibration for {self.model!r} has {name}="
                                 f"{getattr(self, name)}, this attention call has {v}"
                                 + (f" (layer {layer})" if layer is not None else ""))
        if layer is not None and not 0 <= layer < self.num_layers:
            raise ValueError(f"the calibration for {self.model!r} has {self.num_layers} layers, "
                             f"this call is layer {layer}")

    # -- the file ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model,
                "shape": {"num_layers": self.num_layers, "num_heads": self.num_heads,
                          "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim},
                "target_density": self.target_density,
                "budgets": {str(li): list(row) for li, row in zip(self.layers, self.scales)},
                "dense_layers": list(self.dense_layers), "base": dict(self.base),
                "fit": dict(self.fit),
                "boundaries": {"window": self.boundary_window,
                               "nms_radius": self.boundary_nms_radius,
                               "models": {str(li): [list(r) for r in rows] for li, rows in
                                          zip(self.boundary_layers, self.boundary_models)}}}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "calibration") -> "Calibration":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: not a dhsa calibration (a JSON object expected)")
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: not a dhsa calibration (format {d.get('format')!r}, "
                             f"expected {FORMAT!r})")
        if d.get("version") not in READS:
            raise ValueError(f"{where}: calibration version {d.get('version')!r} is not "
                             f"supported (this dhsa reads versions "
                             f"{', '.join(map(str, READS))})")
        try:
            shape = d["shape"]
            budgets = d["budgets"]
            layers = tuple(int(k) for k in budgets)
            order = sorted(range(len(layers)), key=layers.__getitem__)
            rows = list(budgets.values())
            bd = d.get("boundaries") or {}
            models = bd.get("models") or {}
            blayers = tuple(int(k) for k in models)
            border = sorted(range(len(blayers)), key=blayers.__getitem__)
            brows = list(models.values())
            return cls(
                       boundary_window=bd.get("window") if models else None,
                       boundary_nms_radius=bd.get("nms_radius") if models else None,
                       boundary_layers=tuple(blayers[i] for i in border),
                       boundary_models=tuple(tuple(tuple(r) for r in brows[i]) for i in border),
model=str(d["model"]), num_layers=shape["num_layers"],
                       num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"],
                       head_dim=shape["head_dim"], target_density=d["target_density"],
                       layers=tuple(layers[i] for i in order),
                       scales=tuple(tuple(rows[i]) for i in order),
                       dense_layers=tuple(d.get("dense_layers", ())),
                       base=tuple(sorted(dict(d.get("base", {})).items())),
                       fit=tuple(sorted(dict(d.get("fit", {})).items())))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: malformed calibration ({type(exc).__name__}: {exc})") \
                from None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def load_calibration(path) -> Calibration:
    """Read a calibration file; ValueError naming the file and what is wrong."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"calibration file {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration file {path!r} is not valid JSON ({exc})") from None
    return Calibration.from_dict(d, where=f"calibration file {path!r}")


def from_curves(model: str, shape: Mapping[str, int], target: float,
                curves: Mapping[int, Tuple[np.ndarray, np.ndarray, Sequence[float]]],
                base: Mapping, fit: Mapping, dense_layers: Sequence[int] = (),
                boundaries: Optional[Mapping[int, np.ndarray]] = None,
                boundary_window: Optional[int] = None,
                boundary_nms_radius: Optional[int] = None) -> Calibration:
    """The calibration whose multipliers :func:`allocate` picks from measured
    curves: layer -> (density (Hkv, steps), recall (Hkv, steps), multipliers
    (steps,)) of the same budget steps; ``boundaries``: layer -> learned
    boundary models (Hkv, 2 D + 6) fitted with ``boundary_window`` and
    ``boundary_nms_radius``, if any."""
    layers = sorted(curves)
    dens = np.concatenate([np.asarray(curves[li][0]) for li in layers])
    rec = np.concatenate([np.asarray(curves[li][1]) for li in layers])
    idx = allocate(dens, rec, target)
    scales: List[Tuple[float, ...]] = []
    pos = 0
    for li in layers:
        mult = list(curves[li][2])
        n = np.asarray(curves[li][0]).shape[0]
        scales.append(tuple(float(mult[j]) for j in idx[pos:pos + n]))
        pos += n
    fit = dict(fit)
    fit["density_measured"] = float(dens[np.arange(len(idx)), idx].mean())
    fit["recall_measured"] = float(rec[np.arange(len(idx)), idx].mean())
    return Calibration(model=model, num_layers=int(shape["num_layers"]),
                       num_heads=int(shape["num_heads"]),
                       num_kv_heads=int(shape["num_kv_heads"]), head_dim=int(shape["head_dim"]),
                       target_density=float(target), layers=tuple(layers),
                       scales=tuple(scales), dense_layers=tuple(dense_layers),
                       base=tuple(sorted(dict(base).items())), fit=tuple(sorted(fit.items())),
                       boundary_window=boundary_window if boundaries else None,
                       boundary_nms_radius=boundary_nms_radius if boundaries else None,
                       boundary_layers=tuple(sorted(boundaries or {})),
                       boundary_models=tuple(
                           tuple(tuple(float(x) for x in row) for row in np.asarray(boundaries[li]))
                           for li in sorted(boundaries or {})))
