"""Sparse decode in a patched model: one :class:`dhsa.KVCache` per attention
layer, kept in step with the keys transformers passes.

transformers owns the cache: each call of the attention function receives
every key and value of the sequence so far (a DynamicCache concatenates, a
StaticCache hands its slots). With ``DHSAConfig(decode_budget=N)`` the
patch keeps a dhsa.KVCache per layer beside it - its chunk state grows with
every call, prefill included - and a decode step (one query) reads N keys of
it through :func:`dhsa.decode_attention`. Before each use the state is
checked against the keys of the call:

- a call whose keys start a new sequence (no earlier keys) starts a new state;
- the state must hold exactly the earlier keys: its length, and its rows at a
  few spread positions of every batch item compared bit for bit;
- fewer earlier keys than the state holds, the kept rows matching: the
  generation cache was cropped (assisted decoding) - the state is cropped;
- the rows of each batch item found in other items of the state: the batch
  was reordered (beam search) - the state is reordered;
- anything else: the state is rebuilt from the call's keys (counted in
  ``DecodeStates.rebuilds``), never used out of step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, Optional

import numpy as np

from ..config import DHSAConfig
from ..decode import KVCache, decode_attention

__all__ = ["DecodeStates", "usable"]


def usable(cfg: DHSAConfig) -> bool:
    """Whether a layer's config asks for sparse decode that a KVCache can run."""
    return (cfg.decode_budget is not None and cfg.method in ("dhsa", "block_topk")
            and cfg.max_chunks is None)


def _probe_positions(n: int) -> np.ndarray:
    """A few positions spread over [0, n) whose rows stand for the whole prefix."""
    return np.unique(np.array([0, n // 7, n // 3, n // 2, (2 * n) // 3, n - 2, n - 1]).clip(0, n - 1))


@dataclass
class _State:
    cache: KVCache
    config: DHSAConfig
    bmodel: Optional[np.ndarray]


class DecodeStates:
    """The per-layer KV caches of one patch handle."""

    def __init__(self) -> None:
        self._states: Dict[Hashable, _State] = {}
        self.rebuilds = 0
        self.crops = 0
        self.reorders = 0

    def clear(self) -> None:
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)

    def cache(self, key: Hashable) -> Optional[KVCache]:
        st = self._states.get(key)
        return None if st is None else st.cache

    def _state(self, key, cfg: DHSAConfig, bmodel, k: np.ndarray) -> _State:
        st = self._states.get(key)
        if (st is None or st.config != cfg or st.bmodel is not bmodel
                or st.cache.dtype != k.dtype or st.cache.num_kv_heads != k.shape[1]
                or st.cache.head_dim != k.shape[3]):
            st = _State(KVCache(cfg, k.shape[1], k.shape[3], dtype=k.dtype,
                                boundary_model=bmodel), cfg, bmodel)
            self._states[key] = st
        return st

    def sync(self, key: Hashable, cfg: DHSAConfig, bmodel, k: np.ndarray, v: np.ndarray,
             new: int, num_threads=None) -> KVCache:
        """The layer's cache holding exactly k, v (B, Hkv, Lk, D), whose last
        ``new`` positions are this call's."""
        st = self._state(key, cfg, bmodel, k)
        cache, before = st.cache, k.shape[2] - new
        if before == 0:
            cache.reset()
        elif not self._matches(cache, k, before):
            if len(cache) > before and cache.batch_size == k.shape[0] and \
                    self._rows_match(cache, k, before, np.arange(k.shape[0])):
                cache.crop(before)
                self.crops += 1
            else:
                perm = self._permutation(cache, k, before)
                if perm is not None:
                    cache.reorder(perm)
                    self.reorders += 1
                else:
                    cache.reset()
                    cache.append(np.ascontiguousarray(k[:, :, :before]),
                                 np.ascontiguousarray(v[:, :, :before]), num_threads=num_threads)
                    self.rebuilds += 1
        cache.append(np.ascontiguousarray(k[:, :, before:]), np.ascontiguousarray(v[:, :, before:]),
                     num_threads=num_threads)
        return cache

    @staticmethod
    def _rows_match(cache: KVCache, k: np.ndarray, n: int, items: np.ndarray) -> bool:
        """Whether cache item items[b] holds k[b]'s rows at the probe positions of [0, n)."""
        for p in _probe_positions(n):
            rows = cache.keys(int(p), int(p) + 1)
            if not np.array_equal(rows[items], k[:, :, p:p + 1]):
                return False
        return True

    def _matches(self, cache: KVCache, k: np.ndarray, n: int) -> bool:
        return (len(cache) == n and cache.batch_size == k.shape[0]
                and self._rows_match(cache, k, n, np.arange(k.shape[0])))

    def _permutation(self, cache: KVCache, k: np.ndarray, n: int) -> Optional[np.ndarray]:
        """For each item of k, an item of the cache with the same probe rows (beam search)."""
        if len(cache) != n or cache.batch_size is None:
            return None
        pos = _probe_positions(n)
        have = np.stack([cache.keys(int(p), int(p) + 1)[:, :, 0] for p in pos], axis=1)
        want = np.stack([k[:, :, p] for p in pos], axis=1)
        perm = []
        for b in range(k.shape[0]):
            hits = [i for i in range(have.shape[0]) if np.array_equal(have[i], want[b])]
            if not hits:
                return None
            perm.append(hits[0])
        return np.asarray(perm, dtype=np.int64)

    def decode(self, cache: KVCache, q: np.ndarray, *, scale, softcap, window, num_threads):
        """One decode step over the synced cache: (out, DecodeInfo)."""
        return decode_attention(q, cache, scale=scale, softcap=softcap, window=window,
                                num_threads=num_threads, return_info=True)
