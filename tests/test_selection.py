"""dhsa.predict_selection: exact agreement with reference.predict and the
properties every selection must have."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dhsa
from dhsa import reference
from conftest import (assert_selection_equal, blocks_of, make_qkv, reference_predict)


def base_cfg(**kw):
    base = dict(budget=96, block_size=16, sink=8, local=32, boundary_window=8, nms_radius=8,
                min_chunk=4, max_chunk=32, threshold=0.5, min_budget=40, max_budget=150,
                mass=0.9, density=0.3)
    base.update(kw)
    return dhsa.DHSAConfig(**base)


def geometry(Lq, Lk, block_size, qb, causal=True, window=None):
    """(i0, nq, spos, epos, lo, hi) of a query block, from the documented conventions."""
    i0 = qb * block_size
    nq = min(block_size, Lq - i0)
    spos = Lk - Lq + i0
    epos = spos + nq - 1
    lo = max(0, spos - window + 1) if window else 0
    if causal:
        hi = epos + 1
    else:
        hi = min(Lk, epos + window) if window else Lk
    return i0, nq, spos, epos, lo, hi


def covered(ranges, a, b):
    """Whether the union of ranges covers [a, b)."""
    if a >= b:
        return True
    mask = np.zeros(b, dtype=bool)
    for s, e in ranges:
        mask[s:min(e, b)] = True
    return bool(mask[a:b].all())


def check_properties(sel, cfg, Lq, Lk, causal=True, window=None):
    """Every documented property of a selection; returns the number of dense blocks."""
    dense_blocks = 0
    for b, g, qb, r in blocks_of(sel):
        i0, nq, spos, epos, lo, hi = geometry(Lq, Lk, cfg.block_size, qb, causal, window)
        allowed = hi - lo
        assert len(r) >= 1
        starts, ends = r[:, 0], r[:, 1]
        # sorted, non-empty, disjoint and merged (touching ranges are joined)
        assert np.all(ends > starts)
        assert np.all(starts[1:] > ends[:-1])
        # within the allowed keys, hence within the causal limit
        assert starts[0] >= lo and ends[-1] <= hi
        if causal:
            assert ends[-1] <= epos + 1
        # always kept: the first `sink` allowed keys, the `local` keys before the
        # block and the block's own keys
        sink_end = min(lo + cfg.sink, hi)
        loc_a = max(sink_end, spos - cfg.local)
        loc_b = max(loc_a, min(hi, epos + 1))
        assert covered(r, lo, sink_end), (qb, r)
        assert covered(r, max(lo, spos - cfg.local), min(hi, epos + 1)), (qb, r)
        forced = (sink_end - lo) + (loc_b - loc_a)
        n = int((ends - starts).sum())
        if cfg.budget_mode == "adaptive":
            lo_clamp = max(cfg.min_budget, forced)
            hi_clamp = max(cfg.max_budget, forced)
        else:
            bud = cfg.budget if cfg.budget_mode == "tokens" else math.ceil(cfg.density * allowed)
            lo_clamp = hi_clamp = max(bud, forced)
        in_tail = cfg.dense_tail > 0 and i0 + nq > Lq - cfg.dense_tail
        if allowed <= lo_clamp or in_tail:
            dense_blocks += 1
            assert r.tolist() == [[lo, hi]], (qb, r)
        else:
            assert lo_clamp <= n <= hi_clamp, (qb, n, lo_clamp, hi_clamp)
            if cfg.budget_mode != "adaptive":
                # more candidates than budget: the budget is filled exactly
                assert n == hi_clamp
    counts = sel.keys_per_block()
    assert counts.shape == (sel.batch, sel.groups, sel.num_blocks)
    return dense_blocks


def reference_density(sel, Lq, Lk, causal=True, window=None):
    s, a = reference.count_pairs(sel.offsets, sel.starts, sel.ends, sel.batch, sel.groups, Lq,
                                 Lk, sel.block_size, causal=causal, window=window)
    return s, a


# ---- exact agreement ---------------------------------------------------------

CASES = [
    # (B, H, Hkv, Lq, Lk, D), config changes, call options
    ((1, 2, 1, 150, 150, 32), dict(), dict()),
    ((1, 4, 2, 100, 260, 32), dict(), dict()),
    ((2, 4, 2, 90, 230, 16), dict(granularity="layer"), dict()),
    ((2, 6, 2, 90, 230, 16), dict(granularity="query_head"), dict()),
    ((1, 4, 2, 100, 300, 64), dict(budget_mode="density", density=0.25), dict()),
    ((1, 4, 2, 100, 300, 64), dict(budget_mode="density", density=0.05), dict()),
    ((2, 4, 1, 100, 300, 64), dict(budget_mode="adaptive"), dict()),
    ((1, 4, 2, 100, 300, 64), dict(budget_mode="adaptive", mass=0.5, min_budget=60,
                                   max_budget=60), dict()),
    ((1, 4, 2, 120, 300, 32), dict(budget_mode="adaptive", mass=1.0, granularity="query_head"),
     dict()),
    ((1, 4, 2, 100, 300, 32), dict(), dict(window=120)),
    ((1, 4, 2, 100, 300, 32), dict(budget_mode="density"), dict(window=200)),
    ((1, 4, 2, 100, 300, 32), dict(budget_mode="adaptive"), dict(window=150)),
    ((1, 4, 2, 100, 300, 32), dict(), dict(causal=False)),
    ((1, 4, 2, 100, 300, 32), dict(granularity="layer"), dict(causal=False, window=90)),
    ((1, 2, 2, 100, 300, 32), dict(budget_mode="adaptive"), dict(causal=False)),
    ((1, 2, 1, 100, 301, 32), dict(block_size=7, budget=80), dict()),
    ((2, 3, 1, 61, 199, 16), dict(block_size=13, budget=70, granularity="query_head"), dict()),
    ((1, 2, 1, 1, 250, 32), dict(), dict()),
    ((1, 2, 1, 250, 250, 32), dict(block_size=1, budget=45, sink=4, local=16, nms_radius=4,
                                   boundary_window=4), dict()),
    ((1, 2, 1, 100, 300, 32), dict(sink=0, local=16, budget=40), dict()),
    ((1, 2, 1, 100, 300, 32), dict(max_chunks=6, granularity="layer"), dict()),
    ((1, 2, 1, 100, 300, 32), dict(chunking="fixed", chunk_size=10, local=0, budget=40),
     dict()),
    ((1, 2, 1, 100, 300, 32), dict(), dict(scale=0.5)),
    ((1, 2, 1, 100, 300, 32), dict(budget_mode="adaptive"), dict(scale=0.0625)),
    ((1, 4, 2, 64, 400, 128), dict(budget=150), dict()),
    ((1, 4, 2, 100, 300, 32), dict(dense_tail=20), dict()),
    ((1, 4, 2, 100, 300, 32), dict(dense_tail=1, budget_mode="density"), dict(window=120)),
    ((2, 4, 2, 100, 300, 32), dict(dense_tail=50, budget_mode="adaptive",
                                   granularity="query_head"), dict()),
    ((1, 2, 1, 100, 300, 32), dict(dense_tail=100), dict(causal=False)),
    ((1, 4, 2, 100, 300, 32), dict(chunk_score="max"), dict()),
    ((2, 6, 2, 90, 230, 16), dict(chunk_score="max", granularity="layer"), dict()),
    ((1, 4, 2, 100, 300, 32), dict(chunk_score="max", granularity="query_head",
                                   budget_mode="density", density=0.2), dict(window=150)),
    ((1, 4, 2, 100, 300, 32), dict(chunk_score="max", chunking="fixed", chunk_size=1), dict()),
    ((1, 4, 2, 100, 300, 32), dict(chunk_score="max", min_chunk=1, max_chunk=4,
                                   dense_tail=16), dict(causal=False)),
]


def _case_id(case):
    shape, changes, opts = case
    parts = ["B{}H{}Hkv{}Lq{}Lk{}D{}".format(*shape)]
    parts += [f"{k}={v}" for k, v in {**changes, **opts}.items()]
    return ",".join(parts)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_predict_matches_reference_exactly(rng, case):
    shape, changes, opts = case
    q, k, _ = make_qkv(rng, *shape)
    cfg = base_cfg(**changes)
    sel = dhsa.predict_selection(q, k, cfg, **opts)
    ref = reference_predict(q, k, cfg, **opts)
    assert_selection_equal(sel, ref)
    assert sel.granularity == cfg.granularity
    assert sel.block_size == cfg.block_size
    assert sel.num_blocks == -(-shape[3] // cfg.block_size)
    check_properties(sel, cfg, shape[3], shape[4], opts.get("causal", True), opts.get("window"))


@pytest.mark.parametrize("mode", ["tokens", "density", "adaptive"])
def test_predict_matches_reference_float16(rng, mode):
    q, k, _ = make_qkv(rng, 1, 4, 2, 90, 220, 32, dtype=np.float16)
    cfg = base_cfg(budget_mode=mode)
    assert_selection_equal(dhsa.predict_selection(q, k, cfg), reference_predict(q, k, cfg))


@pytest.mark.parametrize("mode", ["tokens", "adaptive"])
def test_predict_matches_reference_caller_boundaries(rng, mode):
    q, k, _ = make_qkv(rng, 2, 4, 2, 80, 200, 32)
    cfg = base_cfg(budget_mode=mode)
    bounds = [np.array([0, 5, 50, 51, 120, 199, 200]), np.array([0, 100, 200]),
              np.arange(0, 201, 25), np.array([0, 200])]
    sel = dhsa.predict_selection(q, k, cfg, boundaries=bounds)
    assert_selection_equal(sel, reference_predict(q, k, cfg, bounds=bounds))


@pytest.mark.parametrize("D", [80, 96])
def test_predict_adaptive_default_scale_not_power_of_two(rng, D):
    """1/sqrt(D) is not a float32 value here; the selection must still match."""
    q, k, _ = make_qkv(rng, 1, 4, 2, 100, 300, D, scale=2.0)
    cfg = base_cfg(budget_mode="adaptive", mass=0.8)
    assert_selection_equal(dhsa.predict_selection(q, k, cfg), reference_predict(q, k, cfg))


def test_predict_threads_identical(rng):
    q, k, _ = make_qkv(rng, 2, 4, 2, 300, 500, 32)
    for mode in ("tokens", "adaptive"):
        cfg = base_cfg(budget_mode=mode)
        a = dhsa.predict_selection(q, k, cfg, num_threads=1)
        b = dhsa.predict_selection(q, k, cfg, num_threads=2)
        c = dhsa.predict_selection(q, k, cfg, num_threads=5)
        for x in (b, c):
            for name in ("offsets", "starts", "ends", "pairs_selected", "pairs_allowed"):
                np.testing.assert_array_equal(getattr(a, name), getattr(x, name))
            for ba, bx in zip(a.boundaries, x.boundaries):
                np.testing.assert_array_equal(ba, bx)


# ---- properties --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tokens", "density", "adaptive"])
@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
@pytest.mark.parametrize("opts", [dict(), dict(window=100), dict(causal=False),
                                  dict(causal=False, window=70)],
                         ids=["causal", "window", "noncausal", "noncausal-window"])
def test_selection_properties(rng, mode, granularity, opts):
    B, H, Hkv, Lq, Lk = 2, 4, 2, 130, 330
    q, k, _ = make_qkv(rng, B, H, Hkv, Lq, Lk, 32)
    cfg = base_cfg(budget_mode=mode, granularity=granularity)
    sel = dhsa.predict_selection(q, k, cfg, **opts)
    assert sel.groups == {"layer": 1, "kv_head": Hkv, "query_head": H}[granularity]
    assert sel.batch == B
    assert len(sel.offsets) == B * sel.groups * sel.num_blocks + 1
    assert sel.starts.dtype == np.int32 and sel.ends.dtype == np.int32
    dense = check_properties(sel, cfg, Lq, Lk, opts.get("causal", True), opts.get("window"))
    assert dense < B * sel.groups * sel.num_blocks  # something was actually sparse


def test_density_matches_count_pairs(rng):
    q, k, _ = make_qkv(rng, 2, 4, 2, 120, 300, 32)
    for opts in (dict(), dict(window=90), dict(causal=False)):
        for gran in ("layer", "kv_head", "query_head"):
            sel = dhsa.predict_selection(q, k, base_cfg(granularity=gran), **opts)
            s, a = reference_density(sel, 120, 300, **opts)
            np.testing.assert_array_equal(sel.pairs_selected, s)
            np.testing.assert_array_equal(sel.pairs_allowed, a)
            assert sel.density == pytest.approx(s.sum() / a.sum(), rel=1e-12)
            assert 0.0 < sel.density < 1.0


def test_to_mask_matches_ranges(rng):
    q, k, _ = make_qkv(rng, 1, 2, 1, 50, 120, 16)
    sel = dhsa.predict_selection(q, k, base_cfg(budget=60, local=24, sink=4))
    m = sel.to_mask(50, 120)
    assert m.shape == (1, 1, 50, 120)
    for _, _, qb, r in blocks_of(sel):
        row = np.zeros(120, bool)
        for s, e in r:
            row[s:e] = True
        for i in range(qb * 16, min(50, qb * 16 + 16)):
            np.testing.assert_array_equal(m[0, 0, i], row)


@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
@pytest.mark.parametrize("opts", [dict(), dict(causal=False), dict(window=77)])
def test_budget_at_least_lk_is_dense(rng, granularity, opts):
    Lq, Lk = 90, 200
    q, k, _ = make_qkv(rng, 2, 4, 2, Lq, Lk, 16)
    for mode, extra in (("tokens", dict(budget=Lk)), ("density", dict(density=1.0)),
                        ("adaptive", dict(min_budget=Lk, max_budget=Lk + 5))):
        cfg = base_cfg(granularity=granularity, budget_mode=mode, **extra)
        sel = dhsa.predict_selection(q, k, cfg, **opts)
        for _, _, qb, r in blocks_of(sel):
            *_, lo, hi = geometry(Lq, Lk, 16, qb, opts.get("causal", True), opts.get("window"))
            assert r.tolist() == [[lo, hi]]
        assert sel.density == 1.0


def test_forced_keys_exceeding_budget_are_kept(rng):
    """density mode with a tiny density: the forced minimum wins over ceil(density*allowed)."""
    Lq, Lk = 64, 400
    q, k, _ = make_qkv(rng, 1, 2, 1, Lq, Lk, 16)
    cfg = base_cfg(budget_mode="density", density=0.01)
    sel = dhsa.predict_selection(q, k, cfg)
    per = sel.keys_per_block()[0, 0]
    for qb, n in enumerate(per):
        _, _, spos, epos, lo, hi = geometry(Lq, Lk, 16, qb)
        forced = cfg.sink + (epos + 1 - (spos - cfg.local))
        assert n == forced
    check_properties(sel, cfg, Lq, Lk)


def test_tokens_budget_monotone(rng):
    """A larger budget keeps a superset-size of keys in every block."""
    q, k, _ = make_qkv(rng, 1, 2, 1, 100, 300, 32)
    prev = None
    for budget in (60, 90, 140, 220, 300):
        per = dhsa.predict_selection(q, k, base_cfg(budget=budget)).keys_per_block()
        if prev is not None:
            assert np.all(per >= prev)
        prev = per


def test_selection_picks_best_chunk(rng):
    """With caller boundaries, the chunk whose keys align with the block's queries
    is taken over the others (a direct check of the score ordering)."""
    D, Lq, Lk = 32, 16, 200
    u = np.zeros(D, np.float32)
    u[0] = 1.0
    q = (rng.standard_normal((1, 1, Lq, D)) * 0.1 + 2 * u).astype(np.float32)
    k = (rng.standard_normal((1, 1, Lk, D)) * 0.1).astype(np.float32)
    k[0, 0, 60:70] += 3 * u
    bounds = np.arange(0, Lk + 1, 10)
    cfg = base_cfg(budget=8 + 32 + 16 + 10, chunking="fixed", chunk_size=10)
    sel = dhsa.predict_selection(q, k, cfg, boundaries=bounds)
    r = sel.ranges(0, 0, 0).tolist()
    assert [60, 70] in r
    assert_selection_equal(sel, reference_predict(q, k, cfg, bounds=[bounds]))


def test_chunk_scores(rng):
    """return_scores: full-chunk scores r_q . r_k, NaN where a chunk is out of reach."""
    Lq, Lk, D = 64, 160, 16
    q, k, _ = make_qkv(rng, 1, 2, 1, Lq, Lk, D)
    cfg = base_cfg(chunking="fixed", chunk_size=20, local=8, budget=40)
    sel = dhsa.predict_selection(q, k, cfg, return_scores=True, window=60)
    assert dhsa.predict_selection(q, k, cfg).chunk_scores is None
    cs = sel.chunk_scores
    nchunks = Lk // 20
    assert cs.shape == (1, sel.num_blocks, nchunks)
    qP = reference.prefix_sums(q[0])
    kP = reference.prefix_sums(k[0])
    bd = np.arange(0, Lk + 1, 20)
    for qb in range(sel.num_blocks):
        i0, nq, spos, epos, lo, hi = geometry(Lq, Lk, 16, qb, True, 60)
        rq = (qP[i0 + nq] - qP[i0]) / math.sqrt(nq)
        for c in range(nchunks):
            reachable = bd[c] < hi and bd[c + 1] > lo
            if reachable:
                want = rq @ ((kP[bd[c + 1]] - kP[bd[c]]) / math.sqrt(20))
                assert cs[0, qb, c] == pytest.approx(want, rel=1e-9, abs=1e-9)
            else:
                assert np.isnan(cs[0, qb, c]), (qb, c)


def test_non_contiguous_inputs(rng):
    B, H, Hkv, Lq, Lk, D = 1, 4, 2, 80, 200, 32
    q0 = rng.standard_normal((B, Lq, H, D)).astype(np.float32)
    k0 = rng.standard_normal((B, Lk, Hkv, 2 * D)).astype(np.float32)
    q = q0.transpose(0, 2, 1, 3)
    k = k0.transpose(0, 2, 1, 3)[..., ::2]
    assert not q.flags.c_contiguous and not k.flags.c_contiguous
    cfg = base_cfg(budget_mode="adaptive")
    a = dhsa.predict_selection(q, k, cfg)
    b = dhsa.predict_selection(np.ascontiguousarray(q), np.asfortranarray(k), cfg)
    for name in ("offsets", "starts", "ends"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert_selection_equal(a, reference_predict(q, k, cfg))


def test_inputs_not_modified(rng):
    q, k, _ = make_qkv(rng, 1, 4, 2, 80, 200, 32)
    qc, kc = q.copy(), k.copy()
    dhsa.predict_selection(q, k, base_cfg(budget_mode="adaptive"), return_scores=True)
    np.testing.assert_array_equal(q, qc)
    np.testing.assert_array_equal(k, kc)


def test_dense_tail_blocks_keep_every_key(rng):
    # the blocks holding the last dense_tail queries keep all their keys (block 12
    # holds queries 192..199, block 11 176..191), the
    # others are the selection without a tail, range for range
    q, k, v = make_qkv(rng, 1, 4, 2, 200, 400, 32)
    cfg = base_cfg(budget_mode="density", density=0.2)
    plain = dhsa.predict_selection(q, k, cfg)
    for tail, dense_from in ((1, 12), (8, 12), (9, 11), (24, 11), (25, 10), (300, 0)):
        sel = dhsa.predict_selection(q, k, cfg.replace(dense_tail=tail))
        for b, g, qb, r in blocks_of(sel):
            if qb >= dense_from:
                i0, nq, spos, epos, lo, hi = geometry(200, 400, 16, qb)
                assert r.tolist() == [[lo, hi]], (tail, qb)
            else:
                np.testing.assert_array_equal(r, plain.ranges(b, g, qb), err_msg=f"{tail} {qb}")
        assert (sel.density > plain.density) == (tail > 0)
    # a tail over every query is dense attention
    out = dhsa.sparse_attention(q, k, v, cfg.replace(dense_tail=200))
    np.testing.assert_allclose(out, dhsa.dense_attention(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["streaming", "vertical_slash", "oracle", "block_topk"])
def test_dense_tail_applies_to_every_method(rng, method):
    q, k, _ = make_qkv(rng, 1, 4, 2, 128, 256, 16)
    cfg = base_cfg(method=method, chunk_size=8, last_queries=16, dense_tail=20)
    sel = dhsa.predict_selection(q, k, cfg)
    plain = dhsa.predict_selection(q, k, cfg.replace(dense_tail=0))
    for b, g, qb, r in blocks_of(sel):
        if qb >= 6:  # blocks 6 and 7 hold the last 20 queries
            assert r.tolist() == [[0, 256 - 128 + 16 * qb + 16]], (qb, r)
        else:
            np.testing.assert_array_equal(r, plain.ranges(b, g, qb))


def test_max_score_finds_the_one_key_a_mean_dilutes(rng):
    # one key in a chunk of 16 matches the block's queries; its 15 neighbours
    # point the other way, so the chunk's mean is low. chunk_score="max"
    # keeps that key's chunk, "mean" does not.
    D, L, Lq = 16, 400, 16
    q = np.zeros((1, 1, Lq, D), np.float32)
    q[..., 0] = 1.0
    k = (0.1 * rng.standard_normal((1, 1, L, D))).astype(np.float32)
    k[0, 0, 160:176, 0] = -0.5          # a chunk that points away...
    k[0, 0, 170, 0] = 3.0               # ...but for one key
    k[0, 0, 96:112, 0] = 0.2            # a chunk mildly aligned as a whole
    bounds = np.arange(0, L + 1, 16)
    cfg = dhsa.DHSAConfig(budget=16 + 16 + 16 + 16, block_size=16, sink=16, local=16,
                          chunking="fixed", chunk_size=16)
    kept = {}
    for score in ("mean", "max"):
        sel = dhsa.predict_selection(q, k, cfg.replace(chunk_score=score), boundaries=bounds)
        r = sel.ranges(0, 0, 0)
        kept[score] = {int(j) for a, b in r for j in range(a, b)}
    assert 170 in kept["max"] and 170 not in kept["mean"]
    assert set(range(96, 112)) <= kept["mean"]


def test_block_topk_ignores_chunk_score(rng):
    q, k, _ = make_qkv(rng, 1, 4, 2, 70, 150, 16)
    cfg = dhsa.DHSAConfig(budget=60, block_size=8, sink=4, local=16, chunk_size=10,
                          method="block_topk")
    a = dhsa.predict_selection(q, k, cfg)
    b = dhsa.predict_selection(q, k, cfg.replace(chunk_score="max"))
    np.testing.assert_array_equal(a.starts, b.starts)
    np.testing.assert_array_equal(a.ends, b.ends)


def test_lq_one(rng):
    q, k, _ = make_qkv(rng, 1, 2, 2, 1, 300, 32)
    cfg = base_cfg()
    sel = dhsa.predict_selection(q, k, cfg)
    assert sel.num_blocks == 1
    assert sel.keys_per_block()[0, 0, 0] == cfg.budget
    assert_selection_equal(sel, reference_predict(q, k, cfg))


# ---- randomised configurations -----------------------------------------------


@st.composite
def predict_problems(draw):
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    B = draw(st.integers(1, 2))
    Lk = draw(st.integers(1, 260))
    Lq = draw(st.integers(1, Lk))
    D = draw(st.sampled_from([8, 16, 24, 80]))
    bs = draw(st.integers(1, 40))
    sink = draw(st.integers(0, 20))
    bw = draw(st.integers(1, 10))
    nms = draw(st.integers(0, 8))
    local = bw + nms + draw(st.integers(0, 40))
    min_budget = draw(st.integers(1, 60))
    min_chunk = draw(st.integers(1, 10))
    kw = dict(
        budget=sink + local + bs + draw(st.integers(0, 100)), block_size=bs, sink=sink,
        local=local, boundary_window=bw, nms_radius=nms, min_chunk=min_chunk,
        max_chunk=min_chunk + draw(st.integers(0, 40)),
        threshold=draw(st.floats(0.0, 1.5)), min_budget=min_budget,
        max_budget=min_budget + draw(st.integers(0, 100)), mass=draw(st.floats(0.05, 1.0)),
        density=draw(st.floats(0.01, 1.0)),
        budget_mode=draw(st.sampled_from(["tokens", "density", "adaptive"])),
        granularity=draw(st.sampled_from(["layer", "kv_head", "query_head"])),
        max_chunks=draw(st.one_of(st.none(), st.integers(1, 20))),
        chunking=draw(st.sampled_from(["dynamic", "dynamic", "fixed"])),
        chunk_size=draw(st.integers(1, 50)),
        dense_tail=draw(st.sampled_from([0, 0, 1, bs, Lq // 3, Lq + 5])),
        chunk_score=draw(st.sampled_from(["mean", "max"])))
    if kw["chunk_score"] == "max" and kw["budget_mode"] == "adaptive":
        kw["budget_mode"] = "density"
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = False
    if draw(st.booleans()):
        opts["window"] = draw(st.integers(1, Lk + 20))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    seed = draw(st.integers(0, 2**32 - 1))
    return (B, H, Hkv, Lq, Lk, D), kw, opts, dtype, seed


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(predict_problems())
def test_predict_random_configs_match_reference(problem):
    shape, kw, opts, dtype, seed = problem
    q, k, _ = make_qkv(np.random.default_rng(seed), *shape, dtype=dtype)
    cfg = dhsa.DHSAConfig(**kw)
    sel = dhsa.predict_selection(q, k, cfg, **opts)
    assert_selection_equal(sel, reference_predict(q, k, cfg, **opts))
    check_properties(sel, cfg, shape[3], shape[4], opts.get("causal", True), opts.get("window"))
    s, a = reference_density(sel, shape[3], shape[4], **opts)
    np.testing.assert_array_equal(sel.pairs_selected, s)
    np.testing.assert_array_equal(sel.pairs_allowed, a)
