"""The AVX2/FMA row kernels against their scalar twins and the reference."""
from __future__ import annotations

import numpy as np
import pytest

import dhsa
from dhsa import reference
from conftest import allow_avx512_switch, make_qkv, rel_err

TOL = 1e-5

CFG = dhsa.DHSAConfig(budget=96, block_size=16, sink=8, local=32, boundary_window=8,
                      nms_radius=8, min_chunk=4, max_chunk=32)


def run_both(fn):
    """fn() with the vector kernels, then with the scalar twins forced."""
    dhsa.force_scalar(False)
    vec = fn()
    dhsa.force_scalar(True)
    try:
        scal = fn()
    finally:
        dhsa.force_scalar(False)
    return vec, scal


# logits: scale=1 on unit-variance data of D=64 gives |logit| ~ 8, and with
# softcap=30 |logit / cap| spans both sides of the 0.55 switch of the vector
# tanh; the small ones stay below it everywhere.
OPTION_SETS = [
    pytest.param(dict(), 1.0, id="plain"),
    pytest.param(dict(scale=1.0), 1.0, id="large-logits"),
    pytest.param(dict(scale=1.0, softcap=30.0), 1.0, id="softcap-large"),
    pytest.param(dict(scale=1.0, softcap=5.0), 1.0, id="softcap-saturated"),
    pytest.param(dict(softcap=30.0), 0.3, id="softcap-small"),
    pytest.param(dict(scale=1.0, softcap=30.0, window=137), 2.0, id="softcap-window"),
    pytest.param(dict(causal=False, softcap=20.0, scale=0.5), 1.0, id="noncausal-softcap"),
]


@pytest.mark.parametrize("opts, amp", OPTION_SETS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dense_scalar_vs_simd(rng, opts, amp, dtype):
    q, k, v = make_qkv(rng, 1, 4, 2, 75, 203, 64, dtype=dtype, scale=amp)
    vec, scal = run_both(lambda: dhsa.dense_attention(q, k, v, **opts))
    ref = reference.dense_attention(q, k, v, **opts)
    tol = TOL if dtype == np.float32 else 2e-3
    assert rel_err(vec, scal) <= tol
    assert rel_err(vec, ref) <= tol
    assert rel_err(scal, ref) <= tol


@pytest.mark.parametrize("opts, amp", OPTION_SETS)
def test_sparse_scalar_vs_simd(rng, opts, amp):
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 64, scale=amp)
    sel = dhsa.predict_selection(q, k, CFG, causal=opts.get("causal", True),
                                 scale=opts.get("scale"), window=opts.get("window"))
    assert sel.density < 1.0
    vec, scal = run_both(lambda: dhsa.sparse_attention(q, k, v, selection=sel, **opts))
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                             sel.block_size, **opts)
    assert rel_err(vec, scal) <= TOL
    assert rel_err(vec, ref) <= TOL
    assert rel_err(scal, ref) <= TOL


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 255, 256, 257, 511, 512,
                               513])
@pytest.mark.parametrize("softcap", [None, 10.0])
def test_row_lengths_and_tails(rng, n, softcap):
    """Key counts around multiples of 8 and 16 (vector widths) and of the key tiles."""
    q, k, v = make_qkv(rng, 1, 2, 1, 1, n, 32, scale=2.0)
    vec, scal = run_both(lambda: dhsa.dense_attention(q, k, v, softcap=softcap, scale=1.0))
    ref = reference.dense_attention(q, k, v, softcap=softcap, scale=1.0)
    assert rel_err(vec, ref) <= TOL
    assert rel_err(scal, ref) <= TOL


@pytest.mark.parametrize("softcap", [None, 10.0])
def test_row_tail_bitwise_independent_of_row_length(rng, softcap):
    """A logit goes through the same polynomial in a vector lane and in the
    tail of its row: the rows of a causal prefill of n keys equal the first
    n rows of a longer one bit for bit (the soft-cap tail once used tanhf, so
    a row's output depended on where its key tile ended). The vector tile
    kernels only: OpenBLAS (the forced-scalar path) blocks by matrix size, and
    calls of at most 8 rows per item (here n <= 4 queries of 2 heads) take
    the row kernels, which sum in another order."""
    if dhsa.build_info()["tile_path_d64"] == "openblas":
        pytest.skip("no vector tile kernels on this CPU")
    q, k, v = make_qkv(rng, 1, 2, 1, 300, 300, 32, scale=2.0)
    full = dhsa.dense_attention(q, k, v, softcap=softcap, scale=1.0)
    for n in list(range(5, 40, 3)) + [255, 257, 263]:
        part = dhsa.dense_attention(q[:, :, :n].copy(), k[:, :, :n].copy(),
                                    v[:, :, :n].copy(), softcap=softcap, scale=1.0)
        np.testing.assert_array_equal(part, full[:, :, :n], err_msg=f"n={n}")


def test_exp_underflow_region(rng):
    """Logit gaps beyond 87 (float32 exp underflow) give the one-hot limit."""
    D = 32
    q = np.zeros((1, 1, 1, D), np.float32)
    q[..., 0] = 1.0
    k = np.zeros((1, 1, 20, D), np.float32)
    k[0, 0, :, 0] = np.linspace(-50, 50, 20)
    v = rng.standard_normal((1, 1, 20, D)).astype(np.float32)
    for scale in (1.0, 3.0, 10.0):
        vec, scal = run_both(lambda: dhsa.dense_attention(q, k, v, scale=scale))
        ref = reference.dense_attention(q, k, v, scale=scale)
        assert rel_err(vec, ref) <= TOL
        assert rel_err(scal, ref) <= TOL
    np.testing.assert_allclose(vec[0, 0, 0], v[0, 0, -1], rtol=1e-6)


def test_tanh_switch_point_continuity():
    """Logits whose tanh argument straddles 0.55: both kernels agree with float64."""
    D = 16
    cap = 10.0
    ys = np.concatenate([np.linspace(0.50, 0.60, 41), -np.linspace(0.50, 0.60, 41),
                         np.linspace(0, 3, 40)])
    L = len(ys)
    q = np.zeros((1, 1, 1, D), np.float32)
    q[..., 0] = 1.0
    k = np.zeros((1, 1, L, D), np.float32)
    k[0, 0, :, 0] = (ys * cap).astype(np.float32)
    v = np.zeros((1, 1, L, D), np.float32)
    v[0, 0, :, :] = np.arange(L, dtype=np.float32)[:, None] / L
    v[0, 0, :, 1] = np.cos(np.arange(L))
    vec, scal = run_both(lambda: dhsa.dense_attention(q, k, v, scale=1.0, softcap=cap,
                                                      causal=False))
    ref = reference.dense_attention(q, k, v, scale=1.0, softcap=cap, causal=False)
    assert rel_err(vec, ref) <= TOL
    assert rel_err(scal, ref) <= TOL


def test_force_scalar_switches_path_and_restores():
    before = dhsa.build_info()["simd_path"]
    assert isinstance(before, str) and before
    dhsa.force_scalar(True)
    try:
        assert dhsa.build_info()["simd_path"] == "scalar"
    finally:
        dhsa.force_scalar(False)
    after = dhsa.build_info()["simd_path"]
    assert after == before
    if dhsa.build_info()["simd_available"]:
        assert after != "scalar"
    else:
        assert after == "scalar"


def test_force_scalar_default_argument():
    try:
        dhsa.force_scalar()
        assert dhsa.build_info()["simd_path"] == "scalar"
    finally:
        dhsa.force_scalar(False)
    if dhsa.build_info()["simd_available"]:
        assert dhsa.build_info()["simd_path"] != "scalar"


def test_force_scalar_changes_low_bits_only(rng):
    """The paths differ in rounding (so the switch is real) but not beyond it."""
    q, k, v = make_qkv(rng, 1, 4, 2, 100, 300, 64)
    if not dhsa.build_info()["simd_available"]:
        pytest.skip("no vector path on this machine")
    vec, scal = run_both(lambda: dhsa.dense_attention(q, k, v, softcap=30.0, scale=1.0))
    assert not np.array_equal(vec, scal)
    assert rel_err(vec, scal) <= TOL


def test_scalar_mode_fixture(scalar_mode, rng):
    assert dhsa.build_info()["simd_path"] == "scalar"
    q, k, v = make_qkv(rng, 1, 2, 1, 30, 50, 32)
    assert rel_err(dhsa.dense_attention(q, k, v), reference.dense_attention(q, k, v)) <= TOL


def test_scalar_threads_bitwise(rng, scalar_mode):
    q, k, v = make_qkv(rng, 1, 4, 2, 130, 200, 64)
    a = dhsa.dense_attention(q, k, v, num_threads=1, softcap=20.0)
    b = dhsa.dense_attention(q, k, v, num_threads=2, softcap=20.0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("info", [pytest.param(dhsa.build_info, id="build_info"),
                                  pytest.param(lambda: dhsa.backend_features,
                                               id="backend_features")])
def test_build_info_keys(info):
    d = info()
    assert isinstance(d, dict)
    for key in ("simd_path", "blas_config", "max_threads"):
        assert key in d, key
    assert isinstance(d["simd_path"], str) and d["simd_path"]
    assert isinstance(d["blas_config"], str) and d["blas_config"]
    assert isinstance(d["max_threads"], int) and d["max_threads"] >= 1


def test_build_info_returns_a_copy():
    d = dhsa.build_info()
    d["simd_path"] = "tampered"
    assert dhsa.build_info()["simd_path"] != "tampered"


@pytest.mark.parametrize("opts, amp", OPTION_SETS)
def test_every_vector_path_against_reference(rng, opts, amp):
    """Where the core can pin its narrower vector path (AVX2 under AVX-512), that
    path agrees with the reference and the scalar twins too."""
    switch = allow_avx512_switch()
    if switch is None:
        pytest.skip("the core has a single vector path")
    q, k, v = make_qkv(rng, 1, 4, 2, 75, 203, 64, scale=amp)
    ref = reference.dense_attention(q, k, v, **opts)
    sel = dhsa.predict_selection(q, k, CFG, causal=opts.get("causal", True),
                                 scale=opts.get("scale"), window=opts.get("window"))
    sref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                              sel.block_size, **opts)
    outs = {}
    for allow in (True, False):
        switch(allow)
        try:
            path = dhsa.build_info()["simd_path"]
            outs[path] = (dhsa.dense_attention(q, k, v, **opts),
                          dhsa.sparse_attention(q, k, v, selection=sel, **opts))
        finally:
            switch(True)
    for path, (dense, sparse) in outs.items():
        assert rel_err(dense, ref) <= TOL, path
        assert rel_err(sparse, sref) <= TOL, path
