"""Property tests (issue 8): every memory layout, dtype, option and config at
and past its limits gives the float64 reference's answer, and no input is
ever modified.

Where tests/test_dense.py, test_selection.py and test_sparse.py draw
C-contiguous problems, these draw the layout of every tensor (transposed,
sliced with steps, Fortran order, negative strides, zero-stride broadcast
views, data 1-3 bytes off alignment, read-only, big-endian), head_dim down
to 1, window 1 and >= Lk, and configs whose block size and budgets reach
and pass the sequence length; CSR selections come in every integer dtype
and stride.

``DHSA_PROPERTY_SCALE=k`` (default 1) runs k times the examples, randomised
instead of derandomised, for a longer search outside CI.
"""
from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings, strategies as st

import dhsa
from dhsa import reference
from conftest import assert_selection_equal, make_qkv, reference_predict, rel_err
from _layouts import LAYOUTS, assert_unchanged, snapshot, unaligned_copy, with_layout

F32_TOL = 1e-5
F16_TOL = 2e-3
SCALE = int(os.environ.get("DHSA_PROPERTY_SCALE", "1"))
SETTINGS = dict(deadline=None, derandomize=SCALE == 1, database=None)
# head_dims around every SIMD / tile edge, 1 included
DIMS = [1, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 96, 127, 128, 129, 130]


@st.composite
def shapes(draw, max_len=200):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 4))  # GQA ratios 1-4
    Lk = draw(st.one_of(st.integers(1, 8), st.integers(1, max_len)))
    Lq = draw(st.one_of(st.just(1), st.just(Lk), st.integers(1, Lk)))
    D = draw(st.one_of(st.sampled_from(DIMS), st.integers(1, 130)))
    return B, H, Hkv, Lq, Lk, D


@st.composite
def attention_options(draw, Lk):
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = False
    w = draw(st.sampled_from([None, None, 1, 2, "mid", Lk, Lk + 1, 10**9]))
    if w == "mid":
        w = draw(st.integers(1, max(1, Lk)))
    if w is not None:
        opts["window"] = w
    if draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([1.0, 5.0, 30.0, 1e4]))
    if draw(st.booleans()):
        opts["scale"] = draw(st.floats(0.05, 1.5))
    return opts


layouts = st.sampled_from(LAYOUTS)


def _inputs(shape, dtype, seed, lq, lk, lv):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, *shape, dtype=dtype)
    return (with_layout(q, lq, rng), with_layout(k, lk, rng), with_layout(v, lv, rng))


def _dense_ref(q, k, v, **opts):
    return reference.dense_attention(np.array(q), np.array(k), np.array(v), **opts)


def _check_output(out, q, ref):
    assert isinstance(out, np.ndarray)
    assert out.shape == q.shape
    assert out.dtype == np.dtype(q.dtype).newbyteorder("=")
    assert out.flags.c_contiguous and out.flags.writeable
    assert np.all(np.isfinite(out))
    tol = F16_TOL if q.dtype.itemsize == 2 else F32_TOL
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


# ---- dense -----------------------------------------------------------------

@settings(max_examples=60 * SCALE, **SETTINGS)
@given(shape=shapes(), data=st.data(), dtype=st.sampled_from([np.float32, np.float16]),
       lq=layouts, lk=layouts, lv=layouts, seed=st.integers(0, 2**32 - 1),
       threads=st.sampled_from([None, 1, 2]))
def test_dense_any_layout_matches_reference(shape, data, dtype, lq, lk, lv, seed, threads):
    q, k, v = _inputs(shape, dtype, seed, lq, lk, lv)
    opts = data.draw(attention_options(shape[4]))
    snap = snapshot(q, k, v)
    out = dhsa.dense_attention(q, k, v, num_threads=threads, **opts)
    assert_unchanged((q, k, v), snap)
    _check_output(out, q, _dense_ref(q, k, v, **opts))


# ---- prediction ------------------------------------------------------------

@st.composite
def configs(draw, Lq, Lk):
    """Any valid DHSAConfig, its sizes drawn at, below and past the lengths."""
    def size(lo, near):
        return draw(st.one_of(st.integers(lo, max(lo, near + 2)),
                              st.sampled_from([lo, max(lo, near), near + 1, 4096]),
                              st.integers(lo, 10**6)))

    block_size = min(4096, size(1, Lq))
    bw = draw(st.one_of(st.integers(1, 8), st.sampled_from([Lk, Lk + 5])))
    nms = draw(st.one_of(st.integers(0, 6), st.sampled_from([Lk, Lk + 3])))
    chunking = draw(st.sampled_from(["dynamic", "dynamic", "fixed"]))
    method = draw(st.sampled_from(["dhsa"] * 4 + ["block_topk"]))
    sink = draw(st.one_of(st.integers(0, 16), st.sampled_from([0, Lk, Lk + 1])))
    local = draw(st.one_of(st.integers(0, 40), st.sampled_from([Lk, Lk + 9])))
    if chunking == "dynamic":
        local = max(local, bw + nms)
    mode = draw(st.sampled_from(["tokens", "density", "adaptive"]))
    fixed = sink + local + block_size
    budget = fixed + draw(st.one_of(st.integers(0, 64), st.sampled_from([Lk, Lk + 1, 10**7])))
    min_chunk = draw(st.one_of(st.integers(1, 12), st.sampled_from([Lk, Lk + 1])))
    min_budget = size(1, Lk)
    return dhsa.DHSAConfig(
        block_size=block_size, sink=sink, local=local, budget_mode=mode,
        budget=budget if mode == "tokens" else draw(st.integers(1, 10**6)),
        density=draw(st.sampled_from([1e-9, 0.01, 0.3, 0.5, 1.0])),
        mass=draw(st.sampled_from([1e-9, 0.3, 0.9, 1.0])),
        min_budget=min_budget, max_budget=min_budget + draw(st.sampled_from([0, 7, Lk, 10**6])),
        granularity=draw(st.sampled_from(["layer", "kv_head", "query_head"])),
        chunking=chunking, chunk_size=size(1, Lk), boundary_window=bw,
        threshold=draw(st.sampled_from([0.0, 0.05, 0.2, 0.8, 2.0])),
        min_chunk=min_chunk, max_chunk=min_chunk + draw(st.sampled_from([0, 3, 20, Lk])),
        nms_radius=nms,
        max_chunks=draw(st.sampled_from([None, None, 1, 2, 5, Lk, Lk + 1])),
        normalization=draw(st.sampled_from(["sqrt", "sqrt", "mean", "sum"])), method=method)


@settings(max_examples=50 * SCALE, **SETTINGS)
@given(shape=shapes(), data=st.data(), dtype=st.sampled_from([np.float32, np.float16]),
       lq=layouts, lk=layouts, seed=st.integers(0, 2**32 - 1))
def test_predict_any_layout_and_config_matches_reference(shape, data, dtype, lq, lk, seed):
    q, k, _ = _inputs(shape, dtype, seed, lq, lk, "c")
    Lq, Lk = shape[3], shape[4]
    cfg = data.draw(configs(Lq, Lk))
    opts = data.draw(attention_options(Lk))
    opts.pop("softcap", None)
    snap = snapshot(q, k)
    sel = dhsa.predict_selection(q, k, cfg, **opts)
    assert_unchanged((q, k), snap)
    if cfg.method == "block_topk":  # fixed blocks of chunk_size keys, mean-pooled
        ref = reference_predict(np.array(q), np.array(k), cfg.replace(chunking="fixed"),
                                key_norm=1.0, **opts)
    else:
        ref = reference_predict(np.array(q), np.array(k), cfg, key_norm=cfg.key_norm, **opts)
    assert_selection_equal(sel, ref)
    s, a = reference.count_pairs(sel.offsets, sel.starts, sel.ends, sel.batch, sel.groups,
                                 Lq, Lk, min(cfg.block_size, Lq), opts.get("causal", True),
                                 opts.get("window"))
    np.testing.assert_array_equal(sel.pairs_selected, s)
    np.testing.assert_array_equal(sel.pairs_allowed, a)


# ---- sparse attention ------------------------------------------------------

@settings(max_examples=40 * SCALE, **SETTINGS)
@given(shape=shapes(max_len=160), data=st.data(),
       dtype=st.sampled_from([np.float32, np.float16]), lq=layouts, lk=layouts, lv=layouts,
       seed=st.integers(0, 2**32 - 1))
def test_sparse_predicted_any_layout_matches_reference(shape, data, dtype, lq, lk, lv, seed):
    q, k, v = _inputs(shape, dtype, seed, lq, lk, lv)
    cfg = data.draw(configs(shape[3], shape[4]))
    opts = data.draw(attention_options(shape[4]))
    snap = snapshot(q, k, v)
    out, info = dhsa.sparse_attention(q, k, v, cfg, return_info=True, **opts)
    assert_unchanged((q, k, v), snap)
    sel = info.selection
    ref = reference.attention_with_selection(np.array(q), np.array(k), np.array(v), sel.offsets,
                                             sel.starts, sel.ends, sel.block_size, **opts)
    _check_output(out, q, ref)


INDEX_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                np.uint64, ">i4", ">u8", "<i8"]


def _index_array(values, dtype, kind, rng):
    """values as a 1-D integer array of a dtype that holds them, behind a layout."""
    values = np.asarray(values, dtype=np.int64)
    dt = np.dtype(dtype)
    if values.size and (values.max() > np.iinfo(dt).max or values.min() < np.iinfo(dt).min):
        dt = np.dtype(np.int64)
    a = values.astype(dt)
    if kind == "sliced":
        big = np.zeros(a.size * 3, dtype=dt)
        big[::3] = a
        return big[::3]
    if kind == "negative":
        return a[::-1].copy()[::-1]
    if kind == "unaligned":
        return a if dt.itemsize == 1 else unaligned_copy(a, int(rng.integers(1, dt.itemsize)))
    if kind == "readonly":
        a.flags.writeable = False
    return a


@st.composite
def selections(draw, B, H, Hkv, Lq, Lk):
    """A valid random CSR selection: groups 1 / Hkv / H, block sizes past Lq,
    empty blocks, single keys, whole ranges."""
    bs = draw(st.one_of(st.integers(1, max(1, Lq)), st.sampled_from([Lq, Lq + 1, 4096])))
    G = draw(st.sampled_from([1, Hkv, H]))
    nqb = -(-Lq // bs)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offsets, starts, ends = [0], [], []
    for _ in range(B * G * nqb):
        kind = rng.integers(0, 5)
        if kind == 0:
            pass  # nothing selected: rows give zeros
        elif kind == 1:
            starts.append(0)
            ends.append(Lk)
        else:
            cuts = np.unique(rng.integers(0, Lk + 1, size=int(rng.integers(2, 12))))
            for a, e in zip(cuts[:-1], cuts[1:]):
                if rng.random() < 0.6:
                    starts.append(int(a))
                    ends.append(int(e))
        offsets.append(len(starts))
    return bs, offsets, starts, ends, G


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(shape=shapes(max_len=120), data=st.data(),
       dtype=st.sampled_from([np.float32, np.float16]), lq=layouts, lk=layouts,
       seed=st.integers(0, 2**32 - 1),
       idx=st.tuples(st.sampled_from(INDEX_DTYPES), st.sampled_from(INDEX_DTYPES),
                     st.sampled_from(INDEX_DTYPES)),
       ikind=st.sampled_from(["c", "sliced", "negative", "unaligned", "readonly"]))
def test_sparse_hand_selection_any_dtype_matches_reference(shape, data, dtype, lq, lk, seed,
                                                           idx, ikind):
    B, H, Hkv, Lq, Lk, D = shape
    q, k, v = _inputs(shape, dtype, seed, lq, lk, "sliced")
    bs, offsets, starts, ends, G = data.draw(selections(B, H, Hkv, Lq, Lk))
    opts = data.draw(attention_options(Lk))
    rng = np.random.default_rng(seed)
    o_a, s_a, e_a = (_index_array(x, dt, ikind, rng) for x, dt in zip((offsets, starts, ends), idx))
    sel = dhsa.Selection(offsets=o_a, starts=s_a, ends=e_a, block_size=bs, batch=B, groups=G,
                         num_blocks=-(-Lq // bs), granularity="layer")
    snap = snapshot(q, k, v, o_a, s_a, e_a)
    out, info = dhsa.sparse_attention(q, k, v, selection=sel, return_info=True, **opts)
    assert_unchanged((q, k, v, o_a, s_a, e_a), snap)
    ref = reference.attention_with_selection(np.array(q), np.array(k), np.array(v),
                                             np.asarray(offsets), np.asarray(starts),
                                             np.asarray(ends), bs, **opts)
    _check_output(out, q, ref)
    s, a = reference.count_pairs(np.asarray(offsets), np.asarray(starts), np.asarray(ends), B, G,
                                 Lq, Lk, min(bs, Lq), opts.get("causal", True),
                                 opts.get("window"))
    np.testing.assert_array_equal(info.selection.pairs_selected, s)
    np.testing.assert_array_equal(info.selection.pairs_allowed, a)
