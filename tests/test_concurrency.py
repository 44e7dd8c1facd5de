"""Concurrency (issue 8): the core releases the GIL, so many Python threads
may call it at once; their results must be bitwise those of serial calls.
A KeyboardInterrupt (SIGINT) during a long call leaves the module usable and
later results correct.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import dhsa
from dhsa import _core, reference
from conftest import make_qkv, rel_err

N_THREADS = 8
ROUNDS = 8
CFG = dhsa.DHSAConfig(budget=96, block_size=16, sink=8, local=32, min_chunk=2, max_chunk=12,
                      boundary_window=6, nms_radius=2)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def _same(a, b) -> bool:
    if isinstance(a, dhsa.Selection):
        return all(np.array_equal(getattr(a, f), getattr(b, f))
                   for f in ("offsets", "starts", "ends", "pairs_selected", "pairs_allowed"))
    return np.array_equal(_bits(a), _bits(b))


def _tasks():
    """A mixed bag of calls (name, fn), each deterministic."""
    rng = np.random.default_rng(1234)
    tasks = []
    for i, (shape, dtype) in enumerate([((1, 4, 2, 70, 150, 32), np.float32),
                                        ((2, 2, 1, 33, 33, 64), np.float16),
                                        ((1, 8, 2, 128, 256, 16), np.float32),
                                        ((1, 3, 3, 1, 90, 7), np.float32)]):
        q, k, v = make_qkv(rng, *shape, dtype=dtype)
        threads = [None, 1, 2][i % 3]
        sel = dhsa.predict_selection(q, k, CFG)
        tasks += [
            (f"dense{i}", lambda q=q, k=k, v=v, t=threads:
                dhsa.dense_attention(q, k, v, window=100, num_threads=t)),
            (f"dense_nc{i}", lambda q=q, k=k, v=v:
                dhsa.dense_attention(q, k, v, causal=False, softcap=20.0)),
            (f"sparse{i}", lambda q=q, k=k, v=v, t=threads:
                dhsa.sparse_attention(q, k, v, CFG, num_threads=t)),
            (f"sparse_sel{i}", lambda q=q, k=k, v=v, s=sel:
                dhsa.sparse_attention(q, k, v, selection=s)),
            (f"predict{i}", lambda q=q, k=k, t=threads:
                dhsa.predict_selection(q, k, CFG.replace(budget_mode="adaptive"), num_threads=t)),
            (f"count{i}", lambda s=sel, L=shape:
                _core.count_pairs(s.offsets, s.starts, s.ends, block_size=s.block_size, B=L[0],
                                  H=L[1], Hkv=L[2], Lq=L[3], Lk=L[4])[0]),
        ]
    return tasks


def test_threads_match_serial_bitwise():
    tasks = _tasks()
    serial = {name: fn() for name, fn in tasks}
    errors = []
    barrier = threading.Barrier(N_THREADS)

    def worker(t):
        try:
            barrier.wait()
            order = np.random.default_rng(t).permutation(len(tasks))
            for _ in range(ROUNDS):
                for j in order:
                    name, fn = tasks[j]
                    if not _same(fn(), serial[name]):
                        errors.append(f"thread {t}: {name} differs from the serial result")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a worker hangs"
    assert not errors, "\n".join(errors[:10])


def test_errors_in_threads_are_clean():
    """Errors raised concurrently with successful calls stay in their thread."""
    q, k, v = make_qkv(np.random.default_rng(5), 1, 2, 1, 40, 80, 16)
    good = dhsa.dense_attention(q, k, v)
    bad_v = v.copy()
    bad_v[0, 0, 3, 1] = np.nan
    errors = []

    def worker(t):
        for i in range(30):
            try:
                if (i + t) % 2:
                    with pytest.raises(ValueError, match="v contains NaN"):
                        dhsa.dense_attention(q, k, bad_v)
                    with pytest.raises(TypeError):
                        dhsa.sparse_attention(q, k, v.astype(np.float64), CFG)
                elif not _same(dhsa.dense_attention(q, k, v), good):
                    errors.append(f"thread {t}: wrong result")
            except BaseException as e:  # noqa: BLE001
                errors.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, "\n".join(errors[:10])


def _big():
    """A problem whose dense attention takes 0.1-1 s on one core."""
    rng = np.random.default_rng(7)
    return make_qkv(rng, 1, 8, 2, 4096, 4096, 64)


@pytest.mark.parametrize("entry", ["dense", "sparse", "predict"])
def test_gil_released_during_calls(entry):
    """Another Python thread keeps running while the core computes."""
    q, k, v = _big()
    cfg = CFG.replace(budget=1024, local=256, block_size=64)
    call = {
        "dense": lambda: dhsa.dense_attention(q, k, v, num_threads=1),
        "sparse": lambda: dhsa.sparse_attention(q, k, v, cfg, num_threads=1),
        "predict": lambda: dhsa.predict_selection(q, k, cfg.replace(granularity="query_head",
                                                                    block_size=8,
                                                                    budget_mode="adaptive"),
                                                  num_threads=1),
    }[entry]
    done = threading.Event()
    span = []

    def compute():
        t0 = time.perf_counter()
        call()
        span.append((t0, time.perf_counter()))
        done.set()

    ticks = []
    th = threading.Thread(target=compute)
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        th.start()
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)
        th.join()
    finally:
        sys.setswitchinterval(old)
    (t0, t1), = span
    inside = [t for t in ticks if t0 < t < t1]
    duration = t1 - t0
    if duration < 0.02:
        pytest.skip(f"call too short to judge ({duration:.3f}s)")
    # with the GIL held for the whole call, the main thread would not tick at all
    assert len(inside) >= 10, f"{len(inside)} ticks in a {duration:.3f}s call"
    gaps = np.diff([t0] + inside + [t1])
    assert gaps.max() < 0.5 * duration, f"main thread stalled {gaps.max():.3f}s of {duration:.3f}s"


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
@pytest.mark.parametrize("entry", ["dense", "sparse", "predict"])
def test_keyboard_interrupt_leaves_module_usable(entry):
    q, k, v = _big()
    cfg = CFG.replace(budget=1024, local=256, block_size=64)
    long_call = {
        "dense": lambda: dhsa.dense_attention(q, k, v),
        "sparse": lambda: dhsa.sparse_attention(q, k, v, cfg),
        "predict": lambda: dhsa.predict_selection(q, k, cfg.replace(granularity="query_head",
                                                                    block_size=16)),
    }[entry]
    small = make_qkv(np.random.default_rng(8), 1, 4, 2, 50, 120, 32)
    before_dense = dhsa.dense_attention(*small)
    before_sparse = dhsa.sparse_attention(*small, CFG)
    before_sel = dhsa.predict_selection(small[0], small[1], CFG)

    main = threading.main_thread().ident
    started = threading.Event()

    def interrupt():
        started.wait(10)
        time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)

    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=interrupt)
    interrupted = returned = False
    t0 = time.perf_counter()
    try:
        timer.start()
        try:
            started.set()
            long_call()
            returned = True
            time.sleep(5)  # if the call beat the signal, the interrupt lands here
        except KeyboardInterrupt:
            interrupted = True
        timer.join()
    finally:
        signal.signal(signal.SIGINT, old_handler)
    assert interrupted, "no KeyboardInterrupt arrived"
    if returned:
        pytest.skip("the call finished before the signal came")
    assert time.perf_counter() - t0 < 60

    # the module still works, bit for bit as before, and agrees with the reference
    assert _same(dhsa.dense_attention(*small), before_dense)
    assert _same(dhsa.sparse_attention(*small, CFG), before_sparse)
    assert _same(dhsa.predict_selection(small[0], small[1], CFG), before_sel)
    assert rel_err(dhsa.dense_attention(*small), reference.dense_attention(*small)) < 1e-5
    # and a second long call runs to completion
    out = dhsa.dense_attention(q[:, :, -64:], k, v)
    assert out.shape == (1, 8, 64, 64) and np.all(np.isfinite(out))


def test_signal_during_call_is_not_lost():
    """SIGINT while the GIL is released reaches its Python handler exactly once,
    as soon as the call returns."""
    q, k, v = _big()
    hits = []
    old_handler = signal.signal(signal.SIGINT, lambda *a: hits.append(time.perf_counter()))
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.perf_counter()
        dhsa.dense_attention(q, k, v, num_threads=1)
        t1 = time.perf_counter()
        timer.join()
        deadline = time.time() + 5
        while not hits and time.time() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    assert len(hits) == 1, "the signal was lost or delivered twice"
    # handled once the call returned (Python handlers cannot run inside it), not later
    assert t0 + 0.1 <= hits[0] <= max(t1, t0 + 0.1) + 0.5
