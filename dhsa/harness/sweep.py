"""``python -m dhsa tasks``: exact-match and copy tasks per method, at equal density.

A sweep is a grid of cells - (task, length, sample, method, density, dense
tail or copy protocol) - on one model. Each finished cell is appended to a
JSONL file as one line; a restarted sweep skips the cells already there, so
a long run can be stopped and resumed at any point. Samples are paired: every
method reads the same prompts (sample i has seed ``seed + i`` and depth
``(i + 0.5) / samples``). ``python -m dhsa table FILE.jsonl`` turns a sweep
into a table with 95% confidence intervals (JSON + Markdown) and heat maps.

Methods run at equal achieved density (:func:`~dhsa.harness.protocol.matched_config`);
the density each row reached, measured by the patch over the layers that
ran sparse, is stored with it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .intervals import bootstrap_mean, mean_ci

__all__ = ["MODELS", "SWEEP_METHODS", "ppl_sample", "run_sweep", "summarize_sweep", "read_jsonl"]

MODELS = ("smollm2", "gemma3")
SWEEP_METHODS = ("dense", "dhsa", "block_topk", "streaming", "vertical_slash")
#: tokens of a perplexity sample that are scored (the rest is the prefix)
PPL_SCORED = 256


# ---- shared pieces ---------------------------------------------------------------

def load_model(name: str):
    """(model, tokenizer) of ``smollm2`` or ``gemma3``."""
    from . import models
    if name == "smollm2":
        return models.load_smollm2()
    if name == "gemma3":
        return models.load_gemma3()
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def git_commit() -> Optional[str]:
    """HEAD of the checkout dhsa runs from, or None outside a git checkout."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> str:
    import platform
    cpu = ""
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
               if l.startswith("model name")][0]
    except (OSError, IndexError):
        pass
    return f"{cpu} ({platform.machine()}, {os.cpu_count()} cores)"


def read_jsonl(path) -> List[Dict]:
    """The rows of a sweep file (a torn last line, from a killed run, is skipped)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def cell_key(d: Dict) -> str:
    """The identity of a cell: what it ran, not what it measured."""
    fields = ("model", "task", "haystack", "length", "sample", "method", "density_target",
              "tail", "protocol")
    return json.dumps([d.get(f) for f in fields])


def essay_text(haystack_dir: Optional[str], n_chars: int) -> Optional[str]:
    if not haystack_dir:
        return None
    from .eval import haystack_text
    return haystack_text(haystack_dir, n_chars)


def ppl_sample(tokenizer, length: int, seed: int, text: str) -> Tuple[List[int], List[int]]:
    """(prefix, continuation): ``length`` tokens of ``text`` starting at a
    seeded offset, the last PPL_SCORED of them to be scored."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < length:
        reps = length // max(1, len(ids)) + 1
        ids = (ids * reps)
    start = int(np.random.default_rng(seed).integers(0, max(1, len(ids) - length)))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seg = bos + ids[start:start + length - len(bos)]
    return seg[:-PPL_SCORED], seg[-PPL_SCORED:]


# ---- the sweep -------------------------------------------------------------------

def _plan(tasks, lengths, samples, methods, densities, tails, protocols) -> List[Dict]:
    """Every cell of the grid, in run order: by length, task, sample, then methods
    (so that one prompt serves all its methods)."""
    cells = []
    for L in lengths:
        for task in tasks:
            for i in range(samples):
                for m in methods:
                    for rho in ([None] if m == "dense" else densities):
                        if task in ("copy", "ppl"):
                            for proto in (["exact"] if m == "dense" else protocols):
                                if proto == "sparse" and m == "vertical_slash":
                                    continue  # picks keys from the last queries: not causal per query
                                cells.append(dict(task=task, length=L, sample=i, method=m,
                                                  density_target=rho, tail=0, protocol=proto))
                        else:
                            for tail in ([0] if m == "dense" else tails):
                                cells.append(dict(task=task, length=L, sample=i, method=m,
                                                  density_target=rho, tail=tail, protocol=None))
    return cells


def run_sweep(model_name: str, *, tasks: Sequence[str], lengths: Sequence[int], samples: int,
              methods: Sequence[str], densities: Sequence[float], tails: Sequence[int] = (0,),
              protocols: Sequence[str] = ("exact",), haystack: str = "noise",
              haystack_dir: Optional[str] = None, out: str, seed: int = 0,
              num_threads: Optional[int] = None, model=None, tokenizer=None,
              command: str = "", progress: bool = True, log=print) -> List[Dict]:
    """Run the cells of the grid not yet in ``out`` (JSONL), appending each
    as it finishes; returns the rows of this run."""
    from .protocol import Runner, matched_config
    from .tasks import make_sample, prompt_format, score_output
    cells = _plan(tasks, lengths, samples, methods, densities, tails, protocols)
    base = dict(model=model_name, haystack=haystack)
    done = {cell_key(r) for r in read_jsonl(out)}
    todo = [c for c in cells if cell_key({**base, **c}) not in done]
    log(f"[tasks] {len(cells)} cells, {len(cells) - len(todo)} already in {out}, {len(todo)} to run")
    if not todo:
        return []
    if model is None:
        model, tokenizer = load_model(model_name)
    fmt = prompt_format(model_name)
    text = essay_text(haystack_dir, 8 * max(lengths) + 200_000)
    meta = dict(commit=git_commit(), machine=machine(), command=command)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="cell", dynamic_ncols=True)
        except ImportError:
            bar = None
    rows: List[Dict] = []
    samples_memo: Dict[Tuple, object] = {}
    with Runner(model, tokenizer, num_threads=num_threads) as runner, open(out, "a") as fh:
        for c in todo:
            skey = (c["task"], c["length"], c["sample"])
            if skey not in samples_memo:
                samples_memo.clear()
                depth = (c["sample"] + 0.5) / samples
                if c["task"] == "ppl":
                    from .eval import haystack_text
                    src = text if text is not None else haystack_text(None, 8 * c["length"] + 10_000)
                    samples_memo[skey] = ppl_sample(tokenizer, c["length"], seed + c["sample"], src)
                else:
                    samples_memo[skey] = make_sample(c["task"], tokenizer, fmt=fmt,
                                                     length=c["length"], depth=depth,
                                                     seed=seed + c["sample"], haystack=haystack,
                                                     essay_text=text)
            s = samples_memo[skey]
            n_tokens = (len(s[0]) + len(s[1])) if c["task"] == "ppl" else \
                len(s.prompt_ids) + len(s.continuation_ids)
            cfg = (None if c["method"] == "dense" else
                   matched_config(c["method"], c["density_target"], n_tokens))
            row = {**base, **c, "depth": None if c["task"] == "ppl" else s.depth,
                   "tokens": n_tokens}
            if c["task"] == "ppl" or s.scoring == "loss":
                prefix, cont = s if c["task"] == "ppl" else (s.prompt_ids, s.continuation_ids)
                r = runner.causal_nll(prefix, cont, cfg, continuation=c["protocol"])
                row.update(score=float(np.mean(r["nll"])), scoring="loss",
                           scored_tokens=len(cont))
            else:
                r = runner.answer(s.prompt_ids, cfg, max_new_tokens=s.max_new_tokens,
                                  tail=c["tail"])
                row.update(score=score_output(s, r["text"]), scoring=s.scoring,
                           output=r["text"], answers=s.answers)
                ref = s.meta.get("rouge_reference")
                if ref:
                    from .eval import rouge1_f1
                    row["rouge1"] = rouge1_f1(r["text"], ref)
            row.update(density=r["density"], seconds=r["seconds"],
                       config=None if cfg is None else dict(sink=cfg.sink, local=cfg.local,
                                                            density=cfg.density,
                                                            block_size=cfg.block_size),
                       date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
            if bar is not None:
                bar.set_postfix_str(f"{c['task']} {c['length']} {c['method']} "
                                    f"{row['score']:.3g}", refresh=False)
                bar.update(1)
            else:
                log(f"[tasks] {c['task']} L={c['length']} #{c['sample']} {c['method']} "
                    f"rho={c['density_target']} tail={c['tail']}: {row['score']:.3g}")
    if bar is not None:
        bar.close()
    return rows


# ---- the table -------------------------------------------------------------------

def _group_key(r: Dict) -> Tuple:
    return (r["model"], r["task"], r["haystack"], r["length"], r["method"],
            r["density_target"], r["tail"], r["protocol"])


def summarize_sweep(rows: Iterable[Dict]) -> List[Dict]:
    """One entry per (model, task, haystack, length, method, density target,
    tail, protocol): n, mean score with its 95% CI, achieved density, and for
    sparse methods the paired difference from dense on the same samples."""
    rows = list(rows)
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    dense: Dict[Tuple, Dict[int, float]] = {}
    for k, rs in groups.items():
        if k[4] == "dense":
            dense[k[:4]] = {r["sample"]: r["score"] for r in rs}
    out = []
    for k, rs in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        scoring = rs[0]["scoring"]
        scores = [r["score"] for r in rs]
        m, lo, hi = mean_ci(scores, scoring)
        entry = dict(zip(("model", "task", "haystack", "length", "method", "density_target",
                          "tail", "protocol"), k))
        entry.update(scoring=scoring, n=len(rs), mean=m, ci_low=lo, ci_high=hi,
                     density=float(np.mean([r["density"] for r in rs])),
                     tokens=int(np.mean([r["tokens"] for r in rs])),
                     seconds=float(np.mean([r["seconds"] for r in rs])))
        if "rouge1" in rs[0]:
            entry["rouge1_x10"] = 10.0 * float(np.mean([r.get("rouge1", 0.0) for r in rs]))
        ref = dense.get(k[:4])
        if ref is not None and k[4] != "dense":
            diffs = [r["score"] - ref[r["sample"]] for r in rs if r["sample"] in ref]
            if diffs:
                dl, dh = bootstrap_mean(diffs)
                entry.update(diff_vs_dense=float(np.mean(diffs)), diff_ci_low=dl, diff_ci_high=dh)
        out.append(entry)
    return out


def _fmt_cell(e: Dict) -> str:
    if e["scoring"] == "loss":
        return f"{e['mean']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
    return f"{100 * e['mean']:.0f} [{100 * e['ci_low']:.0f}, {100 * e['ci_high']:.0f}]"


def markdown_table(entries: Sequence[Dict]) -> str:
    """Rows: task, length, density target, tail / protocol; columns: methods.
    Exact-match scores in % with their 95% CI; losses in nats per token."""
    methods = [m for m in SWEEP_METHODS if any(e["method"] == m for e in entries)]
    by: Dict[Tuple, Dict[str, Dict]] = defaultdict(dict)
    dense: Dict[Tuple, Dict] = {}
    for e in entries:
        if e["method"] == "dense":
            dense[(e["model"], e["task"], e["haystack"], e["length"])] = e
        else:
            by[(e["model"], e["task"], e["haystack"], e["length"], e["density_target"],
                e["tail"], e["protocol"])][e["method"]] = e
    head = ["model", "task", "L", "density (achieved)", "tail / scoring", "n"] + methods
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for k in sorted(by, key=lambda k: [str(x) for x in k]):
        row = by[k]
        d = dense.get(k[:4])
        achieved = np.mean([e["density"] for e in row.values()])
        how = (f"{k[6]} continuation" if k[6] else f"tail {k[5]}" if k[5] else "no tail")
        n = max(e["n"] for e in list(row.values()) + ([d] if d else []))
        cells = [_fmt_cell(d) if (m == "dense" and d) else _fmt_cell(row[m]) if m in row
                 else "-" for m in methods]
        lines.append("| " + " | ".join([k[0], k[1], str(k[3]),
                                        f"{k[4]:.3f} ({achieved:.3f})", how, str(n)] + cells)
                     + " |")
    return "\n".join(lines)


def plot_heatmaps(rows: Sequence[Dict], folder) -> List[Path]:
    """Length x depth heat map (5 depth bins) per model, task, method, density and tail."""
    from .viz import plot_niah
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for r in rows:
        if r.get("depth") is None or r["scoring"] == "loss":
            continue
        groups[(r["model"], r["task"], r["method"], r["density_target"], r["tail"])].append(r)
    paths = []
    for (model, task, m, rho, tail), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        cells: Dict[Tuple, List[float]] = defaultdict(list)
        for r in rs:
            b = min(4, int(r["depth"] * 5))
            cells[(r["length"], (b + 0.5) / 5)].append(r["score"])
        agg = [{"length": L, "depth": d, "score": 100 * float(np.mean(v))}
               for (L, d), v in cells.items()]
        tag = "dense" if m == "dense" else f"{m}_d{rho:g}" + (f"_tail{tail}" if tail else "")
        fig = plot_niah(agg, title=f"{model} {task}: {tag} (%)", vmax=100)
        p = folder / f"{model}_{task}_{tag}.png"
        fig.savefig(p, dpi=100, bbox_inches="tight")
        import matplotlib.pyplot as plt
        plt.close(fig)
        paths.append(p)
    return paths


# ---- command line ----------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from .tasks import HAYSTACKS, TASKS
    p.add_argument("--model", choices=MODELS, default="smollm2",
                   help="smollm2 (chat prompts, 8K) or gemma3 (completion prompts, 32K)")
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"],
                   choices=list(TASKS) + ["ppl"],
                   help="tasks (ppl: causal perplexity of held-out text, last 256 tokens scored)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096],
                   help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=10,
                   help="samples per cell, their needles spread over the depths (default 10)")
    p.add_argument("--methods", nargs="+", default=list(SWEEP_METHODS), choices=SWEEP_METHODS,
                   help="methods to compare (default: all but oracle; dense is exact attention)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.125],
                   help="achieved densities the sparse methods are matched to (default 0.125)")
    p.add_argument("--tails", type=int, nargs="+", default=[0],
                   help="dense tails to run: the last N prompt tokens attend exactly (0: none)")
    p.add_argument("--protocols", nargs="+", default=["exact"], choices=["exact", "sparse"],
                   help="how copy / ppl continuations are scored after the method's prefill: "
                        "exact attention, or the method with one selection per query")
    p.add_argument("--haystack", choices=HAYSTACKS, default="noise",
                   help="noise sentences or essay text (passkey always uses noise)")
    p.add_argument("--haystack-dir", default=None,
                   help="folder of .txt essays for the essay haystack and ppl "
                        "(default: generated prose)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i uses seed + i (default 0)")
    p.add_argument("--out", required=True, help="JSONL file; finished cells are skipped on restart")
    p.add_argument("--threads", type=int, default=None, help="threads of the C core")
    p.add_argument("--no-progress", action="store_true", help="a log line per cell, no bar")


def run(args: argparse.Namespace) -> int:
    import sys
    for rho in args.densities:
        if not 0.0 < rho <= 1.0:
            args._parser.error(f"--densities: {rho} is not in (0, 1]")
    run_sweep(args.model, tasks=args.tasks, lengths=args.lengths, samples=args.samples,
              methods=args.methods, densities=args.densities, tails=args.tails,
              protocols=args.protocols, haystack=args.haystack, haystack_dir=args.haystack_dir,
              out=args.out, seed=args.seed, num_threads=args.threads,
              command=" ".join(["python -m dhsa"] + sys.argv[1:]),
              progress=not args.no_progress)
    return table_print(args.out)


def table_print(path) -> int:
    entries = summarize_sweep(read_jsonl(path))
    print(markdown_table(entries))
    return 0


def table_add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="sweep JSONL files")
    p.add_argument("--json", default=None, help="write the summary (with meta) to this JSON file")
    p.add_argument("--plots", default=None, help="folder for heat maps (needs matplotlib)")


def table_run(args: argparse.Namespace) -> int:
    rows = [r for f in args.files for r in read_jsonl(f)]
    entries = summarize_sweep(rows)
    print(markdown_table(entries))
    if args.json:
        dates = sorted(r["date_utc"] for r in rows if r.get("date_utc"))
        doc = {"files": [str(f) for f in args.files],
               "commands": sorted({r.get("command", "") for r in rows}),
               "commits": sorted({r.get("commit") or "" for r in rows}),
               "machines": sorted({r.get("machine", "") for r in rows}),
               "date_utc": [dates[0], dates[-1]] if dates else None,
               "entries": entries}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plots:
        try:
            paths = plot_heatmaps(rows, args.plots)
            print(f"wrote {len(paths)} heat maps to {args.plots}")
        except ImportError:
            print("matplotlib not installed: no heat maps (pip install 'dhsa[viz]')")
    return 0
