"""dhsa.sparse_attention: dense limit, agreement with the reference on a given
selection, causality, a planted needle, threads, info and selection reuse."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dhsa
from dhsa import reference
from conftest import make_qkv, rel_err

# the default-style dynamic chunking configuration, scaled down
CFG = dhsa.DHSAConfig(budget=96, block_size=16, sink=8, local=32, boundary_window=8,
                      nms_radius=8, min_chunk=4, max_chunk=32)


def f16_close(a, b):
    """float16 outputs of float32 results that agree to 1e-6 (relative to the
    largest value) differ by at most one float16 rounding step beyond that."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ulp = np.spacing(np.abs(b).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(a - b) <= ulp + 1e-6 * np.abs(b).max())


# ---- budget >= Lk: sparse equals dense -----------------------------------------

DENSE_LIMIT = [
    # (B, H, Hkv, Lq, Lk, D), sparse_attention options
    ((1, 2, 2, 100, 100, 32), dict()),
    ((2, 4, 1, 70, 190, 64), dict()),                        # GQA 4, Lq < Lk
    ((1, 6, 2, 50, 150, 32), dict(softcap=10.0)),             # GQA 3
    ((1, 4, 2, 80, 200, 32), dict(window=45)),
    ((1, 4, 2, 80, 200, 32), dict(causal=False)),
    ((1, 4, 2, 80, 200, 32), dict(causal=False, window=60, softcap=5.0, scale=0.3)),
    ((1, 2, 1, 1, 120, 80), dict()),                          # Lq = 1
    ((1, 2, 1, 33, 300, 128), dict(softcap=30.0, scale=1.0)),  # crosses a 256-key tile
]


@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
@pytest.mark.parametrize("case", DENSE_LIMIT, ids=lambda c: "B{}H{}Hkv{}Lq{}Lk{}D{}".format(
    *c[0]) + "".join(f",{k}={v}" for k, v in c[1].items()))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_budget_ge_lk_equals_dense(rng, granularity, case, dtype):
    shape, opts = case
    Lk = shape[4]
    q, k, v = make_qkv(rng, *shape, dtype=dtype)
    cfg = CFG.replace(budget=Lk, granularity=granularity)
    out, info = dhsa.sparse_attention(q, k, v, cfg, return_info=True, **opts)
    dense = dhsa.dense_attention(q, k, v, **opts)
    assert out.dtype == dtype and out.shape == q.shape
    assert info.density == 1.0
    if dtype == np.float32:
        assert rel_err(out, dense) <= 1e-6
    else:
        f16_close(out, dense)


@pytest.mark.parametrize("mode, extra", [("density", dict(density=1.0)),
                                         ("adaptive", dict(min_budget=400, max_budget=400))])
def test_full_budget_other_modes_equal_dense(rng, mode, extra):
    q, k, v = make_qkv(rng, 1, 4, 2, 90, 210, 32)
    cfg = CFG.replace(budget_mode=mode, **extra)
    out = dhsa.sparse_attention(q, k, v, cfg, softcap=20.0)
    assert rel_err(out, dhsa.dense_attention(q, k, v, softcap=20.0)) <= 1e-6


# ---- sparse against the reference on the same selection -------------------------

SPARSE_CASES = [
    ((1, 2, 1, 150, 150, 32), dict(), dict()),
    ((2, 4, 2, 100, 300, 64), dict(), dict()),
    ((1, 6, 2, 100, 300, 32), dict(granularity="layer"), dict()),
    ((1, 6, 2, 100, 300, 32), dict(granularity="query_head"), dict()),
    ((1, 4, 2, 100, 300, 80), dict(budget_mode="density", density=0.2), dict()),
    ((1, 4, 2, 100, 300, 64), dict(budget_mode="adaptive", min_budget=40, max_budget=150,
                                   mass=0.9), dict()),
    ((1, 4, 2, 100, 300, 32), dict(), dict(softcap=10.0)),
    ((1, 4, 2, 100, 300, 32), dict(), dict(softcap=30.0, scale=1.0)),
    ((1, 4, 2, 100, 300, 32), dict(), dict(window=150)),
    ((1, 4, 2, 100, 300, 32), dict(), dict(causal=False)),
    ((1, 4, 2, 100, 300, 32), dict(granularity="query_head"),
     dict(causal=False, window=120, softcap=8.0)),
    ((1, 2, 1, 95, 333, 256), dict(block_size=7, budget=60), dict()),
    ((1, 2, 1, 100, 600, 32), dict(block_size=100, budget=300, local=64), dict()),
    ((1, 2, 1, 1, 300, 32), dict(), dict()),
    ((1, 2, 1, 300, 600, 16), dict(block_size=300, budget=400, local=32), dict()),
]


def _sparse_id(c):
    shape, changes, opts = c
    return ",".join(["B{}H{}Hkv{}Lq{}Lk{}D{}".format(*shape)] +
                    [f"{k}={v}" for k, v in {**changes, **opts}.items()])


@pytest.mark.parametrize("case", SPARSE_CASES, ids=_sparse_id)
def test_sparse_matches_reference_with_selection(rng, case):
    shape, changes, opts = case
    q, k, v = make_qkv(rng, *shape)
    cfg = CFG.replace(**changes)
    popts = {key: opts[key] for key in ("causal", "scale", "window") if key in opts}
    sel = dhsa.predict_selection(q, k, cfg, **popts)
    assert sel.density < 1.0 or shape[3] == 1 and sel.density <= 1.0
    out = dhsa.sparse_attention(q, k, v, selection=sel, **opts)
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                             sel.block_size, **opts)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert rel_err(out, ref) <= 1e-5
    # predicting inside sparse_attention gives the very same result
    again = dhsa.sparse_attention(q, k, v, cfg, **opts)
    np.testing.assert_array_equal(out, again)
    # and the sparse result really differs from dense attention
    if sel.density < 0.9:
        assert rel_err(out, dhsa.dense_attention(q, k, v, **opts)) > 1e-3


def test_sparse_float16_matches_reference(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 64, dtype=np.float16)
    sel = dhsa.predict_selection(q, k, CFG)
    out = dhsa.sparse_attention(q, k, v, selection=sel, softcap=20.0)
    assert out.dtype == np.float16
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends, 16,
                                             softcap=20.0)
    assert rel_err(out, ref) <= 2e-3


def test_hand_made_selections_match_reference(rng):
    """Selections not made by predict: empty blocks, single keys, ranges past the
    causal limit (masked inside), per-query-head groups."""
    B, H, Hkv, Lq, Lk, D = 1, 4, 2, 40, 100, 32
    q, k, v = make_qkv(rng, B, H, Hkv, Lq, Lk, D)
    bs, nqb = 8, 5
    for groups in (1, Hkv, H):
        offsets, starts, ends = [0], [], []
        for g in range(groups):
            for qb in range(nqb):
                choice = (g + qb) % 4
                if choice == 0:
                    pass                                  # no key at all: zeros
                elif choice == 1:
                    starts += [3]
                    ends += [4]                           # one key
                elif choice == 2:
                    starts += [0, 10, 70]
                    ends += [5, 40, 100]                  # reaches past the queries
                else:
                    starts += [0]
                    ends += [Lk]                          # everything (masked causally)
                offsets.append(len(starts))
        sel = dhsa.Selection(offsets=np.array(offsets, np.int64),
                             starts=np.array(starts, np.int32), ends=np.array(ends, np.int32),
                             block_size=bs, batch=B, groups=groups, num_blocks=nqb,
                             granularity="layer")
        out = dhsa.sparse_attention(q, k, v, selection=sel)
        ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends, bs)
        assert rel_err(out, ref) <= 1e-5
        assert np.all(np.isfinite(out))
        # a block that saw no key gives zeros (not NaN)
        if groups == 1:
            assert np.all(out[0, :, 0:8] == 0.0)


def test_selection_covering_everything_equals_dense(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 45, 90, 32)
    n = 6
    sel = dhsa.Selection(offsets=np.arange(n + 1, dtype=np.int64),
                         starts=np.zeros(n, np.int32), ends=np.full(n, 90, np.int32),
                         block_size=8, batch=1, groups=1, num_blocks=n, granularity="layer")
    for opts in (dict(), dict(causal=False), dict(window=20, softcap=3.0)):
        out = dhsa.sparse_attention(q, k, v, selection=sel, **opts)
        assert rel_err(out, dhsa.dense_attention(q, k, v, **opts)) <= 1e-6


# ---- causality ---------------------------------------------------------------

CAUSAL_CFGS = [
    pytest.param(CFG, id="tokens"),
    pytest.param(CFG.replace(budget_mode="adaptive", min_budget=56, max_budget=120, mass=0.9),
                 id="adaptive"),
    pytest.param(CFG.replace(budget_mode="density", density=0.2), id="density"),
    pytest.param(CFG.replace(granularity="layer"), id="layer"),
    pytest.param(CFG.replace(granularity="query_head", max_chunks=20), id="query_head"),
    pytest.param(CFG.replace(block_size=13, budget=100, boundary_window=16, nms_radius=16,
                             local=32, threshold=0.2), id="tight-lookahead"),
]


@pytest.mark.parametrize("cfg", CAUSAL_CFGS)
@pytest.mark.parametrize("Lq", [400, 250])
def test_causality_future_keys_never_matter(rng, cfg, Lq):
    """Changing keys/values after position p leaves every query at <= p bitwise equal."""
    B, H, Hkv, Lk, D = 1, 4, 2, 400, 32
    q, k, v = make_qkv(rng, B, H, Hkv, Lq, Lk, D)
    base = dhsa.sparse_attention(q, k, v, cfg)
    base_sel = dhsa.predict_selection(q, k, cfg)
    assert base_sel.density < 0.8
    offset = Lk - Lq
    for p in (offset, offset + 15, offset + 16, 217, 300, 333, Lk - 2):
        k2, v2 = k.copy(), v.copy()
        n = Lk - (p + 1)
        k2[:, :, p + 1:] = rng.standard_normal((B, Hkv, n, D)).astype(np.float32) * 3.0
        v2[:, :, p + 1:] = rng.standard_normal((B, Hkv, n, D)).astype(np.float32) * 3.0
        out = dhsa.sparse_attention(q, k2, v2, cfg)
        rows = p - offset + 1  # query rows at positions <= p
        np.testing.assert_array_equal(out[:, :, :rows], base[:, :, :rows],
                                      err_msg=f"p={p}")
        # the future did change: some later row moved
        if rows < Lq:
            assert not np.array_equal(out[:, :, rows:], base[:, :, rows:])


def test_causality_selection_of_past_blocks_stable(rng):
    """The prediction of every block that ends at or before p is unchanged."""
    Lk = 400
    q, k, _ = make_qkv(rng, 1, 2, 1, Lk, Lk, 32)
    base = dhsa.predict_selection(q, k, CFG)
    for p in (47, 150, 301):
        k2 = k.copy()
        k2[:, :, p + 1:] = -k2[:, :, p + 1:] * 2 + 1
        sel = dhsa.predict_selection(q, k2, CFG)
        for qb in range((p + 1) // 16):
            np.testing.assert_array_equal(sel.ranges(0, 0, qb), base.ranges(0, 0, qb))


def test_causality_dense_kernel(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 200, 300, 32)
    base = dhsa.dense_attention(q, k, v, softcap=10.0)
    for p in (100, 199, 250):
        k2, v2 = k.copy(), v.copy()
        k2[:, :, p + 1:] *= -5
        v2[:, :, p + 1:] += 7
        out = dhsa.dense_attention(q, k2, v2, softcap=10.0)
        rows = p - 100 + 1
        np.testing.assert_array_equal(out[:, :, :rows], base[:, :, :rows])


# ---- planted needle ------------------------------------------------------------

def needle_inputs(rng, Lk=1024, Lq=64, D=64, pos=100, width=4):
    """The last query block points along u; keys [pos, pos + width) are 16 u with
    value w; everything else is noise."""
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    q = rng.standard_normal((1, 2, Lq, D)) * 0.3
    q[:, :, Lq - 16:] += 4.0 * u
    k = rng.standard_normal((1, 1, Lk, D))
    v = rng.standard_normal((1, 1, Lk, D))
    k[0, 0, pos:pos + width] = 16.0 * u
    w = np.full(D, 2.0)
    v[0, 0, pos:pos + width] = w
    return [x.astype(np.float32) for x in (q, k, v)] + [w]


def test_planted_needle_found_by_dhsa_missed_by_sink_local(rng):
    Lk, Lq, bs = 1024, 64, 16
    q, k, v, w = needle_inputs(rng, Lk, Lq)
    out, info = dhsa.sparse_attention(q, k, v, CFG, return_info=True)
    sel = info.selection
    last = sel.num_blocks - 1
    r = sel.ranges(0, 0, last)
    assert any(s <= 100 and e >= 104 for s, e in r), r.tolist()
    assert sel.keys_per_block()[0, 0, last] == CFG.budget
    # the needle dominates the block's output
    err = np.abs(out[0, :, Lq - 16:] - w).max() / np.abs(w).max()
    assert err < 0.1, err
    # other blocks are not drawn to it
    assert np.abs(out[0, :, :Lq - 16] - w).max() > 1.0

    # sink + local with the same budget: the needle is out of reach
    offsets, starts, ends = [0], [], []
    for qb in range(Lq // bs):
        end = Lk - Lq + (qb + 1) * bs
        starts += [0, end - (CFG.budget - CFG.sink)]
        ends += [CFG.sink, end]
        offsets.append(len(starts))
    plain = dhsa.Selection(np.array(offsets, np.int64), np.array(starts, np.int32),
                           np.array(ends, np.int32), bs, 1, 1, Lq // bs, "layer")
    assert np.all(plain.keys_per_block() == CFG.budget)
    out_plain = dhsa.sparse_attention(q, k, v, selection=plain)
    assert np.abs(out_plain[0, :, Lq - 16:] - w).max() / np.abs(w).max() > 0.5

    # fixed chunking with budget = sink + local + block keeps nothing else either
    fixed = CFG.replace(chunking="fixed", budget=CFG.sink + CFG.local + bs)
    out_fixed, info_fixed = dhsa.sparse_attention(q, k, v, fixed, return_info=True)
    r_fixed = info_fixed.selection.ranges(0, 0, last)
    assert not any(s <= 100 < e for s, e in r_fixed)
    assert np.abs(out_fixed[0, :, Lq - 16:] - w).max() / np.abs(w).max() > 0.5

    # DHSA is also closer to dense attention than sink + local on that block
    dense = dhsa.dense_attention(q, k, v)
    d_dhsa = np.abs(out[0, :, Lq - 16:] - dense[0, :, Lq - 16:]).max()
    d_plain = np.abs(out_plain[0, :, Lq - 16:] - dense[0, :, Lq - 16:]).max()
    assert d_dhsa < d_plain


@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
@pytest.mark.parametrize("mode", ["tokens", "adaptive"])
def test_planted_needle_all_granularities(rng, granularity, mode):
    q, k, v, w = needle_inputs(rng, Lk=600, Lq=48, pos=70, width=6)
    cfg = CFG.replace(granularity=granularity, budget_mode=mode, min_budget=60,
                      max_budget=150, mass=0.9)
    out, info = dhsa.sparse_attention(q, k, v, cfg, return_info=True)
    sel = info.selection
    for g in range(sel.groups):
        r = sel.ranges(0, g, sel.num_blocks - 1)
        assert any(s <= 70 and e >= 76 for s, e in r), r.tolist()
    assert np.abs(out[0, :, -16:] - w).max() / 2.0 < 0.1


# ---- threads, info, reuse --------------------------------------------------------

@pytest.mark.parametrize("opts", [dict(), dict(softcap=10.0, window=150), dict(causal=False)])
@pytest.mark.parametrize("granularity", ["kv_head", "query_head", "layer"])
def test_threads_bitwise_identical(rng, opts, granularity):
    q, k, v = make_qkv(rng, 2, 4, 2, 200, 400, 64)
    cfg = CFG.replace(granularity=granularity)
    one = dhsa.sparse_attention(q, k, v, cfg, num_threads=1, **opts)
    two = dhsa.sparse_attention(q, k, v, cfg, num_threads=2, **opts)
    many = dhsa.sparse_attention(q, k, v, cfg, num_threads=6, **opts)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, many)


def test_return_info_with_given_selection_times_only_the_attention(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 32)
    sel = dhsa.predict_selection(q, k, CFG)
    t0 = time.perf_counter()
    _, info = dhsa.sparse_attention(q, k, v, selection=sel, return_info=True)
    wall = time.perf_counter() - t0
    assert info.predict_seconds == 0.0
    assert 0.0 < info.attention_seconds <= wall


def test_return_info_leaves_the_callers_selection_alone(rng):
    """A selection without pair counts gets them in a new Selection; the
    caller's object is not changed."""
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 32)
    sel = dhsa.predict_selection(q, k, CFG)
    hand = dataclasses.replace(sel, pairs_selected=None, pairs_allowed=None)
    out, info = dhsa.sparse_attention(q, k, v, selection=hand, return_info=True)
    assert hand.pairs_selected is None and hand.pairs_allowed is None
    assert info.selection is not hand
    np.testing.assert_array_equal(info.selection.pairs_selected, sel.pairs_selected)
    np.testing.assert_array_equal(info.selection.pairs_allowed, sel.pairs_allowed)
    np.testing.assert_array_equal(out, dhsa.sparse_attention(q, k, v, selection=sel))


def test_return_info(rng):
    Lq, Lk = 100, 300
    q, k, v = make_qkv(rng, 2, 4, 2, Lq, Lk, 32)
    t0 = time.perf_counter()
    out, info = dhsa.sparse_attention(q, k, v, CFG, return_info=True)
    wall = time.perf_counter() - t0
    plain = dhsa.sparse_attention(q, k, v, CFG)
    np.testing.assert_array_equal(out, plain)
    assert isinstance(info, dhsa.AttentionInfo)
    assert isinstance(info.selection, dhsa.Selection)
    assert 0.0 < info.density <= 1.0
    assert info.density < 1.0
    # both stages are timed in the core, inside the call
    assert info.predict_seconds > 0.0 and info.attention_seconds > 0.0
    assert info.predict_seconds + info.attention_seconds <= wall
    assert len(info.boundaries) == 2 * 2
    for bd in info.boundaries:
        assert bd[0] == 0 and bd[-1] == Lk and np.all(np.diff(bd) > 0)
    sel = info.selection
    s, a = reference.count_pairs(sel.offsets, sel.starts, sel.ends, 2, sel.groups, Lq, Lk, 16)
    assert info.density == pytest.approx(s.sum() / a.sum(), rel=1e-12)
    for b in range(2):
        for g in range(sel.groups):
            r = sel.ranges(b, g, 0)
            assert r.ndim == 2 and r.shape[1] == 2 and len(r) >= 1


def test_return_info_hand_selection_gets_density(rng):
    Lq, Lk = 40, 60
    q, k, v = make_qkv(rng, 1, 2, 1, Lq, Lk, 16)
    sel = dhsa.Selection(np.array([0, 1, 2, 3, 4, 5], np.int64), np.zeros(5, np.int32),
                         np.array([10, 10, 10, 10, 10], np.int32), 8, 1, 1, 5, "layer")
    out, info = dhsa.sparse_attention(q, k, v, selection=sel, return_info=True)
    s, a = reference.count_pairs(sel.offsets, sel.starts, sel.ends, 1, 1, Lq, Lk, 8)
    assert info.density == pytest.approx(s.sum() / a.sum(), rel=1e-12)
    assert info.boundaries is None
    out_w, info_w = dhsa.sparse_attention(q, k, v, selection=dhsa.Selection(
        sel.offsets, sel.starts, sel.ends, 8, 1, 1, 5, "layer"), return_info=True, window=30)
    s, a = reference.count_pairs(sel.offsets, sel.starts, sel.ends, 1, 1, Lq, Lk, 8, window=30)
    assert info_w.density == pytest.approx(s.sum() / a.sum(), rel=1e-12)


def test_selection_reuse(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 32)
    sel = dhsa.predict_selection(q, k, CFG)
    direct = dhsa.sparse_attention(q, k, v, CFG)
    reused = dhsa.sparse_attention(q, k, v, selection=sel)
    np.testing.assert_array_equal(direct, reused)
    # reusing the selection with other values and softcap: the keys are not re-chosen
    v2 = v * 2.0 + 1.0
    k2 = -k  # would change the prediction, but the given selection is used as is
    out2 = dhsa.sparse_attention(q, k2, v2, selection=sel, softcap=15.0)
    ref2 = reference.attention_with_selection(q, k2, v2, sel.offsets, sel.starts, sel.ends, 16,
                                              softcap=15.0)
    assert rel_err(out2, ref2) <= 1e-5
    assert not np.array_equal(dhsa.predict_selection(q, k2, CFG).starts, sel.starts) or \
        not np.array_equal(dhsa.predict_selection(q, k2, CFG).offsets, sel.offsets)
    # the selection wins over a config and boundaries passed along with it
    other = dhsa.sparse_attention(q, k, v, CFG.replace(budget=300), selection=sel,
                                  boundaries=np.array([0, 300]))
    np.testing.assert_array_equal(other, direct)
    # the selection object is not modified by being used
    before = (sel.offsets.copy(), sel.starts.copy(), sel.ends.copy())
    dhsa.sparse_attention(q, k, v, selection=sel, return_info=True)
    for a, b in zip(before, (sel.offsets, sel.starts, sel.ends)):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_and_fortran_inputs(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 32)
    base = dhsa.sparse_attention(q, k, v, CFG, softcap=10.0)
    views = [np.asfortranarray(q), np.asfortranarray(k), np.asfortranarray(v)]
    np.testing.assert_array_equal(dhsa.sparse_attention(*views, CFG, softcap=10.0), base)
    big = [np.repeat(x, 2, axis=2)[:, :, ::2] for x in (q, k, v)]  # stepped slices
    assert not big[0].flags.c_contiguous
    np.testing.assert_array_equal(dhsa.sparse_attention(*big, CFG, softcap=10.0), base)


def test_caller_boundaries_flow_into_sparse(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 64, 256, 32)
    bounds = np.arange(0, 257, 32)
    out, info = dhsa.sparse_attention(q, k, v, CFG, boundaries=bounds, return_info=True)
    np.testing.assert_array_equal(info.boundaries[0], bounds)
    sel = dhsa.predict_selection(q, k, CFG, boundaries=bounds)
    np.testing.assert_array_equal(out, dhsa.sparse_attention(q, k, v, selection=sel))


def test_default_config(rng):
    """config=None uses DHSAConfig(): with its budget of 2048 short inputs are dense."""
    q, k, v = make_qkv(rng, 1, 2, 1, 100, 400, 32)
    out = dhsa.sparse_attention(q, k, v)
    assert rel_err(out, dhsa.dense_attention(q, k, v)) <= 1e-6
    sel = dhsa.predict_selection(q, k)
    assert sel.block_size == 64 and sel.density == 1.0


def test_concurrent_calls_from_python_threads(rng):
    """The GIL is released around the compute: parallel callers get serial results."""
    from concurrent.futures import ThreadPoolExecutor
    inputs = [make_qkv(rng, 1, 4, 2, 120, 300, 32) for _ in range(4)]

    def work(x):
        return dhsa.dense_attention(*x), dhsa.sparse_attention(*x, CFG)

    serial = [work(x) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(work, inputs))
    for (d0, s0), (d1, s1) in zip(serial, parallel):
        np.testing.assert_array_equal(d0, d1)
        np.testing.assert_array_equal(s0, s1)


# ---- randomised hand-made selections ---------------------------------------------


@st.composite
def selection_problems(draw):
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    B = draw(st.integers(1, 2))
    Lk = draw(st.integers(1, 400))
    Lq = draw(st.integers(1, Lk))
    D = draw(st.sampled_from([4, 16, 64, 80]))
    bs = draw(st.integers(1, 80))
    groups = draw(st.sampled_from([1, Hkv, H]))
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = False
    if draw(st.booleans()):
        opts["window"] = draw(st.integers(1, Lk + 10))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(1.0, 30.0))
    seed = draw(st.integers(0, 2**32 - 1))
    return (B, H, Hkv, Lq, Lk, D), bs, groups, opts, seed


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(selection_problems())
def test_random_selections_match_reference(problem):
    shape, bs, groups, opts, seed = problem
    rng = np.random.default_rng(seed)
    B, H, Hkv, Lq, Lk, D = shape
    q, k, v = make_qkv(rng, *shape)
    nqb = -(-Lq // bs)
    offsets, starts, ends = [0], [], []
    for _ in range(B * groups * nqb):
        cuts = np.unique(rng.integers(0, Lk + 1, size=int(rng.integers(0, 9))))
        if len(cuts) % 2:
            cuts = cuts[:-1]
        starts += cuts[0::2].tolist()
        ends += cuts[1::2].tolist()
        offsets.append(len(starts))
    sel = dhsa.Selection(np.array(offsets, np.int64), np.array(starts, np.int32),
                         np.array(ends, np.int32), bs, B, groups, nqb, "layer")
    out = dhsa.sparse_attention(q, k, v, selection=sel, **opts)
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends, bs,
                                             **opts)
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref) <= 1e-5
    one = dhsa.sparse_attention(q, k, v, selection=sel, num_threads=1, **opts)
    np.testing.assert_array_equal(one, out)


def test_return_info_counts_pairs_under_this_calls_masks(rng):
    """A selection carrying pair counts of other options (here: no window) gets
    the counts of the call's own masks in the info."""
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 32)
    sel = dhsa.predict_selection(q, k, CFG)
    _, info = dhsa.sparse_attention(q, k, v, selection=sel, window=50, return_info=True)
    windowed = dhsa.predict_selection(q, k, CFG, window=50)
    assert info.selection.pairs_allowed.sum() == windowed.pairs_allowed.sum()
    assert info.selection.pairs_allowed.sum() < sel.pairs_allowed.sum()
