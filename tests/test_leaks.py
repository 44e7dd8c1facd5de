"""Nothing leaks (issue 8): thousands of calls of every public function, on
success and on every kind of error path, leave the reference counts of the
inputs, the malloc heap (C core included), the Python heap (tracemalloc) and
the process RSS flat.

Each case runs a warm-up (thread pools, BLAS buffers and malloc arenas reach
their steady size), then ``N_RSS`` calls measured by the bytes glibc's
malloc has in use (mallinfo2: every arena and mmap, so the C core's scratch
too) and by RSS from /proc/self/statm, then ``N_TRACED`` calls under
tracemalloc. RSS alone is blind in a process that already freed a lot (a
leak reuses resident free pages), hence mallinfo2 where glibc has it. The
inputs are big enough (tens of KiB, copied on every call for the
non-contiguous and float16 cases) that leaking one copy per call would add
many MiB.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest

import dhsa
from dhsa import _core
from conftest import make_qkv

N_WARMUP = 30
N_RSS = 600
N_TRACED = 200
RSS_LIMIT = 3 * 2**20       # bytes over the whole measured loop
HEAP_LIMIT = 64 * 2**10     # malloc bytes in use after it (noise: < 100 bytes)
TRACED_LIMIT = 16 * 2**10   # bytes of Python heap still allocated after it (noise: ~1 KiB)

UNDER_SANITIZER = os.environ.get("DHSA_UNDER_SANITIZER") == "1"

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="RSS read from /proc/self/statm")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    if UNDER_SANITIZER:  # ASan replaces malloc: nothing to read
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.restype = _Mallinfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use():
    """Bytes malloc has handed out and not got back (None where unknown)."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return m.uordblks + m.hblkhd


def _inputs(dtype=np.float32, shape=(1, 4, 48, 2, 96, 32)):
    B, H, Lq, Hkv, Lk, D = shape
    return make_qkv(np.random.default_rng(0), B, H, Hkv, Lq, Lk, D, dtype=dtype)


CFG = dhsa.DHSAConfig(budget=48, block_size=16, sink=4, local=24, min_chunk=2, max_chunk=8,
                      boundary_window=4, nms_radius=2)


def _raises(exc, fn, *args, **kw):
    def call():
        try:
            fn(*args, **kw)
        except exc:
            return
        raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")
    return call


def _hand_selection(Lq, Lk, bs=16):
    nqb = -(-Lq // bs)
    offsets = np.arange(0, 2 * nqb + 1, 2, dtype=np.int32)
    starts = np.tile(np.array([0, Lk // 2], dtype=np.int16), nqb)
    ends = np.tile(np.array([8, Lk], dtype=np.uint32), nqb)
    return offsets, starts, ends


def case(name):
    """(call, inputs) of one case: ``call()`` does one call (and swallows the
    expected error); ``inputs`` are the objects whose refcounts must not move."""
    q, k, v = _inputs()
    qh, kh, vh = (np.asfortranarray(x) for x in _inputs(np.float16))
    Lq, Lk = q.shape[2], k.shape[2]
    offsets, starts, ends = _hand_selection(Lq, Lk)
    sel = dhsa.Selection(offsets, starts, ends, 16, 1, 1, -(-Lq // 16), "layer")
    vnan = v.copy()
    vnan[0, 1, 5, 3] = np.nan
    knan = k.copy()
    knan[0, 0, 7, 0] = np.inf
    bad_ends = ends.copy()
    bad_ends[-1] = Lk + 1
    bounds = np.array([0, 10, 30, 31, 60, Lk], dtype=np.int64)
    dcfg = CFG.replace(decode_budget=40)
    steady = dhsa.KVCache(dcfg, 2, 32)
    steady.append(k, v)
    q1 = np.ascontiguousarray(q[:, :, -1:])
    k1, v1 = np.ascontiguousarray(k[:, :, :1]), np.ascontiguousarray(v[:, :, :1])

    def cache_life():  # a whole cache: made, grown, read, cropped, reordered, dropped
        c = dhsa.KVCache(dcfg.replace(decode_reuse=3), 2, 32, dtype=np.float16)
        for i in range(0, Lk, 32):
            c.append(kh[:, :, i:i + 32].copy(), vh[:, :, i:i + 32].copy())
            dhsa.decode_attention(q1, c, return_info=True)  # kept scores, grown and reused
        c.crop(50)
        c.reorder([0, 0])
        c.keys(0, 10)
        return c.nbytes()

    def cache_step():  # one decode step on a cache that keeps its size
        steady.append(k1, v1)
        dhsa.decode_attention(q1, steady)
        steady.crop(Lk)

    cases = {
        "cache_life": (cache_life, (q1, kh, vh)),
        "cache_step": (cache_step, (q1, k1, v1)),
        "cache_nan_append": (_raises(ValueError, steady.append, knan[:, :, 4:8].copy(),
                                     v[:, :, :4].copy()), (knan,)),
        # ---- success paths
        "dense_f32": (lambda: dhsa.dense_attention(q, k, v, window=40, softcap=20.0), (q, k, v)),
        "dense_f16_fortran": (lambda: dhsa.dense_attention(qh, kh, vh, num_threads=1),
                              (qh, kh, vh)),
        "sparse_predicted": (lambda: dhsa.sparse_attention(q, k, v, CFG, return_info=True),
                             (q, k, v)),
        "sparse_f16_predicted": (lambda: dhsa.sparse_attention(qh, kh, vh, CFG, num_threads=1),
                                 (qh, kh, vh)),
        "sparse_hand_selection": (lambda: dhsa.sparse_attention(q, k, v, selection=sel,
                                                                num_threads=1),
                                  (q, k, v, offsets, starts, ends)),
        "sparse_hand_selection_info": (lambda: dhsa.sparse_attention(
            q, k, v, selection=sel, num_threads=1, return_info=True),
            (q, k, v, offsets, starts, ends)),
        "predict_scores": (lambda: dhsa.predict_selection(q, k, CFG, return_scores=True,
                                                          num_threads=1), (q, k)),
        "predict_bounds": (lambda: dhsa.predict_selection(q, k, CFG.replace(budget_mode="adaptive"),
                                                          boundaries=bounds, num_threads=1),
                           (q, k, bounds)),
        "predict_streaming": (lambda: dhsa.predict_selection(q, k, CFG.replace(method="streaming")),
                              (q, k)),
        "count_pairs": (lambda: _core.count_pairs(offsets, starts, ends, block_size=16, B=1, H=4,
                                                  Hkv=2, Lq=Lq, Lk=Lk, window=30),
                        (offsets, starts, ends)),
        # ---- error paths (after some inputs were already converted)
        "dense_bad_dtype_v": (_raises(TypeError, dhsa.dense_attention, qh, kh,
                                      v.astype(np.float64)), (qh, kh)),
        "dense_nan_v": (_raises(ValueError, dhsa.dense_attention, qh.astype(np.float32),
                                kh.astype(np.float32), vnan), (vnan,)),
        "dense_bad_window": (_raises(ValueError, dhsa.dense_attention, q, k, v, window=0),
                             (q, k, v)),
        "dense_bad_shape": (_raises(ValueError, dhsa.dense_attention, q, k[:, :, :, :16], v),
                            (q, k, v)),
        "sparse_bad_selection": (_raises(ValueError, _core.sparse_attention, qh, kh, vh,
                                         offsets=offsets, starts=starts, ends=bad_ends,
                                         block_size=16), (qh, kh, vh, offsets, starts)),
        "sparse_bad_offsets": (_raises(ValueError, _core.sparse_attention, q, k, v,
                                       offsets=offsets[:-1], starts=starts, ends=ends,
                                       block_size=16), (q, k, v, offsets)),
        "sparse_float_starts": (_raises(TypeError, _core.sparse_attention, q, k, v,
                                        offsets=offsets, starts=starts.astype(np.float32),
                                        ends=ends, block_size=16), (q, k, v)),
        "sparse_nan_v_predicted": (_raises(ValueError, dhsa.sparse_attention, q, k, vnan, CFG),
                                   (q, k, vnan)),
        "core_predict_baseline_method": (_raises(ValueError, _core.predict, q, k,
                                                 CFG.replace(method="streaming")), (q, k)),
        "check_inputs_nan_k": (_raises(ValueError, _core.check_inputs, q, knan), (q, knan)),
        "predict_nan_k": (_raises(ValueError, dhsa.predict_selection, q, knan, CFG), (q, knan)),
        "predict_bad_bounds": (_raises(ValueError, dhsa.predict_selection, q, k, CFG,
                                       boundaries=bounds[::-1].copy()), (q, k)),
        "predict_bad_option": (_raises(ValueError, dhsa.predict_selection, q, k, CFG,
                                       scale=-1.0), (q, k)),
        "count_pairs_bad": (_raises(ValueError, _core.count_pairs, offsets, starts, ends,
                                    block_size=16, B=1, H=3, Hkv=2, Lq=Lq, Lk=Lk),
                            (offsets, starts, ends)),
        "config_type_error": (_raises(TypeError, dhsa.sparse_attention, q, k, v, config={}),
                              (q, k, v)),
    }
    return cases[name]


CASES = ["dense_f32", "dense_f16_fortran", "sparse_predicted", "sparse_f16_predicted",
         "sparse_hand_selection", "sparse_hand_selection_info", "predict_scores", "predict_bounds", "predict_streaming",
         "count_pairs", "dense_bad_dtype_v", "dense_nan_v", "dense_bad_window",
         "dense_bad_shape", "sparse_bad_selection", "sparse_bad_offsets", "sparse_float_starts",
         "predict_nan_k", "predict_bad_bounds", "predict_bad_option", "count_pairs_bad",
         "config_type_error", "sparse_nan_v_predicted", "core_predict_baseline_method",
         "check_inputs_nan_k", "cache_life", "cache_step", "cache_nan_append"]


# a third of the calls where an OpenMP team of every core runs (the pair count
# of a prediction ignores num_threads): on a loaded machine each team start
# can wait a scheduler tick; and the baselines run in Python
SLOW = {name: 3 for name in ("dense_f32", "sparse_predicted", "sparse_f16_predicted",
                             "predict_scores", "predict_bounds", "predict_streaming",
                             "count_pairs")}


@pytest.mark.parametrize("name", CASES)
def test_no_leak(name):
    call, inputs = case(name)
    n_rss, n_traced = N_RSS // SLOW.get(name, 1), N_TRACED // SLOW.get(name, 1)
    for _ in range(N_WARMUP):
        call()
    gc.collect()
    refs = [sys.getrefcount(x) for x in inputs]

    before, heap_before = rss(), heap_in_use()
    for _ in range(n_rss):
        call()
    gc.collect()
    grown, heap_after = rss() - before, heap_in_use()

    tracemalloc.start()
    try:
        call()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(n_traced):
            call()
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()

    assert [sys.getrefcount(x) for x in inputs] == refs, "a reference to an input leaked"
    assert traced <= TRACED_LIMIT, f"Python heap grew by {traced} bytes over {n_traced} calls"
    if heap_before is not None:
        heap = heap_after - heap_before
        assert heap <= HEAP_LIMIT, f"malloc heap grew by {heap / 2**20:.2f} MiB over {n_rss} calls"
    if not UNDER_SANITIZER:  # ASan's quarantine keeps freed memory resident
        assert grown <= RSS_LIMIT, f"RSS grew by {grown / 2**20:.1f} MiB over {n_rss} calls"


@pytest.mark.skipif(_MALLINFO2 is None, reason="needs glibc's mallinfo2")
def test_leak_check_detects_a_leak():
    """The heap check has teeth: keeping one converted copy per call is caught,
    however much freed memory the process holds."""
    q, k, v = _inputs(np.float16)
    kept = []

    def leaky():
        kept.append(q.astype(np.float32))

    for _ in range(N_WARMUP):
        leaky()
    before = heap_in_use()
    for _ in range(N_RSS):
        leaky()
    assert heap_in_use() - before > HEAP_LIMIT
