"""Shared fixtures and helpers of the dhsa test suite.

Only numpy, pytest and hypothesis are used; every random input comes from a
seeded generator so a failure reproduces exactly.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import dhsa
from dhsa import reference


def make_qkv(rng: np.random.Generator, B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int,
             dtype=np.float32, scale: float = 1.0):
    """Random q (B, H, Lq, D) and k, v (B, Hkv, Lk, D) in ``dtype``."""
    q = (rng.standard_normal((B, H, Lq, D)) * scale).astype(dtype)
    k = (rng.standard_normal((B, Hkv, Lk, D)) * scale).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    return q, k, v


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = float(np.max(np.abs(b)))
    num = float(np.max(np.abs(a - b)))
    if denom == 0.0:
        return num
    return num / denom


def predict_kwargs(cfg: dhsa.DHSAConfig) -> dict:
    """The keyword arguments of ``reference.predict`` that mirror a config."""
    return dict(block_size=cfg.block_size, sink=cfg.sink, local=cfg.local,
                mode=cfg.budget_mode, budget=cfg.budget, density=cfg.density, mass=cfg.mass,
                min_budget=cfg.min_budget, max_budget=cfg.max_budget,
                granularity=cfg.granularity, boundary_window=cfg.boundary_window,
                threshold=cfg.threshold, min_len=cfg.min_chunk, max_len=cfg.max_chunk,
                nms_radius=cfg.nms_radius, max_chunks=cfg.max_chunks or 0,
                dense_tail=cfg.dense_tail, chunk_score=cfg.chunk_score)


def tokens_mode_density(L: int, block: int, budget: int) -> float:
    """Selected / allowed pairs of a tokens-mode selection on L causal queries
    over L keys, whatever picks the keys: a block that may see more keys than
    ``budget`` keeps exactly ``budget``, its own ``nq`` keys among them
    (causal inside the block), the rest before it."""
    from dhsa import rules
    selected = allowed = 0
    for qb in range(-(-L // block)):
        g = rules.block_geometry(L, L, block, qb)
        pairs = rules.allowed_pairs(g.nq, g.hi)
        allowed += pairs
        selected += pairs if g.hi - g.lo <= budget else (
            g.nq * (budget - g.nq) + g.nq * (g.nq + 1) // 2)
    return selected / allowed


def reference_predict(q, k, cfg: dhsa.DHSAConfig, **kw) -> dict:
    """``reference.predict`` with the fields of ``cfg`` (fixed chunking included)."""
    args = predict_kwargs(cfg)
    if cfg.chunking == "fixed" and kw.get("bounds") is None:
        Lk = k.shape[2]
        n_cg = k.shape[0] * (1 if cfg.granularity == "layer" else k.shape[1])
        fixed = np.append(np.arange(0, Lk, cfg.chunk_size), Lk).astype(np.int64)
        kw["bounds"] = [fixed] * n_cg
    args.update(kw)
    return reference.predict(q, k, **args)


def assert_selection_equal(sel: dhsa.Selection, ref: dict) -> None:
    """A core Selection equals a reference.predict result exactly."""
    assert sel.groups == ref["groups"]
    assert len(sel.boundaries) == len(ref["bounds"])
    for i, (got, want) in enumerate(zip(sel.boundaries, ref["bounds"])):
        np.testing.assert_array_equal(got, want, err_msg=f"boundaries[{i}]")
    np.testing.assert_array_equal(sel.offsets, ref["offsets"], err_msg="offsets")
    np.testing.assert_array_equal(sel.starts, ref["starts"], err_msg="starts")
    np.testing.assert_array_equal(sel.ends, ref["ends"], err_msg="ends")


def blocks_of(sel: dhsa.Selection):
    """Yield (b, g, qb, ranges (n, 2)) for every query block of a selection."""
    for b in range(sel.batch):
        for g in range(sel.groups):
            for qb in range(sel.num_blocks):
                yield b, g, qb, sel.ranges(b, g, qb)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's node id: stable, yet distinct per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def scalar_mode():
    """Run the body with the scalar kernels forced; always restore the SIMD path."""
    dhsa.force_scalar(True)
    try:
        yield
    finally:
        dhsa.force_scalar(False)


def allow_avx512_switch():
    """The core's switch between its AVX-512 and AVX2 kernels, where it has one."""
    return getattr(dhsa, "allow_avx512", None) or getattr(dhsa._core, "allow_avx512", None)


@pytest.fixture(autouse=True)
def _simd_restored():
    """No test may leave the scalar twins forced (or AVX-512 off) for the next one."""
    yield
    dhsa.force_scalar(False)
    switch = allow_avx512_switch()
    if switch is not None:
        switch(True)
