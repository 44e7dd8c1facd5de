"""Calibration: budgets per layer and KV head, fitted from a model's own attention.

Heads differ: some attend to the keys just before them, and every key past
the local window is wasted on them; others retrieve from anywhere and lose
mass at every key they do not get. A :class:`Calibration` holds, per layer
and KV head, a multiplier of the density budget, chosen offline so that the
average density stays at its target while the attention mass kept (recall)
is as high as a greedy allocation over measured recall curves finds
(:func:`allocate`, the one home of that rule). It also names layers that
stay exact.

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

__all__ = ["Calibration", "FORMAT", "VERSION", "allocate", "load_calibration"]

FORMAT = "dhsa-calibration"
VERSION = 1


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
    recall before and after)."""

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

    # -- applying it ------------------------------------------------------------------
    def scales_of(self, layer: Optional[int]) -> Optional[Tuple[float, ...]]:
        """The KV-head multipliers of a layer, None where it has none."""
        if layer is None or layer not in self.layers:
            return None
        return self.scales[self.layers.index(layer)]

    def config_for(self, config, layer: Optional[int], kv_head: Optional[int] = None):
        """The plain DHSAConfig (no calibration) of one KV head of a layer, or
        of the whole layer (``kv_head=None``: the mean multiplier, for the
        "layer" granularity): density x multiplier, at most 1."""
        cfg = config.replace(calibration=None) if config.calibration is not None else config
        row = self.scales_of(layer)
        if row is None:
            return cfg
        s = float(np.mean(row)) if kv_head is None else float(row[kv_head])
        return cfg.replace(density=min(1.0, cfg.density * s))

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
                "fit": dict(self.fit)}

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
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: calibration version {d.get('version')!r} is not "
                             f"supported (this dhsa reads version {VERSION})")
        try:
            shape = d["shape"]
            budgets = d["budgets"]
            layers = tuple(int(k) for k in budgets)
            order = sorted(range(len(layers)), key=layers.__getitem__)
            rows = list(budgets.values())
            return cls(model=str(d["model"]), num_layers=shape["num_layers"],
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
                base: Mapping, fit: Mapping, dense_layers: Sequence[int] = ()) -> Calibration:
    """The calibration whose multipliers :func:`allocate` picks from measured
    curves: layer -> (density (Hkv, steps), recall (Hkv, steps), multipliers
    (steps,)) of the same budget steps."""
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
                       base=tuple(sorted(dict(base).items())), fit=tuple(sorted(fit.items())))
