"""Baselines in DHSA's selection format: budget, causality, sink/local rules,
recall ordering (oracle on top), and the normalisation switch."""
import numpy as np
import pytest

import dhsa
from dhsa import reference
from dhsa.analysis import attention_recall, output_error

METHODS = ["dhsa", "block_topk", "streaming", "vertical_slash", "oracle"]


def _qkv(rng, B=1, H=4, Hkv=2, Lq=200, Lk=200, D=16):
    q = rng.standard_normal((B, H, Lq, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Lk, D)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
@pytest.mark.parametrize("causal,window,Lq", [(True, None, 200), (True, 70, 200),
                                               (True, None, 120), (False, None, 200)])
def test_baseline_rules(method, granularity, causal, window, Lq):
    rng = np.random.default_rng(7)
    q, k, _ = _qkv(rng, B=2, Lq=Lq)
    Lk = k.shape[2]
    cfg = dhsa.DHSAConfig(budget=64, block_size=16, sink=8, local=24, method=method,
                          granularity=granularity, chunk_size=8, last_queries=16)
    sel = dhsa.predict_selection(q, k, cfg, causal=causal, window=window)
    per_block = sel.keys_per_block()
    for b in range(sel.batch):
        for g in range(sel.groups):
            for qb in range(sel.num_blocks):
                r = sel.ranges(b, g, qb)
                s = Lk - Lq + qb * 16
                e = min(Lk - Lq + (qb + 1) * 16, Lk) - 1
                lo = max(0, s - window + 1) if window else 0
                hi = e + 1 if causal else Lk
                keys = np.concatenate([np.arange(a, c) for a, c in r])
                assert np.all(np.diff(r.ravel()) > 0)                 # sorted, disjoint, non-empty
                assert keys.min() >= lo and keys.max() < hi          # allowed keys only
                if hi - lo <= 64:
                    assert len(keys) == hi - lo                       # dense block
                    continue
                assert per_block[b, g, qb] <= 64                      # budget
                assert set(range(lo, lo + 8)) <= set(keys)            # sink
                assert set(range(max(lo, s - 24), e + 1)) <= set(keys)  # local + own block


def test_dense_selection_recall_is_one():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng)
    sel = dhsa.predict_selection(q, k, dhsa.DHSAConfig(budget=10_000, block_size=16, sink=8,
                                                       local=24))
    rec = attention_recall(q, k, sel)
    np.testing.assert_allclose(rec, 1.0, atol=1e-12)
    assert output_error(q, k, v, sel).max() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_oracle_recall_is_highest(seed, granularity):
    rng = np.random.default_rng(seed)
    q, k, _ = _qkv(rng, H=4, Hkv=2, Lq=256, Lk=256)
    rec = {}
    for m in METHODS:
        cfg = dhsa.DHSAConfig(budget=80, block_size=16, sink=8, local=24, method=m,
                              granularity=granularity, chunk_size=8)
        rec[m] = attention_recall(q, k, dhsa.predict_selection(q, k, cfg)).mean()
    for m in METHODS:
        assert rec["oracle"] >= rec[m] - 1e-12, rec


def test_streaming_is_sink_plus_window():
    rng = np.random.default_rng(3)
    q, k, _ = _qkv(rng, Lq=256, Lk=256)
    cfg = dhsa.DHSAConfig(budget=80, block_size=16, sink=8, local=24, method="streaming")
    sel = dhsa.predict_selection(q, k, cfg)
    r = sel.ranges(0, 0, 15)  # block of positions 240..255
    assert r.tolist() == [[0, 8], [256 - 80 + 8, 256]]


def test_block_topk_is_mean_pooled_fixed_blocks():
    """block_topk equals the C predictor with fixed chunks and plain means,
    which equals the reference with key_norm = 1."""
    rng = np.random.default_rng(4)
    q, k, _ = _qkv(rng, Lq=200, Lk=200)
    cfg = dhsa.DHSAConfig(budget=64, block_size=16, sink=8, local=24, method="block_topk",
                          chunk_size=8)
    sel = dhsa.predict_selection(q, k, cfg)
    ref = reference.predict(q, k, block_size=16, sink=8, local=24, budget=64,
                            bounds=[np.append(np.arange(0, 200, 8), 200)] * 2, key_norm=1.0)
    assert np.array_equal(sel.starts, ref["starts"]) and np.array_equal(sel.ends, ref["ends"])


@pytest.mark.parametrize("normalization,power", [("mean", 1.0), ("sum", 0.0), ("sqrt", 0.5)])
def test_normalization_matches_reference(normalization, power):
    rng = np.random.default_rng(5)
    q, k, _ = _qkv(rng, Lq=230, Lk=230)
    for mode in ["tokens", "adaptive"]:
        cfg = dhsa.DHSAConfig(budget=64, block_size=16, sink=8, local=24, min_budget=40,
                              max_budget=90, mass=0.6, budget_mode=mode,
                              normalization=normalization)
        sel = dhsa.predict_selection(q, k, cfg)
        ref = reference.predict(q, k, block_size=16, sink=8, local=24, budget=64, mode=mode,
                                min_budget=40, max_budget=90, mass=0.6, key_norm=power)
        assert np.array_equal(sel.offsets, ref["offsets"])
        assert np.array_equal(sel.starts, ref["starts"]) and np.array_equal(sel.ends, ref["ends"])


def test_baselines_reject_bad_input_like_dhsa():
    rng = np.random.default_rng(6)
    q, k, _ = _qkv(rng)
    q[0, 0, 3, 1] = np.nan
    for m in METHODS:
        with pytest.raises(ValueError, match="q"):
            dhsa.predict_selection(q, k, dhsa.DHSAConfig(budget=64, block_size=16, sink=8,
                                                         local=24, method=m))
    with pytest.raises(ValueError, match="method"):
        dhsa.DHSAConfig(method="magic")
    with pytest.raises(ValueError, match="normalization"):
        dhsa.DHSAConfig(normalization="cube")
