"""Causality under a growing sequence: appending keys (and the queries at their
positions) after a query never changes that query's selection or output.

test_sparse.py changes the *values* of future keys at a fixed length; these
tests change the *length*: every rule that reads Lk (the chunk cap
``max_chunks`` once did, through ceil(Lk / max_chunks)) shows up here."""
from __future__ import annotations

import numpy as np
import pytest

import dhsa
from dhsa import reference
from conftest import make_qkv

# look-ahead boundary_window + nms_radius = 16 <= local = 32
CFG = dhsa.DHSAConfig(budget=96, block_size=16, sink=8, local=32, boundary_window=8,
                      nms_radius=8, min_chunk=4, max_chunk=32)
LOOKAHEAD = CFG.boundary_window + CFG.nms_radius

# bit-for-bit growth needs the vector tile kernels (D = 32 here): OpenBLAS, the
# fallback, blocks its products by matrix size, so a longer sequence may round
# an earlier row differently
vector_tiles = pytest.mark.skipif(dhsa.build_info()["tile_path_d64"] == "openblas",
                                  reason="no vector tile kernels on this CPU")

GROW_CFGS = [
    pytest.param(CFG, id="no-cap"),
    pytest.param(CFG.replace(max_chunks=3), id="max_chunks=3"),
    pytest.param(CFG.replace(max_chunks=12), id="max_chunks=12"),
    pytest.param(CFG.replace(max_chunks=40), id="max_chunks=40"),
    pytest.param(CFG.replace(max_chunks=12, granularity="layer"), id="layer,max_chunks=12"),
    pytest.param(CFG.replace(max_chunks=12, granularity="query_head"),
                 id="query_head,max_chunks=12"),
    pytest.param(CFG.replace(max_chunks=12, budget_mode="adaptive", min_budget=56,
                             max_budget=120, mass=0.9), id="adaptive,max_chunks=12"),
    pytest.param(CFG.replace(max_chunks=12, budget_mode="density", density=0.3),
                 id="density,max_chunks=12"),
]


def prefix(x, n):
    return np.ascontiguousarray(x[:, :, :n])


@vector_tiles
@pytest.mark.parametrize("cfg", GROW_CFGS)
@pytest.mark.parametrize("first", [0, 236], ids=["prefill", "offset"])
def test_growing_keys_keep_earlier_outputs(rng, cfg, first):
    """Keys [0, n) with queries at positions [first, n), for a growing n: the
    queries of every complete block of the shorter run keep their selection
    and their output bit for bit."""
    B, H, Hkv, D, L = 1, 4, 2, 32, 480
    q, k, v = make_qkv(rng, B, H, Hkv, L - first, L, D)
    long_out, long_info = dhsa.sparse_attention(q, k, v, cfg, return_info=True)
    long_sel = long_info.selection
    assert long_sel.density < 0.5  # the selection has choices to make
    checked = 0
    for n in (first + 64, first + 128, 400, 452):
        lq = n - first  # queries of the shorter run, a whole number of blocks or not
        out, info = dhsa.sparse_attention(prefix(q, lq), prefix(k, n), prefix(v, n), cfg,
                                          return_info=True)
        sel = info.selection
        whole = lq // cfg.block_size  # blocks of the shorter run that are complete
        rows = whole * cfg.block_size
        np.testing.assert_array_equal(out[:, :, :rows], long_out[:, :, :rows], err_msg=f"n={n}")
        for b in range(B):
            for g in range(sel.groups):
                for qb in range(whole):
                    np.testing.assert_array_equal(sel.ranges(b, g, qb), long_sel.ranges(b, g, qb),
                                                  err_msg=f"n={n} group {g} block {qb}")
        # chunk boundaries decided before the look-ahead are the same
        for short_bd, long_bd in zip(sel.boundaries, long_sel.boundaries):
            cut = n - LOOKAHEAD
            np.testing.assert_array_equal(short_bd[short_bd < cut], long_bd[long_bd < cut])
        checked += rows
    assert checked > 0
    if cfg.max_chunks is not None and cfg.max_chunks <= 12:
        # the cap binds on the long run (so the test exercises it)
        assert all(len(bd) - 1 == cfg.max_chunks for bd in long_sel.boundaries)


@pytest.mark.parametrize("max_chunks", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_reference_boundaries_stable_as_keys_grow(rng, max_chunks, threshold):
    """reference.find_boundaries on a growing key sequence: boundaries below
    n - look-ahead never move, and the chunk count never exceeds the cap."""
    D, L, window, nms = 16, 300, 6, 3
    k = rng.standard_normal((1, L, D))
    full = reference.find_boundaries(reference.boundary_scores(k, window), threshold, 3, 9,
                                     nms, max_chunks)
    for n in range(20, L, 7):
        bd = reference.find_boundaries(reference.boundary_scores(k[:, :n], window), threshold,
                                       3, 9, nms, max_chunks)
        cut = n - window - nms
        np.testing.assert_array_equal(bd[bd < cut], full[full < cut], err_msg=f"n={n}")
        if max_chunks:
            assert len(bd) - 1 <= max_chunks


@vector_tiles
def test_dense_kernel_growing_keys(rng):
    """The dense kernel too: a longer sequence leaves earlier rows unchanged
    (with a soft-cap, whose vector kernel once used tanhf in a row's tail).
    Bit for bit while both runs take the tile kernels; a prefix of one query
    (2 rows per item) takes the row kernels, which add the same products in
    another order: equal to float32 rounding there."""
    q, k, v = make_qkv(rng, 1, 4, 2, 300, 300, 32)
    long_out = dhsa.dense_attention(q, k, v, softcap=20.0)
    for n in (1, 2, 64, 200, 257):
        out = dhsa.dense_attention(prefix(q, n), prefix(k, n), prefix(v, n), softcap=20.0)
        if n * 2 <= 8:  # the row kernels
            np.testing.assert_allclose(out, long_out[:, :, :n], rtol=1e-5, atol=1e-6,
                                       err_msg=f"n={n}")
        else:
            np.testing.assert_array_equal(out, long_out[:, :, :n], err_msg=f"n={n}")
