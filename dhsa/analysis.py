"""How good is a selection? Attention-mass recall and output error vs dense.

Works on NumPy tensors (q (B, H, Lq, D), k/v (B, Hkv, Lk, D)) and on any
:class:`dhsa.Selection`, so DHSA and every baseline are measured the same
way. ``capture_qkv`` pulls real post-RoPE Q/K/V out of a transformers model.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from .api import Selection, dense_attention, sparse_attention
from .rules import (group_of_head, kv_head_of, masked_softmax, softcap_logits, visible_mask,
                    visible_rows)

__all__ = ["attention_recall", "output_error", "capture_qkv", "dense_probabilities",
           "recall_from_probabilities"]


def attention_recall(q: np.ndarray, k: np.ndarray, selection: Selection, *,
                     causal: bool = True, scale: Optional[float] = None,
                     softcap: Optional[float] = None,
                     window: Optional[int] = None) -> np.ndarray:
    """(B, H) mean over queries of the dense softmax mass the selection keeps.

    1.0 means the selection holds every key that dense attention weights;
    computed block by block in float64, so memory is O(block x Lk).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bs = selection.block_size
    out = np.zeros((B, H))
    for qb in range(selection.num_blocks):
        r0, r1 = qb * bs, min(Lq, (qb + 1) * bs)
        vis = visible_rows(Lq, Lk, r0, r1, causal, window)
        for b in range(B):
            for h in range(H):
                logits = q[b, h, r0:r1] @ k[b, kv_head_of(h, H, Hkv)].T * scale
                p = masked_softmax(softcap_logits(logits, softcap), vis)
                keep = np.zeros(Lk, dtype=bool)
                for a, e in selection.ranges(b, group_of_head(selection.groups, H, h), qb):
                    keep[a:e] = True
                out[b, h] += p[:, keep].sum()
    return out / Lq


def dense_probabilities(q: np.ndarray, k: np.ndarray, *, scale: Optional[float] = None,
                        softcap: Optional[float] = None) -> np.ndarray:
    """(H, L, L) float32 causal softmax of one batch item (B = 1, Lq = Lk).

    O(H L^2) memory: for scoring many selections of the same layer against
    one dense pass (e.g. 9 heads x 4K^2 = 600 MB)."""
    _, H, L, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tri = visible_mask(L, L)
    P = np.empty((H, L, L), dtype=np.float32)
    for h in range(H):
        s = (q[0, h].astype(np.float64) @ k[0, kv_head_of(h, H, Hkv)].T.astype(np.float64)) * scale
        P[h] = masked_softmax(softcap_logits(s, softcap), tri)
    return P


def recall_from_probabilities(P: np.ndarray, selection: Selection) -> np.ndarray:
    """(H,) mean over queries of the mass of ``P`` (from dense_probabilities)
    inside the selected ranges; batch item 0."""
    H, L, _ = P.shape
    out = np.zeros(H)
    for h in range(H):
        C = np.concatenate([np.zeros((L, 1)), np.cumsum(P[h], axis=1, dtype=np.float64)], axis=1)
        g = group_of_head(selection.groups, H, h)
        for qb in range(selection.num_blocks):
            r0 = qb * selection.block_size
            r1 = min(L, r0 + selection.block_size)
            for a, e in selection.ranges(0, g, qb):
                out[h] += float((C[r0:r1, e] - C[r0:r1, a]).sum())
    return out / L


def output_error(q: np.ndarray, k: np.ndarray, v: np.ndarray, selection: Selection, *,
                 causal: bool = True, scale: Optional[float] = None,
                 softcap: Optional[float] = None, window: Optional[int] = None,
                 num_threads: Optional[int] = None) -> np.ndarray:
    """(B, H) relative error ||sparse - dense|| / ||dense|| of the outputs."""
    kw = dict(causal=causal, scale=scale, softcap=softcap, window=window,
              num_threads=num_threads)
    dense = dense_attention(q, k, v, **kw).astype(np.float64)
    sparse = sparse_attention(q, k, v, selection=selection, **kw).astype(np.float64)
    num = np.sqrt(((sparse - dense) ** 2).sum(axis=(2, 3)))
    den = np.sqrt((dense ** 2).sum(axis=(2, 3)))
    return num / np.maximum(den, 1e-30)


def capture_qkv(model, input_ids, layers: Optional[Iterable[int]] = None
                ) -> Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
    """Run ``model`` on ``input_ids`` and return {layer: (q, k, v, kwargs)}.

    q (B, H, L, D) and k, v (B, Hkv, L, D) are float32 NumPy copies of what
    each attention layer receives (after RoPE); kwargs holds the scaling,
    softcap and sliding window the layer was called with. Needs torch and
    transformers; the model's attention implementation is restored after.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    wanted = None if layers is None else set(layers)
    captured: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray, dict]] = {}
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def capture(module, query, key, value, attention_mask, **kwargs):
        idx = getattr(module, "layer_idx", len(captured))
        if wanted is None or idx in wanted:
            info = {"scaling": kwargs.get("scaling"), "softcap": kwargs.get("softcap"),
                    "sliding_window": kwargs.get("sliding_window")}
            captured[idx] = tuple(t.detach().to(torch.float32).cpu().numpy().copy()
                                  for t in (query, key, value)) + (info,)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("dhsa_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("dhsa_capture")
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return captured
