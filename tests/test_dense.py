"""dhsa.dense_attention against the float64 reference (dhsa.reference)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dhsa
from dhsa import reference
from conftest import make_qkv, rel_err

F32_TOL = 1e-5
F16_TOL = 2e-3


def check_dense(q, k, v, tol=None, **opts):
    out = dhsa.dense_attention(q, k, v, **opts)
    opts.pop("num_threads", None)
    ref = reference.dense_attention(q, k, v, **opts)
    assert out.dtype == q.dtype
    assert out.shape == q.shape
    assert np.all(np.isfinite(out))
    if tol is None:
        tol = F16_TOL if q.dtype == np.float16 else F32_TOL
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"
    return out, ref


# (B, H, Hkv, Lq, Lk, D)
SHAPES = [
    (1, 1, 1, 1, 1, 32),        # a single position
    (1, 2, 2, 1, 97, 64),       # one query, odd key length
    (1, 2, 2, 33, 33, 32),
    (1, 3, 1, 77, 77, 64),      # GQA 3
    (2, 4, 1, 65, 131, 80),     # GQA 4, Lq < Lk, B > 1
    (1, 4, 4, 127, 257, 128),   # crosses a 256-key tile
    (1, 6, 2, 100, 300, 32),    # GQA 3
    (2, 2, 1, 19, 300, 256),    # D = 256
    (1, 8, 2, 129, 129, 64),    # GQA 4, crosses the 64-query tile
    (1, 1, 1, 63, 513, 80),     # three key tiles
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}Lq{}Lk{}D{}".format(*s))
def test_dense_matches_reference_f32(rng, shape):
    q, k, v = make_qkv(rng, *shape)
    check_dense(q, k, v)


@pytest.mark.parametrize("shape", SHAPES[:7], ids=lambda s: "B{}H{}Hkv{}Lq{}Lk{}D{}".format(*s))
def test_dense_matches_reference_f16(rng, shape):
    q, k, v = make_qkv(rng, *shape, dtype=np.float16)
    check_dense(q, k, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 2, 17, 64, 200, 1000])
def test_dense_window(rng, causal, window):
    q, k, v = make_qkv(rng, 1, 4, 2, 90, 200, 64)
    check_dense(q, k, v, causal=causal, window=window)


def test_window_larger_than_lk_equals_no_window(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 50, 120, 32)
    for causal in (True, False):
        full = dhsa.dense_attention(q, k, v, causal=causal)
        win = dhsa.dense_attention(q, k, v, causal=causal, window=121)
        np.testing.assert_allclose(win, full, rtol=1e-6, atol=1e-6)


def test_window_one_causal_returns_own_value(rng):
    # each query sees exactly its own key: the output is that key's value
    q, k, v = make_qkv(rng, 1, 2, 2, 40, 70, 32)
    out = dhsa.dense_attention(q, k, v, window=1)
    np.testing.assert_allclose(out, v[:, :, 30:, :], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_dense_softcap(rng, softcap, scale):
    q, k, v = make_qkv(rng, 1, 4, 2, 70, 150, 64)
    check_dense(q, k, v, softcap=softcap, scale=scale)


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0])
def test_dense_scale(rng, scale):
    q, k, v = make_qkv(rng, 1, 2, 1, 45, 99, 32)
    check_dense(q, k, v, scale=scale)


def test_scale_none_is_inverse_sqrt_d(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 30, 60, 80)
    a = dhsa.dense_attention(q, k, v)
    b = dhsa.dense_attention(q, k, v, scale=1.0 / np.sqrt(80))
    np.testing.assert_array_equal(a, b)
    c = dhsa.dense_attention(q, k, v, scale=2.0 / np.sqrt(80))
    assert rel_err(c, a) > 1e-3  # the scale is really used


@pytest.mark.parametrize("shape", [(1, 2, 2, 50, 50, 32), (2, 3, 1, 31, 97, 64),
                                   (1, 4, 2, 1, 40, 80)])
def test_dense_non_causal(rng, shape):
    q, k, v = make_qkv(rng, *shape)
    out, _ = check_dense(q, k, v, causal=False)
    if shape[3] > 1:
        causal = dhsa.dense_attention(q, k, v, causal=True)
        assert rel_err(out, causal) > 1e-3  # the flag changes the result


def test_causal_first_query_sees_only_first_key(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 10, 10, 32)
    out = dhsa.dense_attention(q, k, v)
    np.testing.assert_allclose(out[:, :, 0], np.repeat(v[:, :, 0], 2, axis=1), rtol=1e-6)


def test_combined_options(rng):
    q, k, v = make_qkv(rng, 2, 6, 2, 37, 211, 80, scale=2.0)
    check_dense(q, k, v, causal=True, scale=0.2, softcap=8.0, window=50)
    check_dense(q, k, v, causal=False, scale=0.2, softcap=8.0, window=50)


def test_combined_options_f16(rng):
    q, k, v = make_qkv(rng, 1, 4, 1, 59, 133, 64, dtype=np.float16)
    check_dense(q, k, v, softcap=20.0, window=40)
    check_dense(q, k, v, causal=False)


def test_gqa_equals_repeated_kv(rng):
    q, k, v = make_qkv(rng, 1, 6, 2, 41, 83, 32)
    a = dhsa.dense_attention(q, k, v)
    b = dhsa.dense_attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_batch_items_independent(rng):
    q, k, v = make_qkv(rng, 3, 2, 1, 29, 70, 32)
    full = dhsa.dense_attention(q, k, v)
    for b in range(3):
        one = dhsa.dense_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1])
        np.testing.assert_allclose(full[b:b + 1], one, rtol=1e-6, atol=1e-6)


# ---- memory layouts --------------------------------------------------------

def test_transposed_views(rng):
    # (B, L, H, D) storage seen as (B, H, L, D)
    B, H, Hkv, Lq, Lk, D = 1, 4, 2, 37, 81, 32
    q0 = rng.standard_normal((B, Lq, H, D)).astype(np.float32)
    k0 = rng.standard_normal((B, Lk, Hkv, D)).astype(np.float32)
    v0 = rng.standard_normal((B, Lk, Hkv, D)).astype(np.float32)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q0, k0, v0))
    assert not q.flags.c_contiguous
    out, _ = check_dense(q, k, v)
    np.testing.assert_array_equal(out, dhsa.dense_attention(*(np.ascontiguousarray(x)
                                                              for x in (q, k, v))))


def test_strided_slices(rng):
    big_q = rng.standard_normal((2, 4, 120, 64)).astype(np.float32)
    big_k = rng.standard_normal((2, 2, 300, 64)).astype(np.float32)
    big_v = rng.standard_normal((2, 2, 300, 64)).astype(np.float32)
    q = big_q[::2, :, ::3, ::2]    # (1, 4, 40, 32)
    k = big_k[1:, :, ::2, 1::2]    # (1, 2, 150, 32)
    v = big_v[:1, ::-1, 1::2, ::2]  # (1, 2, 150, 32), heads reversed
    assert q.shape == (1, 4, 40, 32) and k.shape == v.shape == (1, 2, 150, 32)
    out, _ = check_dense(q, k, v)
    contiguous = dhsa.dense_attention(*(np.ascontiguousarray(x) for x in (q, k, v)))
    np.testing.assert_array_equal(out, contiguous)


def test_fortran_order(rng):
    q, k, v = make_qkv(rng, 2, 2, 1, 33, 65, 32)
    qf, kf, vf = (np.asfortranarray(x) for x in (q, k, v))
    assert qf.flags.f_contiguous and not qf.flags.c_contiguous
    out, _ = check_dense(qf, kf, vf)
    np.testing.assert_array_equal(out, dhsa.dense_attention(q, k, v))


def test_fortran_order_f16(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 33, 65, 64, dtype=np.float16)
    out, _ = check_dense(*(np.asfortranarray(x) for x in (q, k, v)))
    np.testing.assert_array_equal(out, dhsa.dense_attention(q, k, v))


def test_non_native_byte_order(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 20, 45, 32)
    swapped = [x.astype(x.dtype.newbyteorder()) for x in (q, k, v)]
    out = dhsa.dense_attention(*swapped)
    np.testing.assert_array_equal(out, dhsa.dense_attention(q, k, v))


def test_inputs_not_modified(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 50, 90, 64)
    copies = [x.copy() for x in (q, k, v)]
    dhsa.dense_attention(q, k, v, softcap=10.0, window=20)
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)


# ---- threads and output ----------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"causal": False}, {"softcap": 10.0, "window": 33}])
def test_threads_bitwise_identical(rng, opts):
    q, k, v = make_qkv(rng, 2, 4, 2, 150, 290, 64)
    one = dhsa.dense_attention(q, k, v, num_threads=1, **opts)
    two = dhsa.dense_attention(q, k, v, num_threads=2, **opts)
    default = dhsa.dense_attention(q, k, v, **opts)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, default)
    many = dhsa.dense_attention(q, k, v, num_threads=7, **opts)
    np.testing.assert_array_equal(one, many)


def test_output_is_fresh_contiguous_array(rng):
    q, k, v = make_qkv(rng, 1, 2, 1, 16, 32, 32)
    out = dhsa.dense_attention(q, k, v)
    assert out.flags.c_contiguous and out.flags.writeable
    assert not np.shares_memory(out, q)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_output_dtype_and_shape(rng, dtype):
    q, k, v = make_qkv(rng, 2, 6, 3, 11, 50, 80, dtype=dtype)
    out = dhsa.dense_attention(q, k, v)
    assert out.dtype == dtype
    assert out.shape == (2, 6, 11, 80)


def test_large_logits_stable(rng):
    # softmax must survive logits far beyond float32 exp range
    q, k, v = make_qkv(rng, 1, 2, 1, 40, 80, 64, scale=30.0)
    out, _ = check_dense(q, k, v, scale=1.0)
    assert np.all(np.isfinite(out))


def test_constant_values_give_constant_output(rng):
    q, k, _ = make_qkv(rng, 1, 2, 1, 40, 80, 32, scale=3.0)
    v = np.full((1, 1, 80, 32), 0.75, dtype=np.float32)
    out = dhsa.dense_attention(q, k, v, softcap=5.0, window=9)
    np.testing.assert_allclose(out, 0.75, rtol=1e-6)


# ---- randomised shapes and options -------------------------------------------


@st.composite
def dense_problems(draw):
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 3, 4]))
    Lk = draw(st.integers(1, 600))
    Lq = draw(st.integers(1, Lk))
    D = draw(st.sampled_from([1, 3, 8, 32, 64, 80, 128, 256]))
    B = draw(st.integers(1, 2))
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = False
    if draw(st.booleans()):
        opts["window"] = draw(st.integers(1, Lk + 10))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 50.0))
    if draw(st.booleans()):
        opts["scale"] = draw(st.floats(0.01, 0.3))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float16]))
    seed = draw(st.integers(0, 2**32 - 1))
    return (B, Hkv * G, Hkv, Lq, Lk, D), opts, dtype, seed


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(dense_problems())
def test_dense_random_problems(problem):
    shape, opts, dtype, seed = problem
    q, k, v = make_qkv(np.random.default_rng(seed), *shape, dtype=dtype)
    check_dense(q, k, v, **opts)
