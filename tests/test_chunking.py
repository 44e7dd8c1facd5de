"""Dynamic chunking of the keys: the core against reference.boundary_scores /
reference.find_boundaries, structural properties, planted content shifts."""
from __future__ import annotations

import numpy as np
import pytest

import dhsa
from dhsa import reference
from conftest import make_qkv


def chunk_cfg(**kw):
    base = dict(budget=200, block_size=16, sink=8, local=64, boundary_window=8, nms_radius=8,
                min_chunk=4, max_chunk=32, threshold=0.5)
    base.update(kw)
    return dhsa.DHSAConfig(**base)


def reference_bounds(k, cfg):
    """One array per chunking group, in the core's order (batch-major)."""
    B, Hkv = k.shape[:2]
    out = []
    for b in range(B):
        groups = [k[b]] if cfg.granularity == "layer" else [k[b, h:h + 1] for h in range(Hkv)]
        for kh in groups:
            score = reference.boundary_scores(kh, cfg.boundary_window)
            out.append(reference.find_boundaries(score, cfg.threshold, cfg.min_chunk,
                                                 cfg.max_chunk, cfg.nms_radius,
                                                 cfg.max_chunks or 0))
    return out


def assert_bounds_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"chunking group {i}")


def planted_keys(rng, B, Hkv, Lk, D, shifts, noise=0.3):
    """Keys drawn around a fresh random mean in every segment [shifts[i], shifts[i+1])."""
    k = np.empty((B, Hkv, Lk, D), np.float32)
    for b in range(B):
        for h in range(Hkv):
            for a, e in zip(shifts[:-1], shifts[1:]):
                mean = rng.standard_normal(D)
                k[b, h, a:e] = mean + noise * rng.standard_normal((e - a, D))
    return k


def check_structure(bounds, Lk, min_len, max_len, max_chunks=None):
    """Every chunk but the last has min_len..max_len keys; the last has at
    most max_len unless the cap max_chunks was reached (then it takes the rest)."""
    bounds = np.asarray(bounds)
    assert bounds.dtype.kind == "i"
    assert bounds[0] == 0 and bounds[-1] == Lk
    lengths = np.diff(bounds)
    assert np.all(lengths > 0), "boundaries must rise strictly"
    capped = False
    if max_chunks:
        assert len(lengths) <= max_chunks
        capped = len(lengths) == max_chunks
    assert np.all(lengths[:-1] >= min_len), lengths
    assert np.all(lengths[:-1] <= max_len), lengths
    assert capped or lengths[-1] <= max_len, lengths


# ---- exact agreement with the reference ------------------------------------

@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 50, 173, 32), (2, 4, 2, 64, 300, 16),
                                   (1, 6, 3, 1, 257, 64)],
                         ids=lambda s: "B{}H{}Hkv{}Lq{}Lk{}D{}".format(*s))
def test_random_keys_match_reference(rng, granularity, shape):
    q, k, _ = make_qkv(rng, *shape)
    cfg = chunk_cfg(granularity=granularity)
    sel = dhsa.predict_selection(q, k, cfg)
    n_cg = shape[0] * (1 if granularity == "layer" else shape[2])
    assert sel.chunk_groups == (1 if granularity == "layer" else shape[2])
    assert len(sel.boundaries) == n_cg
    assert_bounds_equal(sel.boundaries, reference_bounds(k, cfg))


@pytest.mark.parametrize("params", [
    dict(threshold=0.0),                        # every local maximum qualifies
    dict(threshold=1.0, nms_radius=0),
    dict(threshold=1.2, min_chunk=1, max_chunk=7),
    dict(threshold=2.0, max_chunk=20),          # only forced boundaries
    dict(boundary_window=1, nms_radius=3, threshold=0.8),
    dict(boundary_window=40, nms_radius=2, threshold=0.3),
    dict(min_chunk=16, max_chunk=16),
    dict(max_chunks=5),
    dict(max_chunks=1),
    dict(max_chunks=40, min_chunk=1, max_chunk=3),
], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_parameters_match_reference(rng, params, granularity):
    q, k, _ = make_qkv(rng, 1, 4, 2, 40, 230, 16)
    cfg = chunk_cfg(granularity=granularity, **params)
    got = dhsa.predict_selection(q, k, cfg).boundaries
    assert_bounds_equal(got, reference_bounds(k, cfg))
    for bd in got:
        check_structure(bd, 230, cfg.min_chunk, cfg.max_chunk, cfg.max_chunks)


@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
def test_planted_keys_match_reference(rng, granularity):
    shifts = [0, 60, 130, 171, 260, 333, 400]
    k = planted_keys(rng, 2, 2, 400, 64, shifts)
    q = rng.standard_normal((2, 4, 50, 64)).astype(np.float32)
    cfg = chunk_cfg(granularity=granularity, max_chunk=128, threshold=0.3)
    assert_bounds_equal(dhsa.predict_selection(q, k, cfg).boundaries, reference_bounds(k, cfg))


def test_float16_keys_match_reference(rng):
    q, k, _ = make_qkv(rng, 1, 2, 2, 30, 190, 32, dtype=np.float16)
    cfg = chunk_cfg()
    assert_bounds_equal(dhsa.predict_selection(q, k, cfg).boundaries, reference_bounds(k, cfg))


def test_layer_concatenates_heads_not_averages(rng):
    """layer granularity scores the KV heads concatenated: differs from head 0 alone."""
    q, k, _ = make_qkv(rng, 1, 2, 2, 20, 200, 16)
    cfg = chunk_cfg(granularity="layer")
    got = dhsa.predict_selection(q, k, cfg).boundaries[0]
    concat = reference.find_boundaries(reference.boundary_scores(k[0], 8), 0.5, 4, 32, 8)
    np.testing.assert_array_equal(got, concat)
    mean = k[0].mean(axis=0, keepdims=True)
    averaged = reference.find_boundaries(reference.boundary_scores(mean, 8), 0.5, 4, 32, 8)
    assert not np.array_equal(concat, averaged)  # the distinction is observable


def test_kv_head_groups_use_their_own_head(rng):
    q, k, _ = make_qkv(rng, 1, 4, 2, 20, 200, 16)
    cfg = chunk_cfg(granularity="kv_head")
    b0, b1 = dhsa.predict_selection(q, k, cfg).boundaries
    swapped = dhsa.predict_selection(q, k[:, ::-1], cfg).boundaries
    np.testing.assert_array_equal(swapped[0], b1)
    np.testing.assert_array_equal(swapped[1], b0)


def test_query_head_shares_kv_head_chunking(rng):
    q, k, _ = make_qkv(rng, 1, 6, 2, 30, 150, 16)
    a = dhsa.predict_selection(q, k, chunk_cfg(granularity="query_head"))
    b = dhsa.predict_selection(q, k, chunk_cfg(granularity="kv_head"))
    assert a.chunk_groups == 2 and a.groups == 6
    assert_bounds_equal(a.boundaries, b.boundaries)


def test_boundaries_do_not_depend_on_queries(rng):
    q, k, _ = make_qkv(rng, 1, 2, 1, 60, 200, 32)
    cfg = chunk_cfg()
    a = dhsa.predict_selection(q, k, cfg).boundaries
    b = dhsa.predict_selection(-3 * q[:, :, 10:], k, cfg).boundaries
    assert_bounds_equal(a, b)


# ---- structure ---------------------------------------------------------------

@pytest.mark.parametrize("min_chunk, max_chunk", [(1, 1), (1, 5), (4, 32), (10, 11), (50, 90)])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.5])
def test_chunk_lengths_within_limits(rng, min_chunk, max_chunk, threshold):
    Lk = 311
    q, k, _ = make_qkv(rng, 2, 2, 2, 20, Lk, 16)
    cfg = chunk_cfg(min_chunk=min_chunk, max_chunk=max_chunk, threshold=threshold)
    for bd in dhsa.predict_selection(q, k, cfg).boundaries:
        check_structure(bd, Lk, min_chunk, max_chunk)
    if min_chunk == max_chunk == 1:
        np.testing.assert_array_equal(bd, np.arange(Lk + 1))


@pytest.mark.parametrize("max_chunks", [1, 2, 3, 7, 10, 50])
def test_max_chunks_caps_count(rng, max_chunks):
    Lk = 257
    q, k, _ = make_qkv(rng, 1, 2, 2, 20, Lk, 16)
    cfg = chunk_cfg(min_chunk=1, max_chunk=4, threshold=0.0, max_chunks=max_chunks)
    uncapped = dhsa.predict_selection(q, k, cfg.replace(max_chunks=None)).boundaries
    capped = dhsa.predict_selection(q, k, cfg).boundaries
    for bd, free in zip(capped, uncapped):
        assert len(free) - 1 > max_chunks  # the cap has work to do
        assert len(bd) - 1 == max_chunks
        check_structure(bd, Lk, 1, 4, max_chunks)
        # the first max_chunks - 1 boundaries of the uncapped scan, then the rest
        np.testing.assert_array_equal(bd, np.append(free[:max_chunks], Lk))
    if max_chunks == 1:
        np.testing.assert_array_equal(bd, [0, Lk])


def test_short_sequences(rng):
    for Lk in (1, 2, 3, 5, 9):
        q, k, _ = make_qkv(rng, 1, 1, 1, 1, Lk, 8)
        cfg = chunk_cfg(min_chunk=1, max_chunk=2, threshold=0.0)
        bd = dhsa.predict_selection(q, k, cfg).boundaries[0]
        check_structure(bd, Lk, 1, 2)
        assert_bounds_equal([bd], reference_bounds(k, cfg))


def test_constant_keys_only_forced_boundaries():
    """Identical keys carry no content shift: every score is 0, every cut is forced."""
    k = np.ones((1, 1, 100, 8), np.float32)
    q = np.ones((1, 1, 10, 8), np.float32)
    cfg = chunk_cfg(max_chunk=30, threshold=0.0 + 1e-9)
    bd = dhsa.predict_selection(q, k, cfg).boundaries[0]
    np.testing.assert_array_equal(bd, [0, 30, 60, 90, 100])


# ---- planted content shifts ------------------------------------------------

@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_planted_shifts_are_found(rng, granularity):
    """Keys around a new mean in each segment: once the running mean is a mix of
    segments (every shift but the first), a boundary lands within 2 positions of
    every planted shift, and there are no other boundaries there."""
    Lk = 400
    shifts = [0, 60, 130, 171, 260, 333, Lk]
    k = planted_keys(rng, 2, 2, Lk, 64, shifts)
    q = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
    cfg = chunk_cfg(granularity=granularity, max_chunk=128, threshold=0.3)
    checked = shifts[2:-1]
    for bd in dhsa.predict_selection(q, k, cfg).boundaries:
        for s in checked:
            assert np.min(np.abs(bd - s)) <= 2, (s, bd)
        late = bd[(bd >= checked[0] - 5) & (bd < Lk)]
        for x in late:
            assert min(abs(int(x) - s) for s in checked) <= 2, (x, bd)


def test_planted_shift_peaks_in_scores(rng):
    """The reference score itself peaks at the planted shift (sanity of the data)."""
    shifts = [0, 80, 150, 220, 300]
    k = planted_keys(rng, 1, 1, 300, 64, shifts)
    score = reference.boundary_scores(k[0], 8)
    for s in shifts[2:-1]:
        near = score[s - 8:s + 9]
        assert abs(int(np.argmax(near)) - 8) <= 2
        assert score[s] > 0.3
    # inside a segment (away from the first) the score is small
    assert np.median(score[170:200]) < 0.2


# ---- fixed chunking and caller boundaries --------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 7, 32, 100, 300, 1000])
@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
def test_fixed_chunking(rng, chunk_size, granularity):
    Lk = 300
    q, k, _ = make_qkv(rng, 2, 4, 2, 30, Lk, 16)
    cfg = dhsa.DHSAConfig(budget=200, block_size=16, sink=8, local=8, chunking="fixed",
                          chunk_size=chunk_size, granularity=granularity)
    sel = dhsa.predict_selection(q, k, cfg)
    expect = np.append(np.arange(0, Lk, chunk_size), Lk)
    assert len(sel.boundaries) == 2 * (1 if granularity == "layer" else 2)
    for bd in sel.boundaries:
        np.testing.assert_array_equal(bd, expect)
        assert np.all(bd[:-1] % chunk_size == 0)


@pytest.mark.parametrize("granularity", ["layer", "kv_head", "query_head"])
def test_caller_boundaries_used_verbatim(rng, granularity):
    Lk = 150
    q, k, _ = make_qkv(rng, 2, 4, 2, 40, Lk, 16)
    cfg = chunk_cfg(granularity=granularity)
    n = 2 * (1 if granularity == "layer" else 2)
    given = [np.unique(np.concatenate([[0, Lk], rng.choice(np.arange(1, Lk), 3 + i,
                                                           replace=False)])) for i in range(n)]
    sel = dhsa.predict_selection(q, k, cfg, boundaries=given)
    assert_bounds_equal(sel.boundaries, given)
    # one shared array is used for every group
    one = np.array([0, 10, 11, 90, Lk])
    sel1 = dhsa.predict_selection(q, k, cfg, boundaries=one)
    assert_bounds_equal(sel1.boundaries, [one] * n)
    # and with fixed chunking configured, the caller's boundaries still win
    fixed = cfg.replace(chunking="fixed", chunk_size=7)
    assert_bounds_equal(dhsa.predict_selection(q, k, fixed, boundaries=given).boundaries, given)


def test_caller_boundaries_accept_lists_and_int_dtypes(rng):
    q, k, _ = make_qkv(rng, 1, 2, 1, 20, 50, 16)
    cfg = chunk_cfg()
    for b in ([0, 25, 50], np.array([0, 25, 50], np.int32), np.array([0, 25, 50], np.uint16)):
        sel = dhsa.predict_selection(q, k, cfg, boundaries=[b])
        np.testing.assert_array_equal(sel.boundaries[0], [0, 25, 50])


def test_returned_boundaries_are_owned_copies(rng):
    q, k, _ = make_qkv(rng, 1, 2, 2, 20, 80, 16)
    given = np.array([0, 40, 80])
    sel = dhsa.predict_selection(q, k, chunk_cfg(), boundaries=given)
    sel.boundaries[0][1] = 7
    assert given[1] == 40
    assert sel.boundaries[1][1] == 40
