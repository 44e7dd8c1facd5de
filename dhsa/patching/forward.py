"""The attention function transformers calls: ``dhsa_attention_forward``.

One call: check the arguments, find each batch item's keys and queries
(:mod:`.masks`), run exact or sparse attention on each (the C core through
:mod:`dhsa.api`), record what happened (:mod:`.stats`).
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..api import dense_attention, sparse_attention
from ..config import DHSAConfig
from ..rules import query_heads_of
from .decode import usable as _sparse_decode_usable
from .masks import exact_masked, key_spans
from .registry import binding_of
from .stats import CallRecord, CallStats

__all__ = ["dhsa_attention_forward"]

_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (float32 / float16), bfloat16 -> float32 copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    elif t.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"DHSA attention supports float32, float16 and bfloat16, got {t.dtype}")
    return t.numpy()


def _check_call(module: nn.Module, query, key, value, dropout: float, kwargs) -> None:
    """What DHSA cannot do raises here, naming it; what it ignores warns once."""
    if dropout and getattr(module, "training", False):
        raise NotImplementedError("DHSA attention is inference-only: attention dropout in training "
                                  "mode is not supported (call model.eval())")
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"DHSA attention does not support the `{unsupported}` "
                                      f"argument this model passes ({type(module).__name__})")
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions", "DHSA attention returns no attention weights "
                   "(output_attentions=True gives None)")
    if query.device.type != "cpu":
        raise RuntimeError(f"DHSA attention runs on the CPU; got tensors on {query.device}")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        if getattr(module, "training", False):
            raise RuntimeError("DHSA attention is inference-only (no backward): use model.eval() "
                               "and torch.no_grad() / torch.inference_mode()")
        _warn_once("grad", "DHSA attention outputs carry no gradient; run under torch.no_grad() "
                   "to silence this warning")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"DHSA attention expects 4-D (B, H, L, D) tensors, got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    H, Lq, Hkv, Lk = query.shape[1], query.shape[2], key.shape[1], key.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Lq > Lk:
        raise ValueError(f"more queries ({Lq}) than keys ({Lk})")


@dataclass
class _Plan:
    """The options of one call, the same for every batch item."""

    config: DHSAConfig
    forced_dense: bool
    dense_when_fits: bool
    sparse_sliding: bool
    causal: bool
    scale: float
    softcap: Optional[float]
    window: Optional[int]
    threads: Optional[int]
    decode_threads: Optional[int]  # one-query calls
    head_configs: Optional[Tuple[DHSAConfig, ...]] = None  # per KV head (a calibration)
    boundary_model: Optional[np.ndarray] = None  # (Hkv, 2 D + 6): learned boundaries


def _fits(cfg: DHSAConfig, nk: int, window: Optional[int]) -> bool:
    """Whether every query may see no more keys than every block keeps anyway."""
    most = nk if window is None else min(nk, window)
    if cfg.budget_mode == "tokens":
        return most <= cfg.budget
    if cfg.budget_mode == "adaptive":
        return most <= cfg.min_budget
    return False


def _sparse(plan: _Plan, stats: CallStats, qi, ki, vi, win, weight) -> np.ndarray:
    """Sparse attention of one item; with per-KV-head configs (a calibration),
    one call per KV head and its query heads."""
    kw = dict(causal=True, scale=plan.scale, softcap=plan.softcap, window=win,
              num_threads=plan.threads, return_info=True)
    heads, bm = plan.head_configs, plan.boundary_model
    if heads is None or len(set(heads)) == 1:
        o, info = sparse_attention(qi, ki, vi, plan.config, boundary_model=bm, **kw)
        stats.sparse(weight, info)
        return o
    H, Hkv = qi.shape[1], ki.shape[1]
    out = np.empty_like(qi)
    for g, cfg in enumerate(heads):
        qh = query_heads_of(g, H, Hkv)
        o, info = sparse_attention(np.ascontiguousarray(qi[:, qh]),
                                   np.ascontiguousarray(ki[:, g:g + 1]),
                                   np.ascontiguousarray(vi[:, g:g + 1]), cfg,
                                   boundary_model=None if bm is None else bm[g:g + 1], **kw)
        out[:, qh] = o
        stats.sparse(weight / Hkv, info)
    return out


@functools.lru_cache(maxsize=1024)
def _layer_calibration(cfg: DHSAConfig, layer: Optional[int],
                       Hkv: int) -> Tuple[Tuple[DHSAConfig, ...], Optional[np.ndarray]]:
    """What a calibrated config gives one layer, made once per layer, not per
    call: the plain configs (one for the "layer" granularity, else one per KV
    head) and the learned boundary model rows (read-only), if any."""
    cal = cfg.calibration
    if cfg.granularity == "layer":
        heads = (cal.config_for(cfg, layer),)
    else:
        heads = tuple(cal.config_for(cfg, layer, g) for g in range(Hkv))
    bmodel = cal.boundary_model_for(layer)
    if bmodel is not None:
        bmodel.setflags(write=False)
    return heads, bmodel


def _attend(plan: _Plan, stats: CallStats, qi: np.ndarray, ki: np.ndarray,
            vi: np.ndarray) -> np.ndarray:
    """Exact or sparse attention of items whose queries are the last of their keys."""
    nq, nk = qi.shape[2], ki.shape[2]
    win = plan.window if plan.window is not None and plan.window < nk else None
    weight = stats.item_pairs(qi.shape[0], nq, nk, win)
    sliding = plan.window is not None and not plan.sparse_sliding
    if (nq == 1 or plan.forced_dense or not plan.causal or sliding
            or (plan.dense_when_fits and _fits(plan.config, nk, win))):
        reason = ("decode" if nq == 1 else "dense layer" if plan.forced_dense
                  else "non-causal" if not plan.causal else "sliding window" if sliding
                  else "fits budget")
        t0 = time.perf_counter()
        kw = dict(causal=plan.causal, scale=plan.scale, softcap=plan.softcap, window=win,
                  num_threads=plan.decode_threads if nq == 1 else plan.threads)
        if nq == 1 and ki.shape[0] == 1 and not ki.flags.c_contiguous:
            # the filled slots of a static cache: each KV head's rows are
            # contiguous, the heads are not - one call per head, no copy of K/V
            o = np.empty(qi.shape, dtype=np.float32)
            G = qi.shape[1] // ki.shape[1]
            for g in range(ki.shape[1]):
                o[:, g * G:(g + 1) * G] = dense_attention(qi[:, g * G:(g + 1) * G],
                                                          ki[:, g:g + 1], vi[:, g:g + 1], **kw)
            o = o.astype(qi.dtype, copy=False)
        else:
            o = dense_attention(qi, ki, vi, **kw)
        stats.dense("decode" if nq == 1 else "dense", reason, weight, time.perf_counter() - t0)
        return o
    return _sparse(plan, stats, qi, ki, vi, win, weight)


def dhsa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                           scaling: Optional[float] = None, dropout: float = 0.0,
                           sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                           **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function backed by dhsa (see :mod:`dhsa.patching`).

    query (B, H, Lq, D), key / value (B, Hkv, Lk, D); returns ((B, Lq, H, D), None).
    """
    t_start = time.perf_counter()
    handle, name = binding_of(module)
    layer = getattr(module, "layer_idx", None)
    _check_call(module, query, key, value, dropout, kwargs)
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    cfg, forced_dense = handle.config_for(layer, name)
    heads = bmodel = None
    cal = cfg.calibration
    if cal is not None:  # budgets (and boundaries) per layer and KV head, checked here
        cal.check_shape(H, Hkv, D, layer)
        forced_dense = forced_dense or (layer is not None and layer in cal.dense_layers)
        heads, bmodel = _layer_calibration(cfg, layer, Hkv)
        cfg = heads[0]
    plan = _Plan(cfg, forced_dense, handle.dense_when_fits, handle.sparse_sliding, causal,
                 float(scaling) if scaling is not None else 1.0 / math.sqrt(D),
                 float(softcap) if softcap is not None and float(softcap) > 0 else None,
                 int(sliding_window) if sliding_window is not None and int(sliding_window) > 0
                 else None, handle.num_threads,
                 handle.decode_threads if handle.decode_threads is not None else handle.num_threads,
                 heads, bmodel)
    spans, padded, how = key_spans(attention_mask, key, value, Lq, causal, plan.window)

    def record(path, density, predict, attention, padded, reason, selection=None):
        handle._add(CallRecord(layer, name, path, B, H, Hkv, Lq, Lk, density, predict, attention,
                               time.perf_counter() - t_start, plan.window, plan.softcap,
                               padded, reason, selection))

    if spans is None:  # not causal + padding (+ window): exact, masked, in PyTorch
        t0 = time.perf_counter()
        out = exact_masked(query, key, value, attention_mask, plan.scale, plan.softcap,
                           plan.window, causal)
        t1 = time.perf_counter()
        result = out.to(query.dtype).transpose(1, 2).contiguous()
        record("fallback", 1.0, 0.0, t1 - t0, attention_mask is not None, how)
        return result, None

    qn, kn, vn = _to_numpy(query), _to_numpy(key), _to_numpy(value)
    # one key span [0, ke) shared by the batch (a static cache's empty slots
    # past ke, reported as padding, are left out)
    if (_sparse_decode_usable(cfg) and causal and not forced_dense
            and (plan.window is None or handle.sparse_sliding)
            and spans[0] is not None and spans[0][0] == 0 and spans[0][2:] == (0, Lq)
            and all(s == spans[0] for s in spans)):
        # sparse decode: the layer's KVCache follows every call (prefill too)
        ke = spans[0][1]
        cache = handle.decode_states.sync(layer if layer is not None else name, cfg, bmodel,
                                          kn[:, :, :ke], vn[:, :, :ke], Lq,
                                          num_threads=plan.decode_threads if Lq == 1
                                          else plan.threads)
        if Lq == 1:
            out_np, info = handle.decode_states.decode(
                cache, qn, scale=plan.scale, softcap=plan.softcap, window=plan.window,
                num_threads=plan.decode_threads)
            result = torch.from_numpy(out_np).to(query.dtype).transpose(1, 2).contiguous()
            record("decode", info.density, info.select_seconds, info.attention_seconds, False,
                   "sparse decode")
            return result, None
    keep = layer in handle.keep_selections or name in handle.keep_selections
    stats = CallStats(keep_selection=keep)
    if spans[0] is not None and all(s == spans[0] for s in spans):  # one span for the batch
        ks, ke, r0, r1 = spans[0]
        out_np = o = _attend(plan, stats, qn[:, :, r0:r1], kn[:, :, ks:ke], vn[:, :, ks:ke])
        if (r0, r1) != (0, Lq):
            out_np = np.zeros((B, H, Lq, D), dtype=o.dtype)
            out_np[:, :, r0:r1] = o
    else:  # item by item; padding queries (and items without a real query) get zeros
        out_np = np.zeros((B, H, Lq, D), dtype=qn.dtype)
        for b, s in enumerate(spans):
            if s is not None:
                ks, ke, r0, r1 = s
                out_np[b:b + 1, :, r0:r1] = _attend(plan, stats, qn[b:b + 1, :, r0:r1],
                                                    kn[b:b + 1, :, ks:ke], vn[b:b + 1, :, ks:ke])
    result = torch.from_numpy(out_np).to(query.dtype).transpose(1, 2).contiguous()
    reasons = sorted(stats.reasons | ({how} if how else set()))
    record(stats.path(Lq), stats.density, stats.predict, stats.attention, padded,
           ",".join(reasons), stats.selection)
    return result, None
