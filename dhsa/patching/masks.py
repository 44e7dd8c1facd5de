"""Attention mask -> the keys and queries each batch item really has.

transformers hands the attention function a 4-D mask (boolean, or additive
float with -inf / finfo.min for masked pairs), or None when the plain causal
pattern needs none. :func:`key_spans` turns it into one span per batch item:
keys [ks, ke) and query rows [r0, r1) on which the mask is exactly the causal
(and sliding-window) pattern of :mod:`dhsa.rules` - what left padding, right
padding, caches and ``generate()`` produce - so that each item runs on its own
unpadded span. Any other mask (packed sequences, bidirectional blocks, custom
biases) gets no spans and runs through :func:`exact_masked`, an exact masked
attention in PyTorch.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, List, NamedTuple, Optional, Tuple

import torch

from ..rules import visible_mask

__all__ = ["Span", "Spans", "key_spans", "exact_masked"]

# (ks, ke, r0, r1): keys [ks, ke), query rows [r0, r1); None: an item with no real query
Span = Optional[Tuple[int, int, int, int]]


class Spans(NamedTuple):
    """What :func:`key_spans` found: ``spans`` per batch item (None: the mask
    is no such pattern, run :func:`exact_masked`), ``padded`` (some item uses
    fewer keys or queries than the tensors hold), and ``reason`` (why no
    spans, or how the keys were read; "" for the plain case)."""

    spans: Optional[List[Span]]
    padded: bool
    reason: str


# A few masks are analysed per forward (one per mask type); every layer sees the same
# tensor, so remember the last results by identity.
_MASK_CACHE: "OrderedDict[Tuple, Tuple[weakref.ref, Any]]" = OrderedDict()


def _allowed_mask(mask: torch.Tensor, B: int, Lq: int, Lk: int) -> Optional[torch.Tensor]:
    """(B, Lq, Lk) bool 'may attend' from a 4-D bool or additive mask; None if the
    mask is not a plain 0 / -inf pattern shared by all heads."""
    if mask.dim() != 4 or mask.shape[-2] != Lq or mask.shape[-1] < Lk or mask.shape[0] not in (1, B):
        return None
    mask = mask[..., :Lk]
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask > torch.finfo(mask.dtype).min / 2
        if bool((mask.masked_select(allowed) != 0).any()):
            return None  # a real additive bias: not a padding pattern
    else:
        return None
    if allowed.shape[1] > 1:
        if not bool((allowed == allowed[:, :1]).all()):
            return None
    allowed = allowed[:, 0]
    if allowed.shape[0] != B:
        allowed = allowed.expand(B, Lq, Lk)
    return allowed


def _spans_of(allowed: torch.Tensor, window: Optional[int]) -> Optional[List[Span]]:
    """Per batch item (ks, ke, r0, r1): keys [ks, ke) and query rows [r0, r1)
    such that the mask is exactly the causal(/window) pattern of those rows on
    those keys (None for an item with no real query); None if some item's mask
    is not of that form."""
    B, Lq, Lk = allowed.shape
    spans: List[Span] = []
    rows = torch.arange(Lq)
    for b in range(B):
        M = allowed[b]
        any_row = M.any(dim=1)
        if not bool(any_row.any()):
            spans.append(None)
            continue
        last = (Lk - 1) - torch.flip(M, dims=[1]).to(torch.uint8).argmax(dim=1)
        d = last - rows
        q_off = int(d[any_row].max())
        real = any_row & (d == q_off)
        idx = torch.nonzero(real).flatten()
        r0, r1 = int(idx[0]), int(idx[-1]) + 1
        if not bool(real[r0:r1].all()):
            return None
        valid = M[r0:r1].any(dim=0)
        kidx = torch.nonzero(valid).flatten()
        ks, ke = int(kidx[0]), int(kidx[-1]) + 1
        if ke != q_off + r1:
            return None
        # rows r0..r1-1 are the last r1 - r0 queries of the keys [ks, ke)
        expected = torch.zeros(r1 - r0, Lk, dtype=torch.bool)
        expected[:, ks:ke] = torch.from_numpy(visible_mask(r1 - r0, ke - ks, True, window))
        if not torch.equal(M[r0:r1], expected):
            return None
        spans.append((ks, ke, r0, r1))
    return spans


def _mask_spans(mask: torch.Tensor, B: int, Lq: int, Lk: int, window: Optional[int]):
    key = (id(mask), B, Lq, Lk, window)
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    allowed = _allowed_mask(mask, B, Lq, Lk)
    spans = None if allowed is None else _spans_of(allowed.cpu(), window)
    try:
        _MASK_CACHE[key] = (weakref.ref(mask), spans)
    except TypeError:  # pragma: no cover - tensors are weak-referenceable
        pass
    while len(_MASK_CACHE) > 8:
        _MASK_CACHE.popitem(last=False)
    return spans


def _empty_after(x: torch.Tensor, n: int) -> bool:
    """Whether every key/value slot at positions >= n is exactly zero."""
    return not bool(x[:, :, n:].detach().any())


def key_spans(attention_mask: Optional[torch.Tensor], key: torch.Tensor, value: torch.Tensor,
              Lq: int, causal: bool, window: Optional[int]) -> Spans:
    """The span of keys and queries of each batch item (see the module docstring).

    No mask with more keys than queries (causal, Lq > 1) is what transformers
    hands over for a prefill into an empty StaticCache: sdpa then aligns the
    causal mask top-left, so the slots at positions >= Lq are never seen. That
    reading is taken only when those slots are verifiably empty (all zero,
    as a fresh or reset StaticCache keeps them) and the record says so;
    otherwise the call is ambiguous and raises ValueError.
    """
    B, Lk = key.shape[0], key.shape[2]
    full = (0, Lk, 0, Lq)
    if not causal and window is not None:
        return Spans(None, False, "bidirectional sliding window")
    if attention_mask is None:
        if causal and Lq > 1 and Lk > Lq:
            if not (_empty_after(key, Lq) and _empty_after(value, Lq)):
                raise ValueError(
                    f"DHSA attention got no attention mask and {Lk} keys for {Lq} queries, and the "
                    f"keys at positions >= {Lq} are not empty: transformers passes no mask only for "
                    "a prefill into an empty StaticCache (queries at positions 0..Lq-1), while dhsa "
                    "takes queries as the last Lq positions; pass an explicit 4-D attention mask "
                    "(or reset the StaticCache before a new prompt)")
            return Spans([(0, Lq, 0, Lq)] * B, False, "empty static cache slots")
        return Spans([full] * B, False, "")
    if not causal:
        return Spans(None, False, "non-causal module")
    spans = _mask_spans(attention_mask, B, Lq, Lk, window)
    if spans is None:
        return Spans(None, False, "mask is not causal+padding")
    return Spans(spans, any(s != full for s in spans), "")


def exact_masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: Optional[torch.Tensor], scale: float, softcap: Optional[float],
                 window: Optional[int], causal: bool) -> torch.Tensor:
    """Exact attention in PyTorch with an arbitrary 4-D mask (boolean or additive),
    GQA without repeating K/V; fully masked rows give zeros. (B, H, Lq, D) float32."""
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    G = H // Hkv  # query head h reads KV head h // G (dhsa.rules.kv_head_of)
    q = query.detach().float().reshape(B, Hkv, G, Lq, D)
    k = key.detach().float()[:, :, None]
    v = value.detach().float()[:, :, None]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale          # (B, Hkv, G, Lq, Lk)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"DHSA attention expects a 4-D attention mask, got shape {tuple(mask.shape)}")
        m = mask[..., :Lk]
        if m.dtype == torch.bool:
            allowed, bias = m, None
        else:
            allowed, bias = m > torch.finfo(m.dtype).min / 2, m.float()

        def heads(x):
            if x.shape[1] == H:
                return x.reshape(x.shape[0], Hkv, G, Lq, Lk)
            return x[:, :, None]                              # (Bm, 1, 1, Lq, Lk)

        allowed = heads(allowed)
        if bias is not None:
            s = s + heads(bias)
    else:
        allowed = torch.from_numpy(visible_mask(Lq, Lk, causal, window))
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.matmul(p, v).reshape(B, H, Lq, D)
