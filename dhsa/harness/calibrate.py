"""``python -m dhsa calibrate``: fit budgets per layer and KV head from a model's attention.

On a few thousand tokens of text, for every full-attention layer: capture
its post-RoPE Q/K, measure the attention-mass recall of the selection per
KV head at a ladder of density multipliers (the base config's density
times each), and let :func:`dhsa.calibration.allocate` give each head the
multiplier that buys the most recall at the target average density. The
result is a small JSON file for ``DHSAConfig(calibration=FILE)``. With
``--boundaries`` it first fits a learned boundary model per layer and KV
head (:mod:`dhsa.harness.boundaries`) and measures the budgets on its chunks.

    python -m dhsa calibrate --model smollm2 --density 0.125 --out smollm2.cal.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Optional, Sequence

import numpy as np

from ..api import predict_selection
from ..calibration import Calibration, from_curves
from ..config import DHSAConfig

#: keys each side of a position that learned boundaries read (labels and features)
BOUNDARY_WINDOW = 4
#: the boundary scan's nms_radius with learned boundaries: a boundary beats its
#: immediate neighbours only (their scores are sharper than the cosine's)
BOUNDARY_NMS_RADIUS = 1
# density multipliers measured per head (the base density is the target's)
MULTIPLIERS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.5, 8.0)


def head_curves(q: np.ndarray, k: np.ndarray, cfg: DHSAConfig, multipliers: Sequence[float],
                scale: Optional[float] = None, softcap: Optional[float] = None,
                boundary_model: Optional[np.ndarray] = None, P: Optional[np.ndarray] = None):
    """(density, recall), each (Hkv, steps): achieved density and mean recall
    of each KV head's query heads, per multiplier of cfg.density (batch item 0),
    chunked by ``boundary_model`` where one is given (P: the dense
    probabilities, if already at hand)."""
    from ..analysis import dense_probabilities, recall_from_probabilities
    if P is None:
        P = dense_probabilities(q[:1], k[:1], scale=scale, softcap=softcap)
    H, Hkv = q.shape[1], k.shape[1]
    dens = np.zeros((Hkv, len(multipliers)))
    rec = np.zeros((Hkv, len(multipliers)))
    for j, m in enumerate(multipliers):
        sel = predict_selection(q[:1], k[:1], cfg.replace(density=min(1.0, cfg.density * m)),
                                scale=scale, softcap=softcap, boundary_model=boundary_model)
        # groups per KV head: 1/Hkv of one layer group, 1 kv_head group or G query-head groups
        per = sel.pairs_selected.reshape(-1).astype(np.float64)
        allowed = sel.pairs_allowed.reshape(-1).astype(np.float64)
        if sel.groups == 1:
            dens[:, j] = per[0] / allowed[0]
        else:
            dens[:, j] = per.reshape(Hkv, -1).sum(1) / allowed.reshape(Hkv, -1).sum(1)
        rec[:, j] = recall_from_probabilities(P, sel).reshape(Hkv, -1).mean(1)
    # a larger multiplier never keeps fewer keys; keep the curves monotone against ties
    return np.maximum.accumulate(dens, axis=1), np.maximum.accumulate(rec, axis=1)


def fit_calibration(model, input_ids, config: DHSAConfig, *, name: str = "model",
                    multipliers: Sequence[float] = MULTIPLIERS, text: str = "",
                    boundaries: bool = False, boundary_window: int = BOUNDARY_WINDOW,
                    boundary_nms_radius: int = BOUNDARY_NMS_RADIUS,
                    log=None) -> Calibration:
    """The calibration of ``model`` for ``config`` from one forward pass over
    ``input_ids`` (1, L), full-attention layers only: its target is the
    density ``config`` achieves there uncalibrated, so that the calibrated
    heads spend, on average, what the uniform budget spent.

    ``boundaries=True`` first fits a learned boundary model per layer and KV
    head (:mod:`dhsa.harness.boundaries`: labels and features over
    ``boundary_window`` keys each side, the scan's ``nms_radius`` set to
    ``boundary_nms_radius``, each head's threshold the one of
    :func:`~dhsa.harness.boundaries.choose_thresholds`), then measures the budget curves on
    the chunks it cuts; the target stays the uncalibrated config's density
    (cosine boundaries, uniform budgets)."""
    from ..analysis import capture_qkv, dense_probabilities
    from .boundaries import boundary_labels, choose_thresholds, fit_boundary_model
    if 1.0 not in multipliers:
        raise ValueError("the multipliers must include 1.0 (the uncalibrated budget)")
    if config.budget_mode != "density":
        raise ValueError("calibration fits density budgets: config.budget_mode must be 'density'")
    if boundaries and (config.method != "dhsa" or config.chunking != "dynamic"
                       or config.granularity == "layer"):
        raise ValueError("learned boundaries need method 'dhsa', chunking='dynamic' and a "
                         "per-head granularity ('kv_head' or 'query_head')")
    config = config.replace(calibration=None)
    bconfig = config.replace(boundary_window=boundary_window,
                             nms_radius=boundary_nms_radius) if boundaries else config
    t0 = time.perf_counter()
    cap = capture_qkv(model, input_ids)
    full = [li for li in sorted(cap) if not cap[li][3].get("sliding_window")]
    curves, models, targets, cosine = {}, {}, {}, {}
    i1 = list(multipliers).index(1.0)
    for li in full:
        q, k, _, kw = cap[li]
        bm = None
        P = dense_probabilities(q[:1], k[:1], scale=kw.get("scaling"), softcap=kw.get("softcap"))
        if boundaries:
            # the target is what the uncalibrated config spends (cosine chunks)
            d0, r0 = head_curves(q, k, config, [1.0], kw.get("scaling"), kw.get("softcap"), P=P)
            targets[li] = float(d0[:, 0].mean())
            cosine[li] = float(r0[:, 0].mean())
            lab = boundary_labels(q, k, boundary_window, scale=kw.get("scaling"),
                                  softcap=kw.get("softcap"))
            bm = np.stack([fit_boundary_model(k[0, g:g + 1], lab[g], bconfig)
                           for g in range(k.shape[1])])
            bm = choose_thresholds(q, k, P, bconfig, bm, scale=kw.get("scaling"),
                                   softcap=kw.get("softcap"))
            models[li] = bm
        d, r = head_curves(q, k, bconfig, multipliers, kw.get("scaling"), kw.get("softcap"),
                           boundary_model=bm, P=P)
        del P
        curves[li] = (d, r, multipliers)
        if log:
            log(f"layer {li}: recall at x1 {r[:, i1].mean():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    q0, k0 = cap[full[0]][0], cap[full[0]][1]
    mcfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    shape = {"num_layers": int(mcfg.num_hidden_layers), "num_heads": int(q0.shape[1]),
             "num_kv_heads": int(k0.shape[1]), "head_dim": int(q0.shape[3])}
    base = {f: getattr(config, f) for f in ("block_size", "sink", "local", "density",
                                             "granularity", "chunking", "min_chunk",
                                             "max_chunk", "chunk_score", "method")}
    # the target: the density the config achieves uncalibrated (its forced keys included)
    target = float(np.mean([targets[li] if boundaries else curves[li][0][:, i1].mean()
                            for li in full]))
    uniform = float(np.mean([curves[li][1][:, i1].mean() for li in full]))
    fit = {"tokens": int(input_ids.shape[1]), "text": text, "multipliers": list(multipliers),
           "recall_uniform": uniform, "seconds": round(time.perf_counter() - t0, 1)}
    if boundaries:  # recall_uniform is then the learned chunks' at one budget
        fit["boundary_label_window"] = int(boundary_window)
        fit["recall_cosine"] = float(np.mean([cosine[li] for li in full]))
    return from_curves(name, shape, min(1.0, target), curves, base, fit,
                       boundaries=models or None,
                       boundary_window=int(boundary_window) if boundaries else None,
                       boundary_nms_radius=int(boundary_nms_radius) if boundaries else None)


def _density(text: str) -> float:
    d = float(text)
    if not 0.0 < d <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {d}")
    return d


def _length(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {n}")
    return n


def _radius(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .models import MODELS
    from .protocol import VARIANTS
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                   help="the model to calibrate (default smollm2)")
    p.add_argument("--text", default=None,
                   help="a text file to calibrate on (default: generated prose)")
    p.add_argument("--length", type=_length, default=2048, help="tokens of text (default 2048)")
    p.add_argument("--density", type=_density, default=0.125,
                   help="the average density the budgets keep (default 0.125)")
    p.add_argument("--variant", choices=("dhsa", "block_topk", *VARIANTS), default="dhsa_max",
                   help="the harness method or variant whose selection is calibrated "
                        "(default dhsa_max)")
    p.add_argument("--boundaries", action="store_true",
                   help="also fit learned chunk boundaries per layer and KV head (DHSA variants "
                        "with dynamic chunks), before the budgets")
    p.add_argument("--boundary-window", type=_length, default=BOUNDARY_WINDOW,
                   help=f"keys each side that learned boundaries read (default {BOUNDARY_WINDOW})")
    p.add_argument("--boundary-nms-radius", type=_radius, default=BOUNDARY_NMS_RADIUS,
                   help="the boundary scan's nms_radius with learned boundaries "
                        f"(default {BOUNDARY_NMS_RADIUS})")
    p.add_argument("--out", required=True, help="the calibration file to write (JSON)")


def run(args) -> int:
    from .eval import haystack_text
    from .models import load_model
    from .protocol import matched_config
    if args.text and not os.path.isfile(args.text):
        args._parser.error(f"argument --text: no such file: {args.text}")
    if args.boundaries and args.variant == "block_topk":
        args._parser.error("argument --boundaries: block_topk has no dynamic chunks")
    model, tok = load_model(args.model)
    if args.text:
        with open(args.text, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = haystack_text(None, n_chars=8 * args.length + 10_000)
    ids = tok(text, return_tensors="pt").input_ids[:, :args.length]
    L = int(ids.shape[1])
    cfg = matched_config(args.variant, args.density, L)
    from datetime import datetime, timezone
    import sys
    from .provenance import git_state, machine
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cal = fit_calibration(model, ids, cfg, name=args.model,
                          text=os.path.basename(args.text) if args.text else "generated prose",
                          boundaries=args.boundaries, boundary_window=args.boundary_window,
                          boundary_nms_radius=args.boundary_nms_radius,
                          log=lambda m: print(m, flush=True))
    fit = dict(cal.fit, variant=args.variant,
               command="python -m dhsa " + " ".join(sys.argv[1:]), date=started,
               machine=machine(), **git_state())
    cal = dataclasses.replace(cal, fit=tuple(sorted(fit.items())))
    cal.save(args.out)
    print(f"wrote {args.out}: {len(cal.layers)} layers x {cal.num_kv_heads} KV heads, "
          f"recall on the calibration text "
          + (f"{fit['recall_cosine']:.4f} (cosine chunks) -> " if "recall_cosine" in fit else "")
          + f"{fit['recall_uniform']:.4f} -> "
          f"{fit['recall_measured']:.4f} at density {fit['density_measured']:.4f} "
          f"({fit['seconds']} s)")
    return 0
