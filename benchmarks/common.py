"""Shared pieces of the dhsa benchmarks.

- :func:`machine_info`: what the numbers were measured on (CPU, cores, the
  dhsa build, library versions, load, git state) and :func:`command_line`;
- :func:`time_call` / :func:`time_interleaved`: warm-up, then the minimum
  of N timed calls (``time.perf_counter``), compared methods taken in turns;
  the minimum is the number to trust on a machine that other processes
  share, and :class:`CpuWatch` tells how much of the CPUs others took during
  each call (a contended best call earns extra calls);
- FLOP counts: :func:`causal_pairs`, :func:`dense_flops`,
  :func:`selected_head_pairs`, :func:`sparse_flops`;
- :func:`measure_peak_rss`: one case run once in a fresh subprocess, its
  peak resident memory read from ``/proc/self/status`` (VmHWM, reset just
  before the call through ``/proc/self/clear_refs``) and getrusage's
  ``ru_maxrss``; C allocations are invisible to ``tracemalloc``;
- :func:`write_results`: JSON (machine, date, command, every row) and a
  Markdown table under ``benchmarks/results/``.

Also runnable as ``python benchmarks/common.py`` to print the machine
description (the subprocess entry point ``--mem-child`` is internal).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

import numpy as np

import dhsa
from dhsa import rules
from dhsa.harness.memory import reset_peak_rss as _reset_hwm
from dhsa.harness.memory import rss_kib as _status_kib
from dhsa.harness.provenance import git_state

torch = None  # set by load_torch(); optional, its columns are skipped without it


def load_torch():
    """Import torch if installed; returns the module or None. (Either order of
    importing torch and dhsa works: both link libgomp.so.1 and the first one
    loaded serves both, one OpenMP runtime in the process.)"""
    global torch
    if torch is None:
        try:
            import torch as _torch
        except ImportError:  # pragma: no cover - depends on the machine
            return None
        torch = _torch
    return torch

MiB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------
# machine description
# ----------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_description() -> Dict[str, Any]:
    """CPU model, logical/physical cores, caches and the SIMD flags that matter."""
    text = _read("/proc/cpuinfo")
    model, mhz, cache = None, None, None
    flags: set = set()
    cores = set()
    phys, core = None, None
    for line in text.splitlines():
        if ":" not in line:
            if phys is not None or core is not None:
                cores.add((phys, core))
            phys = core = None
            continue
        key, val = (s.strip() for s in line.split(":", 1))
        if key == "model name" and model is None:
            model = val
        elif key == "cpu MHz" and mhz is None:
            mhz = float(val)
        elif key == "cache size" and cache is None:
            cache = val
        elif key == "flags" and not flags:
            flags = set(val.split())
        elif key == "physical id":
            phys = val
        elif key == "core id":
            core = val
    if phys is not None or core is not None:
        cores.add((phys, core))
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    interesting = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                   "avx512_vnni", "avx512_bf16", "amx_tile", "hypervisor"]
    return {
        "model": model or platform.processor() or "unknown",
        "mhz": mhz,
        "cache": cache,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "physical_cores": len(cores) if cores else None,
        "flags": [f for f in interesting if f in flags],
    }


def _meminfo_gib() -> Optional[float]:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / (1024.0 * 1024.0), 1)
    return None


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _loaded_libraries() -> List[str]:
    """Shared objects of interest mapped into this process (OpenMP, BLAS)."""
    libs = set()
    for line in _read("/proc/self/maps").splitlines():
        parts = line.split()
        if len(parts) >= 6:
            name = parts[-1]
            base = os.path.basename(name)
            if "gomp" in base or "openblas" in base.lower() or "iomp" in base:
                libs.add(name)
    return sorted(libs)


def _git_state() -> Dict[str, Any]:
    return git_state(REPO_ROOT)


def _file_digest(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """Path, modification time and SHA-256 (first 16 hex) of the loaded core."""
    if not path:
        return None
    import hashlib
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        mtime = _dt.datetime.fromtimestamp(os.path.getmtime(path), _dt.timezone.utc)
    except OSError:
        return {"path": path}
    return {"path": os.path.relpath(path, REPO_ROOT), "sha256_16": digest,
            "mtime_utc": mtime.isoformat(timespec="seconds")}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The exact command that ran this benchmark (shell-quoted)."""
    cmd = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    pp = os.environ.get("PYTHONPATH")
    return f"PYTHONPATH={shlex.quote(pp)} {cmd}" if pp else cmd


def machine_info() -> Dict[str, Any]:
    """Everything that decides the numbers, for the JSON header."""
    info: Dict[str, Any] = {
        "cpu": cpu_description(),
        "memory_gib": _meminfo_gib(),
        "loadavg_at_start": loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "torch_default_threads": torch.get_num_threads() if torch is not None else None,
        "dhsa": getattr(dhsa, "__version__", None),
        "dhsa_build": dhsa.build_info(),
        "dhsa_core_file": _file_digest(getattr(dhsa._core, "__file__", None)),
        "loaded_libraries": _loaded_libraries(),
        "git": _git_state(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                           "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                           "GOMP_SPINCOUNT", "OMP_PROC_BIND",
                                           # a forced core type changes OpenBLAS's kernels
                                           "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                if k in os.environ},
    }
    return info


def describe_machine(info: Dict[str, Any]) -> str:
    """A few human lines out of :func:`machine_info`."""
    c, b = info["cpu"], info["dhsa_build"]
    lines = [
        f"CPU: {c['model']} ({c['logical_cpus']} logical CPUs, {c['usable_cpus']} usable, "
        f"{c['physical_cores']} physical cores; flags {' '.join(c['flags'])})",
        f"dhsa {info['dhsa']}: simd {b.get('simd_path')}, {b.get('blas_config')}, "
        f"{b.get('compiler')}, max_threads {b.get('max_threads')}",
        f"python {info['python']}, numpy {info['numpy']}, torch {info['torch'] or 'absent'}; "
        f"load average at start {info['loadavg_at_start']}",
    ]
    return "\n".join(lines)


_OPENBLAS = None


def _openblas():
    """dhsa's OpenBLAS (the library dhsa/_loader.py loads), its cblas_sgemm typed,
    kept at one thread: each of our threads runs a single-threaded sgemm."""
    global _OPENBLAS
    if _OPENBLAS is None:
        import ctypes
        from dhsa import _loader

        lib = ctypes.CDLL(_loader._openblas_path())  # already loaded: the same library
        c_int, c_ptr = ctypes.c_int, ctypes.c_void_p
        lib.scipy_cblas_sgemm.argtypes = [c_int] * 6 + [ctypes.c_float, c_ptr, c_int, c_ptr,
                                                        c_int, ctypes.c_float, c_ptr, c_int]
        lib.scipy_cblas_sgemm.restype = None
        lib.scipy_openblas_set_num_threads(1)
        _OPENBLAS = lib
    return _OPENBLAS


def sgemm_rate(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of C = A B (n x n float32) with the rows of C split over
    ``threads`` Python threads, each a single-threaded OpenBLAS sgemm (ctypes
    releases the GIL, so they run in parallel): the practical float32 peak an
    attention kernel could reach here. GFLOP/s = 2 n**3 / seconds / 1e9."""
    import threading

    threads, n, repeats = int(threads), int(n), int(repeats)
    if not (16 <= n <= 16384 and threads >= 1 and repeats >= 1):
        raise ValueError("sgemm_rate: need 16 <= n <= 16384, threads >= 1, repeats >= 1")
    lib = _openblas()
    i = np.arange(n * n, dtype=np.int64)
    A = ((i * 7) % 13).astype(np.float32).reshape(n, n) * np.float32(0.01)
    B = ((i * 5) % 11).astype(np.float32).reshape(n, n) * np.float32(0.01)
    C = np.empty((n, n), np.float32)
    row_major, no_trans = 101, 111
    start, end = threading.Barrier(threads + 1), threading.Barrier(threads + 1)

    def work(t: int) -> None:
        r0, r1 = n * t // threads, n * (t + 1) // threads
        for _ in range(repeats):
            start.wait()
            if r1 > r0:
                lib.scipy_cblas_sgemm(row_major, no_trans, no_trans, r1 - r0, n, n, 1.0,
                                      A[r0:].ctypes.data, n, B.ctypes.data, n, 0.0,
                                      C[r0:].ctypes.data, n)
            end.wait()

    pool = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    best = 0.0
    for _ in range(repeats):
        start.wait()
        t0 = time.perf_counter()
        end.wait()
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0) * 1e-9)
    for th in pool:
        th.join()
    return best


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------

class CpuWatch:
    """How much CPU other processes (and the hypervisor: steal) took while we
    ran: (busy CPU time of the machine - our own CPU time) / (wall x CPUs),
    from /proc/stat and os.times(). Both count in clock ticks (10 ms), so
    windows shorter than ``min_window`` CPU-seconds give None (unknown)."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    NCPU = os.cpu_count() or 1

    def __init__(self, min_window: float = 0.2):
        self.min_window = min_window

    @staticmethod
    def _busy() -> Optional[float]:
        line = _read("/proc/stat").split("\n", 1)[0].split()
        if not line or line[0] != "cpu":
            return None
        v = [int(x) for x in line[1:]]
        # user nice system idle iowait irq softirq steal (guest is in user)
        return float(v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0))

    def start(self) -> None:
        t = os.times()
        self._b0, self._o0, self._w0 = self._busy(), t.user + t.system, time.perf_counter()

    def stop(self) -> Optional[float]:
        t = os.times()
        b1, o1, w1 = self._busy(), t.user + t.system, time.perf_counter()
        window = (w1 - self._w0) * self.NCPU
        if b1 is None or self._b0 is None or window < self.min_window:
            return None
        others = (b1 - self._b0) / self.HZ - (o1 - self._o0)
        return max(0.0, others / window)


CONTENDED = 0.10  # others took > 10% of the machine: the sample is suspect


@dataclass
class Timing:
    """Seconds of the timed calls (warm-up excluded), the share of the CPUs
    other processes took during each (None: too short to tell) and the last
    result."""

    times: List[float]
    warmup: int
    others: List[Optional[float]] = field(default_factory=list)
    result: Any = field(default=None, repr=False)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def best_index(self) -> int:
        return self.times.index(self.best)

    @property
    def median(self) -> float:
        s = sorted(self.times)
        n = len(s)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    @property
    def best_others(self) -> Optional[float]:
        """Share of the CPUs others took during the best call (None: unknown)."""
        return self.others[self.best_index] if self.others else None

    @property
    def contended(self) -> Optional[bool]:
        """Whether the best call shared the machine (None: unknown)."""
        o = self.best_others
        return None if o is None else o > CONTENDED

    def as_dict(self) -> Dict[str, Any]:
        return {"best_s": self.best, "median_s": self.median, "repeats": len(self.times),
                "warmup": self.warmup, "times_s": [round(t, 6) for t in self.times],
                "others_cpu_frac": [None if o is None else round(o, 3) for o in self.others],
                "best_others_cpu_frac": self.best_others, "best_contended": self.contended}


def time_interleaved(fns: Dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                     max_seconds: Optional[float] = None, extra_repeats: Optional[int] = None,
                     keep: Optional[Sequence[str]] = None) -> Dict[str, Timing]:
    """Time several functions in turns (round robin), so that methods that
    are compared see the same machine conditions; the minimum of each is the
    figure to use.

    Each function: ``warmup`` untimed calls (all warm-ups first), then timed
    calls (``time.perf_counter``) until it has ``repeats`` of them. On a
    shared machine, while a function's best call so far was measurably
    contended (other processes took > 10% of the CPUs, see
    :class:`CpuWatch`), it gets up to ``extra_repeats`` (default
    ``2 * repeats``) more. A function stops early (after at least one timed
    call) once its timed calls add up to ``max_seconds``. The garbage
    collector is off while timing. The last result of the functions named in
    ``keep`` (default: all) is kept; the others' results are dropped after
    each call, outside the timed region (to bound memory).
    """
    keep = set(fns) if keep is None else set(keep)
    repeats = max(1, int(repeats))
    warmup = max(0, int(warmup))
    extra = 2 * repeats if extra_repeats is None else max(0, int(extra_repeats))
    watch = CpuWatch()
    results: Dict[str, Any] = {}
    times: Dict[str, List[float]] = {n: [] for n in fns}
    others: Dict[str, List[Optional[float]]] = {n: [] for n in fns}
    totals = {n: 0.0 for n in fns}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name, fn in fns.items():
            for _ in range(warmup):
                results[name] = None
                results[name] = fn()
                if name not in keep:
                    results[name] = None
        active = list(fns)
        while active:
            for name in list(active):
                results[name] = None  # let the previous output go before the next call
                watch.start()
                t0 = time.perf_counter()
                results[name] = fns[name]()
                dt = time.perf_counter() - t0
                others[name].append(watch.stop())
                if name not in keep:
                    results[name] = None
                times[name].append(dt)
                totals[name] += dt
                ts = times[name]
                done = max_seconds is not None and totals[name] >= max_seconds
                if not done and len(ts) >= repeats:
                    o = others[name][ts.index(min(ts))]
                    done = o is None or o <= CONTENDED or len(ts) >= repeats + extra
                if done:
                    active.remove(name)
    finally:
        if enabled:
            gc.enable()
    return {n: Timing(times=times[n], warmup=warmup, others=others[n], result=results.get(n))
            for n in fns}


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
              max_seconds: Optional[float] = None, extra_repeats: Optional[int] = None) -> Timing:
    """:func:`time_interleaved` of one function."""
    return time_interleaved({"f": fn}, repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                            extra_repeats=extra_repeats)["f"]


def others_label(*timings: Optional[Dict[str, Any]]) -> str:
    """"51/48": percent of the CPUs others took during each best call
    ('?' unknown, '-' not run), from :meth:`Timing.as_dict` dicts."""
    out = []
    for t in timings:
        if t is None:
            out.append("-")
        elif t.get("best_others_cpu_frac") is None:
            out.append("?")
        else:
            out.append("%.0f" % (100.0 * t["best_others_cpu_frac"]))
    return "/".join(out)


def wait_for_quiet(max_wait: float, window: float = 1.0, threshold: float = CONTENDED) -> Dict[str, Any]:
    """Sleep-probe the machine in ``window``-second steps until other
    processes use at most ``threshold`` of the CPUs, for up to ``max_wait``
    seconds. Returns what it saw ({"waited_s", "others_cpu_frac", "quiet"})."""
    t0 = time.perf_counter()
    frac = None
    while True:
        b0 = CpuWatch._busy()
        w0 = time.perf_counter()
        time.sleep(window)
        b1 = CpuWatch._busy()
        dt = time.perf_counter() - w0
        if b0 is not None and b1 is not None:
            frac = max(0.0, (b1 - b0) / CpuWatch.HZ / (dt * CpuWatch.NCPU))
        quiet = frac is not None and frac <= threshold
        if quiet or time.perf_counter() - t0 + window > max_wait:
            return {"waited_s": round(time.perf_counter() - t0, 2),
                    "others_cpu_frac": None if frac is None else round(frac, 3),
                    "quiet": quiet}


class SgemmPeak:
    """The OpenBLAS sgemm rate, sampled several times over a run; contention
    only lowers it, so the maximum is the machine's figure."""

    def __init__(self, threads: int, n: int = 2048):
        self.threads, self.n = int(threads), int(n)
        self.samples: List[float] = []

    def sample(self, repeats: int = 3) -> float:
        g = sgemm_rate(self.threads, n=self.n, repeats=repeats)
        self.samples.append(g)
        return g

    @property
    def best(self) -> float:
        return max(self.samples)

    def as_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "threads": self.threads, "best_gflops": self.best,
                "samples_gflops": [round(x, 1) for x in self.samples]}


# ----------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------

def add_timing_arguments(p, repeats: int, scope: str) -> None:
    """The timing options both attention benchmarks share."""
    p.add_argument("--repeats", type=int, default=repeats,
                   help="timed calls per case (min reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="stop repeating a case once its timed calls add up to this")
    p.add_argument("--extra-repeats", type=int, default=None,
                   help="more timed calls allowed while the best one was contended by other "
                        "processes (default: --repeats)")
    p.add_argument("--quiet-wait", type=float, default=5.0,
                   help=f"before each {scope}, wait up to this many seconds for other "
                        "processes to leave the CPUs (default: %(default)s)")


def causal_pairs(Lq: int, Lk: Optional[int] = None, causal: bool = True) -> int:
    """Query-key pairs one head computes: queries are the last Lq of Lk
    positions (:func:`dhsa.rules.allowed_pairs`). L(L+1)/2 for Lq = Lk = L."""
    return rules.allowed_pairs(Lq, Lk, causal)


def dense_flops(B: int, H: int, L: int, D: int, Lk: Optional[int] = None,
                causal: bool = True) -> float:
    """4 B H D pairs: q k^T and p v, 2 D FLOPs each per pair (the softmax's
    exponentials are not counted). ~2 B H D L^2 for causal L = Lq = Lk."""
    return 4.0 * B * H * D * causal_pairs(L, Lk, causal)


def selected_head_pairs(selection, H: int) -> int:
    """Query-key pairs summed over batch and query heads that a selection
    keeps. ``pairs_selected`` has one entry per (batch, selection group);
    a group serves H / groups query heads (1 group per layer, Hkv per KV
    head, H per query head)."""
    if selection.pairs_selected is None:
        raise ValueError("selection has no pair counts")
    return rules.head_pairs(selection.pairs_selected, selection.groups, H)


def allowed_head_pairs(selection, H: int) -> int:
    """Same as :func:`selected_head_pairs` for the causally allowed pairs."""
    return rules.head_pairs(selection.pairs_allowed, selection.groups, H)


def sparse_flops(selection, H: int, D: int) -> float:
    """4 D x the selected (query head, key) pairs: the useful work of the
    sparse kernel (the prediction's own FLOPs not counted)."""
    return 4.0 * D * selected_head_pairs(selection, H)


def gflops(flops: Optional[float], seconds: Optional[float]) -> Optional[float]:
    if flops is None or seconds is None or seconds <= 0:
        return None
    return flops / seconds * 1e-9


# ----------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------

def capture_full_layers(model_name: str, *, length: int, haystack_dir: Optional[str],
                        offset: int = 0, layer_step: int = 1, chars_per_token: int = 8):
    """Q/K/V of a model's full-attention layers on ``length`` tokens of text
    (the essays of ``haystack_dir`` from character ``offset`` on, or generated
    prose): (captured {layer: (q, k, v, kwargs)}, every ``layer_step``-th
    full-attention layer, the token count). The model is not kept."""
    from dhsa.analysis import capture_qkv
    from dhsa.harness.eval import haystack_text
    from dhsa.harness.models import load_model

    model, tok = load_model(model_name)
    text = haystack_text(haystack_dir, n_chars=offset + chars_per_token * length + 10_000)
    ids = tok(text[offset:], return_tensors="pt").input_ids[:, :length]
    L = int(ids.shape[1])
    t0 = time.perf_counter()
    cap = capture_qkv(model, ids)
    full = [li for li in sorted(cap) if not cap[li][3].get("sliding_window")]
    layers = full[::layer_step]
    print(f"captured {len(cap)} layers of {L} tokens in {time.perf_counter() - t0:.1f}s; "
          f"full-attention layers used: {layers}", flush=True)
    return cap, layers, L


def make_qkv(B: int, H: int, Hkv: int, L: int, D: int, seed: int = 0):
    """Random normal float32 q (B,H,L,D), k and v (B,Hkv,L,D), generated
    directly in float32 (no float64 temporary)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
    return q, k, v


def parse_shapes(text: str) -> List[Tuple[int, int, int, Optional[int]]]:
    """"9/3/64,32/8/128@4096" -> [(H, Hkv, D, max_len or None), ...]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        cap = None
        if "@" in item:
            item, c = item.split("@", 1)
            cap = parse_length(c)
        parts = [int(x) for x in item.split("/")]
        if len(parts) != 3:
            raise ValueError(f"shape {item!r} must be H/Hkv/D")
        out.append((parts[0], parts[1], parts[2], cap))
    return out


def parse_length(text: str) -> int:
    t = text.strip().lower()
    if t.endswith("k"):
        return int(float(t[:-1]) * 1024)
    return int(t)


def parse_lengths(text: str) -> List[int]:
    return [parse_length(x) for x in text.split(",") if x.strip()]


def shape_name(H: int, Hkv: int, D: int) -> str:
    return f"H{H}/kv{Hkv}/D{D}"


def fmt_len(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


# ----------------------------------------------------------------------------
# peak memory in a subprocess
# ----------------------------------------------------------------------------

MEM_METHODS = ("dhsa", "predict", "dense", "torch", "numpy")


def _mem_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one case once; return its memory figures (runs in the child)."""
    method = spec["method"]
    B, H, Hkv, L, D = (int(spec[k]) for k in ("B", "H", "Hkv", "L", "D"))
    threads = int(spec["threads"])
    if method == "torch":
        if load_torch() is None:
            raise RuntimeError("torch is not installed")
        torch.set_num_threads(threads)
    q, k, v = make_qkv(B, H, Hkv, L, D, seed=int(spec.get("seed", 0)))
    inputs = q.nbytes + k.nbytes + v.nbytes
    cfg = dhsa.DHSAConfig(budget=int(spec.get("budget", 2048)))
    if method == "dhsa":
        def fn():
            return dhsa.sparse_attention(q, k, v, cfg, num_threads=threads)
    elif method == "predict":
        def fn():
            return dhsa.predict_selection(q, k, cfg, num_threads=threads)
    elif method == "dense":
        def fn():
            return dhsa.dense_attention(q, k, v, causal=True, num_threads=threads)
    elif method == "torch":
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def fn():
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=True, enable_gqa=True)
    elif method == "numpy":
        from dhsa import reference

        def fn():
            return reference.dense_attention(q, k, v, causal=True)
    else:
        raise ValueError(f"unknown method {method!r}")
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_hwm()
    hwm_before = _status_kib("VmHWM")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    rss_after = _status_kib("VmRSS")
    out_bytes = getattr(out, "nbytes", None)
    if out_bytes is None and torch is not None and isinstance(out, torch.Tensor):
        out_bytes = out.element_size() * out.nelement()
    return {
        "method": method, "seconds": seconds, "hwm_reset": reset,
        "inputs_mib": inputs / MiB,
        "output_mib": (out_bytes / MiB) if out_bytes is not None else None,
        "rss_before_mib": rss_before / 1024.0 if rss_before is not None else None,
        "hwm_before_mib": hwm_before / 1024.0 if hwm_before is not None else None,
        "peak_rss_mib": hwm / 1024.0 if hwm is not None else None,
        "rss_after_mib": rss_after / 1024.0 if rss_after is not None else None,
        # what the call itself added at its peak (output included)
        "call_peak_extra_mib": ((hwm - rss_before) / 1024.0
                                if hwm is not None and rss_before is not None else None),
    }


def measure_peak_rss(method: str, B: int, H: int, Hkv: int, L: int, D: int, threads: int,
                     budget: int = 2048, seed: int = 0,
                     timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run ``method`` once on fresh random inputs in a new Python process.

    Returns the child's figures: ``peak_rss_mib`` (VmHWM after the call,
    reset to the RSS just before it when the kernel allows), the RSS before
    the call (interpreter, libraries and inputs), ``call_peak_extra_mib`` (peak
    minus that: what the call needed, its output included), and
    ``ru_maxrss_mib``, the child's lifetime peak from ``wait4`` (includes
    the imports). On failure: ``{"error": ...}``.
    """
    spec = dict(method=method, B=B, H=H, Hkv=Hkv, L=L, D=D, threads=threads, budget=budget,
                seed=seed)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"method": method, "error": f"timed out after {timeout} s"}
    # (RUSAGE_CHILDREN's ru_maxrss would be the max over all children so
    # far, so the child reports its own getrusage(RUSAGE_SELF) instead)
    if proc.returncode != 0:
        return {"method": method, "error": (err or out).strip().splitlines()[-1:]}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        return {"method": method, "error": "no result from child"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------
# tables and results
# ----------------------------------------------------------------------------

Column = Tuple[str, str, str]  # (row key, header, format spec or "" for str)


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if spec:
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a Markdown table with right-aligned numeric columns."""
    headers = [c[1].replace("|", "/") for c in columns]
    body = [[_cell(r.get(key), spec).replace("|", "/") for key, _, spec in columns]
            for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]
    left = [not spec for _, _, spec in columns]  # text columns left, numbers right
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
           "|" + "|".join("-" * (w + 2) if lft else "-" * (w + 1) + ":"
                          for w, lft in zip(widths, left)) + "|"]
    for b in body:
        out.append("| " + " | ".join(
            (c.ljust(w) if lft else c.rjust(w)) for c, w, lft in zip(b, widths, left)) + " |")
    return "\n".join(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def results_paths(name: str, out: Optional[str] = None) -> Tuple[Path, Path]:
    """``out`` (a path, with or without .json/.md) or results/<name>.{json,md}."""
    if out:
        base = Path(out)
        if base.suffix in (".json", ".md"):
            base = base.with_suffix("")
    else:
        base = RESULTS_DIR / name
    return base.with_suffix(".json"), base.with_suffix(".md")


def write_results(name: str, *, machine: Dict[str, Any], command: str, started: str,
                  config: Dict[str, Any], rows: Sequence[Dict[str, Any]],
                  tables: Sequence[Tuple[str, Sequence[Dict[str, Any]], Sequence[Column]]],
                  notes: Sequence[str] = (), extra: Optional[Dict[str, Any]] = None,
                  out: Optional[str] = None) -> Tuple[Path, Path]:
    """Save ``rows`` (and ``extra``) as JSON and the ``tables`` as Markdown.

    tables: (title, rows, columns) each. Returns (json path, md path).
    """
    json_path, md_path = results_paths(name, out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "started_utc": started,
        "finished_utc": utc_now(),
        "command": command,
        "machine": machine,
        "loadavg_at_end": loadavg(),
        "config": config,
        "notes": list(notes),
        "rows": list(rows),
    }
    if extra:
        doc.update(extra)
    json_path.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    md = [f"# {name}", "",
          f"- date (UTC): {started} to {doc['finished_utc']}",
          f"- command: `{command}`",
          *[f"- {line}" for line in describe_machine(machine).splitlines()],
          f"- load average at end: {doc['loadavg_at_end']}"]
    for k, v in config.items():
        md.append(f"- {k}: {v}")
    md.append("")
    for title, trows, cols in tables:
        md += [f"## {title}", "", markdown_table(trows, cols), ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md_path.write_text("\n".join(md))
    return json_path, md_path


def _main(argv: Sequence[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--mem-child":
        import resource
        res = _mem_child(json.loads(argv[1]))
        res["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        print(json.dumps(res), flush=True)
        return 0
    info = machine_info()
    print(describe_machine(info))
    print(json.dumps(_jsonable(info), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
