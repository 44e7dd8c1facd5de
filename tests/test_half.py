"""float16 K/V stay float16 in the kernels (widened tile by tile): the result
must be bit-identical to running on the same values widened beforehand, on
the F16C path and on the scalar twin, for every finite half value."""
import numpy as np
import pytest

import dhsa


@pytest.fixture
def scalar_off():
    yield
    dhsa.force_scalar(False)


def _all_finite_halves():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    return h[np.isfinite(h)]


@pytest.mark.parametrize("scalar", [False, True])
def test_every_half_value_widens_exactly(scalar, scalar_off):
    dhsa.force_scalar(scalar)
    vals = _all_finite_halves()                       # 63488 values, subnormals included
    D = 32
    n = -(-vals.size // D) * D
    flat = np.resize(vals, n).astype(np.float16)
    v16 = flat.reshape(1, 1, n // D, D)
    k16 = np.zeros_like(v16)                          # uniform weights: out = mean of v rows
    q16 = np.zeros((1, 1, 1, D), dtype=np.float16)
    out16 = dhsa.dense_attention(q16, k16, v16, causal=False)
    out32 = dhsa.dense_attention(q16.astype(np.float32), k16.astype(np.float32),
                                 v16.astype(np.float32), causal=False)
    assert out16.dtype == np.float16
    assert np.array_equal(out16, out32.astype(np.float16))
    # and k itself through the logits: a one-hot query reads one column of k
    kk = flat.reshape(1, 1, n // D, D)
    qq = np.zeros((1, 1, 1, D), dtype=np.float16)
    qq[..., 3] = 1.0
    a = dhsa.dense_attention(qq, kk, kk, causal=False, scale=1e-3)
    b = dhsa.dense_attention(qq.astype(np.float32), kk.astype(np.float32),
                             kk.astype(np.float32), causal=False, scale=1e-3)
    assert np.array_equal(a, b.astype(np.float16))


@pytest.mark.parametrize("Lq,Lk,window,softcap", [(200, 200, None, None), (37, 300, 50, 20.0),
                                                  (129, 129, None, 30.0)])
def test_half_kv_matches_widened_inputs(Lq, Lk, window, softcap):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 6, Lq, 64)).astype(np.float16)
    k = rng.standard_normal((2, 2, Lk, 64)).astype(np.float16)
    v = rng.standard_normal((2, 2, Lk, 64)).astype(np.float16)
    kw = dict(window=window, softcap=softcap)
    w = [x.astype(np.float32) for x in (q, k, v)]
    assert np.array_equal(dhsa.dense_attention(q, k, v, **kw),
                          dhsa.dense_attention(*w, **kw).astype(np.float16))
    cfg = dhsa.DHSAConfig(budget=96, block_size=16, sink=8, local=32)
    sel = dhsa.predict_selection(w[0], w[1], cfg, window=window)
    assert np.array_equal(dhsa.sparse_attention(q, k, v, selection=sel, **kw),
                          dhsa.sparse_attention(*w, selection=sel, **kw).astype(np.float16))
    # the full DHSA path with float16 inputs predicts from the same keys
    a = dhsa.sparse_attention(q, k, v, cfg, **kw)
    b = dhsa.sparse_attention(*w, cfg, **kw).astype(np.float16)
    assert np.array_equal(a, b)


def test_half_nonfinite_rejected():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 16, 8)).astype(np.float16)
    for name, bad in (("k", np.inf), ("v", np.nan)):
        k = rng.standard_normal((1, 1, 16, 8)).astype(np.float16)
        v = k.copy()
        (k if name == "k" else v)[0, 0, 5, 2] = bad
        with pytest.raises(ValueError, match=name):
            dhsa.dense_attention(q, k, v)
