"""Every bad input is refused with TypeError / ValueError naming what is wrong.

The core must never crash, hang or silently compute on invalid input.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest

import dhsa
from dhsa import reference
from conftest import make_qkv, reference_predict, rel_err

SMALL_CFG = dict(budget=40, block_size=8, sink=4, local=16, boundary_window=4, nms_radius=4,
                 min_chunk=2, max_chunk=8)


@pytest.fixture
def qkv(rng):
    return make_qkv(rng, 1, 2, 1, 40, 60, 16)


@pytest.fixture
def cfg():
    return dhsa.DHSAConfig(**SMALL_CFG)


def z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


# The three entry points, called uniformly as fn(q, k, v, **opts).
def _dense(q, k, v, **kw):
    return dhsa.dense_attention(q, k, v, **kw)


def _sparse(q, k, v, **kw):
    return dhsa.sparse_attention(q, k, v, dhsa.DHSAConfig(**SMALL_CFG), **kw)


def _predict(q, k, v, **kw):
    kw.pop("softcap", None)
    return dhsa.predict_selection(q, k, dhsa.DHSAConfig(**SMALL_CFG), **kw)


ENTRY_POINTS = [pytest.param(_dense, id="dense"), pytest.param(_sparse, id="sparse"),
                pytest.param(_predict, id="predict")]
QKV_ENTRY_POINTS = ENTRY_POINTS[:2]


# ---- q / k / v -------------------------------------------------------------

@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("which", ["q", "k"])
def test_non_array_qk(fn, qkv, which):
    args = dict(zip("qkv", qkv))
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"\b{which}\b.*ndarray"):
        fn(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("fn", QKV_ENTRY_POINTS)
def test_non_array_v(fn, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"\bv\b.*ndarray"):
        fn(q, k, v.tolist())


@pytest.mark.parametrize("fn", QKV_ENTRY_POINTS)
def test_scalar_instead_of_array(fn, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"\bq\b"):
        fn(np.float32(1.0), k, v)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_wrong_ndim_qk(fn, qkv, which, ndim):
    args = dict(zip("qkv", qkv))
    x = args[which]
    args[which] = x.reshape(x.shape[:ndim - 1] + (-1,)) if ndim < 4 else x[None]
    with pytest.raises(ValueError, match=rf"\b{which}\b.*4 dimensions"):
        fn(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("fn", QKV_ENTRY_POINTS)
def test_wrong_ndim_v(fn, qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"\bv\b.*4 dimensions"):
        fn(q, k, v[0])


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_mismatched_batch(fn):
    with pytest.raises(ValueError, match="batch"):
        fn(z(2, 2, 4, 8), z(1, 1, 6, 8), z(1, 1, 6, 8))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_mismatched_head_dim(fn):
    with pytest.raises(ValueError, match="head_dim"):
        fn(z(1, 2, 4, 16), z(1, 1, 6, 8), z(1, 1, 6, 8))


@pytest.mark.parametrize("fn", QKV_ENTRY_POINTS)
@pytest.mark.parametrize("vshape", [(2, 1, 6, 8), (1, 2, 6, 8), (1, 1, 7, 8), (1, 1, 6, 16)])
def test_v_shape_differs_from_k(fn, vshape):
    with pytest.raises(ValueError, match=r"\bv\b"):
        fn(z(1, 2, 4, 8), z(1, 1, 6, 8), z(*vshape))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_heads_not_divisible(fn):
    with pytest.raises(ValueError, match="heads"):
        fn(z(1, 3, 4, 8), z(1, 2, 6, 8), z(1, 2, 6, 8))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_more_kv_heads_than_q_heads(fn):
    with pytest.raises(ValueError, match="heads"):
        fn(z(1, 2, 4, 8), z(1, 4, 6, 8), z(1, 4, 6, 8))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_lq_greater_than_lk(fn):
    with pytest.raises(ValueError, match="length"):
        fn(z(1, 2, 7, 8), z(1, 1, 6, 8), z(1, 1, 6, 8))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_, np.complex64, object])
def test_bad_dtype_qk(fn, qkv, which, dtype):
    args = dict(zip("qkv", qkv))
    args[which] = args[which].astype(dtype)
    with pytest.raises(TypeError, match=rf"\b{which}\b.*dtype"):
        fn(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("fn", QKV_ENTRY_POINTS)
@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_bad_dtype_v(fn, qkv, dtype):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"\bv\b.*dtype"):
        fn(q, k, v.astype(dtype))


# (entry point, index of the odd argument): predict_selection takes no v
ARG_CASES = [pytest.param(p.values[0], which, id=f"{p.id}-{'qkv'[which]}")
             for p in ENTRY_POINTS for which in (0, 1, 2)
             if not (p.id == "predict" and which == 2)]


@pytest.mark.parametrize("fn, which", ARG_CASES)
def test_mixed_dtypes(fn, qkv, which):
    args = list(qkv)
    args[which] = args[which].astype(np.float16)
    with pytest.raises(TypeError, match="dtype"):
        fn(*args)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_head_dim_zero(fn):
    with pytest.raises(ValueError, match=r"\bq\b.*empty"):
        fn(z(1, 2, 4, 0), z(1, 1, 6, 0), z(1, 1, 6, 0))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("D", [257, 300, 512])
def test_head_dim_too_large(fn, D):
    with pytest.raises(ValueError, match="head_dim"):
        fn(z(1, 2, 4, D), z(1, 1, 6, D), z(1, 1, 6, D))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_empty_query_sequence(fn):
    with pytest.raises(ValueError, match=r"\bq\b.*empty"):
        fn(z(1, 2, 0, 8), z(1, 1, 6, 8), z(1, 1, 6, 8))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_empty_key_sequence(fn):
    with pytest.raises(ValueError, match=r"\bk\b.*empty"):
        fn(z(1, 2, 4, 8), z(1, 1, 0, 8), z(1, 1, 0, 8))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("shape_q, shape_k", [((0, 2, 4, 8), (0, 1, 6, 8)),
                                              ((1, 0, 4, 8), (1, 1, 6, 8)),
                                              ((1, 2, 4, 8), (1, 0, 6, 8))])
def test_empty_batch_or_heads(fn, shape_q, shape_k):
    with pytest.raises(ValueError, match="empty"):
        fn(z(*shape_q), z(*shape_k), z(*shape_k))


@pytest.mark.parametrize("fn, which", ARG_CASES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_finite_inputs(fn, qkv, which, bad, dtype):
    args = [x.astype(dtype) for x in qkv]
    args[which][0, -1, 7, 3] = bad
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"\b{name}\b.*(NaN|Inf|finite)"):
        fn(*args)


def test_non_finite_anywhere_is_found(rng):
    # the finite check runs in blocks; a NaN in the very last element counts
    q, k, v = make_qkv(rng, 1, 2, 1, 4000, 4100, 8)
    v[0, 0, -1, -1] = np.nan
    with pytest.raises(ValueError, match=r"\bv\b"):
        dhsa.dense_attention(q[:, :, :3], k, v)
    v[0, 0, -1, -1] = 0.0
    k[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"\bk\b"):
        dhsa.dense_attention(q[:, :, :3], k, v)


# ---- options ---------------------------------------------------------------

@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("window, exc", [(0, ValueError), (-1, ValueError), (True, TypeError),
                                         (1.5, TypeError), ("3", TypeError),
                                         (np.int64(0), ValueError), (10**30, ValueError)])
def test_bad_window(fn, qkv, window, exc):
    with pytest.raises(exc, match="window"):
        fn(*qkv, window=window)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("threads, exc", [(0, ValueError), (-2, ValueError), ("2", TypeError),
                                          (2.0, TypeError), (True, TypeError),
                                          (10**6, ValueError)])
def test_bad_num_threads(fn, qkv, threads, exc):
    with pytest.raises(exc, match="num_threads"):
        fn(*qkv, num_threads=threads)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("scale, exc", [(0, ValueError), (0.0, ValueError), (-1, ValueError),
                                        (math.nan, ValueError), (math.inf, ValueError),
                                        (-math.inf, ValueError), (1e39, ValueError),
                                        ("1", TypeError), (True, TypeError),
                                        (1j, TypeError)])
def test_bad_scale(fn, qkv, scale, exc):
    with pytest.raises(exc, match="scale"):
        fn(*qkv, scale=scale)


@pytest.mark.parametrize("fn", QKV_ENTRY_POINTS)
@pytest.mark.parametrize("softcap, exc", [(0, ValueError), (0.0, ValueError), (-1, ValueError),
                                          (math.nan, ValueError), (math.inf, ValueError),
                                          ("30", TypeError), (True, TypeError)])
def test_bad_softcap(fn, qkv, softcap, exc):
    with pytest.raises(exc, match="softcap"):
        fn(*qkv, softcap=softcap)


def _selection_arrays(out):
    """The arrays an entry point returns: the output, or a selection's CSR."""
    if isinstance(out, dhsa.Selection):
        return [out.offsets, out.starts, out.ends, out.pairs_selected, out.pairs_allowed]
    return [out]


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_numpy_scalar_options_accepted(fn, qkv):
    """NumPy scalars mean exactly what the Python numbers of the same value mean."""
    got = fn(*qkv, window=np.int32(5), num_threads=np.int64(1), scale=np.float32(0.25))
    want = fn(*qkv, window=5, num_threads=1, scale=0.25)
    got, want = _selection_arrays(got), _selection_arrays(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# scale and softcap become float32 in the core: values float32 cannot hold
# (or would hold only as 0 / inf) are refused by name, never silently changed
@pytest.mark.parametrize("scale", [1e-50, 1e-300])
def test_scale_below_float32_range(qkv, scale):
    with pytest.raises(ValueError, match=r"scale must be in \[1e-30, 1e30\]"):
        dhsa.dense_attention(*qkv, scale=scale)


@pytest.mark.parametrize("softcap", [1e-50, 1e-300, 1e39, 1e300])
def test_softcap_outside_float32_range(qkv, softcap):
    with pytest.raises(ValueError, match=r"softcap must be in \[1e-30, 1e30\]"):
        dhsa.dense_attention(*qkv, softcap=softcap)


# ---- config ----------------------------------------------------------------

@pytest.mark.parametrize("fn", [dhsa.predict_selection,
                                lambda q, k, c: dhsa.sparse_attention(q, k, k, c)])
@pytest.mark.parametrize("config", ["x", {}, 1, dict(SMALL_CFG)])
def test_config_wrong_type(fn, qkv, config):
    q, k, _ = qkv
    with pytest.raises(TypeError, match="config"):
        fn(q, k, config)


@pytest.mark.parametrize("changes, field", [
    (dict(budget=0), "budget"),
    (dict(budget=-5), "budget"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=5000), "block_size"),
    (dict(sink=-1), "sink"),
    (dict(local=-1), "local"),
    (dict(granularity="x"), "granularity"),
    (dict(granularity=None), "granularity"),
    (dict(budget_mode="x"), "budget_mode"),
    (dict(chunking="x"), "chunking"),
    (dict(density=0), "density"),
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(density=-0.5), "density"),
    (dict(density=math.nan), "density"),
    (dict(mass=0), "mass"),
    (dict(mass=1.01), "mass"),
    (dict(min_budget=0), "min_budget"),
    (dict(min_budget=100, max_budget=50), "max_budget"),
    (dict(min_chunk=0), "min_chunk"),
    (dict(min_chunk=10, max_chunk=5), "max_chunk"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(boundary_window=0), "boundary_window"),
    (dict(nms_radius=-1), "nms_radius"),
    (dict(dense_tail=-1), "dense_tail"),
    (dict(chunk_score="min"), "chunk_score"),
    (dict(decode_score="max"), "decode_score"),
    (dict(chunk_score="max", budget_mode="adaptive"), "chunk_score"),
    (dict(max_chunks=0), "max_chunks"),
    (dict(threshold=-1), "threshold"),
    (dict(threshold=2.5), "threshold"),
    (dict(threshold=math.nan), "threshold"),
    # the always-kept keys must fit the budget
    (dict(budget=100, sink=10, local=80, block_size=16), "budget"),
    (dict(budget=399, sink=64, local=256, block_size=80), "budget"),
    # dynamic chunking looks boundary_window + nms_radius keys ahead
    (dict(local=15, boundary_window=8, nms_radius=8), "local"),
    (dict(local=0, boundary_window=1, nms_radius=0), "local"),
])
def test_config_bad_values(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        dhsa.DHSAConfig(**changes)


@pytest.mark.parametrize("field", ["budget", "block_size", "sink", "local", "min_budget",
                                   "max_budget", "chunk_size", "boundary_window", "min_chunk",
                                   "max_chunk", "nms_radius", "max_chunks",
                                   "dense_tail"])
@pytest.mark.parametrize("value", [True, False, 2.0, "8"])
def test_config_int_fields_reject_non_ints(field, value):
    with pytest.raises(TypeError, match=rf"\b{field}\b"):
        dhsa.DHSAConfig(**{field: value})


@pytest.mark.parametrize("field", ["density", "mass", "threshold"])
@pytest.mark.parametrize("value", [True, "0.5", None])
def test_config_float_fields_reject_non_numbers(field, value):
    with pytest.raises(TypeError, match=rf"\b{field}\b"):
        dhsa.DHSAConfig(**{field: value})


def test_config_boundary_values_accepted():
    dhsa.DHSAConfig(density=1.0, mass=1.0, threshold=0.0)
    dhsa.DHSAConfig(threshold=2.0, min_budget=7, max_budget=7, min_chunk=3, max_chunk=3)
    dhsa.DHSAConfig(budget=16 + 32 + 8, sink=16, local=32, block_size=8, boundary_window=16,
                    nms_radius=16)
    # fixed chunking has no look-ahead constraint; density mode no budget constraint
    dhsa.DHSAConfig(local=0, chunking="fixed", budget=128)
    dhsa.DHSAConfig(budget=1, budget_mode="density")
    dhsa.DHSAConfig(budget=np.int64(4096), density=np.float32(0.25))


def test_config_frozen_and_replace_revalidates():
    c = dhsa.DHSAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.budget = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="budget"):
        c.replace(budget=0)
    assert c.replace(budget=4000).budget == 4000
    assert c.budget == 2048


# ---- boundaries ------------------------------------------------------------

@pytest.mark.parametrize("bounds", [
    [1, 30, 60],       # does not start at 0
    [0, 30, 59],       # does not end at Lk
    [0, 30, 61],       # past Lk
    [0, 30, 30, 60],   # repeated
    [0, 40, 30, 60],   # decreasing
    [0, -5, 60],       # negative
    [0],               # too short
    [],                # empty
])
@pytest.mark.parametrize("entry", ["predict", "sparse"])
def test_bad_boundaries_values(qkv, cfg, bounds, entry):
    q, k, v = qkv
    b = np.asarray(bounds, dtype=np.int64)
    with pytest.raises(ValueError, match="boundaries"):
        if entry == "predict":
            dhsa.predict_selection(q, k, cfg, boundaries=b)
        else:
            dhsa.sparse_attention(q, k, v, cfg, boundaries=b)


@pytest.mark.parametrize("granularity, n_ok", [("layer", 2), ("kv_head", 4), ("query_head", 4)])
def test_boundaries_wrong_count(rng, granularity, n_ok):
    q, k, _ = make_qkv(rng, 2, 4, 2, 20, 30, 8)
    cfg = dhsa.DHSAConfig(**SMALL_CFG, granularity=granularity)
    good = np.array([0, 10, 30])
    dhsa.predict_selection(q, k, cfg, boundaries=[good] * n_ok)  # the right count works
    for n in (0, 1, n_ok - 1, n_ok + 1):
        if n == n_ok:
            continue
        with pytest.raises(ValueError, match="boundaries"):
            dhsa.predict_selection(q, k, cfg, boundaries=[good] * n)


def test_bad_boundaries_in_one_group_only(rng):
    q, k, _ = make_qkv(rng, 1, 4, 2, 20, 30, 8)
    cfg = dhsa.DHSAConfig(**SMALL_CFG)
    with pytest.raises(ValueError, match=r"boundaries\[1\]"):
        dhsa.predict_selection(q, k, cfg, boundaries=[np.array([0, 30]), np.array([0, 29])])


@pytest.mark.parametrize("bounds", [np.array([0.0, 60.0]), np.array([True, False]), 5, 3.5])
def test_boundaries_wrong_type(qkv, cfg, bounds):
    q, k, _ = qkv
    with pytest.raises(TypeError, match="boundaries"):
        dhsa.predict_selection(q, k, cfg, boundaries=bounds)


# ---- hand-made selections --------------------------------------------------

def hand_selection(offsets, starts, ends, block_size=8, num_blocks=5, dtype=np.int64):
    return dhsa.Selection(offsets=np.asarray(offsets, dtype=np.int64),
                          starts=np.asarray(starts, dtype=dtype),
                          ends=np.asarray(ends, dtype=dtype), block_size=block_size,
                          batch=1, groups=1, num_blocks=num_blocks, granularity="layer")


def test_hand_selection_valid_baseline(qkv):
    q, k, v = qkv  # Lq = 40, Lk = 60, 5 blocks of 8
    sel = hand_selection([0, 1, 2, 2, 3, 4], [0, 0, 10, 0], [30, 25, 60, 60])
    out = dhsa.sparse_attention(q, k, v, selection=sel)
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends, 8)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("offsets, starts, ends, match", [
    ([0, 2, 2, 2, 2, 2], [0, 5], [10, 12], "overlapping"),           # overlap
    ([0, 2, 2, 2, 2, 2], [20, 0], [30, 10], "sorted"),               # unsorted
    ([0, 2, 2, 2, 2, 2], [0, 0], [10, 10], "sorted|overlapping"),    # duplicate
    ([0, 1, 1, 1, 1, 1], [0], [61], "Lk"),                          # end > Lk
    ([0, 1, 1, 1, 1, 1], [0], [2**33], "Lk"),                       # far past Lk
    ([0, 1, 1, 1, 1, 1], [-1], [5], "start"),                       # negative start
    ([0, 1, 1, 1, 1, 1], [5], [5], "start < end"),                  # empty range
    ([0, 1, 1, 1, 1, 1], [9], [5], "start < end"),                  # reversed range
    ([0, 1, 1, 1, 1, 1], [0], [10, 20], "equal length"),            # lengths differ
    ([0, 1, 1, 1, 1], [0], [10], "offsets"),                        # too few offsets
    ([0, 1, 1, 1, 1, 1, 1], [0], [10], "offsets"),                  # too many offsets
    ([], [], [], "offsets"),                                        # no offsets at all
    ([0, 1, 1, 1, 1, 2], [0], [10], "offsets"),                     # past len(starts)
    ([1, 1, 1, 1, 1, 1], [0], [10], "offsets"),                     # does not start at 0
    ([0, 2, 1, 1, 1, 2], [0, 20], [10, 30], "offsets"),             # decreasing
    ([0, 2**40, 1, 1, 1, 1], [0], [10], "offsets"),                 # wild offset
    ([0, -1, 1, 1, 1, 1], [0], [10], "offsets"),                    # negative offset
])
def test_bad_hand_selection(qkv, offsets, starts, ends, match):
    q, k, v = qkv
    sel = hand_selection(offsets, starts, ends)
    with pytest.raises(ValueError, match=match):
        dhsa.sparse_attention(q, k, v, selection=sel)
    with pytest.raises(ValueError, match=match):
        dhsa.sparse_attention(q, k, v, selection=sel, return_info=True)


def test_hand_selection_wrong_block_size(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="block_size"):
        dhsa.sparse_attention(q, k, v, selection=hand_selection([0, 1], [0], [10], block_size=0))
    # 6 offsets fit 5 blocks of 8, not 4 blocks of 10
    with pytest.raises(ValueError, match="offsets"):
        dhsa.sparse_attention(q, k, v, selection=hand_selection([0, 1, 1, 1, 1, 1], [0], [10],
                                                                 block_size=10))


def test_hand_selection_wrong_array_types(qkv):
    q, k, v = qkv
    sel = hand_selection([0, 1, 1, 1, 1, 1], [0], [10])
    with pytest.raises(TypeError, match="offsets"):
        dhsa.sparse_attention(q, k, v, selection=dataclasses.replace(
            sel, offsets=sel.offsets.astype(np.float64)))
    with pytest.raises(TypeError, match="starts"):
        dhsa.sparse_attention(q, k, v, selection=dataclasses.replace(sel, starts=[0]))
    with pytest.raises(ValueError, match="ends"):
        dhsa.sparse_attention(q, k, v, selection=dataclasses.replace(
            sel, ends=sel.ends.reshape(1, 1)))


def test_selection_not_a_selection(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="selection"):
        dhsa.sparse_attention(q, k, v, selection={"offsets": np.zeros(6, np.int64)})


def test_selection_from_other_shape_rejected(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 40, 60, 16)
    cfg = dhsa.DHSAConfig(**SMALL_CFG)
    sel = dhsa.predict_selection(q, k, cfg)
    assert int(sel.ends.max()) == 60
    q2, k2, v2 = make_qkv(rng, 1, 2, 1, 24, 60, 16)  # 3 blocks instead of 5
    with pytest.raises(ValueError, match="offsets"):
        dhsa.sparse_attention(q2, k2, v2, selection=sel)
    q3, k3, v3 = make_qkv(rng, 1, 2, 1, 40, 40, 16)  # 5 blocks, ranges past Lk = 40
    with pytest.raises(ValueError, match="Lk"):
        dhsa.sparse_attention(q3, k3, v3, selection=sel)


def test_selection_ranges_index_error(qkv, cfg):
    q, k, _ = qkv
    sel = dhsa.predict_selection(q, k, cfg)
    with pytest.raises(IndexError):
        sel.ranges(0, 0, sel.num_blocks)
    with pytest.raises(IndexError):
        sel.ranges(1, 0, 0)
    with pytest.raises(IndexError):
        sel.ranges(0, -1, 0)


def test_density_unknown_for_hand_selection():
    sel = hand_selection([0, 1, 1, 1, 1, 1], [0], [10])
    with pytest.raises(ValueError, match="unknown"):
        _ = sel.density


# ---- extreme but valid option values -------------------------------------------
# Python ints reach the int64 core: values near 2**63 must not overflow its
# position arithmetic. They work as their meaning says: a window wider than
# the sequence restricts nothing; a sink longer than it keeps every allowed key.

HUGE = [2**40, 2**62, sys.maxsize]


@pytest.mark.parametrize("window", HUGE)
@pytest.mark.parametrize("causal", [True, False])
def test_huge_window_dense(qkv, window, causal):
    q, k, v = qkv
    got = dhsa.dense_attention(q, k, v, causal=causal, window=window)
    assert rel_err(got, reference.dense_attention(q, k, v, causal=causal)) <= 1e-5
    np.testing.assert_array_equal(got, dhsa.dense_attention(q, k, v, causal=causal,
                                                            window=k.shape[2]))


@pytest.mark.parametrize("window", HUGE)
@pytest.mark.parametrize("causal", [True, False])
def test_huge_window_sparse(qkv, cfg, window, causal):
    q, k, v = qkv
    got = dhsa.sparse_attention(q, k, v, cfg, causal=causal, window=window)
    assert rel_err(got, dhsa.sparse_attention(q, k, v, cfg, causal=causal)) <= 1e-6
    np.testing.assert_array_equal(got, dhsa.sparse_attention(q, k, v, cfg, causal=causal,
                                                             window=k.shape[2]))


@pytest.mark.parametrize("window", HUGE)
@pytest.mark.parametrize("causal", [True, False])
def test_huge_window_predict(qkv, cfg, window, causal):
    q, k, _ = qkv
    want = dhsa.predict_selection(q, k, cfg, causal=causal)
    got = dhsa.predict_selection(q, k, cfg, causal=causal, window=window)
    for name in ("offsets", "starts", "ends"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("field", ["sink", "local"])
@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("window", [None, 10])
def test_huge_sink_and_local(qkv, field, value, window):
    q, k, _ = qkv
    cfg = dhsa.DHSAConfig(**{**SMALL_CFG, "budget_mode": "density", field: value})
    got = dhsa.predict_selection(q, k, cfg, window=window)
    want = reference_predict(q, k, cfg, window=window)
    np.testing.assert_array_equal(got.offsets, want["offsets"])
    np.testing.assert_array_equal(got.starts, want["starts"])
    np.testing.assert_array_equal(got.ends, want["ends"])


# ---- the Python -> C boundary: a config read by field name ----------------------

def _core_fields(cfg):
    """The DHSAConfig fields on a plain namespace (DHSAConfig's own checks bypassed)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@pytest.mark.parametrize("field, bad", [("granularity", "head"), ("budget_mode", "Tokens"),
                                        ("chunking", "static"), ("normalization", "l2"),
                                        ("method", "streaming"), ("chunk_score", "Max"),
                                        ("decode_score", "Bounds")])
def test_core_matches_names_not_positions(qkv, cfg, field, bad):
    """String options reach the core as names, looked up in its own table."""
    import types
    from dhsa import _core
    q, k, _ = qkv
    ns = types.SimpleNamespace(**dict(_core_fields(cfg), **{field: bad}))
    with pytest.raises(ValueError, match=rf"config\.{field} = '{bad}' is not run by the C core"):
        _core.predict(q, k, ns)
    ns = types.SimpleNamespace(**dict(_core_fields(cfg), **{field: 1}))
    with pytest.raises(TypeError, match=rf"config\.{field} must be a str"):
        _core.predict(q, k, ns)


@pytest.mark.parametrize("field", ["budget", "min_chunk", "max_chunks", "normalization"])
def test_core_needs_every_config_field(qkv, cfg, field):
    import types
    from dhsa import _core
    q, k, _ = qkv
    fields = _core_fields(cfg)
    del fields[field]
    with pytest.raises(TypeError, match=rf"no field '{field}'"):
        _core.predict(q, k, types.SimpleNamespace(**fields))


def test_core_refuses_unsafe_values_itself(qkv, cfg):
    """Values DHSAConfig would refuse, given past it, are refused by the core."""
    import types
    from dhsa import _core
    q, k, _ = qkv
    for mode, field, bad in [("tokens", "block_size", 0), ("tokens", "sink", -1),
                             ("tokens", "budget", 0), ("density", "density", 0.0),
                             ("adaptive", "mass", 1.5), ("adaptive", "min_budget", 0),
                             ("tokens", "boundary_window", 0), ("tokens", "min_chunk", 0),
                             ("tokens", "dense_tail", -1)]:
        ns = types.SimpleNamespace(**dict(_core_fields(cfg), budget_mode=mode, **{field: bad}))
        with pytest.raises(ValueError, match="predict: invalid argument"):
            _core.predict(q, k, ns)
    # max scores with the adaptive budget, which estimates mass from mean scores
    ns = types.SimpleNamespace(**dict(_core_fields(cfg), budget_mode="adaptive",
                                      chunk_score="max"))
    with pytest.raises(ValueError, match="predict: invalid argument"):
        _core.predict(q, k, ns)


def test_block_topk_is_fixed_mean_pooled_chunks(rng):
    """block_topk means fixed chunks of chunk_size keys, mean-pooled, whatever
    chunking and normalization say."""
    q, k, _ = make_qkv(rng, 1, 4, 2, 70, 150, 16)
    base = dict(budget=60, block_size=8, sink=4, local=16, chunk_size=10)
    got = dhsa.predict_selection(q, k, dhsa.DHSAConfig(**base, method="block_topk"))
    want = dhsa.predict_selection(q, k, dhsa.DHSAConfig(**base, chunking="fixed",
                                                        normalization="mean"))
    for name in ("offsets", "starts", "ends", "pairs_selected"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    np.testing.assert_array_equal(got.boundaries[0], np.append(np.arange(0, 150, 10), 150))


def test_prediction_arrays_are_the_cores_buffers(qkv, cfg):
    """The core's result buffers become the arrays without a copy: every one of
    them is a view of the one capsule that frees the prediction."""
    from dhsa import _core
    q, k, _ = qkv
    res = _core.predict(q, k, cfg, return_scores=True)
    bases = {id(res[name].base) for name in ("bounds", "num_bounds", "offsets", "starts",
                                              "ends", "pairs_selected", "pairs_allowed",
                                              "chunk_scores")}
    assert len(bases) == 1
    assert type(res["starts"].base).__name__ == "PyCapsule"
    assert res["starts"].dtype == np.int32 and res["offsets"].dtype == np.int64


def test_check_inputs_is_the_scan_of_every_call(qkv):
    from dhsa import _core
    q, k, v = qkv
    assert _core.check_inputs(q, k) is None
    assert _core.check_inputs(q, k, v, softcap=30.0, window=5, num_threads=1) is None
    bad = q.copy()
    bad[0, 0, 3, 1] = np.nan
    with pytest.raises(ValueError, match=r"\bq\b contains NaN or Inf"):
        _core.check_inputs(bad, k)
    with pytest.raises(ValueError, match="softcap"):
        _core.check_inputs(q, k, softcap=0.0)
    with pytest.raises(ValueError, match=r"\bv\b contains NaN or Inf"):
        _core.check_inputs(q, k, np.full_like(v, np.inf))


def test_core_sparse_attention_takes_a_config_or_a_selection(qkv, cfg):
    from dhsa import _core
    q, k, v = qkv
    sel = dhsa.predict_selection(q, k, cfg)
    with pytest.raises(TypeError, match="either config or offsets"):
        _core.sparse_attention(q, k, v)
    with pytest.raises(TypeError, match="either config or offsets"):
        _core.sparse_attention(q, k, v, config=cfg, offsets=sel.offsets, starts=sel.starts,
                               ends=sel.ends, block_size=sel.block_size)
    one = _core.sparse_attention(q, k, v, config=cfg)
    two = _core.sparse_attention(q, k, v, offsets=sel.offsets, starts=sel.starts,
                                 ends=sel.ends, block_size=sel.block_size)
    np.testing.assert_array_equal(one, two)
