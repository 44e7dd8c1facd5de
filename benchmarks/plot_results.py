"""Draw the README's speed pictures from the committed benchmark results.

Reads benchmarks/results/*.json (whichever exist) and writes PNGs to
docs/img/:

- ``scaling_vs_length.png`` (bench_sparse, bench_sparse_long): time vs L for
  torch SDPA, the dense C kernel and DHSA (log-log: O(L^2) against
  O(L * budget)), and the speed-up over torch with the ideal 1 / density;
- ``model_prefill.png`` (bench_model, bench_llama, bench_llama_32k): SmolLM2 prefill time per
  method and length, split into attention and the rest;
- ``thread_scaling.png`` (bench_threads*): speed-up over 1 thread;
- ``generation_speed.png`` (bench_generate, bench_llama_decode): SmolLM2
  tokens/s vs context, exact and sparse decode.

    python benchmarks/plot_results.py [--results benchmarks/results] [--out docs/img]

Needs matplotlib (the viz extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(results: Path, name: str):
    p = results / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def merged(results: Path, *names: str):
    """The first file's document with the rows of the others appended."""
    docs = [d for d in (load(results, n) for n in names) if d]
    if not docs:
        return None
    doc = dict(docs[0])
    doc["rows"] = [r for d in docs for r in d["rows"]]
    return doc


def kfmt(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def log_axes(ax, ticks, labels, ybase, xlabel, ylabel, title) -> None:
    """Log-2 x axis at the given ticks, log y axis, labels, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=ybase)
    ax.set_xticks(ticks, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_scaling(plt, docs, out: Path) -> bool:
    rows = [r for d in docs if d for r in d["rows"] if r.get("H") == 9 and r.get("budget") == 2048]
    if not rows:
        return False
    by_L = {}
    for r in rows:  # a later file (longer lengths) adds, never overrides
        by_L.setdefault(r["L"], r)
    Ls = sorted(by_L)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, style in (("torch_ms", "torch SDPA (dense)", "o-"),
                              ("dense_ms", "dhsa dense kernel", "s-"),
                              ("dhsa_ms", "DHSA, budget 2K (predict + attend)", "^-")):
        pts = [(L, by_L[L][key] / 1e3) for L in Ls if by_L[L].get(key) is not None
               and not by_L[L].get(key.replace("_ms", "_skipped"), False)]
        if pts:
            a1.plot(*zip(*pts), style, label=label)
    log_axes(a1, Ls, [kfmt(L) for L in Ls], 10, "context length L (causal prefill, H=9, Hkv=3, D=64)",
             "seconds (best of the timed calls)", "time vs length: O(L²) against O(L·budget)")
    pts = [(L, by_L[L]["speedup_vs_torch"]) for L in Ls if by_L[L].get("speedup_vs_torch")]
    if pts:
        a2.plot(*zip(*pts), "^-", label="DHSA vs torch SDPA")
    pts = [(L, by_L[L]["torch_ms"] / by_L[L]["dense_ms"]) for L in Ls
           if by_L[L].get("torch_ms") and by_L[L].get("dense_ms")
           and not by_L[L].get("dense_skipped") and not by_L[L].get("torch_skipped")]
    if pts:
        a2.plot(*zip(*pts), "s-", label="dense kernel vs torch SDPA")
    a2.plot(Ls, [by_L[L]["ideal_speedup"] for L in Ls], "k--", lw=1,
            label="ideal (1 / density)")
    log_axes(a2, Ls, [kfmt(L) for L in Ls], 2, "context length L",
             "speed-up over torch SDPA (×)", "speed-up, same machine, same run")
    fig.tight_layout()
    fig.savefig(out / "scaling_vs_length.png", dpi=110)
    plt.close(fig)
    return True


def plot_model(plt, doc, llama, out: Path) -> bool:
    if not doc:
        return False
    rows = [r for r in doc["rows"] if r.get("method") not in (None, "error")]
    Ls = sorted({r["length"] for r in rows})
    methods = []
    for r in rows:
        key = (r["method"], r.get("budget"))
        if key not in methods:
            methods.append(key)
    order = {"sdpa": 0, "eager": 1, "dhsa": 2}
    methods.sort(key=lambda m: (order.get(m[0], 3), m[1] or 0))
    fig, axes = plt.subplots(1, len(Ls), figsize=(2.6 * len(Ls), 3.8), squeeze=False)
    for ax, L in zip(axes[0], Ls):
        names, att, rest = [], [], []
        for m, b in methods:
            r = next((x for x in rows if x["length"] == L and x["method"] == m
                      and x.get("budget") == b), None)
            if r is None:
                continue
            names.append(m if b is None else f"{m}\n{kfmt(b)}")
            att.append(r["attention_s"])
            rest.append(r["prefill_s"] - r["attention_s"])
        if llama:
            lr = [x for x in llama["rows"] if x["length"] == L and x["flash_attn"]]
            if lr:
                names.append("llama.cpp\nQ4_1")
                att.append(0.0)
                rest.append(lr[0]["prefill_s"])
        x = range(len(names))
        colors = ["#bbbbbb" if n.startswith("llama") else "#9bb7d4" for n in names]
        ax.bar(x, rest, color=colors, label="rest of the model")
        ax.bar(x, att, bottom=rest, color="#d4765f", label="attention")
        ax.set_xticks(list(x), names, fontsize=7)
        ax.set_title(f"L = {kfmt(L)}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("prefill seconds (2 threads)")
    from matplotlib.patches import Patch
    handles = [Patch(color="#9bb7d4", label="rest of the model"),
               Patch(color="#d4765f", label="attention")]
    if llama:
        handles.append(Patch(color="#bbbbbb", label="llama.cpp (total)"))
    axes[0][0].legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle("SmolLM2-135M prefill: attention vs the rest"
                 + (" (llama.cpp: total only)" if llama else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "model_prefill.png", dpi=110)
    plt.close(fig)
    return True


def plot_threads(plt, doc, out: Path) -> bool:
    if not doc:
        return False
    rows = doc["rows"]
    L = max(r["L"] for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    counts = sorted({r["threads"] for r in rows})
    for m, label, style in (("dense", "dhsa dense kernel", "s-"),
                            ("torch_sdpa", "torch SDPA", "o-"),
                            ("dhsa_total", "DHSA budget 2K", "^-"),
                            ("dhsa_predict", "DHSA prediction alone", "v:")):
        pts = [(r["threads"], r["speedup_vs_1"]) for r in rows
               if r["method"] == m and r["L"] == L and r.get("speedup_vs_1")]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.plot(counts, counts, "k--", lw=1, label="linear")
    cpu = doc["machine"].get("cpu", {}).get("model", "")
    log_axes(ax, counts, [str(c) for c in counts], 2, "threads", "speed-up over 1 thread",
             f"L = {kfmt(L)}, {cpu[:40]}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(out / "thread_scaling.png", dpi=110)
    plt.close(fig)
    return True


def plot_generate(plt, doc, llama, out: Path) -> bool:
    """Tokens/s vs context: HF sdpa, dhsa exact and sparse decode (and
    llama.cpp's decode, when measured on the same CPU)."""
    if not doc:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.6))
    styles = {"sdpa": ("HF sdpa", "o-"), "dhsa_exact": ("dhsa, exact decode", "s-"),
              "dhsa_sparse": ("dhsa, sparse decode", "^-")}
    Ls = sorted({r["L"] for r in doc["rows"]})
    for m, (label, style) in styles.items():
        pts = sorted((r["L"], r["tokens_per_s"]) for r in doc["rows"] if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    if llama:
        pts = sorted((r["L"], r["tokens_per_s"]) for r in llama["rows"])
        ax.plot(*zip(*pts), "x--", color="#777777", label="llama.cpp (Q4_1 weights)")
        Ls = sorted(set(Ls) | {p[0] for p in pts})
    log_axes(ax, Ls, [kfmt(L) for L in Ls], 2, "context (tokens)", "tokens / s",
             "SmolLM2-135M generation, 2 threads")
    fig.tight_layout()
    fig.savefig(out / "generation_speed.png", dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "img"))
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, llama = load(res, "bench_model"), merged(res, "bench_llama", "bench_llama_32k")
    cpu = lambda doc: (doc or {}).get("machine", {}).get("cpu", {}).get("model")  # noqa: E731
    if llama and model and cpu(llama) != cpu(model):
        llama = None  # measured on another machine: not beside these bars
    done = {
        "scaling_vs_length": plot_scaling(plt, [load(res, "bench_sparse"),
                                                load(res, "bench_sparse_long")], out),
        "model_prefill": plot_model(plt, model, llama, out),
        "thread_scaling": plot_threads(plt, load(res, "bench_threads_16core")
                                       or load(res, "bench_threads"), out),
    }
    generate, lldec = load(res, "bench_generate"), load(res, "bench_llama_decode")
    if lldec and generate and cpu(lldec) != cpu(generate):
        lldec = None
    done["generation_speed"] = plot_generate(plt, generate, lldec, out)
    for k, v in done.items():
        print(f"{k}: {'written' if v else 'no results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
