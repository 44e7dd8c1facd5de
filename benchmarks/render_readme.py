"""Render the README's result tables and numbers from benchmarks/results/.

The README holds generated blocks between markers::

    <!-- rendered: bench_dense -->
    ... (written by this script) ...
    <!-- /rendered -->

Each block name maps to one function below that reads the results files
(``benchmarks/results/*.json``, ``accuracy/*.json`` and ``reliability.md``)
and returns the block's Markdown: the table or sentences and a source line
naming the file, its command, machine, date and git commit. The output is a
pure function of those files (no clock, no git, no environment), so
``tests/test_readme.py`` can check it.

    python benchmarks/render_readme.py            # rewrite README.md's blocks
    python benchmarks/render_readme.py --check    # exit 1 with a diff if they differ

``--readme`` and ``--results`` point elsewhere (the test renders a copy).
Standard library only: it imports neither dhsa nor NumPy.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from dhsa.harness.sweep import decode_steps_exact  # the one home of the rule

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MINUS = "\u2212"

BLOCK = re.compile(r"(<!-- rendered: ([a-z0-9_]+) -->\n)(.*?)(<!-- /rendered -->)", re.S)


# ----------------------------------------------------------------------------
# the results files
# ----------------------------------------------------------------------------

class Results:
    """The files under one results folder, each read once."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._cache: Dict[str, object] = {}

    def json(self, name: str) -> dict:
        """``name`` relative to the folder, without ``.json``."""
        if name not in self._cache:
            path = self.folder / f"{name}.json"
            if not path.exists():
                raise FileNotFoundError(f"results file missing: {path}")
            self._cache[name] = json.loads(path.read_text())
        return self._cache[name]  # type: ignore[return-value]

    def names(self, pattern: str) -> List[str]:
        """The stems of the JSON files matching a glob, sorted."""
        return sorted(p.relative_to(self.folder).with_suffix("").as_posix()
                      for p in self.folder.glob(f"{pattern}.json"))

    def text(self, name: str) -> str:
        path = self.folder / name
        if not path.exists():
            raise FileNotFoundError(f"results file missing: {path}")
        return path.read_text()


# ----------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------

def neg(s: str) -> str:
    """A typographic minus sign."""
    return s.replace("-", MINUS)


def f(x: float, nd: int) -> str:
    return neg(f"{x:.{nd}f}")


def ms(x: float) -> str:
    """Milliseconds (or seconds) to about three significant digits."""
    return f(x, 1) if abs(x) < 100 else f(x, 0)


def sec(x: float) -> str:
    return f(x, 2) if abs(x) < 100 else f(x, 1)


def opt(fmt: Callable[[float], str], x: Optional[float]) -> str:
    """fmt(x), or a dash where the file has no value (a skipped method)."""
    return "–" if x is None else fmt(x)


def times(x: float, nd: int = 2) -> str:
    return f"{f(x, nd)}×"


def pct(x: float, nd: int = 0, sign: bool = True) -> str:
    """x already in percent."""
    return neg(f"{x:+.{nd}f}%" if sign else f"{x:.{nd}f}%")


def share(x: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100.0 * x:.1f}%"


def klen(n: int) -> str:
    """2048 -> 2K."""
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def span(values: Sequence[float], fmt: Callable[[float], str], unit: str = "") -> str:
    """'a–b' of the smallest and largest value (one value: just it)."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"


def listing(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          align: Optional[str] = None) -> str:
    """A Markdown table; align is one 'l' / 'r' per column (default: first l)."""
    align = align or "l" + "r" * (len(headers) - 1)
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------
# provenance: command, machine, date, commit
# ----------------------------------------------------------------------------

def _cpu_name(model: str) -> str:
    name = re.sub(r"\((R|TM)\)", "", model or "unknown CPU")
    name = re.sub(r"\b(Processor|CPU)\b", "", name)
    name = re.sub(r"@.*", "", name)
    return " ".join(name.split())


def machine_short(machine) -> str:
    """'2-CPU Intel Xeon with AVX-512' (or the recorded string as it is)."""
    if not isinstance(machine, dict):
        return str(machine)
    cpu = machine.get("cpu") or {}
    flags = cpu.get("flags") or []
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu.get('logical_cpus')}-CPU {_cpu_name(cpu.get('model'))} with {isa}"


def machine_long(machine) -> str:
    if not isinstance(machine, dict):
        return str(machine)
    build = machine.get("dhsa_build") or {}
    parts = [machine_short(machine), f"dhsa SIMD path {build.get('simd_path')}"]
    if build.get("blas_core"):  # the sgemm rate depends on the OpenBLAS kernels in use
        parts.append(f"OpenBLAS core {build['blas_core']}")
    forced = (machine.get("env") or {}).get("OPENBLAS_CORETYPE")
    if forced:
        parts.append(f"OPENBLAS_CORETYPE={forced}")
    parts += [f"Python {machine.get('python')}", f"NumPy {machine.get('numpy')}"]
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    for key, label in (("llama_cpp_python", "llama-cpp-python"),
                       ("transformers", "transformers")):
        if machine.get(key):
            parts.append(f"{label} {machine[key]}")
    return ", ".join(parts)


def commit_of(doc: dict) -> str:
    machine = doc.get("machine")
    git = machine.get("git") if isinstance(machine, dict) else doc.get("git")
    if not git or not git.get("commit"):
        return "commit not recorded"
    text = f"commit `{git['commit'][:7]}`"
    if git.get("core_sources_modified"):
        text += " with uncommitted changes to csrc/ or dhsa/"
    return text


def date_of(doc: dict) -> str:
    stamp = doc.get("started_utc") or doc.get("date_utc") or ""
    m = re.match(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d)", stamp)
    return f"{m.group(1)} {m.group(2)} UTC" if m else "date not recorded"


def day_of(doc: dict) -> str:
    return date_of(doc)[:10]


def source(res: Results, name: str) -> str:
    doc = res.json(name)
    return (f"`benchmarks/results/{name}.json`: {date_of(doc)}, {commit_of(doc)}, "
            f"{machine_long(doc.get('machine'))}; "
            f"`{doc.get('command', 'command not recorded')}`")


def sources(res: Results, names: Sequence[str]) -> str:
    """One small-print source line per file, under a table."""
    return "<br>\n".join(f"<sub>Source: {source(res, n)}</sub>" for n in names)


# ----------------------------------------------------------------------------
# the speed section
# ----------------------------------------------------------------------------

SPEED_FILES = ["bench_dense", "bench_sparse", "bench_sparse_long", "bench_sparse_128k_warm",
               "bench_flex", "bench_model", "bench_threads"]


def _sgemm_rates(doc: dict) -> Dict[int, float]:
    """The OpenBLAS sgemm rate(s) a benchmark measured, by thread count."""
    cfg = doc.get("config") or {}
    if isinstance(doc.get("sgemm_gflops_by_threads"), dict):
        return {int(k): v for k, v in doc["sgemm_gflops_by_threads"].items()}
    if isinstance(doc.get("sgemm_peak"), dict):
        return {int(doc["sgemm_peak"]["threads"]): doc["sgemm_peak"]["best_gflops"]}
    rate = cfg.get("sgemm_gflops")
    if isinstance(rate, dict):
        return {int(k): v for k, v in rate.items()}
    if isinstance(rate, (int, float)):
        return {int(cfg.get("threads")): rate}
    return {}


def block_speed_header(res: Results) -> str:
    docs = [res.json(n) for n in SPEED_FILES] + [res.json(n) for n in res.names("bench_llama*")]
    machines = sorted({machine_short(d.get("machine")) for d in docs})
    days = sorted({day_of(d) for d in docs})
    where = machines[0] if len(machines) == 1 else "; ".join(machines)
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    return f"## Speed ({where}, {when})\n"


def block_speed_intro(res: Results) -> str:
    dense = res.json("bench_dense")
    threads = sorted({r["threads"] for r in dense["rows"]})
    rates = [rate for n in SPEED_FILES for t, rate in _sgemm_rates(res.json(n)).items()
             if t in threads]
    tl = "/".join(str(t) for t in threads)
    rate = span(rates, lambda x: f"{x:.0f}")
    return (f"Every figure compares against PyTorch measured side by side in the same run:\n"
            f"`torch.nn.functional.scaled_dot_product_attention` (torch "
            f"{dense['machine'].get('torch')}, the same\n{tl} threads, causal, GQA) for the op, "
            f"and Hugging Face `sdpa` / `eager` for the model.\nTimes are the best of the timed "
            f"calls. GFLOP/s count the useful causal work (4·H·D·pairs) against\nthis machine's "
            f"OpenBLAS sgemm rate, measured in the same run ({rate} GFLOP/s on {tl} threads\n"
            f"in these runs).\n")


def block_bench_dense(res: Results) -> str:
    doc = res.json("bench_dense")
    rows = []
    for r in doc["rows"]:
        rows.append([f"H={r['H']}, Hkv={r['Hkv']}, D={r['D']}", klen(r["L"]),
                     ms(r["dhsa_ms"]), opt(ms, r.get("torch_ms")),
                     opt(times, r.get("speedup_vs_torch")),
                     f"{r['dhsa_gflops']:.0f}", f"{r['dhsa_frac_sgemm']:.2f}"])
    batch = "/".join(str(b) for b in sorted({r["B"] for r in doc["rows"]}))
    threads = "/".join(str(t) for t in sorted({r["threads"] for r in doc["rows"]}))
    rate = "/".join(f"{v:.1f}" for v in _sgemm_rates(doc).values())
    head = (f"**Dense kernel** against torch, causal, B={batch}, {threads} threads (share of "
            f"sgemm:\ndhsa GFLOP/s over the best sgemm rate of the run, {rate} GFLOP/s):\n\n")
    return head + table(["shape", "L", "dhsa ms", "torch ms", "torch ms ÷ dhsa ms",
                         "dhsa GFLOP/s", "share of sgemm"], rows, "lrrrrrr") + \
        "\n\n" + sources(res, ["bench_dense"]) + "\n"


SPARSE_FILES = ["bench_sparse", "bench_sparse_long", "bench_sparse_128k_warm"]


def _calls(doc: dict) -> str:
    cfg = doc.get("config") or {}
    rep, warm = cfg.get("repeats"), cfg.get("warmup")
    if rep == 1 and not warm:
        return "1 cold call"
    return f"best of {rep}" + (f", {warm} warm-up" if warm else "")


def block_bench_sparse(res: Results) -> str:
    shapes = sorted({(r["H"], r["Hkv"], r["D"])
                     for n in SPARSE_FILES for r in res.json(n)["rows"]})
    lead = (f"**DHSA** (prediction + sparse attention) against torch, "
            f"{', '.join(f'H={h}, Hkv={kv}, D={d}' for h, kv, d in shapes)}\n"
            f"(`bench_sparse.py`, three runs: {listing(f'`{n}`' for n in SPARSE_FILES)}):\n\n")
    rows = []
    for name in SPARSE_FILES:
        doc = res.json(name)
        for r in doc["rows"]:
            torch_ms = r.get("torch_ms")
            x = r.get("speedup_vs_torch") or (torch_ms / r["dhsa_ms"] if torch_ms else None)
            rows.append([klen(r["L"]), klen(r["budget"]), f"{r['density']:.3f}",
                         f"{r['ideal_speedup']:.1f}", ms(r["dhsa_ms"]), share(r["predict_share"]),
                         ms(torch_ms) if torch_ms else "–", f"{x:.2f}" if x else "–",
                         f"{100 * x / r['ideal_speedup']:.0f}%" if x else "–", _calls(doc)])
    headers = ["L", "budget", "density", "ideal ×", "DHSA ms", "predict share", "torch ms",
               "× vs torch", "× vs torch ÷ ideal", "calls"]
    return (lead + table(headers, rows, "rrrrrrrrrl") + "\n\n"
            + sources(res, SPARSE_FILES) + "\n")


def block_sparse_notes(res: Results) -> str:
    main, long_, warm = (res.json(n) for n in SPARSE_FILES)
    budget = max(r["budget"] for r in main["rows"])
    cold = {r["L"]: r for r in long_["rows"] if r["budget"] == budget}
    shares = [f"{share(r['predict_share'])} at {klen(r['L'])}"
              for r in main["rows"] if r["budget"] == budget]
    shares += [f"{share(r['predict_share'])} at {klen(L)} (cold)" for L, r in sorted(cold.items())]
    out = [f"At budget {klen(budget)} prediction takes {listing(shares)} of the DHSA call."]
    for w in warm["rows"]:
        c = cold.get(w["L"])
        line = (f"Warm calls at {klen(w['L'])} (`bench_sparse_128k_warm`, {_calls(warm)}) take "
                f"{sec(w['dhsa_ms'] / 1000)} s, {share(w['predict_share'])} of it prediction")
        if c and c.get("torch_ms"):
            line += (f"; torch at that length ({_calls(long_)}) took "
                     f"{sec(c['torch_ms'] / 1000)} s, {times(c['torch_ms'] / w['dhsa_ms'], 1)} "
                     f"the warm DHSA time")
        out.append(line + ".")
    mem = defaultdict(dict)
    for m in main.get("memory") or []:
        mem[m["L"]][m["method"]] = m
    for L, by in sorted(mem.items()):
        dh = next((m for k, m in by.items() if k.startswith("dhsa")), None)
        pr = next((m for k, m in by.items() if k.startswith("predict")), None)
        if not dh:
            continue
        parts = [f"At {klen(L)} one DHSA call ({dh['method'].split()[-1]}) needs "
                 f"{dh['call_peak_extra_mib']:.1f} MiB beyond its inputs (the "
                 f"{dh['output_mib']:.1f} MiB output included)"]
        if pr:
            parts.append(f"the prediction alone {pr['call_peak_extra_mib']:.1f} MiB")
        for k in ("dense", "torch"):
            if k in by:
                parts.append(f"{k} {by[k]['call_peak_extra_mib']:.1f} MiB")
        out.append(", ".join(parts) + ".")
    return "\n".join(out) + "\n"


def block_bench_flex(res: Results) -> str:
    doc = res.json("bench_flex")
    rs = doc["rows"]
    rows = [[klen(r["L"]), f"{r['density']:.3f}", f"{r['flex_work_ratio']:.2f}",
             f"{r['dhsa_attention_s']:.3f}", f"{r['flex_sparse_s']:.3f}",
             f"{r['flex_over_dhsa']:.1f}", f"{r['compile_sparse_s']:.1f}",
             f"{r['flex_dense_s']:.3f}", f"{r['sdpa_s']:.3f}"] for r in rs]
    err = max(r["max_rel_err_vs_dhsa"] for r in rs)
    budgets = "/".join(klen(b) for b in sorted({r["budget"] for r in rs}))
    head = (f"The outputs agree to {err:.1e} (largest relative difference), so both kernels do "
            f"the same job (budget {budgets}):\n\n")
    def spread(key, nd):
        return span([key(r) for r in rs], lambda x: f"{x:.{nd}f}")

    tail = (f"FlexAttention visits whole blocks, which here means "
            f"{spread(lambda r: r['flex_work_ratio'], 1)}× the selected pairs\n(DHSA's chunks "
            f"are {_chunk_range(res)} keys long). It also reaches only "
            f"{spread(lambda r: r['flex_sparse_gflops'], 0)} GFLOP/s of useful work\non this "
            f"CPU, against DHSA's {spread(lambda r: r['dhsa_attention_gflops'], 0)}. Its dense "
            f"causal path takes {spread(lambda r: r['flex_dense_s'] / r['sdpa_s'], 1)}× "
            f"SDPA's time here.\n")
    headers = ["L", "density", "Flex work ÷ selected pairs", "DHSA attention s", "Flex s",
               "Flex ÷ DHSA", "Flex compile s", "Flex dense s", "SDPA s"]
    return (head + table(headers, rows, "r" * len(headers)) + "\n\n"
            + sources(res, ["bench_flex"]) + "\n\n" + tail)


def _chunk_range(res: Results) -> str:
    cfg = (res.json("bench_sparse").get("config") or {}).get("dhsa_config") or {}
    return f"{cfg.get('min_chunk')}–{cfg.get('max_chunk')}"


def _model_rows(res: Results):
    doc = res.json("bench_model")
    by = defaultdict(dict)
    for r in doc["rows"]:
        by[r["length"]][(r["method"], r.get("budget"))] = r
    budgets = list(doc["config"].get("budgets") or
                   sorted({r["budget"] for r in doc["rows"] if r.get("budget")}))
    llama = {}
    for name in _llama_files(res, same_machine=True):
        for r in res.json(name)["rows"]:
            llama.setdefault(r["length"], r)
    return doc, by, budgets, llama


def _llama_prefill_names(res: Results) -> List[str]:
    """The bench_llama.py result files (prefill); bench_llama_decode.py's stand apart."""
    return [n for n in res.names("bench_llama*") if res.json(n).get("benchmark") == "bench_llama"]


def _llama_files(res: Results, *, same_machine: bool) -> List[str]:
    """The llama.cpp results measured on bench_model's machine (or on another):
    only those may stand beside its numbers."""
    here = machine_short(res.json("bench_model").get("machine"))
    return [n for n in _llama_prefill_names(res)
            if (machine_short(res.json(n).get("machine")) == here) == same_machine]


def block_bench_model(res: Results) -> str:
    doc, by, budgets, llama = _model_rows(res)
    names = ["bench_model"] + _llama_files(res, same_machine=True)
    rows = []
    for L, m in sorted(by.items()):
        sdpa = m.get(("sdpa", None))
        cells = [klen(L), sec(sdpa["prefill_s"]) if sdpa else "–"]
        for b in budgets:
            r = m.get(("dhsa", b))
            cells.append(f"{sec(r['prefill_s'])} ({pct(r['latency_change_pct'])})" if r else "–")
        eager = m.get(("eager", None))
        cells.append(sec(eager["prefill_s"]) if eager else "–")
        if llama:
            cells.append(sec(llama[L]["prefill_s"]) if L in llama else "–")
        shares = [sdpa] + [m.get(("dhsa", b)) for b in budgets]
        cells.append(" / ".join(f"{100 * r['attention_share']:.0f}%" if r else "–"
                                for r in shares))
        mem = [sdpa] + [m.get(("dhsa", b)) for b in budgets] + [eager]
        if any(r and r.get("memory_measured") for r in mem):
            cells.append(" / ".join(f"{r['peak_rss_mib']:.0f}" if r else "–" for r in mem))
        else:
            cells.append("latency only")
        rows.append(cells)
    bl = [f"dhsa {klen(b)}" for b in budgets]
    headers = (["L", "sdpa s"] + [f"{b} s (vs sdpa)" for b in bl] + ["eager s"]
               + (["llama.cpp s"] if llama else []) +
               ["attention share sdpa / " + " / ".join(bl),
               "peak RSS MiB sdpa / " + " / ".join(bl) + " / eager"])
    return table(headers, rows, "r" * len(headers)) + "\n\n" + sources(res, names) + "\n"


def block_model_notes(res: Results) -> str:
    doc, by, budgets, llama = _model_rows(res)
    out = []
    for b in budgets:
        ch = [f"{pct(m[('dhsa', b)]['latency_change_pct'])} at {klen(L)}"
              for L, m in sorted(by.items()) if ("dhsa", b) in m]
        out.append(f"At budget {klen(b)} DHSA changes the prefill time by {listing(ch)}.")
    mem = []
    b0 = budgets[0]
    for L, m in sorted(by.items()):
        s, d, e = m.get(("sdpa", None)), m.get(("dhsa", b0)), m.get(("eager", None))
        if s and d and s.get("memory_measured") and d.get("memory_measured"):
            text = f"{pct(100 * (d['peak_rss_mib'] / s['peak_rss_mib'] - 1))} at {klen(L)}"
            if e and e.get("memory_measured"):
                text += f" (eager {pct(100 * (e['peak_rss_mib'] / s['peak_rss_mib'] - 1))})"
            mem.append(text)
    if mem:
        out.append(f"DHSA's peak memory (budget {klen(b0)}) against sdpa's: {listing(mem)}.")
    ratio = [llama[L]["prefill_s"] / m[("sdpa", None)]["prefill_s"]
             for L, m in sorted(by.items()) if L in llama and ("sdpa", None) in m]
    if ratio:
        out.append(f"On this CPU, llama.cpp's 4-bit prefill takes "
                   f"{span(ratio, lambda x: f'{x:.1f}')}× the time of PyTorch's float32 sdpa "
                   f"({len(ratio)} lengths).")
    return "\n".join(out) + "\n"


def block_llama_setup(res: Results) -> str:
    names = _llama_prefill_names(res)
    versions = sorted({res.json(n)["machine"].get("llama_cpp_python") or "?" for n in names})
    flash = sorted({str((res.json(n).get("config") or {}).get("flash_attn")) for n in names})
    text = (f"llama.cpp prefills the same GGUF (Q4_1 weights, its own kernels, flash attention "
            f"{'/'.join(flash)})\nthrough `llama-cpp-python` {'/'.join(versions)}, built from "
            f"source (`bench_llama.py`")
    other = _llama_files(res, same_machine=False)
    if not other:
        return text + "; each file's command is in the source lines below):\n"
    machines = sorted({machine_short(res.json(n).get("machine")) for n in other})
    rows = sorted(((r["length"], r["prefill_s"]) for n in other for r in res.json(n)["rows"]))
    return (text + f"). Those runs were made on another machine ({', '.join(machines)}) than "
            "the table below, so they stand apart and enter no ratio:\n\n"
            + table(["L", "llama.cpp prefill s"], [[klen(L), sec(t)] for L, t in rows], "rr")
            + "\n\n" + sources(res, other) + "\n")


THREAD_LABEL = {"dense": "dense kernel", "dhsa_total": "DHSA (prediction + attention)",
                "dhsa_predict": "prediction alone", "torch_sdpa": "torch SDPA"}


def _threads_rows(doc: dict):
    """At the longest L where every method ran: {method: (1-thread row, max-thread row)}."""
    by = defaultdict(dict)
    for r in doc["rows"]:
        by[r["L"]][(r["method"], r["threads"])] = r
    methods = list(dict.fromkeys(r["method"] for r in doc["rows"]))
    for L in sorted(by, reverse=True):
        ts = sorted({t for _, t in by[L]})
        if all((m, ts[0]) in by[L] and (m, ts[-1]) in by[L] for m in methods):
            return L, ts[0], ts[-1], {m: (by[L][(m, ts[0])], by[L][(m, ts[-1])]) for m in methods}
    raise ValueError("no length where every method ran at every thread count")


def block_bench_threads(res: Results) -> str:
    names = res.names("bench_threads*")
    rows = []
    notes = []
    for name in names:
        doc = res.json(name)
        L, t0, t1, per = _threads_rows(doc)
        where = machine_short(doc["machine"])
        for m, (a, b) in per.items():
            gf = (f"{a['gflops']:.0f} → {b['gflops']:.0f}" if a.get("gflops") and b.get("gflops")
                  else "–")
            xt = f"{b['x_torch']:.2f}" if b.get("x_torch") else "–"
            rows.append([where, klen(L), THREAD_LABEL.get(m, m), f"{t0} → {t1}",
                         f"{a['seconds']:.3f} → {b['seconds']:.3f}",
                         times(a["seconds"] / b["seconds"]), gf, xt])
        least = min((m for m in per if m != "torch_sdpa"),
                    key=lambda m: per[m][0]["seconds"] / per[m][1]["seconds"])
        a, b = per[least]
        notes.append((THREAD_LABEL.get(least, least),
                      f"{times(a['seconds'] / b['seconds'])} from {t0} to {t1} threads on the "
                      f"{where}"))
    text = table(["machine", "L", "method", "threads", "seconds", "speed-up", "GFLOP/s",
                  "× torch at the most threads"], rows, "lrllrrrr")
    least = sorted({m for m, _ in notes})
    if len(least) == 1:
        tail = (f"Of the dhsa methods, the {least[0]} scales least on every machine here: "
                f"{listing([t for _, t in notes])}.")
    else:
        tail = ("Of the dhsa methods, the one that scales least: "
                + "; ".join(f"{m}, {t}" for m, t in notes) + ".")
    return text + "\n\n" + sources(res, names) + "\n\n" + tail + "\n"


# ----------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------

TASK_MODELS = (("smollm2", "SmolLM2-135M-Instruct (chat prompts)"),
               ("gemma3", "Gemma-3-270M (base model, completion prompts)"))
TASK_METHODS = ("dense", "dhsa", "dhsa_max", "block_topk", "streaming", "vertical_slash")


def _methods_of(rows) -> List[str]:
    """The columns of a task table: the methods some row has, in TASK_METHODS order."""
    present = {m for _, cells in rows for m in cells}
    return [m for m in TASK_METHODS if m in present]
TASK_NAMES = {"passkey": "passkey", "niah_single": "NIAH single", "niah_multikey": "NIAH multikey",
              "niah_multivalue": "NIAH multivalue (share)", "variable_tracking": "variable tracking",
              "common_words": "common words (share)", "pg_niah": "PG-essay NIAH",
              "copy": "long-range copy (nats/token)", "ppl": "held-out text (nats/token)"}
TASK_ORDER = list(TASK_NAMES)


def _task_docs(res: Results):
    """(model, label, file name, summary doc) of every accuracy/tasks_<model>.json present."""
    out = []
    for model, label in TASK_MODELS:
        name = f"accuracy/tasks_{model}"
        if (res.folder / f"{name}.json").exists():
            out.append((model, label, name, res.json(name)))
    return out


def _below_dense(e: dict) -> bool:
    """Worse than dense on the same prompts at the 5% level, as the summary
    (``dhsa.harness.sweep.worse_than_dense``) decided it."""
    return bool(e.get("worse_than_dense"))


def _task_cell(e: Optional[dict], target: Optional[float], n: int) -> str:
    """"mean [95% CI]" of one method (% or nats), ↓ when worse than dense beyond
    the paired interval, and its own n / density where they differ from the row's."""
    if e is None:
        return "–"
    if e["scoring"] == "loss":
        txt = f"{e['mean']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
    else:
        txt = f"{100 * e['mean']:.0f} [{100 * e['ci_low']:.0f}, {100 * e['ci_high']:.0f}]"
    notes = []
    if "rouge1_x10" in e:  # the paper's NIAH score, beside the retrieval
        notes.append(f"ROUGE-1 × 10: {e['rouge1_x10']:.1f}")
    if e["n"] != n:
        notes.append(f"n = {e['n']}")
    if (e["method"] != "dense" and target is not None and e.get("density") is not None
            and abs(e["density"] - target) > 0.01):
        notes.append(f"density {e['density']:.3f}")
    return txt + (" ↓" if _below_dense(e) else "") + (f" ({', '.join(notes)})" if notes else "")


def _task_rows(doc: dict):
    """[((task, length, density target, tail, protocol, decode budget, decode
    reuse, decode score), {method: entry})], exact dense entries shown in every
    configuration of their task and length but the sparse-decode ones, whose
    dense column is dense under sparse decode (an exact prefill, then sparse
    decode; its ↓ compares it with exact dense)."""
    dense, dense_decode = {}, {}
    groups: Dict[tuple, dict] = defaultdict(dict)
    for e in doc["entries"]:
        dec = (e.get("decode_budget"), e.get("decode_reuse"), e.get("decode_score"))
        if e["method"] == "dense" and e["protocol"] == "decode":
            dense_decode[(e["task"], e["length"]) + dec] = e
        elif e["method"] == "dense":
            dense[(e["task"], e["length"])] = e
        else:
            groups[(e["task"], e["length"], e["density_target"], e["tail"], e["protocol"])
                   + dec][e["method"]] = e
    for (task, length) in dense:
        if not any(k[:2] == (task, length) for k in groups):
            groups[(task, length, None, 0, None, None, None, None)] = {}
    for key in dense_decode:
        if not any(k[:2] == key[:2] and k[4] == "decode" and k[5:] == key[2:] for k in groups):
            groups[key[:2] + (None, 0, "decode") + key[2:]] = {}
    for k in groups:
        if k[4] == "decode":
            if k[:2] + k[5:] in dense_decode:
                groups[k]["dense"] = dense_decode[k[:2] + k[5:]]
        elif (k[0], k[1]) in dense:
            groups[k]["dense"] = dense[(k[0], k[1])]
    order = sorted(groups, key=lambda k: (TASK_ORDER.index(k[0]) if k[0] in TASK_ORDER else 99,
                                          k[1], k[2] or 0, k[3], str(k[4]), k[5] or 0, k[6] or 1,
                                          k[7] or ""))
    return [(k, groups[k]) for k in order]


def _decode_options(reuse, score) -> str:
    """' (reuse 8, bounds scores)' for the decode options off their defaults."""
    opts = ([f"reuse {reuse}"] if reuse else []) + ([f"{score} scores"] if score else [])
    return f" ({', '.join(opts)})" if opts else ""


def _task_sources(name: str, doc: dict) -> str:
    """The small print under a task table: file, dates, commits, machine, commands."""
    dates = doc.get("date_utc") or []
    when = (f"{date_of({'date_utc': dates[0]})} to {date_of({'date_utc': dates[-1]})}"
            if dates else "date not recorded")
    commits = ", ".join(f"`{c[:7]}`" for c in doc.get("commits", []) if c) or "not recorded"
    if doc.get("core_sources_modified"):
        commits += " (some rows with uncommitted changes to csrc/ or dhsa/)"
    cmds = "<br>\n".join(f"<sub>`{c}`</sub>" for c in doc.get("commands", []) if c)
    return (f"<sub>Source: `benchmarks/results/{name}.json` (summary of "
            f"`{Path(doc['files'][0]).name}`, one line per cell): {when}, commit {commits}, "
            f"{', '.join(doc.get('machines', []))}; made by</sub><br>\n{cmds}")


def _decode_how(budget, reuse, dscore, cells) -> str:
    """How a decode row ran: sparse decode, or, where no step fell short of its
    budget (decode density 1), exact attention through decode steps."""
    if decode_steps_exact(cells.values()):
        return f"decode steps, budget {klen(budget)} ≥ context (exact)"
    return f"sparse decode {klen(budget)}" + _decode_options(reuse, dscore)


def block_tasks(res: Results) -> str:
    """One table per model: task rows, method columns, scores with 95% CIs."""
    parts = []
    for model, label, name, doc in _task_docs(res):
        rows = []
        methods = _methods_of(_task_rows(doc))
        for (task, length, rho, tail, proto, budget, reuse, dscore), cells in _task_rows(doc):
            how = (", " + _decode_how(budget, reuse, dscore, cells)
                   if proto == "decode" else f", {proto} continuation" if proto
                   else f", dense tail {tail}" if tail else "")
            n = max(e["n"] for e in cells.values())
            rows.append([TASK_NAMES.get(task, task) + how, klen(length),
                         "–" if rho is None else f"{rho:.3f}", str(n)]
                        + [_task_cell(cells.get(m), rho, n) for m in methods])
        parts.append(f"**{label}**\n\n" + table(
            ["task", "L", "density", "n"] + methods, rows,
            "llrr" + "r" * len(methods)) + "\n\n" + _task_sources(name, doc))
    if not parts:
        return "No task sweep results yet.\n"
    return "\n\n".join(parts) + "\n"


def _goal_lines(rows) -> List[str]:
    """The accuracy issue's goals for Gemma-3, as measured (or not yet)."""
    lines = []
    for task in ("passkey", "niah_single"):
        for L in (16384, 32768):
            d = next((c["dense"] for k, c in rows if k[:2] == (task, L) and "dense" in c), None)
            goal = f"dense ≥ 90% on {TASK_NAMES[task]} at {klen(L)}"
            if d is None:
                lines.append(f"- Goal \"{goal}\" (Gemma-3): not measured yet.")
            else:
                lines.append(f"- Goal \"{goal}\" (Gemma-3): measured {100 * d['mean']:.0f}% "
                             f"[{100 * d['ci_low']:.0f}, {100 * d['ci_high']:.0f}], n = {d['n']} "
                             f"({'met' if d['mean'] >= 0.9 else 'not met'}).")
    for k, cells in rows:
        s = cells.get("streaming")
        mid = (s or {}).get("middle") or {}
        if k[0] in ("passkey", "niah_single") and not k[3] and "diff_vs_dense" in mid:
            below = _below_dense(mid)
            lines.append(
                f"- Goal \"sink + local at density {k[2]:.3f} measurably below dense at middle "
                f"depths\" (Gemma-3, {TASK_NAMES[k[0]]}, {klen(k[1])}, needles at 25–75%): "
                f"streaming − dense {100 * mid['diff_vs_dense']:+.0f} points "
                f"[{100 * mid['diff_ci_low']:+.0f}, {100 * mid['diff_ci_high']:+.0f}], "
                f"n = {mid['n']}, exact McNemar p = {mid.get('mcnemar_p', 1.0):.2f} "
                f"({'met' if below else 'not met'}).")
    return lines


def block_tasks_notes(res: Results) -> str:
    """Counts of rows below dense, DHSA against block_topk, the Gemma-3 goals."""
    lines = []
    for model, label, name, doc in _task_docs(res):
        rows = _task_rows(doc)
        short = label.split(" (")[0]
        worse, total = defaultdict(int), defaultdict(int)
        for _, cells in rows:
            for m, e in cells.items():
                if m != "dense" and e.get("diff_ci_high") is not None:
                    total[m] += 1
                    worse[m] += _below_dense(e)
        if total:
            lines.append(f"- {short}: rows where a method is worse than dense at the 5% level "
                         f"(↓): " + ", ".join(
                             f"{m} {worse[m]} of {total[m]}" for m in TASK_METHODS if m in total)
                         + ".")
        for ours, other in (("dhsa", "block_topk"), ("dhsa_max", "block_topk"),
                            ("dhsa_max", "dhsa")):
            ahead = behind = tied = 0
            for _, cells in rows:
                a, b = cells.get(ours), cells.get(other)
                if a and b:
                    d = (b["mean"] - a["mean"]) if a["scoring"] == "loss" else (a["mean"] - b["mean"])
                    ahead += d > 1e-9
                    behind += d < -1e-9
                    tied += abs(d) <= 1e-9
            if ahead + behind + tied:
                lines.append(f"  {ours} against {other}, row by row (mean score, not a test): "
                             f"ahead in {ahead}, behind in {behind}, tied in {tied} of "
                             f"{ahead + behind + tied} rows.")
        for k, cells in rows:  # sparse decode against exact decode, the same prompts
            d = cells.get("dense")
            if k[4] != "decode" or not d or d.get("diff_vs_dense") is None:
                continue
            what = ("  " + _decode_how(k[5], k[6], k[7], cells)
                    + f" after an exact prefill against exact decode, {TASK_NAMES.get(k[0], k[0])} "
                      f"at {klen(k[1])} (decode density {d['decode_density']:.3f}), n = "
                      f"{d['n_paired']}: ")
            if d["scoring"] == "loss":
                what += (f"{d['diff_vs_dense']:+.4f} nats/token [{d['diff_ci_low']:+.4f}, "
                         f"{d['diff_ci_high']:+.4f}], perplexity "
                         f"{100 * (math.exp(d['diff_vs_dense']) - 1):+.1f}%.")
            else:
                what += (f"{100 * d['mean']:.0f}% against {100 * (d['mean'] - d['diff_vs_dense']):.0f}%"
                         f" ({100 * d['diff_vs_dense']:+.0f} points [{100 * d['diff_ci_low']:+.0f}, "
                         f"{100 * d['diff_ci_high']:+.0f}]).")
            lines.append(what)
        if model == "gemma3":
            lines += _goal_lines(rows)
    return "\n".join(lines) + "\n" if lines else "No task sweep results yet.\n"


def _recall(res: Results):
    rec = res.json("accuracy/recall_4k")
    recall = defaultdict(list)
    for r in rec["rows"]:
        recall[(r["method"], r["budget"])].append(r["recall"])
    recall = {k: statistics.mean(v) for k, v in recall.items()}
    methods = list(dict.fromkeys(r["method"] for r in rec["rows"]))
    return rec, recall, methods, list(rec["args"]["budgets"])


def block_accuracy(res: Results) -> str:
    rec, recall, methods, budgets = _recall(res)
    rows = [[f"**{m}**" if m == "dhsa" else m]
            + [f"{recall[(m, b)]:.3f}" if (m, b) in recall else "–" for b in budgets]
            for m in methods]
    layers = sorted({r["layer"] for r in rec["rows"]})
    headers = ["method"] + [f"budget {b} (density {_recall_density(rec, b):.2f})" for b in budgets]
    return (f"Attention-mass recall (share of each query's true attention that its block's "
            f"selection keeps), SmolLM2 at {klen(rec['args']['length'])}, layers "
            f"{', '.join(map(str, layers))}, equal budget:\n\n"
            + table(headers, rows, "l" + "r" * len(budgets)) + "\n\n"
            + sources(res, ["accuracy/recall_4k"]) + "\n")


def _recall_density(rec: dict, budget: int) -> float:
    return statistics.mean(r["density"] for r in rec["rows"] if r["budget"] == budget)


def block_accuracy_notes(res: Results) -> str:
    _, recall, _, budgets = _recall(res)
    best = []
    for b in budgets:
        cand = {m: v for (m, bb), v in recall.items() if bb == b and m != "oracle"}
        best.append(max(cand, key=cand.get))
    best_txt = (f"`{best[0]}` at every budget" if len(set(best)) == 1
                else ", ".join(f"`{m}` at {b}" for m, b in zip(best, budgets)))
    return (f"- Of the non-oracle methods, the most attention mass is kept by {best_txt}\n"
            f"  (vertical-slash looks at the true attention of the last 64 queries).\n")


def block_ablation(res: Results) -> str:
    doc = res.json("ablate_selection")
    cfg = doc["config"]
    by = defaultdict(dict)
    for r in doc["rows"]:
        by[r["method"]][r["budget"]] = r
    budgets = list(cfg["budgets"])
    default = next(m for m in by if "(default)" in m)

    def diff(a, b):
        return " / ".join(f"{100 * (by[a][x]['recall_mean'] - by[b][x]['recall_mean']):+.1f}"
                          for x in budgets)

    def cost(a, b):
        return " / ".join(f"{by[a][x]['predict_ms'] / by[b][x]['predict_ms']:.1f}×"
                          for x in budgets)

    def chunks(m):
        return f"{statistics.mean(by[m][x]['chunks_per_group'] for x in budgets):.0f}"

    bl = " / ".join(str(b) for b in budgets)
    text = (f"- Ablation (`benchmarks/ablate_selection.py`, attention-mass recall on SmolLM2 "
            f"Q/K/V at\n  {klen(cfg['length'])}, budget {bl}, sink {cfg['sink']}, local "
            f"{cfg['local']}; recall differences in points of %):\n"
            f"  per-KV-head selection against per-layer (heads averaged) "
            f"{neg(diff(default, 'dhsa layer'))};\n"
            f"  per-query-head against per-KV-head {neg(diff('dhsa query_head', default))}, "
            f"at {cost('dhsa query_head', default)} the\n  prediction time and with no K/V "
            f"sharing in the kernel, so `kv_head` is the default;\n"
            f"  the default chunks ({chunks(default)} per group) against the paper-like 8–64 "
            f"keys ({chunks('dhsa kv_head coarse (t=0.5, 8..64)')} per group)\n"
            f"  {neg(diff(default, 'dhsa kv_head coarse (t=0.5, 8..64)'))}; against fixed 16-key "
            f"chunks ({chunks('fixed 16 kv_head')} per group)\n"
            f"  {neg(diff(default, 'fixed 16 kv_head'))}.\n"
            f"  <sub>Source: {source(res, 'ablate_selection')}</sub>\n")
    return text


def block_scoring(res: Results) -> str:
    """The chunk-score ablation: recall per selection at each density, and the goal."""
    out = []
    names = res.names("ablate_scoring_*")
    if not names:
        return "(no chunk-score ablation measured yet)\n"
    for name in names:
        doc = res.json(name)
        cfg = doc["config"]
        dens = list(cfg["densities"])
        by = defaultdict(dict)
        for r in doc["rows"]:
            by[r["row"]][r["density_target"]] = r
        order = list(dict.fromkeys(r["row"] for r in doc["rows"]))
        head = (["selection"] + [f"recall at {f(d, 3)}" for d in dens]
                + [f"worst layer at {f(d, 3)}" for d in dens]
                + ["predict ms (one call each)"])
        rows = []
        for n in order:
            cells = [f"**{n}**" if n.startswith("dhsa_max (") else n]
            cells += [f(by[n][d]["recall_mean"], 3) for d in dens]
            cells += [f(by[n][d]["recall_min_layer"], 3) for d in dens]
            cells.append(" / ".join(f(by[n][d]["predict_ms"], 0) for d in dens))
            rows.append(cells)
        layers = ", ".join(str(x) for x in cfg["layers"])
        out.append(f"Attention-mass recall at equal achieved density, {cfg['model']} at "
                   f"{klen(cfg['length'])}, layers {layers}, text from character "
                   f"{cfg['offset']:,} of {cfg['text'].rstrip('/').split('/')[-1]} "
                   f"(the variants were chosen on text from character 300,000 on):\n\n")
        out.append(table(head, rows, "l" + "r" * (len(head) - 1)))
        goal = []
        for d in dens:
            ours = by.get("dhsa_max (max score, chunks 2-4)", {}).get(d)
            vs, orc, base = (by.get(m, {}).get(d) for m in ("vertical_slash", "oracle", "dhsa"))
            if ours and vs and orc and base:
                goal.append(f"at density {f(d, 3)}: dhsa_max {f(ours['recall_mean'], 3)} against "
                            f"the mean score's {f(base['recall_mean'], 3)}, vertical_slash's "
                            f"{f(vs['recall_mean'], 3)} "
                            f"({'at or above' if ours['recall_mean'] >= vs['recall_mean'] else 'below'})"
                            f" and {share(ours['recall_mean'] / orc['recall_mean'])} of the "
                            f"oracle's {f(orc['recall_mean'], 3)}")
        if cfg.get("calibration"):
            cal = res.json("calibration/" + cfg["calibration"].rsplit(".json", 1)[0])
            fit = cal["fit"]
            variant = fit.get("variant", "dhsa_max")
            uniform = "dhsa_max (max score, chunks 2-4)" if variant == "dhsa_max" else variant
            fitted = [n for n in order if n.startswith(variant + ", ")
                      and ("calibrated" in n or "learned" in n)]
            for d in dens:
                ours = by.get(uniform, {}).get(d)
                for n in fitted:
                    calr = by[n].get(d)
                    if ours and calr:
                        goal.append(
                            f"at density {f(d, 3)}: {n} {f(calr['recall_mean'], 3)} at achieved "
                            f"density {f(calr['density'], 4)}, against {f(ours['recall_mean'], 3)} "
                            f"at {f(ours['density'], 4)} for {variant} with cosine boundaries "
                            f"and one budget for every head")
            learned = " and learned boundaries (window " \
                f"{cal['boundaries']['window']})" if (cal.get("boundaries") or {}).get("models") \
                else ""
            goal.append(f"the calibration (`{cfg['calibration']}`, {variant}{learned}): "
                        f"{fit['tokens']:,} tokens of {fit['text']}, {fit['seconds']:.0f} s on "
                        f"this machine; on that text recall "
                        + (f"{f(fit['recall_cosine'], 3)} uncalibrated, "
                           f"{f(fit['recall_uniform'], 3)} with learned boundaries, "
                           if "recall_cosine" in fit else
                           f"{f(fit['recall_uniform'], 3)} uncalibrated, ")
                        + f"{f(fit['recall_measured'], 3)} calibrated, at density "
                        f"{f(fit['density_measured'], 4)}")
        if goal:
            out.append("\n\n- " + ";\n- ".join(goal) + ".\n")
        out.append(f"\n<sub>Source: {source(res, name)}</sub>\n\n")
    return "".join(out)


# ----------------------------------------------------------------------------
# reliability (benchmarks/results/reliability.md holds the counts)
# ----------------------------------------------------------------------------

def _md_table(text: str, anchor: str) -> List[List[str]]:
    """The body rows (cells stripped) of the first Markdown table after ``anchor``."""
    if anchor not in text:
        raise ValueError(f"reliability.md lost the text '{anchor}'")
    rows, seen = [], False
    for line in text.split(anchor, 1)[1].splitlines():
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif seen:
            break
    return rows[1:]  # without the header row


def _count(cell: str):
    """'≈ 14 000' -> (14000, True); '2 850 + 1 900' -> (4750, False)."""
    approx = "≈" in cell
    total = sum(int(re.sub(r"\D", "", p)) for p in cell.replace("≈", "").split("+"))
    return total, approx


def _num(n: int, approx: bool = False) -> str:
    s = f"{n:,}".replace(",", "\u202f")
    return f"≈ {s}" if approx else s


RELIABILITY_KINDS = [("Property", "property examples against the float64 reference"),
                     ("Fuzz", "fuzzed calls (atheris + random, also under ASan/UBSan)"),
                     ("Leak", "leak-check calls (success and error paths)"),
                     ("Concurrency", "concurrent calls from 8 threads"),
                     ("Limits", "limits cases (2³¹ sizes, zero strides, Lk = D = 1, ...)")]


def block_reliability(res: Results) -> str:
    text = res.text("reliability.md")
    inputs = _md_table(text, "## Inputs tried")
    after_fixes = _md_table(text, "After the fixes")
    found = _md_table(text, "## Crashes, wrong results, leaks, sanitizer")
    rows = []
    for prefix, label in RELIABILITY_KINDS:
        hit = [r for r in inputs if r[0].startswith(prefix)]
        if prefix == "Fuzz":
            hit += after_fixes
        if not hit:
            continue
        parts = [p for r in hit for p in r[1].split("+")]
        counts = [_count(p) for p in parts]
        total, approx = sum(c for c, _ in counts), any(a for _, a in counts)
        cell = _num(total, approx)
        if 1 < len(counts) <= 3:
            cell += " (" + " + ".join(_num(c, a) for c, a in counts) + ")"
        rows.append([label, cell])
    outcome = []
    for kind, n_found, n_fixed, n_open in found:
        lead = kind[0].lower() if kind[1:2].islower() else kind[0]
        text_ = f"{lead + kind[1:]}: {n_found}"
        if n_fixed not in ("-", ""):
            text_ += f", {n_fixed} fixed, {n_open} open"
        outcome.append(text_)
    n_bugs = sum(int(m.group(1)) for r in found for m in [re.match(r"(\d+) \(BUG", r[1])] if m)
    date = re.search(r"\| Date \| ([^|]+) \|", text)
    return (table(["Tried", "Count"], rows, "lr") +
            f"\n\nFound: {'; '.join(outcome)}.\n\n"
            f"<sub>Source: `benchmarks/results/reliability.md` (its tables \"Inputs tried\", "
            f"\"After the fixes\" and \"Crashes, wrong results, leaks, sanitizer\"): "
            f"{date.group(1).strip() if date else 'date not recorded'}, commit not recorded; "
            f"the commands are listed there.</sub>\n\n"
            f"The {n_bugs} bugs found, all fixed and covered by regression tests:\n")



# ----------------------------------------------------------------------------
# sparse decode
# ----------------------------------------------------------------------------

def _decode_score_of(doc: dict) -> str:
    """'decode_score="moments"' as a benchmark ran it (files written before the
    option existed ran the only score there was, "mean")."""
    return f'decode_score="{doc["config"].get("decode_score") or "mean"}"'


def block_bench_decode(res: Results) -> str:
    doc = res.json("bench_decode")
    budgets = sorted({r["budget"] for r in doc["rows"]})
    b = 2048 if 2048 in budgets else budgets[-1]
    rows = []
    reuse = doc["config"].get("reuse")
    for r in doc["rows"]:
        if r["budget"] != b:
            continue
        rows.append([f"H={r['H']}, Hkv={r['Hkv']}, D={r['D']}", klen(r["L"]), ms(r["sparse_ms"]),
                     ms(r["exact_cache_ms"]), ms(r["exact_kernel_ms"]), opt(ms, r.get("torch_ms")),
                     times(r["speedup_vs_exact_kernel"], 1),
                     opt(lambda x: times(x, 1), r.get("speedup_vs_torch")),
                     share(r["state_frac"])]
                    + ([ms(r["step_ms"]), ms(r["step_reuse_ms"]), share(r["reused_frac"])]
                       if reuse else []))
    threads = "/".join(str(t) for t in sorted({r["threads"] for r in doc["rows"]}))
    head = (f"**One decode step** (one query over a cache of L keys, {threads} threads, "
            f"{doc['config'].get('dtype', 'float32')} K/V; decode budget {klen(b)}, "
            f"{_decode_score_of(doc)}; ms per step):\n\n")
    cols = ["shape", "L", "sparse", "exact, from the cache", "exact kernel", "torch SDPA",
            "× exact kernel", "× torch", "chunk state / K-V"]
    if reuse:
        cols += ["append + step", f"… with decode_reuse={reuse}", "groups reusing"]
    text = table(cols, rows, "l" + "r" * (len(cols) - 1))
    notes = []
    for shape in dict.fromkeys((r["H"], r["Hkv"], r["D"]) for r in doc["rows"]):
        at = [r for r in doc["rows"] if (r["H"], r["Hkv"], r["D"]) == shape]
        L = max(r["L"] for r in at)
        one = {r["budget"]: r for r in at if r["L"] == L}
        app = span([r["append1_ms"] * 1e3 for r in at], lambda x: f"{x:.0f}", " µs")
        fill = max(at, key=lambda r: r["L"])
        notes.append(f"H={shape[0]}, Hkv={shape[1]}, D={shape[2]}: at {klen(L)} a step takes "
                     + ", ".join(f"{ms(one[x]['sparse_ms'])} ms at budget {klen(x)} "
                                 f"({times(one[x]['speedup_vs_exact_kernel'], 1)} the exact "
                                 f"kernel)" for x in sorted(one))
                     + f"; appending a token costs {app}, chunking {klen(fill['L'])} keys at once "
                       f"{ms(fill['fill_ms'])} ms"
                     + (f"; a generation step (append + decode, budget {klen(b)}) "
                        f"{ms(one[b]['step_ms'])} ms, {ms(one[b]['step_reuse_ms'])} ms with "
                        f"decode_reuse={reuse} ({times(one[b]['speedup_reuse'], 2)})"
                        if reuse and b in one else ""))
    return (head + text + "\n\n" + sources(res, ["bench_decode"]) + "\n\n"
            + "\n".join(f"- {n}." for n in notes) + "\n")


def block_bench_generate(res: Results) -> str:
    doc = res.json("bench_generate")
    rows = []
    for r in doc["rows"]:
        rows.append([klen(r["L"]), GENERATE_LABEL.get(r["method"], r["method"]),
                     sec(r["prefill_s"]), ms(r["decode_ms"]), f"{r['tokens_per_s']:.2f}",
                     opt(times, r.get("speedup_vs_sdpa")),
                     opt(lambda x: f"{x:.3f}", r.get("decode_density")),
                     "yes" if r.get("same_tokens_as_exact", True) else "no"])
    cfg = doc["config"]
    head = (f"**Generation** of SmolLM2-135M-Instruct (float32, static cache, greedy, "
            f"{cfg['new_tokens']} new tokens after an L-token prompt, sparse decode with "
            f"{_decode_score_of(doc)}, {cfg['threads']} threads, "
            f"OMP_WAIT_POLICY={cfg.get('OMP_WAIT_POLICY', 'unset')}; decode = median time per "
            f"token):\n\n")
    return head + table(["L", "method", "prefill", "decode ms/token", "tokens/s", "× sdpa",
                         "decode density", "same tokens as exact decode"], rows, "llrrrrrl") + \
        "\n\n" + sources(res, ["bench_generate"]) + "\n"


DECODE_SCORE_LABEL = {"mean": "mean (r_q · r_c, the prefill's)", "bounds": "bounds (Quest's)",
                      "moments": "moments (expected weight per key)",
                      "oracle": "oracle (most true mass per key)"}


def block_decode_ablation(res: Results) -> str:
    """Decode-step recall per chunk score, one table per model."""
    names = res.names("ablate_decode_*")
    if not names:
        return "(no decode-score ablation measured yet)\n"
    docs = [res.json(n) for n in names]
    scores = list(dict.fromkeys(r["score"] for d in docs for r in d["rows"]))
    head = ["decode_score"] + [f"{d['config']['model']} {klen(d['config']['length'])}, budget "
                               f"{klen(d['config']['budget'])}: recall / worst layer / output "
                               f"error" for d in docs]
    rows = []
    for sc in scores:
        cells = [DECODE_SCORE_LABEL.get(sc, sc)]
        for d in docs:
            r = next((x for x in d["rows"] if x["score"] == sc), None)
            if r is None:
                cells.append("–")
                continue
            e = "–" if r.get("output_error") is None else f(r["output_error"], 3)
            cells.append(f"{f(r['recall_mean'], 3)} / {f(r['recall_min_layer'], 3)} / {e}")
        rows.append(cells)
    def layers(ls):
        ls = list(ls)
        run = len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1))
        return f"{ls[0]}–{ls[-1]}" if run else ", ".join(map(str, ls))
    text = "; ".join(f"{d['config']['model']}: {d['config']['steps']} steps at the end of "
                     f"{klen(d['config']['length'])} tokens of {d['config']['text']}, layers "
                     f"{layers(d['config']['layers'])}" for d in docs)
    return (f"Attention-mass recall of one decode step by chunk score "
            f"(`benchmarks/ablate_decode.py`; {text}):\n\n"
            + table(head, rows, "l" + "r" * len(docs)) + "\n\n" + sources(res, names) + "\n")


def block_llama_decode(res: Results) -> str:
    doc = res.json("bench_llama_decode")
    gen = res.json("bench_generate")
    same = machine_short(doc.get("machine")) == machine_short(gen.get("machine"))
    ours = {(r["L"], r["method"]): r for r in gen["rows"]}
    rows = []
    for r in doc["rows"]:
        sp = ours.get((r["L"], "dhsa_sparse")) if same else None
        rows.append([klen(r["L"]), f"{r['tokens_per_s']:.2f}", ms(r["decode_ms"]),
                     f"{r.get('type_k')}/{r.get('type_v')}",
                     f"{sp['tokens_per_s']:.2f}" if sp else "–",
                     times(sp["tokens_per_s"] / r["tokens_per_s"]) if sp else "–"])
    build = doc["machine"].get("llama_cpp_build") or "?"
    head = (f"**llama.cpp** decoding the same GGUF (Q4_1 weights, its own kernels and KV "
            f"cache, flash attention {doc['config']['flash_attn']}, {doc['config']['threads']} "
            f"threads; `llama-bench` build {build}, {doc['config']['tokens']} decode steps after "
            f"filling the context to L; `bench_llama_decode.py`), "
            + ("on the machine of the table above but in a separate run, beside dhsa's sparse "
               "decode from that table (4-bit weights against float32, so the ratio mixes "
               "weight formats with attention):\n\n" if same else
               "on another machine than the table above, so no ratio is formed:\n\n"))
    return head + table(["L", "llama.cpp tokens/s", "ms/token", "K/V type",
                         "dhsa sparse decode tokens/s", "dhsa / llama.cpp"], rows, "rrrlrr") + \
        "\n\n" + sources(res, ["bench_llama_decode"]) + "\n"


GENERATE_LABEL = {"sdpa": "HF sdpa", "dhsa_exact": "dhsa, exact decode",
                  "dhsa_sparse": "dhsa, sparse decode"}


# ----------------------------------------------------------------------------
# the README
# ----------------------------------------------------------------------------

def block_needle_decode(res: Results) -> str:
    """Whether the last prompt step keeps the pass-key needle, by score and budget."""
    names = res.names("needle_decode_*")
    if not names:
        return "(no needle measurement yet)\n"
    parts = []
    for name in names:
        d = res.json(name)
        cfg = d["config"]
        rows = [[klen(r["budget"]), DECODE_SCORE_LABEL.get(r["score"], r["score"]),
                 f(r["needle_kept"], 2), f(r["needle_all_kept"], 2), f(r["recall"], 3)]
                for r in d["rows"]]
        m = cfg["needle_mass"]
        parts.append(
            f"**The needle in one decode step**, {cfg['model']} at {klen(cfg['length'])} "
            f"(`benchmarks/needle_decode.py`: {cfg['samples']} pass-key prompts, layers "
            f"{', '.join(map(str, cfg['layers']))}, the step of the last prompt position). "
            f"The query heads give the needle {f(100 * m['mean'], 2)}% of their attention on "
            f"average, {f(100 * m['median_max_head'], 2)}% in the median layer's most attentive "
            f"head and at most {f(100 * m['max_head'], 2)}%:\n\n"
            + table(["budget", "decode_score", "needle tokens kept", "layers keeping all of it",
                     "attention mass kept"], rows, "llrrr")
            + "\n\n" + sources(res, [name]))
    return "\n\n".join(parts) + "\n"


BLOCKS: Dict[str, Callable[[Results], str]] = {
    "speed_header": block_speed_header,
    "speed_intro": block_speed_intro,
    "bench_dense": block_bench_dense,
    "bench_sparse": block_bench_sparse,
    "sparse_notes": block_sparse_notes,
    "bench_flex": block_bench_flex,
    "llama_setup": block_llama_setup,
    "bench_model": block_bench_model,
    "model_notes": block_model_notes,
    "bench_threads": block_bench_threads,
    "bench_decode": block_bench_decode,
    "bench_generate": block_bench_generate,
    "decode_ablation": block_decode_ablation,
    "needle_decode": block_needle_decode,
    "llama_decode": block_llama_decode,
    "tasks": block_tasks,
    "tasks_notes": block_tasks_notes,
    "accuracy": block_accuracy,
    "accuracy_notes": block_accuracy_notes,
    "ablation": block_ablation,
    "scoring": block_scoring,
    "reliability": block_reliability,
}


def render(readme: str, results_dir: Path) -> str:
    """The README text with every rendered block rewritten from the files."""
    res = Results(results_dir)
    names = [m.group(2) for m in BLOCK.finditer(readme)]
    unknown = sorted(set(names) - set(BLOCKS))
    if unknown:
        raise ValueError(f"README has blocks no renderer knows: {unknown}")
    if len(names) != len(set(names)):
        raise ValueError("README has a rendered block twice")
    return BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group(2)](res) + m.group(4), readme)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="change nothing; print a diff and exit 1 if the README differs")
    p.add_argument("--readme", default=str(REPO_ROOT / "README.md"), help="the README to render")
    p.add_argument("--results", default=str(BENCH_DIR / "results"),
                   help="the results folder to render from")
    args = p.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text()
    new = render(old, Path(args.results))
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), new.splitlines(True), str(path), "rendered"))
            print(f"\n{path} differs from the results files: run "
                  f"python benchmarks/render_readme.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new)
        print(f"rewrote the rendered blocks of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
