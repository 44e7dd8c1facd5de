"""Overflow and limits (issue 8): sizes whose products pass 32 bits, logical
shapes of 2**31 and more (zero-stride views, never allocated: in a child
process with a hard address-space limit), option values at the int64 edge,
budgets and block sizes at and past the sequence length, the smallest
shapes (Lq = Lk = D = 1), many heads of tiny sequences, read-only memmaps and
unaligned buffers, non-finite values behind odd layouts, and finite values
so large that float32 intermediates could overflow (refused with an error
naming q and k, or computed exactly when only v is large).

Complements tests/test_validation.py (argument checks on ordinary inputs).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import dhsa
from dhsa import _core, reference
from conftest import make_qkv, rel_err
from _layouts import unaligned_copy, with_layout

F32_TOL = 1e-5
F16_TOL = 2e-3
UNDER_SANITIZER = os.environ.get("DHSA_UNDER_SANITIZER") == "1"
no_rlimit_under_asan = pytest.mark.skipif(
    UNDER_SANITIZER or not sys.platform.startswith("linux"),
    reason="needs RLIMIT_AS (ASan reserves terabytes of shadow memory)")

SMALL_CFG = dhsa.DHSAConfig(budget=40, block_size=8, sink=4, local=16, min_chunk=2,
                            max_chunk=8, boundary_window=4, nms_radius=2)


def tol_of(x):
    return F16_TOL if x.dtype.itemsize == 2 else F32_TOL


# ---- huge logical shapes: zero-stride views, in a memory-capped child ---------

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    import dhsa
    from dhsa import _core

    def vsz():
        return int(open("/proc/self/statm").read().split()[0]) * 4096

    cap = vsz() + (1 << 30)  # 1 GiB of address space on top of what is mapped
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    small = np.zeros((1, 1, 1, 1), np.float32)
    results = []
    for case in json.loads(sys.argv[1]):
        shape, which, entry = tuple(case["shape"]), case["which"], case["entry"]
        big = np.broadcast_to(np.float32(0.5), shape)
        args = [small, small, small]
        for i in which:
            args[i] = big
        t0 = time.perf_counter()
        try:
            if entry == "dense":
                dhsa.dense_attention(*args)
            elif entry == "sparse":
                _core.sparse_attention(*args, offsets=np.array([0, 1]), starts=np.array([0]),
                                       ends=np.array([1]), block_size=1)
            else:
                dhsa.predict_selection(args[0], args[1], dhsa.DHSAConfig(
                    budget=8, block_size=1, sink=0, local=6, boundary_window=2, nms_radius=1))
            outcome, msg = "ok", ""
        except BaseException as e:
            outcome, msg = type(e).__name__, str(e)[:200]
        results.append(dict(case, outcome=outcome, msg=msg,
                            seconds=round(time.perf_counter() - t0, 3)))
    # VmHWM: peak RSS of this image (ru_maxrss would include the parent's, kept over exec)
    peak = [int(line.split()[1]) for line in open("/proc/self/status")
            if line.startswith("VmHWM:")][0]
    print(json.dumps({"results": results, "peak_rss_kib": peak}))
""")


def run_capped(cases):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(dhsa.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # cwd = where the imported dhsa lives: `python -c` puts the cwd first on
    # sys.path, and a source checkout there has no built extension
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child died ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


HUGE_SHAPES = [(1, 1, 2**31, 1), (1, 1, 2**31 - 1, 1), (1, 1, 2**31 + 5, 2), (1, 1, 2**40, 1),
               (2**31, 1, 1, 1), (1, 2**31, 1, 1), (2**16, 2**16, 1, 1), (1, 1, 2**20, 2**12),
               (2**20, 2**20, 2**20, 1)]


@no_rlimit_under_asan
def test_huge_broadcast_views_fail_cleanly():
    """Logical sizes past 2**31 (and 2**63 bytes) from zero-stride views are
    refused with ValueError or MemoryError, fast and without using the memory."""
    cases = []
    for shape in HUGE_SHAPES:
        for entry in ("dense", "sparse", "predict"):
            for which in ([1, 2], [0, 1, 2], [2]) if entry != "predict" else ([1], [0, 1]):
                cases.append({"shape": shape, "which": which, "entry": entry})
    out = run_capped(cases)
    for r in out["results"]:
        assert r["outcome"] in ("ValueError", "MemoryError"), r
        assert r["seconds"] < 10, r
    assert out["peak_rss_kib"] < 1.5 * 2**20, "the child used more than 1.5 GiB"


@no_rlimit_under_asan
@pytest.mark.parametrize("entry", ["dense", "sparse", "predict"])
def test_invalid_huge_view_refused_before_copying(entry):
    which = [1] if entry == "predict" else [1, 2]
    out = run_capped([{"shape": (1, 1, 2**31, 1), "which": which, "entry": entry}])
    r = out["results"][0]
    assert r["outcome"] == "ValueError" and "2**31" in r["msg"], r


# ---- integer sizes past 32 bits, without the memory -----------------------------

def test_count_pairs_products_past_32_bits():
    """B * H * Lk > 2**32 in count_pairs (ints only, one key per row)."""
    B, H, Hkv, Lk = 2**17, 2**15, 2**15, 1
    n = B  # G = 1: one row per batch item
    offsets = np.arange(n + 1, dtype=np.int64)
    starts = np.zeros(n, np.int32)
    ends = np.ones(n, np.int32)
    sel, allowed = _core.count_pairs(offsets, starts, ends, block_size=1, B=B, H=H, Hkv=Hkv,
                                     Lq=1, Lk=Lk)
    assert sel.shape == allowed.shape == (B,)
    assert np.all(sel == 1) and np.all(allowed == 1)


@pytest.mark.parametrize("Lk", [2**31 - 1, 2**31 - 2, 2**30 + 3])
@pytest.mark.parametrize("window", [None, 1, 2**31 - 1, 2**40])
def test_count_pairs_longest_sequence(Lk, window):
    """Lk at the int32 limit: one query, ranges at its end."""
    starts = np.array([0, Lk - 5], np.int64)
    ends = np.array([3, Lk], np.int64)
    sel, allowed = _core.count_pairs(np.array([0, 2]), starts, ends, block_size=1, B=1, H=1,
                                     Hkv=1, Lq=1, Lk=Lk, window=window)
    w = Lk if window is None else min(window, Lk)
    want_allowed = w
    want_sel = min(5, w) + max(0, 3 - (Lk - w))
    assert (int(sel[0]), int(allowed[0])) == (want_sel, want_allowed)


@pytest.mark.parametrize("Lk", [2**31, 2**32, 2**62])
def test_count_pairs_length_past_int32_refused(Lk):
    with pytest.raises(ValueError):
        _core.count_pairs(np.array([0, 1]), np.array([0]), np.array([1]), block_size=1, B=1,
                          H=1, Hkv=1, Lq=1, Lk=Lk)


@pytest.mark.parametrize("B, H", [(2**62, 4), (2**32, 2**32), (2, 2**62), (3, 2**62)])
def test_count_pairs_head_products_past_int64_refused(B, H):
    with pytest.raises(ValueError):
        _core.count_pairs(np.array([0, 1]), np.array([0]), np.array([1]), block_size=1, B=B,
                          H=H, Hkv=1, Lq=1, Lk=1)


@pytest.mark.parametrize("name", ["B", "H", "Hkv", "Lq", "Lk"])
@pytest.mark.parametrize("value", [2**64, -2**63 - 1, 2**100])
def test_count_pairs_huge_ints_raise_value_error(name, value):
    kw = dict(block_size=1, B=1, H=1, Hkv=1, Lq=1, Lk=1)
    kw[name] = value
    with pytest.raises(ValueError):
        _core.count_pairs(np.array([0, 1]), np.array([0]), np.array([1]), **kw)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.uint32])
@pytest.mark.parametrize("bad", [2**32, 2**32 + 1, 2**31, 2**63 - 1])
def test_range_values_past_int32_refused_before_narrowing(dtype, bad):
    """starts / ends are narrowed to int32 only after the range check: 2**32 + 1
    must not wrap to 1."""
    q, k, v = make_qkv(np.random.default_rng(0), 1, 1, 1, 4, 8, 4)
    if bad > np.iinfo(dtype).max:
        pytest.skip("value does not fit the dtype")
    ends = np.array([bad], dtype=dtype)
    with pytest.raises(ValueError, match="Lk"):
        _core.sparse_attention(q, k, v, offsets=np.array([0, 1]), starts=np.array([0]),
                               ends=ends, block_size=4)
    with pytest.raises(ValueError, match="Lk"):
        _core.count_pairs(np.array([0, 1]), np.array([0], dtype=dtype), ends, block_size=4,
                          B=1, H=1, Hkv=1, Lq=4, Lk=8)


def test_offsets_past_int64_wrap_refused():
    q, k, v = make_qkv(np.random.default_rng(0), 1, 1, 1, 4, 8, 4)
    offsets = np.array([0, 2**64 - 1], dtype=np.uint64)  # -1 as int64
    with pytest.raises(ValueError, match="offsets"):
        _core.sparse_attention(q, k, v, offsets=offsets, starts=np.array([0]),
                               ends=np.array([1]), block_size=4)


# ---- option values at the int64 edge ---------------------------------------------

# the fields _core.predict reads from a config, here on a plain namespace so
# that values DHSAConfig would refuse reach the core's own safety checks
PREDICT_BASE = dict(granularity="kv_head", block_size=8, sink=4, local=16,
                    budget_mode="tokens", budget=40, density=0.3, mass=0.9, min_budget=8,
                    max_budget=48, chunking="dynamic", chunk_size=8, boundary_window=4,
                    threshold=0.2, min_chunk=2, max_chunk=8, nms_radius=2, max_chunks=None,
                    normalization="sqrt", method="dhsa", dense_tail=0,
                    chunk_score="mean", decode_score="mean")


def core_config(**fields):
    return types.SimpleNamespace(**dict(PREDICT_BASE, **fields))
EDGE = [2**31 - 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1]


@pytest.mark.parametrize("field", ["block_size", "sink", "local", "budget", "min_budget",
                                   "max_budget", "boundary_window", "min_chunk", "max_chunk",
                                   "nms_radius", "max_chunks", "chunk_size", "dense_tail"])
@pytest.mark.parametrize("mode", ["tokens", "adaptive"])
def test_predict_int_options_at_int64_edge_mean_the_length(field, mode):
    """Every count option past the sequence length behaves as the length itself."""
    q, k, _ = make_qkv(np.random.default_rng(3), 1, 4, 2, 40, 70, 16)
    Lq, Lk = 40, 70
    cut = Lq if field in ("block_size", "dense_tail") else Lk
    base = dict(budget_mode=mode)
    if field == "min_chunk":
        base["max_chunk"] = 2**63 - 1
    if field == "min_budget":
        base["max_budget"] = 2**63 - 1
    if field == "chunk_size":
        base["chunking"] = "fixed"
    want = _core.predict(q, k, core_config(**base, **{field: cut}))
    for value in EDGE:
        got = _core.predict(q, k, core_config(**base, **{field: value}))
        for name in ("offsets", "starts", "ends", "num_bounds", "pairs_selected"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{field}={value}")


@pytest.mark.parametrize("bs", [2**31, 2**62, 2**63 - 1])
def test_sparse_block_size_at_int64_edge(bs):
    q, k, v = make_qkv(np.random.default_rng(4), 1, 2, 1, 20, 50, 8)
    offsets, starts, ends = np.array([0, 2]), np.array([0, 30]), np.array([10, 50])
    want = _core.sparse_attention(q, k, v, offsets=offsets, starts=starts, ends=ends,
                                  block_size=20)
    got = _core.sparse_attention(q, k, v, offsets=offsets, starts=starts, ends=ends,
                                 block_size=bs)
    np.testing.assert_array_equal(got, want)
    sel_w = _core.count_pairs(offsets, starts, ends, block_size=20, B=1, H=2, Hkv=1, Lq=20, Lk=50)
    sel_g = _core.count_pairs(offsets, starts, ends, block_size=bs, B=1, H=2, Hkv=1, Lq=20,
                              Lk=50)
    np.testing.assert_array_equal(sel_g, sel_w)


@pytest.mark.parametrize("name", ["density", "mass", "threshold"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_predict_float_options_non_finite_named(name, bad):
    q, k, _ = make_qkv(np.random.default_rng(3), 1, 2, 1, 10, 20, 8)
    with pytest.raises(ValueError, match=rf"config\.{name} must be finite"):
        _core.predict(q, k, core_config(**{name: bad}))


# ---- budgets and block sizes at and past the sequence length ----------------------

@pytest.mark.parametrize("block_size", ["Lq", "Lq+1", 4096])
@pytest.mark.parametrize("budget", ["Lk", "Lk+1", 10**9])
@pytest.mark.parametrize("opts", [{}, {"causal": False}, {"window": 33}])
def test_budget_and_block_past_length_is_dense(block_size, budget, opts):
    B, H, Hkv, Lq, Lk, D = 1, 4, 2, 45, 90, 16
    q, k, v = make_qkv(np.random.default_rng(11), B, H, Hkv, Lq, Lk, D)
    bs = {"Lq": Lq, "Lq+1": Lq + 1}.get(block_size, block_size)
    bud = {"Lk": Lk, "Lk+1": Lk + 1}.get(budget, budget)
    cfg = dhsa.DHSAConfig(block_size=bs, budget=max(bud, 4 + 8 + bs), sink=4, local=8,
                          boundary_window=4, nms_radius=2)
    out, info = dhsa.sparse_attention(q, k, v, cfg, return_info=True, **opts)
    sel = info.selection
    np.testing.assert_array_equal(sel.pairs_selected, sel.pairs_allowed)
    assert info.density == 1.0
    ref = reference.dense_attention(q, k, v, **opts)
    assert rel_err(out, ref) <= F32_TOL


# ---- smallest shapes and many tiny heads --------------------------------------------

TINY = [(1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 2, 1), (1, 1, 1, 2, 2, 1), (1, 4, 1, 1, 1, 1),
        (2, 2, 2, 1, 1, 3), (1, 1, 1, 1, 1, 256), (1, 3, 1, 1, 300, 1), (1, 2, 2, 300, 300, 1)]


@pytest.mark.parametrize("shape", TINY, ids=lambda s: "B{}H{}Hkv{}Lq{}Lk{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("opts", [{}, {"causal": False, "window": 1}, {"softcap": 2.0}])
def test_tiny_shapes_all_entry_points(shape, dtype, opts):
    q, k, v = make_qkv(np.random.default_rng(12), *shape, dtype=dtype)
    out = dhsa.dense_attention(q, k, v, **opts)
    ref = reference.dense_attention(q, k, v, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= tol_of(q)
    cfg = dhsa.DHSAConfig(budget=3, block_size=1, sink=1, local=1, chunking="fixed",
                          chunk_size=1)
    out, info = dhsa.sparse_attention(q, k, v, cfg, return_info=True, **opts)
    sel = info.selection
    sref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                              sel.block_size, **opts)
    assert rel_err(out, sref) <= tol_of(q)


@pytest.mark.parametrize("Hkv", [64, 16, 1])
def test_many_heads_tiny_sequences(Hkv):
    B, H, Lq, Lk, D = 64, 64, 2, 3, 4
    q, k, v = make_qkv(np.random.default_rng(13), B, H, Hkv, Lq, Lk, D)
    out = dhsa.dense_attention(q, k, v)
    assert rel_err(out, reference.dense_attention(q, k, v)) <= F32_TOL
    cfg = dhsa.DHSAConfig(budget=2, block_size=1, sink=0, local=1, chunking="fixed",
                          chunk_size=1, granularity="query_head")
    out, info = dhsa.sparse_attention(q, k, v, cfg, return_info=True)
    sel = info.selection
    assert sel.groups == H
    assert len(sel.offsets) == B * H * 2 + 1
    ref = reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends, 1)
    assert rel_err(out, ref) <= F32_TOL


# ---- read-only and unaligned memory ------------------------------------------------

def test_read_only_memmap_inputs(tmp_path):
    q, k, v = make_qkv(np.random.default_rng(14), 1, 4, 2, 30, 60, 24, dtype=np.float16)
    maps = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        path = tmp_path / f"{name}.bin"
        x.tofile(path)
        maps.append(np.memmap(path, dtype=x.dtype, mode="r", shape=x.shape))
    assert not any(m.flags.writeable for m in maps)
    out = dhsa.dense_attention(*maps)
    assert rel_err(out, reference.dense_attention(q, k, v)) <= F16_TOL
    sel = dhsa.predict_selection(maps[0], maps[1], SMALL_CFG)
    ref_sel = dhsa.predict_selection(q, k, SMALL_CFG)
    np.testing.assert_array_equal(sel.starts, ref_sel.starts)
    np.testing.assert_array_equal(dhsa.sparse_attention(*maps, SMALL_CFG),
                                  dhsa.sparse_attention(q, k, v, SMALL_CFG))
    del maps


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unaligned_inputs_give_the_aligned_result(offset, dtype):
    q, k, v = make_qkv(np.random.default_rng(15), 2, 2, 1, 17, 40, 9, dtype=dtype)
    uq, uk, uv = (unaligned_copy(x, offset) for x in (q, k, v))
    if offset % np.dtype(dtype).itemsize:
        assert not uq.flags.aligned
    np.testing.assert_array_equal(dhsa.dense_attention(uq, uk, uv), dhsa.dense_attention(q, k, v))
    np.testing.assert_array_equal(dhsa.sparse_attention(uq, uk, uv, SMALL_CFG),
                                  dhsa.sparse_attention(q, k, v, SMALL_CFG))
    a, b = dhsa.predict_selection(uq, uk, SMALL_CFG), dhsa.predict_selection(q, k, SMALL_CFG)
    np.testing.assert_array_equal(a.starts, b.starts)
    np.testing.assert_array_equal(a.ends, b.ends)


# ---- non-finite values behind odd layouts -------------------------------------------

@pytest.mark.parametrize("layout", ["fortran", "transposed", "sliced", "negative", "broadcast",
                                    "unaligned", "readonly", "bigendian"])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_finite_behind_any_layout_named(layout, which, dtype):
    rng = np.random.default_rng(16)
    args = list(make_qkv(rng, 1, 2, 2, 6, 9, 5, dtype=dtype))
    bad = args[which].copy()
    bad[...] = bad[0:1, 0:1, 0:1, 0:1]  # constant: any broadcast view still holds the NaN
    bad[0, 0, 0, 0] = np.nan
    args[which] = with_layout(bad, layout, rng)
    name = "qkv"[which]
    for fn in (dhsa.dense_attention, lambda q, k, v: dhsa.sparse_attention(q, k, v, SMALL_CFG)):
        with pytest.raises(ValueError, match=rf"\b{name}\b contains NaN or Inf"):
            fn(*args)
    if which < 2:
        with pytest.raises(ValueError, match=rf"\b{name}\b contains NaN or Inf"):
            dhsa.predict_selection(args[0], args[1], SMALL_CFG)


# ---- finite inputs whose float32 intermediates could overflow ----------------------

@pytest.mark.parametrize("case", ["pos", "neg", "prescale", "sparse"])
def test_logits_beyond_float32_are_not_silently_wrong(case):
    v = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1)
    big = np.full((1, 1, 4, 1), 1e20, np.float32)
    kw = {}
    if case == "pos":        # logit +1e40: rows should average v uniformly
        q, k = big, big
    elif case == "neg":      # logit -1e40: the same, from the other side
        q, k = big, -big
    elif case == "prescale":  # logit 1e30 is finite, but q * scale = 1e60 is not
        q, k = np.full((1, 1, 4, 1), 1e30, np.float32), np.full((1, 1, 4, 1), 1e-30, np.float32)
        kw = dict(scale=1e30)
    else:
        q, k = big, big
    ref = reference.dense_attention(q, k, v, **kw)
    try:
        if case == "sparse":
            out = _core.sparse_attention(q, k, v, offsets=np.array([0, 1]), starts=np.array([0]),
                                         ends=np.array([4]), block_size=4)
        else:
            out = dhsa.dense_attention(q, k, v, **kw)
    except ValueError as e:
        assert case != "prescale", e  # logit 1e30 fits float32: must be computed
        assert "q and k are too large" in str(e)
        return
    assert np.all(np.isfinite(out)), out.ravel()
    assert rel_err(out, ref) <= F32_TOL, (out.ravel(), ref.ravel())


@pytest.mark.parametrize("value, Lk", [(3e38, 4), (1e37, 300)])
def test_values_near_float32_max_are_not_silently_wrong(value, Lk):
    q = np.zeros((1, 1, Lk, 8), np.float32)  # all logits 0: out = mean of v
    v = np.full((1, 1, Lk, 8), value, np.float32)
    out = dhsa.dense_attention(q, q, v)  # any finite v is computed, never refused
    assert np.all(np.isfinite(out)), out.ravel()[-4:]
    assert rel_err(out, reference.dense_attention(q, q, v)) <= F32_TOL


@pytest.mark.parametrize("entry", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_huge_values_with_real_softmax_match_reference(entry, dtype):
    """v spread over +-3e38 (scaled weights in the core) with non-uniform
    logits, against the float64 reference; float16 v at its own max."""
    rng = np.random.default_rng(21)
    q, k, v = make_qkv(rng, 1, 4, 2, 200, 260, 16, dtype=dtype)
    top = 3e38 if dtype == np.float32 else 6.5e4
    v = (rng.uniform(-1, 1, v.shape) * top).astype(dtype)
    if entry == "dense":
        out = dhsa.dense_attention(q, k, v)
    else:
        out = dhsa.sparse_attention(q, k, v, SMALL_CFG)
        sel = dhsa.predict_selection(q, k, SMALL_CFG)
    want = (reference.dense_attention(q, k, v) if entry == "dense" else
            reference.attention_with_selection(q, k, v, sel.offsets, sel.starts, sel.ends,
                                               sel.block_size))
    assert np.all(np.isfinite(out))
    assert rel_err(out, want) <= tol_of(v)


@pytest.mark.parametrize("scale", [3.0, 1e3, 1e30])
def test_scale_above_one_goes_through_the_logits_not_q(scale):
    """scale > 1 multiplies q.k (sgemm alpha), so q * scale never overflows on
    its own; the result still matches the reference."""
    rng = np.random.default_rng(22)
    q, k, v = make_qkv(rng, 1, 2, 1, 33, 40, 8)
    q = (q / np.float32(scale) ** 0.5).astype(np.float32)
    k = (k / np.float32(scale) ** 0.5).astype(np.float32)
    if scale == 1e30:
        q = (q * np.float32(1e20)).astype(np.float32)  # q * scale = 1e35 alone, logits ~1
        k = (k * np.float32(1e-20)).astype(np.float32)
    out = dhsa.dense_attention(q, k, v, scale=scale)
    assert rel_err(out, reference.dense_attention(q, k, v, scale=scale)) <= F32_TOL


@pytest.mark.parametrize("entry", ["dense", "sparse"])
def test_logit_bound_refusal_names_q_and_k(entry):
    q = np.full((1, 1, 8, 4), 1e19, np.float32)
    v = np.zeros_like(q)
    with pytest.raises(ValueError, match=r"q and k are too large.*2\*\*126"):
        if entry == "dense":
            dhsa.dense_attention(q, q, v)
        else:
            _core.sparse_attention(q, q, v, offsets=np.array([0, 1]), starts=np.array([0]),
                                   ends=np.array([8]), block_size=8)
    # just under the bound: computed (all logits equal, uniform weights)
    q = np.full((1, 1, 8, 4), 1e18, np.float32)
    out = dhsa.dense_attention(q, q, np.ones_like(q))
    assert np.allclose(out, 1.0)
