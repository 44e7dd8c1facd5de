"""The KV cache and sparse decode (dhsa.KVCache, dhsa.decode_attention).

Checked against the prefill (the cache's chunks are the prediction's, however
the keys arrive), against the float64 reference (reference.cache_chunks,
decode_select, attention_with_selection) and against exact attention.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import dhsa
from dhsa import _core, reference
from dhsa.rules import bmodel_len

B, H, HKV, D = 2, 6, 2, 32


def chunky(rng, B, Hkv, L, D, seg=12, dtype=np.float32):
    """Keys with content shifts every ~seg positions (so dynamic chunking has
    something to find), values and queries standard normal."""
    n = -(-L // seg)
    base = np.repeat(rng.standard_normal((B, Hkv, n, D)) * 2.0, seg, axis=2)[:, :, :L]
    k = (base + 0.5 * rng.standard_normal((B, Hkv, L, D))).astype(dtype)
    v = rng.standard_normal((B, Hkv, L, D)).astype(dtype)
    return k, v


def queries(rng, B, H, n, D, dtype=np.float32):
    return rng.standard_normal((B, H, n, D)).astype(dtype)


# chunks scored by "mean" (the default) unless the name says otherwise
MEAN = dict(decode_score="mean")
CONFIGS = {
    "dynamic": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16, decode_budget=160,
                               **MEAN),
    "fixed": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16, chunking="fixed",
                             chunk_size=16, decode_budget=160, **MEAN),
    "block_topk": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16,
                                  method="block_topk", chunk_size=8, decode_budget=160, **MEAN),
    "layer": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16, granularity="layer",
                             decode_budget=160, **MEAN),
    "query_head": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16,
                                  granularity="query_head", decode_budget=160, **MEAN),
    "mean_norm": dhsa.DHSAConfig(budget=256, sink=8, local=32, block_size=16,
                                 normalization="mean", boundary_window=8, nms_radius=2,
                                 decode_budget=100, **MEAN),
    "bounds": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16, decode_budget=160,
                              decode_score="bounds"),
    "bounds_layer": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16,
                                    granularity="layer", chunking="fixed", chunk_size=12,
                                    decode_budget=160, decode_score="bounds"),
    "moments": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16, decode_budget=160,
                               decode_score="moments"),
    "moments_layer": dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16,
                                     granularity="layer", decode_budget=160,
                                     decode_score="moments"),
}


def filled(config, k, v, step=None, dtype=np.float32, boundary_model=None):
    cache = dhsa.KVCache(config, k.shape[1], k.shape[3], dtype=dtype,
                         boundary_model=boundary_model)
    L = k.shape[2]
    if step is None:
        cache.append(k, v)
    else:
        i = 0
        sizes = step if callable(step) else (lambda _: step)
        while i < L:
            n = max(1, min(L - i, sizes(i)))
            cache.append(k[:, :, i:i + n], v[:, :, i:i + n])
            i += n
    return cache


def committed(cache):
    return [cache.chunk_bounds(b, g) for b in range(cache.batch_size)
            for g in range(cache.chunk_groups)]


def learned_model(rng, groups, width, threshold=0.3):
    m = np.zeros((groups, bmodel_len(width)))
    m[:, :width] = rng.uniform(0.0, 0.02, (groups, width))
    m[:, 2 * width] = 1.0  # the cosine term
    m[:, -1] = threshold
    return m


# ---- the chunk state ----------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_bounds_are_the_predictions(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(1)
    k, v = chunky(rng, B, HKV, 700, D)
    cache = filled(cfg, k, v)
    bounds, nb = cache.prefill_boundaries()
    pred = dhsa.predict_selection(queries(rng, B, H, 700, D), k, cfg)
    assert len(pred.boundaries) == len(nb)
    for i, want in enumerate(pred.boundaries):
        np.testing.assert_array_equal(bounds[i, :nb[i]], want)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("step", [1, 7, "random"])
def test_appending_in_pieces_gives_the_same_state(name, step):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(2)
    k, v = chunky(rng, B, HKV, 500, D)
    whole = filled(cfg, k, v)
    sizes = (lambda i: int(np.random.default_rng(i).integers(1, 40))) if step == "random" else step
    parts = filled(cfg, k, v, step=sizes)
    for a, b in zip(committed(whole), committed(parts)):
        np.testing.assert_array_equal(a, b)
    q = queries(rng, B, H, 1, D)
    np.testing.assert_array_equal(dhsa.decode_attention(q, whole), dhsa.decode_attention(q, parts))


@pytest.mark.parametrize("name", ["dynamic", "fixed", "layer", "mean_norm"])
def test_committed_chunks_match_the_reference(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(3)
    k, v = chunky(rng, B, HKV, 400, D)
    cache = filled(cfg, k, v, step=5)
    CG = cache.chunk_groups
    for b in range(B):
        for g in range(CG):
            kh = k[b] if cfg.granularity == "layer" else k[b, g:g + 1]
            if cfg.chunking == "fixed":
                full = np.r_[np.arange(0, 400, cfg.chunk_size), 400]
            else:
                full = reference.find_boundaries(reference.boundary_scores(kh, cfg.boundary_window),
                                                 cfg.threshold, cfg.min_chunk, cfg.max_chunk,
                                                 cfg.nms_radius)
            want = reference.cache_chunks(full, 400, chunking=cfg.chunking,
                                          boundary_window=cfg.boundary_window,
                                          nms_radius=cfg.nms_radius)
            np.testing.assert_array_equal(cache.chunk_bounds(b, g), want)


def test_committed_chunks_never_move_as_keys_arrive():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(4)
    k, v = chunky(rng, 1, HKV, 600, D)
    cache = dhsa.KVCache(cfg, HKV, D)
    seen = [np.zeros(1, np.int64)] * HKV
    for t in range(600):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        for g in range(HKV):
            now = cache.chunk_bounds(0, g)
            np.testing.assert_array_equal(now[:len(seen[g])], seen[g])
            assert now[-1] <= t + 1 - cfg.lookahead or len(now) == 1
            seen[g] = now
    assert len(seen[0]) > 20  # the keys do have chunks


def test_learned_boundaries_match_the_prediction():
    rng = np.random.default_rng(5)
    cfg = CONFIGS["dynamic"]
    k, v = chunky(rng, B, HKV, 500, D)
    model = learned_model(rng, HKV, D)
    cache = filled(cfg, k, v, step=3, boundary_model=model)
    bounds, nb = cache.prefill_boundaries()
    pred = dhsa.predict_selection(queries(rng, B, H, 500, D), k, cfg, boundary_model=model)
    for i, want in enumerate(pred.boundaries):
        np.testing.assert_array_equal(bounds[i, :nb[i]], want)
    cosine = filled(cfg, k, v)
    assert any(len(a) != len(b) or (a != b).any()
               for a, b in zip(committed(cache), committed(cosine)))


def test_state_after_prefill_and_decode_steps_equals_a_prefill_of_everything():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(6)
    k, v = chunky(rng, B, HKV, 520, D)
    q = queries(rng, B, H, 520, D)
    cache = dhsa.KVCache(cfg, HKV, D)
    dhsa.sparse_attention(q[:, :, :400], k[:, :, :400], v[:, :, :400], cfg, cache=cache)
    for t in range(400, 520):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        dhsa.decode_attention(q[:, :, t:t + 1], cache)
    once = filled(cfg, k, v)
    for a, b in zip(committed(cache), committed(once)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cache.keys(), k)
    np.testing.assert_array_equal(cache.values(), v)


# ---- prefill through a cache ----------------------------------------------------

@pytest.mark.parametrize("name", ["dynamic", "block_topk", "query_head"])
def test_prefill_through_a_cache_equals_the_prefill(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(7)
    k, v = chunky(rng, B, HKV, 640, D)
    q = queries(rng, B, H, 640, D)
    cache = dhsa.KVCache(cfg, HKV, D)
    out = dhsa.sparse_attention(q[:, :, :500], k[:, :, :500], v[:, :, :500], cfg, cache=cache)
    np.testing.assert_array_equal(out, dhsa.sparse_attention(q[:, :, :500], k[:, :, :500],
                                                             v[:, :, :500], cfg))
    # a continued prefill: the new keys only, the queries over everything
    out = dhsa.sparse_attention(q[:, :, 500:], k[:, :, 500:], v[:, :, 500:], cfg, cache=cache)
    np.testing.assert_array_equal(out, dhsa.sparse_attention(q[:, :, 500:], k, v, cfg))
    assert len(cache) == 640


def test_prefill_through_a_cache_refuses_another_chunking():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(8)
    k, v = chunky(rng, 1, HKV, 100, D)
    q = queries(rng, 1, H, 100, D)
    cache = dhsa.KVCache(cfg, HKV, D)
    with pytest.raises(ValueError, match="threshold"):
        dhsa.sparse_attention(q, k, v, cfg.replace(threshold=0.5), cache=cache)
    with pytest.raises(TypeError, match="boundaries"):
        dhsa.sparse_attention(q, k, v, cfg, cache=cache, boundaries=np.array([0, 100]))
    with pytest.raises(TypeError, match="KVCache"):
        dhsa.sparse_attention(q, k, v, cfg, cache=object())
    assert len(cache) == 0


# ---- decode ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("nq", [1, 3])
def test_decode_selection_and_output_match_the_reference(name, nq):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(9)
    L = 450
    k, v = chunky(rng, B, HKV, L, D)
    q = queries(rng, B, H, nq, D)
    cache = filled(cfg, k, v, step=11)
    out, info = dhsa.decode_attention(q, cache, return_info=True)
    gran = "kv_head" if cfg.method == "block_topk" else cfg.granularity
    ref = reference.decode_select(q, k, committed(cache), budget=cfg.decode_budget,
                                  sink=cfg.sink, local=cfg.local, granularity=gran,
                                  key_norm=1.0 if cfg.method == "block_topk" else cfg.key_norm,
                                  score=cfg.decode_score)
    np.testing.assert_array_equal(info.offsets, ref["offsets"])
    np.testing.assert_array_equal(info.starts, ref["starts"])
    np.testing.assert_array_equal(info.ends, ref["ends"])
    want = reference.attention_with_selection(q, k, v, ref["offsets"], ref["starts"], ref["ends"],
                                              nq)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    # the last query reads decode_budget keys: sink + local + open chunk + chunks
    assert (info.keys_selected == cfg.decode_budget).all()
    assert 0 < info.density < 1


def _group_chunk_group(cfg, g, H, Hkv):
    """The chunking group of selection group g (the rule of rules.h)."""
    if cfg.granularity == "layer":
        return 0
    return g // (H // Hkv) if cfg.granularity == "query_head" else g


def _group_heads(cfg, g, H, Hkv):
    if cfg.granularity == "layer":
        return list(range(H))
    if cfg.granularity == "query_head":
        return [g]
    G = H // Hkv
    return list(range(g * G, (g + 1) * G))


@pytest.mark.parametrize("name", ["dynamic", "fixed", "layer", "query_head", "bounds",
                                  "moments"])
@pytest.mark.parametrize("reuse", [2, 5])
def test_reused_chunk_scores_are_the_scoring_steps(name, reuse):
    """decode_reuse N: a group's chunk scores serve the single-query steps of
    the N - 1 positions after the step that made them, unless a chunk of its
    group closed; the selection is then the reference's with the scoring
    step's queries and this step's sink / local / open chunk / budget."""
    cfg = CONFIGS[name].replace(decode_reuse=reuse)
    rng = np.random.default_rng(41)
    L0, steps = 400, 40
    k, v = chunky(rng, B, HKV, L0 + steps, D)
    cache = filled(cfg, k[:, :, :L0], v[:, :, :L0])
    SG = {"layer": 1, "query_head": H}.get(cfg.granularity, HKV)
    made = {}  # (b, g) -> (length, bound count, q)
    gran = "kv_head" if cfg.method == "block_topk" else cfg.granularity
    total_reused = 0
    for t in range(steps):
        n = L0 + t + 1
        cache.append(k[:, :, n - 1:n], v[:, :, n - 1:n])
        q = queries(rng, B, H, 1, D)
        out, info = dhsa.decode_attention(q, cache, return_info=True)
        bounds = committed(cache)
        score_q, want_reused = q.copy(), 0
        for b in range(B):
            for g in range(SG):
                nb = len(bounds[b * cache.chunk_groups + _group_chunk_group(cfg, g, H, HKV)])
                m = made.get((b, g))
                if m is not None and n - m[0] < reuse and m[1] == nb:
                    want_reused += 1
                    heads = _group_heads(cfg, g, H, HKV)
                    score_q[b, heads] = m[2][b, heads]
                else:
                    made[(b, g)] = (n, nb, q)
        assert info.reused_groups == want_reused
        total_reused += want_reused
        ref = reference.decode_select(q, k[:, :, :n], bounds, budget=cfg.decode_budget,
                                      sink=cfg.sink, local=cfg.local, granularity=gran,
                                      key_norm=cfg.key_norm, score_q=score_q,
                                      score=cfg.decode_score)
        np.testing.assert_array_equal(info.offsets, ref["offsets"])
        np.testing.assert_array_equal(info.starts, ref["starts"])
        np.testing.assert_array_equal(info.ends, ref["ends"])
        assert (info.keys_selected == cfg.decode_budget).all()
        want = reference.attention_with_selection(q, k[:, :, :n], v[:, :, :n], ref["offsets"],
                                                  ref["starts"], ref["ends"], 1)
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    assert total_reused > 0  # the rule was exercised, not only its refusal


def test_reuse_one_scores_every_step_and_crop_or_reorder_rescore():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(42)
    k, v = chunky(rng, B, HKV, 420, D)
    plain = filled(cfg, k, v)
    kept = filled(cfg.replace(decode_reuse=50), k, v)
    q1, q2 = queries(rng, B, H, 1, D), queries(rng, B, H, 1, D)
    # the first step scores; reuse 1 never reuses
    assert dhsa.decode_attention(q1, kept, return_info=True)[1].reused_groups == 0
    assert dhsa.decode_attention(q1, plain, return_info=True)[1].reused_groups == 0
    assert dhsa.decode_attention(q2, plain, return_info=True)[1].reused_groups == 0
    # the same position again: q2 gets q1's scores
    out, info = dhsa.decode_attention(q2, kept, return_info=True)
    assert info.reused_groups == B * HKV
    # a crop or a reorder drops the kept scores
    kept.crop(419)
    assert dhsa.decode_attention(q2[:, :, :1], kept, return_info=True)[1].reused_groups == 0
    kept.reorder([1, 0])
    assert dhsa.decode_attention(q2[::-1], kept, return_info=True)[1].reused_groups == 0
    # a multi-query call scores anew (and its scores serve later steps)
    kept.append(k[:, :, :2], v[:, :, :2])
    two = queries(rng, B, H, 2, D)
    assert dhsa.decode_attention(two, kept, return_info=True)[1].reused_groups == 0
    assert dhsa.decode_attention(two[:, :, 1:], kept, return_info=True)[1].reused_groups > 0
    with pytest.raises(ValueError, match="decode_reuse"):
        cfg.replace(decode_reuse=0)
    with pytest.raises(TypeError, match="decode_reuse"):
        cfg.replace(decode_reuse=1.5)


@pytest.mark.parametrize("name", ["dynamic", "moments"])
def test_decode_with_a_window_and_softcap_matches_the_reference(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(10)
    k, v = chunky(rng, 1, HKV, 600, D)
    q = queries(rng, 1, H, 2, D) * 3
    cache = filled(cfg, k, v)
    out, info = dhsa.decode_attention(q, cache, window=300, softcap=2.0, scale=0.3,
                                      return_info=True)
    ref = reference.decode_select(q, k, committed(cache), budget=cfg.decode_budget,
                                  sink=cfg.sink, local=cfg.local, window=300,
                                  score=cfg.decode_score, scale=0.3)
    np.testing.assert_array_equal(info.starts, ref["starts"])
    assert info.starts.min() >= 600 - 2 - 300 + 1
    want = reference.attention_with_selection(q, k, v, ref["offsets"], ref["starts"], ref["ends"],
                                              2, window=300, softcap=2.0, scale=0.3)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("budget", [None, 10**6])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_budget_past_the_context_is_exact(budget, dtype):
    cfg = CONFIGS["dynamic"].replace(decode_budget=budget)
    rng = np.random.default_rng(11)
    k, v = chunky(rng, B, HKV, 300, D, dtype=dtype)
    q = queries(rng, B, H, 4, D, dtype=dtype)
    cache = filled(cfg, k, v, step=13, dtype=dtype)
    out = dhsa.decode_attention(q, cache)
    assert out.dtype == dtype
    exact = dhsa.dense_attention(q, k, v)
    if dtype == np.float32:
        np.testing.assert_allclose(out, exact, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(out, exact)
    want = reference.dense_attention(q, k, v)
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=3e-3 if dtype == np.float16
                               else 2e-5, atol=3e-3 if dtype == np.float16 else 2e-6)


def test_float16_cache_equals_a_float32_cache_of_the_same_values():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(12)
    k, v = chunky(rng, B, HKV, 400, D, dtype=np.float16)
    q = queries(rng, B, H, 1, D)
    half = filled(cfg, k, v, dtype=np.float16)
    full = filled(cfg, k.astype(np.float32), v.astype(np.float32))
    for a, b in zip(committed(half), committed(full)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(dhsa.decode_attention(q, half), dhsa.decode_attention(q, full),
                               rtol=1e-6, atol=1e-6)
    assert half.nbytes()["kv"] * 2 == full.nbytes()["kv"]


def test_one_and_two_threads_give_identical_results():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(13)
    k, v = chunky(rng, B, HKV, 500, D)
    q = queries(rng, B, H, 1, D)
    outs = []
    for t in (1, 2):
        cache = dhsa.KVCache(cfg, HKV, D)
        cache.append(k, v, num_threads=t)
        outs.append((committed(cache), dhsa.decode_attention(q, cache, num_threads=t)))
    for a, b in zip(outs[0][0], outs[1][0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("name", ["dynamic", "query_head", "layer"])
def test_one_kv_head_splits_its_heads_over_threads_with_identical_results(name):
    """One batch item of one KV head (Gemma-3's shape) has fewer (batch, KV
    head) items than threads: its query heads are split across them, and
    every thread count gives the bits of one thread, which match the
    reference."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(31)
    h = 5  # not a multiple of the thread counts: uneven parts
    k, v = chunky(rng, 1, 1, 600, D)
    q = queries(rng, 1, h, 1, D)
    cache = filled(cfg, k, v)
    outs = [dhsa.decode_attention(q, cache, num_threads=t, return_info=True) for t in (1, 2, 3, 8)]
    for out, _ in outs[1:]:
        np.testing.assert_array_equal(out, outs[0][0])
    out, info = outs[0]
    want = reference.attention_with_selection(q, k, v, info.offsets, info.starts, info.ends, 1)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    assert (info.keys_selected == cfg.decode_budget).all()


def test_decode_picks_the_chunk_the_query_points_at():
    """A query equal to one far chunk's keys gets that chunk, which sink +
    local alone would miss."""
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(14)
    k, v = chunky(rng, 1, 1, 800, D)
    target = k[0, 0, 300:312].mean(axis=0)
    q = np.tile(target * 4, (1, 3, 1, 1)).astype(np.float32)
    cache = filled(cfg, k, v)
    _, info = dhsa.decode_attention(q, cache, return_info=True)
    r = info.ranges(0, 0)
    assert any(a <= 305 < e for a, e in r), r


@pytest.mark.parametrize("score", ["mean", "bounds", "moments"])
def test_bounds_and_moments_find_the_lone_key_a_mean_dilutes(score):
    """Chunk A holds one key pointing where the query does among noise, chunk
    B sixteen keys pointing there weakly; room for one chunk. The mean of A's
    keys is diluted below B's; A's bounds reach the lone key (q . k = 5 |q|),
    and its variance lifts its expected weight - and the lone key holds more
    attention than all of B."""
    cfg = dhsa.DHSAConfig(budget=256, sink=16, local=64, block_size=16, chunking="fixed",
                          chunk_size=16, decode_budget=96, decode_score=score)
    rng = np.random.default_rng(24)
    L = 800
    k = (0.3 * rng.standard_normal((1, 1, L, D))).astype(np.float32)
    v = rng.standard_normal((1, 1, L, D)).astype(np.float32)
    u = np.zeros(D, np.float32)
    u[0] = 1.0
    k[0, 0, 320:336, 0] = 0.0
    k[0, 0, 325] = 5.0 * u
    k[0, 0, 480:496] = 0.8 * u
    q = np.tile(6.0 * u, (1, 2, 1, 1))
    w = np.exp((k[0, 0] @ q[0, 0, 0]) / np.sqrt(D))
    assert w[325] > w[480:496].sum()
    cache = filled(cfg, k, v)
    _, info = dhsa.decode_attention(q, cache, return_info=True)
    r = info.ranges(0, 0)
    assert (info.keys_selected == 96).all()
    picked = [any(a <= x < e for a, e in r) for x in (325, 485)]
    assert picked == ([False, True] if score == "mean" else [True, False]), r


@pytest.mark.parametrize("name", ["bounds", "moments"])
def test_bounds_and_moments_cost_two_vectors_per_chunk(name):
    rng = np.random.default_rng(25)
    k, v = chunky(rng, 1, HKV, 4096, 64)
    mean = filled(CONFIGS["dynamic"], k, v).nbytes()["chunk_state"]
    bounds = filled(CONFIGS[name], k, v)
    nb = sum(len(bounds.chunk_bounds(0, g)) - 1 for g in range(HKV))
    assert bounds.nbytes()["chunk_state"] - mean >= 2 * 64 * 4 * nb
    assert bounds.nbytes()["chunk_state"] < 0.5 * 2 * k.nbytes


def test_kept_moments_scores_serve_only_the_scale_they_were_made_with():
    cfg = CONFIGS["moments"].replace(decode_reuse=4)
    rng = np.random.default_rng(26)
    k, v = chunky(rng, 1, HKV, 402, D)
    cache = filled(cfg, k[:, :, :400], v[:, :, :400])
    q = queries(rng, 1, H, 1, D)
    cache.append(k[:, :, 400:401], v[:, :, 400:401])
    dhsa.decode_attention(q, cache, scale=0.3)
    cache.append(k[:, :, 401:402], v[:, :, 401:402])
    _, same = dhsa.decode_attention(q, cache, scale=0.3, return_info=True)
    cache.crop(401)
    cache.append(k[:, :, 401:402], v[:, :, 401:402])
    dhsa.decode_attention(q, cache, scale=0.3)
    _, other = dhsa.decode_attention(q, cache, scale=0.2, return_info=True)
    assert same.reused_groups > 0 and other.reused_groups == 0


# ---- edits -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dynamic", "bounds"])
def test_crop_equals_a_cache_given_only_the_kept_keys(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(15)
    k, v = chunky(rng, B, HKV, 500, D)
    cache = filled(cfg, k, v, step=9)
    cache.crop(333)
    fresh = filled(cfg, k[:, :, :333], v[:, :, :333])
    assert len(cache) == 333
    for a, b in zip(committed(cache), committed(fresh)):
        np.testing.assert_array_equal(a, b)
    # and it grows again as a fresh cache would
    cache.append(k[:, :, 333:], v[:, :, 333:])
    for a, b in zip(committed(cache), committed(filled(cfg, k, v))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="length"):
        cache.crop(501)


@pytest.mark.parametrize("name", ["dynamic", "bounds", "moments"])
def test_reorder_follows_the_batch(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(16)
    k, v = chunky(rng, 3, HKV, 300, D)
    cache = filled(cfg, k, v)
    idx = np.array([2, 0, 0, 1])
    cache.reorder(idx)
    assert cache.batch_size == 4
    ref = filled(cfg, k[idx], v[idx])
    for a, b in zip(committed(cache), committed(ref)):
        np.testing.assert_array_equal(a, b)
    q = queries(rng, 4, H, 1, D)
    k2, v2 = chunky(rng, 4, HKV, 1, D)
    cache.append(k2, v2)
    ref.append(k2, v2)
    np.testing.assert_array_equal(dhsa.decode_attention(q, cache), dhsa.decode_attention(q, ref))
    with pytest.raises(ValueError, match="index"):
        cache.reorder([0, 7])
    assert cache.batch_size == 4


def test_memory_of_the_chunk_state_is_small():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(17)
    k, v = chunky(rng, 1, HKV, 4096, 64)
    cache = filled(cfg, k, v)
    mem = cache.nbytes()
    assert mem["kv"] >= 2 * k.nbytes
    assert mem["chunk_state"] < 0.25 * 2 * k.nbytes


# ---- bad input ---------------------------------------------------------------------

def test_bad_input_is_refused_by_name():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(18)
    k, v = chunky(rng, 1, HKV, 50, D)
    cache = dhsa.KVCache(cfg, HKV, D)
    cache.append(k, v)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(np.zeros((1, HKV, 2, D + 1), np.float32), np.zeros((1, HKV, 2, D + 1), np.float32))
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(np.zeros((2, HKV, 2, D), np.float32), np.zeros((2, HKV, 2, D), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        cache.append(k.astype(np.float16), v.astype(np.float16))
    with pytest.raises(ValueError, match="same shape"):
        cache.append(k, v[:, :, :3])
    bad = k[:, :, :2].copy()
    bad[0, 1, 1, 3] = np.nan
    with pytest.raises(ValueError, match="k contains NaN"):
        cache.append(bad, v[:, :, :2])
    bad = v[:, :, :2].copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="v contains NaN"):
        cache.append(k[:, :, :2], bad)
    assert len(cache) == 50  # nothing appended
    q = queries(rng, 1, H, 1, D)
    with pytest.raises(ValueError, match="head_dim"):
        dhsa.decode_attention(queries(rng, 1, H, 1, D + 1), cache)
    with pytest.raises(ValueError, match="multiple"):
        dhsa.decode_attention(queries(rng, 1, 5, 1, D), cache)
    with pytest.raises(ValueError, match="batch"):
        dhsa.decode_attention(queries(rng, 2, H, 1, D), cache)
    with pytest.raises(ValueError, match="q length"):
        dhsa.decode_attention(queries(rng, 1, H, 51, D), cache)
    with pytest.raises(TypeError, match="float32 or float16"):
        dhsa.decode_attention(q.astype(np.float64), cache)
    qn = q.copy()
    qn[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="q contains NaN"):
        dhsa.decode_attention(qn, cache)
    with pytest.raises(TypeError, match="KVCache"):
        dhsa.decode_attention(q, object())
    with pytest.raises(ValueError, match="empty"):
        dhsa.decode_attention(q, dhsa.KVCache(cfg, HKV, D))
    with pytest.raises(ValueError, match="window"):
        dhsa.decode_attention(q, cache, window=0)


def test_bad_cache_options_are_refused():
    cfg = CONFIGS["dynamic"]
    with pytest.raises(ValueError, match="max_chunks"):
        dhsa.KVCache(cfg.replace(max_chunks=8), HKV, D)
    with pytest.raises(ValueError, match="method"):
        dhsa.KVCache(cfg.replace(method="streaming"), HKV, D)
    with pytest.raises(TypeError, match="dtype"):
        dhsa.KVCache(cfg, HKV, D, dtype=np.float64)
    with pytest.raises(ValueError, match="head_dim"):
        dhsa.KVCache(cfg, HKV, 300)
    with pytest.raises(ValueError, match="num_kv_heads"):
        dhsa.KVCache(cfg, 0, D)
    with pytest.raises(TypeError, match="config"):
        dhsa.KVCache({"budget": 5}, HKV, D)
    with pytest.raises(ValueError, match="boundary_model must have shape"):
        dhsa.KVCache(cfg, HKV, D, boundary_model=np.zeros((HKV, 7)))
    with pytest.raises(ValueError, match="not finite"):
        dhsa.KVCache(cfg, HKV, D, boundary_model=np.full((HKV, bmodel_len(D)), np.nan))
    with pytest.raises(ValueError, match="dynamic"):
        dhsa.KVCache(cfg.replace(chunking="fixed"), HKV, D,
                     boundary_model=np.zeros((HKV, bmodel_len(D))))
    with pytest.raises(ValueError, match="decode_budget"):
        cfg.replace(decode_budget=cfg.sink + cfg.local)
    with pytest.raises(TypeError, match="decode_budget"):
        cfg.replace(decode_budget=1.5)


def test_a_cache_in_use_by_another_thread_is_refused_not_raced():
    cfg = CONFIGS["dynamic"]
    rng = np.random.default_rng(19)
    k, v = chunky(rng, 1, HKV, 40000, D)
    cache = dhsa.KVCache(cfg, HKV, D)
    cache.append(k[:, :, :10], v[:, :, :10])
    errors, done = [], threading.Event()

    def appender():
        try:
            while True:
                try:
                    cache.append(k[:, :, 10:], v[:, :, 10:], num_threads=1)
                    return
                except RuntimeError as e:  # the decode call held it
                    errors.append(str(e))
        finally:
            done.set()

    t = threading.Thread(target=appender)
    t.start()
    q = queries(rng, 1, H, 1, D)
    while not done.is_set():
        try:
            dhsa.decode_attention(q, cache, num_threads=1)
        except RuntimeError as e:
            errors.append(str(e))
        time.sleep(0.001)  # the GIL for the appender, with the cache free
    t.join()
    assert len(cache) == 40000
    assert all("in use by another thread" in e for e in errors)
    for a, b in zip(committed(cache), committed(filled(cfg, k, v))):
        np.testing.assert_array_equal(a, b)
