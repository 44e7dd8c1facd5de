"""The tile matrix products (csrc/tiles.c): every path against the reference,
the vector kernels against their scalar twins, padding edges (rows not a
multiple of 8, key tiles not a multiple of 32, head_dim not a multiple of 16
or 8), float16 K/V, and the fallback rules of the path switch."""
from __future__ import annotations

import numpy as np
import pytest

import dhsa
from dhsa import _core, reference
from conftest import make_qkv, rel_err

TOL = 1e-5
PATHS = ["avx512f", "avx2-fma", "openblas", "scalar"]
CFG = dhsa.DHSAConfig(budget=96, block_size=16, sink=8, local=32, boundary_window=8,
                      nms_radius=8, min_chunk=4, max_chunk=32)


@pytest.fixture
def tile_path():
    """Set a path for the test; 'auto' again afterwards, whatever happens."""
    def set_path(name, D):
        return _core.tile_path(name, head_dim=D)
    try:
        yield set_path
    finally:
        _core.tile_path("auto")


def expected_path(name, D):
    info = dhsa.build_info()
    avx512 = info["simd_path"] == "avx512f" and D % 16 == 0
    avx2 = info["simd_available"] and D % 8 == 0
    if name in ("openblas", "scalar"):
        return name
    if name == "avx2-fma":
        return "avx2-fma" if avx2 else "openblas"
    if avx512:
        return "avx512f"
    return "avx2-fma" if avx2 else "openblas"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("D", [8, 16, 24, 48, 64, 80, 96, 128, 256, 5, 33])
def test_dense_every_path_every_head_dim(rng, tile_path, path, D):
    # H * Lq rows: 3 * 45 = 135, not a multiple of 8; Lk = 301 keys, not of 32
    q, k, v = make_qkv(rng, 1, 3, 1, 45, 301, D)
    got = tile_path(path, D)
    assert got == expected_path(path, D)
    out = dhsa.dense_attention(q, k, v)
    assert rel_err(out, reference.dense_attention(q, k, v)) <= TOL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opts", [dict(), dict(causal=False), dict(window=37),
                                  dict(softcap=20.0, scale=0.5)])
def test_sparse_every_path(rng, tile_path, path, opts):
    q, k, v = make_qkv(rng, 2, 6, 2, 150, 190, 64)
    tile_path(path, 64)
    sel = dhsa.predict_selection(q, k, CFG, **{k_: v_ for k_, v_ in opts.items()
                                               if k_ in ("causal", "window", "scale")})
    out = dhsa.sparse_attention(q, k, v, CFG, selection=sel, **opts)
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                             sel.block_size, **opts)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("D", [64, 128, 80])
def test_vector_paths_against_scalar_twin(rng, tile_path, D):
    q, k, v = make_qkv(rng, 1, 4, 2, 700, 700, D)  # several 512-key tiles
    outs = {}
    for p in PATHS:
        tile_path(p, D)
        outs[p] = dhsa.dense_attention(q, k, v)
    for p in ("avx512f", "avx2-fma", "openblas"):
        assert rel_err(outs[p], outs["scalar"]) <= 2e-6, p
    # both vector kernels add the same products in the same order
    if expected_path("avx512f", D) == "avx512f" and expected_path("avx2-fma", D) == "avx2-fma":
        np.testing.assert_array_equal(outs["avx512f"], outs["avx2-fma"])


@pytest.mark.parametrize("path", ["avx512f", "avx2-fma", "scalar"])
def test_float16_kv_through_the_tile_kernels(rng, tile_path, path):
    q, k, v = make_qkv(rng, 1, 4, 2, 200, 260, 64, dtype=np.float16)
    tile_path(path, 64)
    out = dhsa.dense_attention(q, k, v)
    ref = reference.dense_attention(q, k, v)
    assert rel_err(out, ref) <= 2e-3
    # the same values widened beforehand give the same float32 result
    out32 = dhsa.dense_attention(q.astype(np.float32), k.astype(np.float32),
                                 v.astype(np.float32))
    np.testing.assert_array_equal(out.astype(np.float32), out32.astype(np.float16)
                                  .astype(np.float32))


@pytest.mark.parametrize("path", ["avx512f", "avx2-fma"])
def test_threads_agree_bitwise(rng, tile_path, path):
    q, k, v = make_qkv(rng, 2, 6, 3, 333, 333, 64)
    tile_path(path, 64)
    one = dhsa.dense_attention(q, k, v, num_threads=1)
    two = dhsa.dense_attention(q, k, v, num_threads=2)
    np.testing.assert_array_equal(one, two)
    s1 = dhsa.sparse_attention(q, k, v, CFG, num_threads=1)
    s2 = dhsa.sparse_attention(q, k, v, CFG, num_threads=2)
    np.testing.assert_array_equal(s1, s2)


def test_scalar_switch_routes_tiles_to_openblas(tile_path):
    assert tile_path("auto", 64) == expected_path("auto", 64)
    dhsa.force_scalar(True)
    try:
        assert _core.tile_path(head_dim=64) == "openblas"
    finally:
        dhsa.force_scalar(False)
    assert _core.tile_path(head_dim=64) == expected_path("auto", 64)


def test_tile_path_arguments(tile_path):
    with pytest.raises(ValueError, match="path must be one of"):
        _core.tile_path("fastest")
    with pytest.raises(ValueError, match="head_dim"):
        _core.tile_path(None, head_dim=0)
    with pytest.raises(TypeError):
        _core.tile_path(3)
    assert dhsa.build_info()["tile_path_d64"] == _core.tile_path(head_dim=64)


# ---- the row kernels: items of at most 8 rows (decode steps) -------------------

def hand_selection(B, G, Lk, rng):
    """One query block per (batch, group): ranges of 1..37 keys with gaps, the
    last ending at Lk (the query's own position)."""
    offsets, starts, ends = [0], [], []
    for _ in range(B * G):
        x = int(rng.integers(0, 5))
        while x < Lk:
            n = int(rng.integers(1, 38))
            e = min(Lk, x + n)
            starts.append(x)
            ends.append(e)
            x = e + int(rng.integers(1, 20))
        if ends[-1] != Lk:
            starts.append(Lk - 1)
            ends.append(Lk)
        offsets.append(len(starts))
    return dhsa.Selection(offsets=np.array(offsets, np.int64), starts=np.array(starts, np.int32),
                          ends=np.array(ends, np.int32), block_size=16, batch=B, groups=G,
                          num_blocks=1, granularity="kv_head")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("H,Hkv,Lq", [(1, 1, 1), (3, 1, 1), (4, 1, 1), (9, 3, 1), (8, 1, 1),
                                      (4, 2, 3), (2, 1, 4)])
@pytest.mark.parametrize("D", [64, 256, 24, 5])
def test_few_row_items_every_path(rng, tile_path, path, H, Hkv, Lq, D):
    # rows per item = (H / Hkv) * Lq <= 8: the row kernels (openblas keeps sgemm);
    # 301 keys: a last 4-key slot only partly filled
    q, k, v = make_qkv(rng, 2, H, Hkv, Lq, 301, D)
    tile_path(path, D)
    out = dhsa.dense_attention(q, k, v)
    assert rel_err(out, reference.dense_attention(q, k, v)) <= TOL
    sel = hand_selection(2, Hkv, 301, rng)
    out = dhsa.sparse_attention(q, k, v, CFG, selection=sel, softcap=30.0)
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                             sel.block_size, softcap=30.0)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("D", [64, 256, 40])
def test_row_kernels_against_scalar_twin(rng, tile_path, D):
    q, k, v = make_qkv(rng, 1, 6, 2, 1, 2051, D)  # 3 rows per item, 4 tiles of 512 keys
    sel = hand_selection(1, 2, 2051, rng)
    outs = {}
    for p in PATHS:
        tile_path(p, D)
        outs[p] = (dhsa.dense_attention(q, k, v),
                   dhsa.sparse_attention(q, k, v, CFG, selection=sel))
    for p in ("avx512f", "avx2-fma", "openblas"):  # outputs of ~0.04: float32 sums of 2K keys
        for got, want in zip(outs[p], outs["scalar"]):
            assert rel_err(got, want) <= 5e-6, p
    # both vector paths run the same row kernels: the same bits
    for got, want in zip(outs["avx512f"], outs["avx2-fma"]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("path", ["avx2-fma", "scalar"])
def test_row_kernels_float16_kv(rng, tile_path, path):
    q, k, v = make_qkv(rng, 1, 4, 1, 1, 700, 64, dtype=np.float16)
    tile_path(path, 64)
    sel = hand_selection(1, 1, 700, rng)
    out = dhsa.sparse_attention(q, k, v, CFG, selection=sel)
    wide = [x.astype(np.float32) for x in (q, k, v)]
    np.testing.assert_array_equal(out, dhsa.sparse_attention(*wide, CFG, selection=sel)
                                  .astype(np.float16))
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                             sel.block_size)
    assert rel_err(out, ref) <= 2e-3


@pytest.mark.parametrize("path", ["avx2-fma", "scalar", "openblas"])
@pytest.mark.parametrize("opts", [dict(), dict(window=2500), dict(softcap=20.0),
                                  dict(causal=False)])
def test_split_keys_of_few_row_items(rng, tile_path, path, opts):
    # one KV head, 3 queries x 2 heads = 6 rows over up to 5000 keys: the
    # keys are cut into parts (about 1K each) merged afterwards; the parts
    # depend on the keys only, so 1 and 2 threads agree bitwise
    q, k, v = make_qkv(rng, 1, 2, 1, 3, 5000, 64)
    tile_path(path, 64)
    one = dhsa.dense_attention(q, k, v, num_threads=1, **opts)
    two = dhsa.dense_attention(q, k, v, num_threads=2, **opts)
    np.testing.assert_array_equal(one, two)
    assert rel_err(one, reference.dense_attention(q, k, v, **opts)) <= TOL
    sel = hand_selection(1, 1, 5000, rng)
    sopts = {k_: v_ for k_, v_ in opts.items() if k_ != "causal"}
    one = dhsa.sparse_attention(q, k, v, CFG, selection=sel, num_threads=1, **sopts)
    two = dhsa.sparse_attention(q, k, v, CFG, selection=sel, num_threads=2, **sopts)
    np.testing.assert_array_equal(one, two)
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                             sel.block_size, **sopts)
    assert rel_err(one, ref) <= TOL
