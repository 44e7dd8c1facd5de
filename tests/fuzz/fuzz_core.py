#!/usr/bin/env python3
"""Fuzz target of dhsa._core (issue 8).

Bytes are decoded into one call of ``_core.dense_attention``,
``_core.sparse_attention`` (with arbitrary, often invalid, CSR selections:
offsets / starts / ends of random ints, dtypes and shapes; or with a config,
predicting in the same call), ``_core.predict`` (a config whose every field is
an arbitrary int, float or name, huge, negative, NaN, unknown, missing or not
a number at all; caller boundaries valid, mutated or random; a learned
boundary model of the right or a wrong shape, dtype or values) or
``_core.count_pairs``.
A call may raise ValueError, TypeError or MemoryError and nothing else; when
it succeeds its result must be well formed (shape, dtype, finite values,
a consistent CSR, 0 <= selected <= allowed pairs) and no input may have
changed. A crash, a sanitizer report, any other exception or a broken result
is a finding.

Run modes::

    python tests/fuzz/fuzz_core.py -max_total_time=60 CORPUS_DIR   # atheris (libFuzzer)
    python tests/fuzz/fuzz_core.py --random --seed 0 --iterations 2000
    python tests/fuzz/fuzz_core.py --random --seed 0 --seconds 60
    python tests/fuzz/fuzz_core.py --random --seed 0 --start 1234 --iterations 1 -v
    python tests/fuzz/fuzz_core.py --repro crash-<sha1>    # a libFuzzer crash file

In random mode input i is ``default_rng([seed, i]).bytes(n)``, so (seed, i)
reproduces it alone. The same decoder serves both modes (and
tests/test_fuzz_smoke.py). The C core is not coverage-instrumented (gcc has
no -fsanitize=fuzzer), so atheris is guided by the decoder's Python coverage
only; run it under scripts/sanitize.sh's build for memory errors.

Every outcome other than a clean result or an allowed exception is a
finding: the bugs it found (logits or P V sums past float32, OverflowError
from count_pairs) are fixed and pinned by tests/test_limits.py.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import struct
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for _layouts

from _layouts import with_layout  # noqa: E402

from dhsa import _core  # noqa: E402

ALLOWED = (ValueError, TypeError, MemoryError)

# ---- byte decoder ------------------------------------------------------------


class Source:
    """Reads decisions from a byte string; past its end every read is 0."""

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.i = 0
        self.wild = 0.0  # how often an argument is made odd (set per input)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.i:self.i + n]
        self.i += n
        return chunk + b"\0" * (n - len(chunk))

    def uint(self, nbytes: int = 1) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def below(self, n: int) -> int:
        return self.uint(1 if n <= 256 else 4) % n if n > 1 else 0

    def between(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)

    def chance(self, p: float) -> bool:
        return self.uint(1) < p * 256

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def f64(self) -> float:
        return struct.unpack("<d", self.take(8))[0]


INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 63, 64, 65, 127, 128, 255, 256,
                    257, 4095, 4096, 4097, 65535, 2**31 - 1, 2**31, -2**31, 2**32, 2**53,
                    2**62, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 2**100, -2**100]
INTERESTING_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1e-38, 1e-30, 1e-7, 0.001, 0.5, 1.0, 2.0,
                      0.999999, 1.000001, 30.0, 1e4, 1e30, 3e38, 1e39, 1e300, -1.0, -1e-30,
                      math.nan, math.inf, -math.inf]
ODD_OBJECTS = [None, True, False, "3", b"1", [], [1], (1,), {}, object(), 1 + 0j,
               np.array(3), np.array([3]), np.float64("nan"), np.int8(-1), np.uint64(2**64 - 1),
               np.float32(2.5), np.bool_(True)]


def any_int(src: Source, lo: int, hi: int, odd: float = 1.0):
    """Usually an int in [lo, hi]; else an interesting int or an odd object."""
    r = src.uint(1)
    odd *= src.wild
    if r < 256 * odd:
        return src.pick(ODD_OBJECTS)
    if r < 256 * (odd + 2 * src.wild):
        v = src.pick(INTERESTING_INTS)
        return np.int64(v) if src.chance(0.1) and -2**63 <= v < 2**63 else v
    return src.between(lo, hi)


def any_float(src: Source, lo: float, hi: float, odd: float = 1.0):
    """Usually a float in [lo, hi]; else an interesting float, raw bits or an odd object."""
    r = src.uint(1)
    odd *= src.wild
    if r < 256 * odd:
        return src.pick(ODD_OBJECTS + [2**2000, -2**2000, 10**400])
    if r < 256 * (odd + 1.5 * src.wild):
        return src.pick(INTERESTING_FLOATS)
    if r < 256 * (odd + 2 * src.wild):
        return src.f64()
    x = lo + (hi - lo) * src.uint(2) / 65535.0
    return src.pick([x, x, x, int(x) or 1, np.float32(x), np.float16(x)])


F_DTYPES = [np.float32] * 8 + [np.float16] * 4 + [">f4", ">f2", np.float64, np.int32, np.bool_,
                                                  np.complex64, np.uint8, object]
LAYOUT_KINDS = ["c"] * 6 + ["fortran", "transposed", "sliced", "negative", "broadcast",
                            "unaligned", "readonly", "bigendian"]
INDEX_DTYPES = [np.int64] * 6 + [np.int32] * 3 + [np.int8, np.uint8, np.int16, np.uint16,
                                                  np.uint32, np.uint64, ">i8", ">i4",
                                                  np.float64, np.bool_, object]


def tensor(src: Source, rng: np.random.Generator, shape, dtype):
    """A tensor-ish argument: usually an ndarray of `shape` and `dtype`."""
    if src.chance(src.wild / 4):
        return src.pick([None, 1.0, [[[[1.0]]]], "q", np.float32(1)])
    if src.chance(src.wild / 3):  # wrong rank
        shape = shape[:src.between(0, 3)] if src.chance(0.5) else shape + (1,)
    magnitude = src.pick([1.0, 1.0, 1.0, 0.0, 1e-3, 1e-30, 10.0, 100.0])
    if src.chance(src.wild * 3):
        magnitude = src.pick([1e4, 60000.0, 1e18, 1e20, 1e38])
    x = np.array(rng.standard_normal(shape) * magnitude)
    if x.size and src.chance(src.wild / 2):  # non-finite values
        x.flat[src.below(x.size)] = src.pick([np.nan, np.inf, -np.inf])
    if x.size and src.chance(0.03):
        x[...] = src.pick([0.0, 1.0, -1.0, 65504.0, 1e-45])
    try:
        with np.errstate(all="ignore"):
            x = x.astype(dtype)
    except (TypeError, ValueError):
        x = x.astype(np.float32)
    if x.ndim == 4 and x.size:
        kind = src.pick(LAYOUT_KINDS)
        try:
            x = with_layout(x, kind, rng)
        except (TypeError, ValueError):
            pass
    elif src.chance(0.3):
        x = np.asfortranarray(x)
    return x


def base_shape(src: Source):
    """(B, H, Hkv, Lq, Lk, D), usually consistent, sometimes broken."""
    Hkv = src.between(1, 3)
    shape = [src.between(1, 3), Hkv * src.between(1, 4), Hkv, 0, src.pick([1, 2, 3, 8, 17, 64,
                                                                           65, 100, 129, 300]),
             src.pick([1, 1, 2, 3, 7, 8, 16, 31, 32, 64, 65, 128, 129, 256])]
    shape[4] = min(shape[4], src.between(1, 300))
    shape[3] = src.pick([1, shape[4], src.between(1, shape[4])])
    if src.chance(src.wild * 1.5):  # break one size
        i = src.below(6)
        shape[i] = src.pick([0, 1, 2, 5, 257, 300, shape[i] + 1])
    B, H, Hkv, Lq, Lk, D = shape
    if max(Lq, Lk) * D * B * H > 3_000_000:  # keep one call cheap
        Lq, Lk = min(Lq, 64), min(Lk, 64)
    return B, H, Hkv, Lq, Lk, D


def qkv(src: Source, rng, shape, need_v=True):
    B, H, Hkv, Lq, Lk, D = shape
    dt = src.pick(F_DTYPES) if src.chance(src.wild * 4) else src.pick([np.float32, np.float16])
    dts = [dt, dt, dt] if not src.chance(src.wild / 2) else [src.pick(F_DTYPES) for _ in range(3)]
    q = tensor(src, rng, (B, H, Lq, D), dts[0])
    k = tensor(src, rng, (B, Hkv, Lk, D), dts[1])
    v = None
    if need_v:  # now and then one key too many
        Lv = Lk + (1 if src.chance(src.wild / 3) else 0)
        v = tensor(src, rng, (B, Hkv, Lv, D), dts[2])
    return q, k, v


def attention_kwargs(src: Source, Lk: int) -> dict:
    kw = {}
    if src.chance(0.5):
        kw["causal"] = src.pick([True, False, False, 0, 1, "", "yes", None, 2.5])
    if src.chance(0.4):
        kw["window"] = any_int(src, 1, Lk + 3)
    if src.chance(0.3):
        kw["scale"] = any_float(src, 0.01, 2.0)
    if src.chance(0.3):
        kw["softcap"] = any_float(src, 0.5, 60.0)
    if src.chance(0.3):
        kw["num_threads"] = src.pick([None, 1, 2, 3]) if not src.chance(src.wild * 5) else \
            src.pick([0, -1, 4096, 4097, 2**70, "2", 1.0, True])
    return kw


def index_array(src: Source, values):
    """values (a list of ints) as an index array of a random dtype and stride."""
    if src.chance(src.wild / 2):
        return src.pick([None, list(values), 3, "0", np.zeros((2, 2), np.int64),
                         np.array(0), np.array([], dtype=np.float32)])
    dt = src.pick(INDEX_DTYPES) if src.chance(0.1 + 3 * src.wild) else src.pick(
        [np.int64, np.int32, np.int16, np.uint32])
    with np.errstate(all="ignore"):
        try:
            a = np.array(values, dtype=np.int64 if dt is object else object).astype(dt)
        except (OverflowError, ValueError, TypeError):
            a = np.array([int(v) % 2**63 for v in values], dtype=np.int64)
    if src.chance(0.1) and a.size:
        a = np.repeat(a, 2)[::2]
    if src.chance(0.1):
        a = a[::-1].copy()[::-1]
    if src.chance(0.05):
        a.flags.writeable = False
    return a


def valid_selection(src: Source, B, H, Hkv, Lq, Lk):
    bs = src.pick([1, 2, 3, 7, 16, 64, max(1, Lq), Lq + 1, 4096])
    G = src.pick([1, Hkv, H])
    nqb = -(-max(Lq, 1) // bs)
    offsets, starts, ends = [0], [], []
    for _ in range(B * G * nqb):
        pos = 0
        for _ in range(src.below(4)):
            a = pos + src.below(max(1, Lk - pos))
            e = a + 1 + src.below(max(1, Lk - a))
            if a < e <= Lk:
                starts.append(a)
                ends.append(e)
                pos = e
            if pos >= Lk:
                break
        offsets.append(len(starts))
    return bs, offsets, starts, ends


def mutate(src: Source, lists, Lk):
    """One small edit of a valid CSR that often makes it invalid."""
    target = lists[src.below(3)]
    op = src.below(6)
    big = src.pick([-1, -2**31, 2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1, Lk, Lk + 1, 0])
    if op == 0 and target:
        target[src.below(len(target))] = big
    elif op == 1 and target:
        i = src.below(len(target))
        target[i] += src.pick([-1, 1])
    elif op == 2 and target:
        target.pop(src.below(len(target)))
    elif op == 3:
        target.append(big)
    elif op == 4 and len(target) > 1:
        i = src.below(len(target) - 1)
        target[i], target[i + 1] = target[i + 1], target[i]
    else:  # swap starts and ends
        lists[1], lists[2] = lists[2], lists[1]
    return lists


def selection_args(src: Source, B, H, Hkv, Lq, Lk):
    mode = src.below(8) if src.chance(0.2 + 4 * src.wild) else 0
    if mode < 4:  # valid, a quarter of them then mutated
        bs, offsets, starts, ends = valid_selection(src, B, H, Hkv, Lq, Lk)
        if mode >= 2 and src.chance(0.5):
            offsets, starts, ends = mutate(src, [offsets, starts, ends], Lk)
    else:  # random ints
        bs = any_int(src, 1, max(1, Lq) + 2)
        n = src.below(12)
        offsets = [src.between(-2, n + 2) for _ in range(src.below(10))]
        if src.chance(0.5):
            offsets = sorted(offsets)
        starts = [any_int(src, -2, Lk + 2, odd=0) for _ in range(n)]
        ends = [any_int(src, -2, Lk + 2, odd=0) for _ in range(n if src.chance(0.8) else n + 1)]
    if mode in (0, 2) and src.chance(src.wild * 2):
        bs = any_int(src, 1, max(1, Lq) + 2)
    return (index_array(src, offsets), index_array(src, starts), index_array(src, ends)), bs


# ---- the calls ---------------------------------------------------------------


def call_dense(src, rng):
    shape = base_shape(src)
    q, k, v = qkv(src, rng, shape)
    kw = attention_kwargs(src, shape[4])
    return "dense", _core.dense_attention, (q, k, v), kw


def call_sparse(src, rng):
    shape = base_shape(src)
    q, k, v = qkv(src, rng, shape)
    B, H, Hkv, Lq, Lk, D = shape
    kw = attention_kwargs(src, Lk)
    if src.chance(0.3):  # predicted in the same call, from a config
        kw["config"] = predict_config(src)
        bounds = predict_bounds(src, kw["config"], B, Hkv, Lk)
        if bounds is not None:
            kw["boundaries"] = bounds
        bm = predict_bmodel(src, rng, kw["config"], Hkv, D)
        if bm is not None:
            kw["boundary_model"] = bm
    else:
        (offsets, starts, ends), bs = selection_args(src, B, H, Hkv, Lq, Lk)
        kw.update(offsets=offsets, starts=starts, ends=ends, block_size=bs)
    if src.chance(0.3):
        kw["return_info"] = src.pick([True, False, 1, None])
    return "sparse", _core.sparse_attention, (q, k, v), kw


# the fields _core.predict reads from a config (a namespace here, so that the
# values DHSAConfig would refuse reach the core's safety checks)
PREDICT_INTS = [("block_size", 1, 80), ("sink", 0, 40), ("local", 0, 80),
                ("budget", 1, 400), ("min_budget", 1, 200), ("max_budget", 1, 400),
                ("chunk_size", 1, 40), ("boundary_window", 1, 20), ("min_chunk", 1, 20),
                ("max_chunk", 1, 40), ("nms_radius", 0, 8), ("max_chunks", 1, 20),
                ("dense_tail", 0, 60)]
PREDICT_FLOATS = [("density", 0.001, 1.0), ("mass", 0.001, 1.0), ("threshold", 0.0, 2.0)]
PREDICT_NAMES = [("granularity", ["layer", "kv_head", "query_head"]),
                 ("budget_mode", ["tokens", "density", "adaptive"]),
                 ("chunking", ["dynamic", "dynamic", "fixed"]),
                 ("normalization", ["sqrt", "mean", "sum"]),
                 ("method", ["dhsa", "dhsa", "block_topk"]),
                 ("chunk_score", ["mean", "mean", "max"]),
                 ("decode_score", ["mean", "bounds", "moments"])]


def predict_config(src):
    fields = {}
    for name, lo, hi in PREDICT_INTS:
        fields[name] = any_int(src, lo, hi, odd=0.5)
    if src.chance(0.3):
        fields["max_chunks"] = None
    if not src.chance(src.wild * 3):  # mostly ordered, as DHSAConfig makes them
        for a, b in (("min_budget", "max_budget"), ("min_chunk", "max_chunk")):
            if isinstance(fields[a], int) and isinstance(fields[b], int):
                fields[a], fields[b] = min(fields[a], fields[b]), max(fields[a], fields[b])
    for name, lo, hi in PREDICT_FLOATS:
        fields[name] = any_float(src, lo, hi, odd=0.5)
    for name, names in PREDICT_NAMES:
        fields[name] = src.pick(names) if not src.chance(src.wild * 2) else \
            src.pick(["streaming", "", "LAYER", None, 1, b"layer"])
    for name in list(fields):
        if src.chance(src.wild / 4):  # rarely missing
            del fields[name]
    return types.SimpleNamespace(**fields)


def predict_bounds(src, cfg, B, Hkv, Lk):
    """None, or caller bounds: one row per (batch, chunk group), or one shared row."""
    if not src.chance(0.3):
        return None
    CG = 1 if getattr(cfg, "granularity", None) == "layer" else Hkv
    rows = []
    for _ in range(B * CG):
        step = 1 + src.below(max(1, Lk))
        rows.append(np.array(list(range(0, Lk, step)) + [Lk], dtype=np.int64))
    if src.chance(src.wild * 5) and rows:
        r = rows[src.below(len(rows))]
        r[src.below(len(r))] = src.pick([-1, 0, Lk, Lk + 1, 2**40, 5])
    if src.chance(0.3) and rows:
        return rows[0]
    if src.chance(src.wild * 2):
        return src.pick([rows[:-1], [r.astype(np.float64) for r in rows], rows + rows[:1],
                         [r.astype(np.int8) for r in rows], 5, "0", [None] * len(rows),
                         [np.concatenate([r, r]) for r in rows]])
    return rows


def predict_bmodel(src, rng, cfg, Hkv, D):
    """None, or a learned boundary model: mostly the right shape (one row per
    chunk group), sometimes wrong shapes, dtypes, values or types."""
    if not src.chance(0.25):
        return None
    layer = getattr(cfg, "granularity", None) == "layer"
    rows, heads = (1, Hkv) if layer else (Hkv, 1)
    m = rng.standard_normal((rows, 2 * heads * D + 6))
    if src.chance(src.wild * 5):
        m.flat[src.below(m.size)] = src.pick([np.nan, np.inf, -np.inf, 1e308])
    if src.chance(src.wild * 3):
        with np.errstate(invalid="ignore"):  # NaN into int64 is one of the wrong inputs
            return src.pick([m[:, :-1], m[:1] if rows > 1 else np.vstack([m, m]), m[0],
                             m.astype(np.float32), m.astype(np.int64), m.T, "model", 3,
                             [None], np.ascontiguousarray(m)[:, ::2],
                             m.astype(np.complex128)])
    return m


def call_predict(src, rng):
    shape = base_shape(src)
    q, k, _ = qkv(src, rng, shape, need_v=False)
    B, H, Hkv, Lq, Lk, D = shape
    kw = attention_kwargs(src, Lk)
    kw.pop("softcap", None)
    cfg = predict_config(src)
    bounds = predict_bounds(src, cfg, B, Hkv, Lk)
    if bounds is not None:
        kw["boundaries"] = bounds
    bm = predict_bmodel(src, rng, cfg, Hkv, D)
    if bm is not None:
        kw["boundary_model"] = bm
    if src.chance(0.3):
        kw["return_scores"] = src.pick([True, False, 1, None])
    return "predict", _core.predict, (q, k, cfg), kw


def call_count_pairs(src, rng):
    B, H, Hkv, Lq, Lk, _ = base_shape(src)
    (offsets, starts, ends), bs = selection_args(src, B, H, Hkv, Lq, Lk)
    kw = {"block_size": bs}
    for name, v in (("B", B), ("H", H), ("Hkv", Hkv), ("Lq", Lq), ("Lk", Lk)):
        if not src.chance(src.wild * 2):
            kw[name] = v
        elif not src.chance(0.1):
            kw[name] = any_int(src, 0, 300)
    if src.chance(0.3):
        kw["causal"] = src.pick([True, False])
    if src.chance(0.3):
        kw["window"] = any_int(src, 1, Lk + 3)
    # count_pairs walks every query row of every block, O(rows * Lq): keep
    # huge lengths to a couple of rows so one call stays fast
    rows = offsets.size if isinstance(offsets, np.ndarray) else 1
    if isinstance(kw.get("Lq"), int) and kw["Lq"] * max(rows, 1) > 2 * 10**7:
        kw["Lq"] = Lq
    return "count_pairs", _core.count_pairs, (offsets, starts, ends), kw


def call_cache(src, rng):
    """A KVCache through a short random life: appends (any layout, sometimes
    a wrong shape, dtype or a NaN), decode steps, crops and reorders. Each
    operation may fail with an allowed error; the cache must stay usable."""
    B, H, Hkv, _, _, D = base_shape(src)
    cfg = predict_config(src)
    if src.chance(0.7):
        cfg.max_chunks = None
    half = src.chance(0.3) if not src.chance(src.wild * 3) else src.pick([2, "x", None])
    dt = np.float16 if half is True else np.float32
    bm = predict_bmodel(src, rng, cfg, Hkv, D) if src.chance(0.3) else None
    ops = []
    n_ops = src.between(1, 8)
    for i in range(n_ops):
        op = src.pick(["append"] * 4 + ["decode"] * 3 + ["crop", "reorder"])
        if i == n_ops - 1 and src.chance(0.7):
            op = "decode"  # most lives end with a step
        if op == "append":
            n = src.pick([1, 1, 2, src.between(1, 60)])
            adt = dt if not src.chance(src.wild * 4) else src.pick(F_DTYPES)
            ops.append(("append", tensor(src, rng, (B, Hkv, n, D), adt),
                        tensor(src, rng, (B, Hkv, n, D), adt)))
        elif op == "decode":
            nq = src.pick([1, 1, 2, 3])
            q = tensor(src, rng, (B, H, nq, D), src.pick([np.float32, np.float32, np.float16]))
            kw = attention_kwargs(src, 64)
            kw.pop("causal", None)
            kw.update(budget=any_int(src, 0, 200), sink=any_int(src, 0, 40),
                      local=any_int(src, 0, 40))
            if src.chance(0.5):
                kw["reuse"] = any_int(src, 1, 6)
            kw["return_info"] = src.chance(0.5)
            ops.append(("decode", q, kw))
        elif op == "crop":
            ops.append(("crop", any_int(src, 0, 120)))
        else:
            ops.append(("reorder", index_array(src, [src.between(0, B) for _ in
                                                    range(src.between(1, 4))])))

    def run(inputs):  # inputs: the arrays, for the unchanged-inputs check
        c = _core.KVCache(cfg, B, Hkv, D, half, boundary_model=bm)
        outs, vmax = [], 0.0
        for op in ops:
            try:
                if op[0] == "append":
                    c.append(op[1], op[2])
                    vmax = max(vmax, _max_abs(op[2]))
                elif op[0] == "decode":
                    res = _core.decode_attention(op[1], c, **op[2])
                    outs.append((op[1], res, vmax, c.length()))
                elif op[0] == "crop":
                    c.crop(op[1])
                else:
                    c.reorder(op[1])
            except ALLOWED:
                pass
            assert c.length() >= 0
        return outs

    arrays = [x for op in ops for x in op[1:] if isinstance(x, np.ndarray)]
    return "cache", run, (), {"inputs": arrays}


CALLS = [call_dense, call_sparse, call_predict, call_count_pairs, call_cache]

# ---- oracles -----------------------------------------------------------------


def _arrays(args, kw):
    out = []
    for a in list(args) + list(kw.values()):
        out += [x for x in (a if isinstance(a, list) else [a]) if isinstance(x, np.ndarray)]
    return out


def _max_abs(x):
    try:
        return float(np.max(np.abs(np.asarray(x, dtype=np.float64)))) if x.size else 0.0
    except (TypeError, ValueError):
        return 0.0


def check_pairs(res: dict) -> None:
    sel, allowed = res["pairs_selected"], res["pairs_allowed"]
    assert np.all(sel >= 0) and np.all(sel <= allowed), (sel, allowed)


def check_result(kind, args, kw, res) -> str:
    """'ok', or AssertionError on a finding."""
    if kind == "sparse" and isinstance(res, tuple):
        res, info = res
        check_pairs(info)
    if kind in ("dense", "sparse"):
        q = args[0]
        assert isinstance(res, np.ndarray), type(res)
        assert res.shape == q.shape, (res.shape, q.shape)
        assert res.dtype == np.dtype(q.dtype).newbyteorder("="), (res.dtype, q.dtype)
        assert res.flags.c_contiguous and res.flags.writeable
        if not np.all(np.isfinite(res)):
            raise AssertionError("non-finite output for finite inputs")
        vmax = _max_abs(args[2])
        assert _max_abs(res) <= vmax * 1.001 + 1e-6, "output outside the convex hull of v"
        return "ok"
    if kind == "predict":
        q, k, _ = args
        B, Lk = q.shape[0], k.shape[2]
        off, st, en = res["offsets"], res["starts"], res["ends"]
        assert off[0] == 0 and off[-1] == len(st) == len(en)
        assert np.all(np.diff(off) >= 0)
        assert np.all(st >= 0) and np.all(en <= Lk) and np.all(st < en)
        assert (len(off) - 1) % (B * res["select_groups"]) == 0
        nb = res["num_bounds"]
        for i, n in enumerate(nb):
            row = res["bounds"][i, :n]
            assert row[0] == 0 and row[-1] == Lk and np.all(np.diff(row) > 0)
        check_pairs(res)
        return "ok"
    if kind == "count_pairs":
        sel, allowed = res
        assert np.all(sel >= 0) and np.all(sel <= allowed), (sel, allowed)
        return "ok"
    if kind == "cache":  # every decode step that ran: shape, finite, inside v's hull
        for q, out, vmax, length in res:
            if isinstance(out, tuple):
                out, info = out
                check_pairs(info)
                assert np.all(info["starts"] >= 0) and np.all(info["ends"] <= length)
            assert out.shape == q.shape and np.all(np.isfinite(out)), out.shape
            assert _max_abs(out) <= vmax * 1.001 + 1e-6, "output outside the convex hull of v"
        return "ok" if res else "no decode"
    raise AssertionError(kind)


def describe(kind, args, kw) -> str:
    def d(x):
        if isinstance(x, np.ndarray):
            s = f"ndarray{x.shape} {x.dtype.str} strides={x.strides}"
            if not x.flags.aligned:
                s += " unaligned"
            if not x.flags.writeable:
                s += " readonly"
            if x.size <= 16 and x.dtype != object:
                s += f" {x.ravel().tolist()}"
            return s
        return repr(x)[:80]
    return f"{kind}({', '.join(d(a) for a in args)}, " + \
        ", ".join(f"{k}={d(v)}" for k, v in kw.items()) + ")"


STATS = collections.Counter()


VERBOSE = False


def one_input(data: bytes) -> str:
    """Decode data into one call and check its outcome; returns the outcome."""
    src = Source(data)
    rng = np.random.default_rng(src.uint(4))
    src.wild = src.pick([0.0, 0.0, 0.0, 0.005, 0.01, 0.02, 0.05, 0.1])
    make = CALLS[src.below(len(CALLS))]
    kind, fn, args, kw = make(src, rng)
    if VERBOSE:
        print(describe(kind, args, kw), file=sys.stderr, flush=True)
    arrays = _arrays(args, kw)
    snap = [(np.array(a, copy=True), a.strides, a.flags.writeable) for a in arrays]
    try:
        res = fn(*args, **kw)
    except ALLOWED as e:
        outcome = type(e).__name__
    except Exception as e:  # noqa: BLE001 - every other exception is a finding
        raise AssertionError(f"unexpected {type(e).__name__}: {e}\n  "
                             f"{describe(kind, args, kw)}") from e
    else:
        try:
            outcome = check_result(kind, args, kw, res)
        except AssertionError as e:
            raise AssertionError(f"bad result: {e}\n  {describe(kind, args, kw)}") from e
    for a, (vals, strides, writeable) in zip(arrays, snap):
        if a.dtype == object:
            continue
        same = np.array_equal(a, vals, equal_nan=a.dtype.kind in "fc")
        if not same or a.strides != strides or a.flags.writeable != writeable:
            raise AssertionError(f"an input changed\n  {describe(kind, args, kw)}")
    STATS[(kind, outcome)] += 1
    return outcome


def random_input(seed: int, i: int) -> bytes:
    g = np.random.default_rng([seed, i])
    return g.bytes(int(g.integers(16, 1024)))


def summary() -> dict:
    per_kind = collections.defaultdict(dict)
    for (kind, outcome), n in sorted(STATS.items()):
        per_kind[kind][outcome] = n
    return {"inputs": sum(STATS.values()), "per_kind": per_kind}


def run_random(seed, start, iterations, seconds, status_file, verbose):
    t0 = time.time()
    i = start
    while True:
        if iterations is not None and i >= start + iterations:
            break
        if seconds is not None and time.time() - t0 >= seconds:
            break
        if status_file:
            with open(status_file, "w") as f:
                f.write(f"{seed} {i}\n")
        data = random_input(seed, i)
        if verbose:
            print(f"[{i}]", end=" ", file=sys.stderr, flush=True)
        try:
            one_input(data)
        except AssertionError:
            print(f"FINDING at seed={seed} iteration={i}; reproduce with:\n  python "
                  f"{os.path.relpath(__file__)} --random --seed {seed} --start {i} "
                  "--iterations 1 -v", file=sys.stderr)
            raise
        i += 1
    out = summary()
    out["seconds"] = round(time.time() - t0, 2)
    out["mode"] = "random"
    out["seed"] = seed
    print("FUZZ-SUMMARY " + json.dumps(out), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--random", action="store_true", help="plain seeded random fuzzing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--status-file")
    ap.add_argument("--repro", help="run one input file (a libFuzzer crash file)")
    ap.add_argument("--summary-file", help="atheris: keep the outcome counts in this file")
    ap.add_argument("--make-corpus", metavar="DIR",
                    help="write 64 random inputs to DIR as a seed corpus and exit")
    ap.add_argument("-v", "--verbose", action="store_true")
    args, rest = ap.parse_known_args(argv)
    global VERBOSE
    VERBOSE = args.verbose
    if args.make_corpus:
        os.makedirs(args.make_corpus, exist_ok=True)
        for i in range(64):
            with open(os.path.join(args.make_corpus, f"seed-{i:03d}"), "wb") as f:
                f.write(random_input(args.seed, i))
        return
    if args.repro:
        with open(args.repro, "rb") as f:
            print(one_input(f.read()))
        return
    if args.random:
        if args.iterations is None and args.seconds is None:
            args.iterations = 2000
        run_random(args.seed, args.start, args.iterations, args.seconds, args.status_file,
                   args.verbose)
        return
    import atexit

    import atheris

    sys.path.insert(0, HERE)
    with atheris.instrument_imports(include=["fuzz_core"]):  # coverage of the decoder
        import fuzz_core as target

    # libFuzzer leaves by _exit: keep the summary in a file as it goes
    last = [time.time()]

    def report():
        out = target.summary()
        out["mode"] = "atheris"
        if args.summary_file:
            with open(args.summary_file, "w") as f:
                json.dump(out, f)
        return out

    def fuzz_one(data):
        target.one_input(data)
        if time.time() - last[0] > 2.0:
            last[0] = time.time()
            report()

    atexit.register(report)
    atheris.Setup([sys.argv[0]] + rest, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
