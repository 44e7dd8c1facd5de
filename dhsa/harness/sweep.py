"""``python -m dhsa tasks``: exact-match and copy tasks per method, at equal density.

A sweep is a grid of cells - (task, length, sample, method, density, dense
tail or continuation protocol) - on one model. Each finished cell is appended
to a JSONL file as one line; a restarted sweep skips the cells already there,
so a long run can be stopped and resumed at any point. Every prompt is built
(tokenizer only) and every config matched before the model loads, so a grid
that cannot run fails at once.

Samples are paired: every method reads the same prompts (sample i has seed
``seed + i`` and depth ``(i + 0.5) / samples``), and each row carries a hash
of its prompt; a cell's identity includes that hash, and the summary pairs a
method's row with the dense row of the same prompt, never by index alone.
``python -m dhsa table FILE.jsonl`` turns a sweep into a table with 95%
confidence intervals (JSON + Markdown) and heat maps.

Methods run at equal achieved density (:func:`~dhsa.harness.protocol.matched_config`,
matched at the length the method prefills); the density each row reached,
measured by the patch over the layers that ran sparse, is stored with it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..config import DECODE_SCORES
from .intervals import mcnemar_exact_p, mean_ci, paired_ci
from .models import MODELS, load_model, load_tokenizer

__all__ = ["SWEEP_METHODS", "PPL_SCORED", "cell_key", "markdown_table", "plot_heatmaps",
           "ppl_sample", "read_jsonl", "run_sweep", "summarize_sweep", "worse_than_dense"]

SWEEP_METHODS = ("dense", "dhsa", "dhsa_max", "block_topk", "streaming", "vertical_slash")
#: tokens of a perplexity sample that are scored (the rest is the prefix)
PPL_SCORED = 256
#: fields that say what a cell ran (the rest of a row is what it measured)
KEY_FIELDS = ("model", "task", "haystack", "length", "sample", "method", "density_target",
              "tail", "protocol", "prompt_hash", "decode_budget", "decode_reuse",
              "decode_score")
#: prompt tokens (the question) a sparse-decode retrieval cell feeds one step
#: at a time after the prefill, as Quest evaluates
STEP_TAIL = 32


# ---- rows on disk ----------------------------------------------------------------

def read_jsonl(path) -> List[Dict]:
    """The rows of a sweep file; a torn line (a run killed while writing) is
    skipped and counted in a warning on stderr."""
    rows, torn = [], 0
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    if torn:
        print(f"[tasks] {path}: skipped {torn} unreadable line(s)", file=sys.stderr)
    return rows


def cell_key(row: Dict) -> str:
    """The identity of a cell: what it ran, not what it measured."""
    return json.dumps([row.get(f) for f in KEY_FIELDS])


def _open_for_append(path: Path):
    """The file opened for appending, after a newline if a killed run left a
    torn last line (so the next row starts a line of its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a")


# ---- samples ---------------------------------------------------------------------

def ppl_sample(tokenizer, length: int, seed: int, text: str) -> Tuple[List[int], List[int]]:
    """(prefix, continuation): ``length`` tokens of ``text`` (BOS first where
    the tokenizer has one) from a seeded offset, the last PPL_SCORED scored."""
    if length <= PPL_SCORED + 1:
        raise ValueError(f"a perplexity sample needs more than {PPL_SCORED + 1} tokens, "
                         f"got length {length}")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < length:
        ids = ids * (length // max(1, len(ids)) + 1)
    start = int(np.random.default_rng(seed).integers(0, max(1, len(ids) - length)))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seg = bos + ids[start:start + length - len(bos)]
    return seg[:-PPL_SCORED], seg[-PPL_SCORED:]


@dataclass
class _Prompt:
    """One prompt of the grid, shared by every method of its cell."""
    prefix: List[int]        # what the method prefills (a retrieval prompt: all of it)
    continuation: List[int]  # scored by loss after the prefix (empty for retrieval)
    sample: object           # the tasks.Sample, None for ppl
    haystack: str            # the haystack the prompt really uses
    depth: Optional[float]
    hash: str


def _build_prompt(task: str, tokenizer, fmt: str, length: int, i: int, samples: int, seed: int,
                  haystack: str, text: Optional[str]) -> _Prompt:
    from .eval import haystack_text
    from .tasks import make_sample
    if task == "ppl":
        src = text if text is not None else haystack_text(None, 8 * length + 10_000)
        prefix, cont = ppl_sample(tokenizer, length, seed + i, src)
        s, hay, depth = None, "essay", None
    else:
        s = make_sample(task, tokenizer, fmt=fmt, length=length, depth=(i + 0.5) / samples,
                        seed=seed + i, haystack=haystack, essay_text=text)
        prefix, cont = list(s.prompt_ids), list(s.continuation_ids)
        hay, depth = s.meta.get("haystack", haystack), s.depth
    digest = hashlib.sha1(json.dumps([prefix, cont]).encode()).hexdigest()[:16]
    return _Prompt(prefix, cont, s, hay, depth, digest)


# ---- the sweep -------------------------------------------------------------------

def _plan(tasks, lengths, samples, methods, densities, tails, protocols,
          decode_budgets=(), decode_reuses=(1,), decode_scores=("mean",)) -> List[Dict]:
    """Every cell of the grid, in run order: by length, task, sample, then methods
    (so that one prompt serves all its methods). Each decode budget adds a
    cell per method and density with protocol "decode": the method's prefill,
    then sparse decode (dense: an exact prefill, then sparse decode), one per
    decode_reuse (recorded as None for 1, the default) and decode_score
    (None for "mean", the default)."""
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
                        for b in decode_budgets:
                            if m == "vertical_slash":
                                continue  # its keys come from the last queries of a prefill
                            for ru in decode_reuses:
                                for sc in decode_scores:
                                    cells.append(dict(
                                        task=task, length=L, sample=i, method=m,
                                        density_target=rho, tail=0, protocol="decode",
                                        decode_budget=int(b),
                                        decode_reuse=int(ru) if ru > 1 else None,
                                        decode_score=sc if sc != "mean" else None))
    return cells


def _prefilled(cell: Dict, p: _Prompt) -> int:
    """Tokens the method prefills in a cell: the prompt (less a dense tail)."""
    return len(p.prefix) - (cell["tail"] or 0)


def _run_cell(runner, cell: Dict, p: _Prompt, cfg) -> Dict:
    """What one cell measured: score, density, time (and the answer for retrieval)."""
    from .tasks import score_output
    budget = cell.get("decode_budget")
    reuse = cell.get("decode_reuse") or 1
    dscore = cell.get("decode_score") or "mean"
    if p.sample is None or p.sample.scoring == "loss":
        r = runner.causal_nll(p.prefix, p.continuation, cfg, continuation=cell["protocol"],
                              decode_budget=budget, decode_reuse=reuse, decode_score=dscore)
        out = dict(score=float(np.mean(r["nll"])), scoring="loss",
                   scored_tokens=len(p.continuation))
        if "continuation_density" in r:
            out["continuation_density"] = r["continuation_density"]
    else:
        s = p.sample
        steps = min(STEP_TAIL, len(s.prompt_ids) // 2) if budget else 0
        r = runner.answer(s.prompt_ids, cfg, max_new_tokens=s.max_new_tokens, tail=cell["tail"],
                          decode_budget=budget, step_tail=steps, decode_reuse=reuse,
                          decode_score=dscore)
        out = dict(score=score_output(s, r["text"]), scoring=s.scoring, output=r["text"],
                   answers=s.answers)
        ref = s.meta.get("rouge_reference")
        if ref:
            from .eval import rouge1_f1
            out["rouge1"] = rouge1_f1(r["text"], ref)
    out.update(density=r["density"], seconds=r["seconds"])
    if budget:
        out.update(decode_density=r["decode_density"], decode_rebuilds=r["decode_rebuilds"])
    return out


def run_sweep(model_name: str, *, tasks: Sequence[str], lengths: Sequence[int], samples: int,
              methods: Sequence[str], densities: Sequence[float], tails: Sequence[int] = (0,),
              protocols: Sequence[str] = ("exact",), haystack: str = "noise",
              haystack_dir: Optional[str] = None, out: str, seed: int = 0,
              decode_budgets: Sequence[int] = (), decode_reuses: Sequence[int] = (1,),
              decode_scores: Sequence[str] = ("mean",),
              num_threads: Optional[int] = None, model=None, tokenizer=None,
              command: str = "", progress: bool = True, log=print) -> List[Dict]:
    """Run the cells of the grid not yet in ``out`` (JSONL), appending each
    as it finishes; returns the rows of this run. Raises ValueError (before
    loading the model) when a cell cannot run: a density out of reach at its
    length, a prompt too short for its task, a tail as long as the prompt."""
    from .eval import haystack_text
    from .protocol import matched_config
    from .provenance import git_state, machine
    from .tasks import prompt_format
    if model_name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {model_name!r}")
    if any(t < 0 for t in tails):
        raise ValueError(f"tails must be >= 0, got {list(tails)}")
    tok = tokenizer if tokenizer is not None else load_tokenizer(model_name)
    fmt = prompt_format(model_name)
    text = haystack_text(haystack_dir, 8 * max(lengths) + 200_000) if haystack_dir else None
    prompts: Dict[Tuple, _Prompt] = {}
    todo, configs = [], {}
    done = {cell_key(r) for r in read_jsonl(out)}
    if any(b < 1 for b in decode_budgets):
        raise ValueError(f"decode budgets must be >= 1, got {list(decode_budgets)}")
    if any(r < 1 for r in decode_reuses):
        raise ValueError(f"decode reuses must be >= 1, got {list(decode_reuses)}")
    if any(sc not in DECODE_SCORES for sc in decode_scores):
        raise ValueError(f"decode scores must be among {DECODE_SCORES}, got {list(decode_scores)}")
    cells = _plan(tasks, lengths, samples, methods, densities, tails, protocols, decode_budgets,
                  decode_reuses, decode_scores)
    for c in cells:  # every prompt and config first: a grid that cannot run fails now
        pk = (c["task"], c["length"], c["sample"])
        if pk not in prompts:
            prompts[pk] = _build_prompt(c["task"], tok, fmt, c["length"], c["sample"], samples,
                                        seed, haystack, text)
        p = prompts[pk]
        if c["tail"] and c["tail"] >= len(p.prefix):
            raise ValueError(f"--tails {c['tail']} is not shorter than the {c['task']} prompt "
                             f"({len(p.prefix)} tokens)")
        ck = (c["method"], c["density_target"], _prefilled(c, p))
        if ck not in configs:
            configs[ck] = matched_config(c["method"], c["density_target"], ck[2]) \
                if c["method"] != "dense" else None
        row = {"model": model_name, "decode_budget": None, "decode_reuse": None,
               "decode_score": None, **c,
               "haystack": p.haystack,
               "prompt_hash": p.hash}
        if cell_key(row) not in done:
            todo.append((row, p, configs[ck]))
    log(f"[tasks] {len(cells)} cells, {len(cells) - len(todo)} already in {out}, "
        f"{len(todo)} to run")
    if not todo:
        return []
    if model is None:
        model, tok = load_model(model_name)
    from .protocol import Runner
    meta = dict(machine=machine(), command=command, seed_base=seed, samples=samples,
                **git_state())
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="cell", dynamic_ncols=True)
        except ImportError:
            bar = None
    rows: List[Dict] = []
    with Runner(model, tok, num_threads=num_threads) as runner, \
            _open_for_append(Path(out)) as fh:
        for row, p, cfg in todo:
            row = {**row, "depth": p.depth, "tokens": len(p.prefix) + len(p.continuation),
                   **_run_cell(runner, row, p, cfg),
                   "config": None if cfg is None else dict(sink=cfg.sink, local=cfg.local,
                                                           density=cfg.density,
                                                           block_size=cfg.block_size),
                   "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
            msg = (f"{row['task']} {row['length']} #{row['sample']} {row['method']} "
                   f"rho={row['density_target']} tail={row['tail']} {row['protocol'] or ''}: "
                   f"{row['score']:.3g}")
            if bar is not None:
                bar.set_postfix_str(msg, refresh=False)
                bar.update(1)
            else:
                log("[tasks] " + msg)
    if bar is not None:
        bar.close()
    return rows


# ---- the table -------------------------------------------------------------------

GROUP_FIELDS = ("model", "task", "haystack", "length", "method", "density_target", "tail",
                "protocol", "decode_budget", "decode_reuse", "decode_score")


def _depth_bin(depth: float) -> int:
    """Which fifth of the context a needle depth falls in (0..4)."""
    return min(4, int(depth * 5))


def _paired(rs: List[Dict], dense: Dict[str, float], scoring: str) -> Dict:
    """{n_paired, diff_vs_dense, diff_ci_low, diff_ci_high (and for 0/1 scores
    mcnemar_p)} of rows against the dense rows of the same prompts ({} without
    any pair)."""
    pairs = [(r["score"], dense[r["prompt_hash"]]) for r in rs if r.get("prompt_hash") in dense]
    if not pairs:
        return {}
    x, y = zip(*pairs)
    d, lo, hi = paired_ci(x, y, scoring)
    out = {"n_paired": len(pairs), "diff_vs_dense": d, "diff_ci_low": lo, "diff_ci_high": hi}
    if scoring == "all":
        out["mcnemar_p"] = mcnemar_exact_p(x, y)
    out["worse_than_dense"] = worse_than_dense({"scoring": scoring, **out})
    return out


def _dedupe(rows: Iterable[Dict]) -> List[Dict]:
    """One row per cell; ValueError when two copies of a cell disagree."""
    seen: Dict[str, Dict] = {}
    for r in rows:
        k = cell_key(r)
        if k in seen:
            if seen[k]["score"] != r["score"]:
                raise ValueError(f"two different results for one cell: {k}")
            continue
        seen[k] = r
    return list(seen.values())


def summarize_sweep(rows: Iterable[Dict]) -> List[Dict]:
    """One entry per (model, task, haystack, length, method, density target,
    tail, protocol): n, mean score with its 95% CI, achieved density, the
    paired difference from dense on the same prompts (Newcombe's interval for
    0/1 scores, a bootstrap otherwise), and for needle tasks the scores per
    fifth of depth and over needles in the middle (25-75%)."""
    rows = _dedupe(rows)
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(f) for f in GROUP_FIELDS)].append(r)
    dense: Dict[Tuple, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["method"] == "dense" and r.get("prompt_hash") and r.get("protocol") != "decode":
            dense[(r["model"], r["task"], r["haystack"], r["length"])][r["prompt_hash"]] = r["score"]
    out = []
    for k, rs in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        scoring = rs[0]["scoring"]
        m, lo, hi = mean_ci([r["score"] for r in rs], scoring)
        dens = [r["density"] for r in rs if r.get("density") is not None]
        entry = dict(zip(GROUP_FIELDS, k))
        entry.update(scoring=scoring, n=len(rs), mean=m, ci_low=lo, ci_high=hi,
                     density=float(np.mean(dens)) if dens else None,
                     tokens=int(np.mean([r["tokens"] for r in rs])),
                     seconds=float(np.mean([r["seconds"] for r in rs])))
        cont = [r["continuation_density"] for r in rs if r.get("continuation_density") is not None]
        if cont:
            entry["continuation_density"] = float(np.mean(cont))
        if "rouge1" in rs[0]:
            entry["rouge1_x10"] = 10.0 * float(np.mean([r.get("rouge1", 0.0) for r in rs]))
        decode_density = [r["decode_density"] for r in rs if r.get("decode_density") is not None]
        if decode_density:
            entry["decode_density"] = float(np.mean(decode_density))
        # the reference is exact dense attention (so dense under sparse decode has one)
        ref = dense.get(k[:4], {}) if (k[4] != "dense" or k[7] == "decode") else {}
        entry.update(_paired(rs, ref, scoring))
        if rs[0].get("depth") is not None:
            entry["by_depth"] = []
            for b in range(5):
                v = [r["score"] for r in rs if _depth_bin(r["depth"]) == b]
                entry["by_depth"].append({"depths": [b / 5, (b + 1) / 5], "n": len(v),
                                          "mean": float(np.mean(v)) if v else None})
            mid = [r for r in rs if 0.25 <= r["depth"] < 0.75]  # needles in the middle
            if mid:
                mm, ml, mh = mean_ci([r["score"] for r in mid], scoring)
                entry["middle"] = {"n": len(mid), "mean": mm, "ci_low": ml, "ci_high": mh,
                                   **_paired(mid, ref, scoring)}
        out.append(entry)
    return out


def decode_steps_exact(entries: Iterable[Dict]) -> bool:
    """Whether summary entries of a decode row never fell short of their
    budget (decode density 1): exact attention through decode steps."""
    steps = [e for e in entries if e.get("protocol") == "decode"]
    return bool(steps) and all((e.get("decode_density") or 0.0) >= 1.0 for e in steps)


def _fmt_cell(e: Dict, target: Optional[float], n: int) -> str:
    """"mean [low, high]" (% for exact match, nats for losses), ↓ when worse than
    dense (:func:`worse_than_dense`), flagged with its own n or density where
    they differ from the row's."""
    if e["scoring"] == "loss":
        txt = f"{e['mean']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
    else:
        txt = f"{100 * e['mean']:.0f} [{100 * e['ci_low']:.0f}, {100 * e['ci_high']:.0f}]"
    notes = []
    if "rouge1_x10" in e:  # the paper's NIAH score, beside the retrieval
        notes.append(f"ROUGE-1 x 10: {e['rouge1_x10']:.1f}")
    if e["n"] != n:
        notes.append(f"n={e['n']}")
    if (e["method"] != "dense" and target is not None and e.get("density") is not None
            and abs(e["density"] - target) > 0.01):
        notes.append(f"density {e['density']:.3f}")
    return txt + (" ↓" if worse_than_dense(e) else "") + (f" ({', '.join(notes)})" if notes else "")


def worse_than_dense(e: Dict) -> bool:
    """Whether a summary entry is worse than dense on the same prompts at the 5%
    level: exact-match scores lower with the exact McNemar p < 0.05; shares lower
    and losses higher beyond the 95% bootstrap interval of the paired difference."""
    if e.get("diff_ci_high") is None:
        return False
    if e["scoring"] == "all":
        return e["diff_vs_dense"] < 0 and e.get("mcnemar_p", 1.0) < 0.05
    return e["diff_ci_low"] > 0 if e["scoring"] == "loss" else e["diff_ci_high"] < 0


def markdown_table(entries: Sequence[Dict]) -> str:
    """Rows: model, task, length, density target, tail / protocol; columns:
    methods. Exact-match scores in % with their 95% CI; losses in nats per
    token; ↓ marks a method worse than dense (:func:`worse_than_dense`); a cell whose n or density differs from the row's says so."""
    methods = [m for m in SWEEP_METHODS if any(e["method"] == m for e in entries)]
    by: Dict[Tuple, Dict[str, Dict]] = defaultdict(dict)
    dense: Dict[Tuple, Dict] = {}
    for e in entries:
        base = (e["model"], e["task"], e["haystack"], e["length"])
        if e["method"] == "dense" and e["protocol"] != "decode":
            dense[base] = e
        else:  # dense under sparse decode: a row of its own, beside the methods'
            by[base + (e["density_target"], e["tail"], e["protocol"],
                       e.get("decode_budget"), e.get("decode_reuse"),
                       e.get("decode_score"))][e["method"]] = e
    for key in [k for k in by if k[6] == "decode"]:  # decode rows carry every density's dense
        for k2 in by:
            if k2[:4] == key[:4] and k2[6] == "decode" and k2[7:] == key[7:] and k2[4] is None:
                by[key].setdefault("dense", by[k2]["dense"])
    for base in dense:  # a dense-only sweep still gets its rows
        if not any(k[:4] == base for k in by):
            by[base + (None, 0, None, None, None, None)] = {}
    head = ["model", "task", "L", "density target", "tail / scoring", "n"] + methods
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for k in sorted(by, key=lambda k: (k[0], k[1], k[2], k[3], k[4] or 0, k[5], str(k[6]),
                                       k[7] or 0, k[8] or 1, k[9] or "")):
        if k[6] == "decode" and k[4] is None and any(
                k2[:4] == k[:4] and k2[6] == "decode" and k2[7:] == k[7:] and k2[4] is not None
                for k2 in by):
            continue  # shown in the decode rows of the densities
        row = dict(by[k])
        if k[:4] in dense and "dense" not in row:
            row["dense"] = dense[k[:4]]
        n = max(e["n"] for e in row.values())
        how = (f"decode steps, budget {k[7]} >= context: exact"
               if k[6] == "decode" and decode_steps_exact(row.values())
               else f"sparse decode {k[7]}" + (f", reuse {k[8]}" if k[8] else "")
               + (f", {k[9]} scores" if k[9] else "")
               if k[6] == "decode" else f"{k[6]} continuation" if k[6]
               else f"tail {k[5]}" if k[5] else "no tail")
        cells = [_fmt_cell(row[m], k[4], n) if m in row else "-" for m in methods]
        rho = "-" if k[4] is None else f"{k[4]:.3f}"
        lines.append("| " + " | ".join([k[0], k[1], str(k[3]), rho, how, str(n)] + cells) + " |")
    return "\n".join(lines)


def plot_heatmaps(rows: Sequence[Dict], folder) -> List[Path]:
    """Length x depth heat map (fifths of depth) per model, task, haystack,
    method, density and tail of the prefill methods (sparse-decode cells
    stay in the tables: their dense is not exact attention); PNG paths."""
    from .viz import plot_niah
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for r in _dedupe(rows):
        if (r.get("depth") is not None and r["scoring"] != "loss"
                and r.get("protocol") != "decode"):
            groups[(r["model"], r["task"], r["haystack"], r["method"], r["density_target"],
                    r["tail"])].append(r)
    paths = []
    for (model, task, hay, m, rho, tail), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        cells: Dict[Tuple, List[float]] = defaultdict(list)
        for r in rs:
            cells[(r["length"], (_depth_bin(r["depth"]) + 0.5) / 5)].append(r["score"])
        agg = [{"length": L, "depth": d, "score": 100 * float(np.mean(v))}
               for (L, d), v in cells.items()]
        tag = "dense" if m == "dense" else f"{m}_d{rho:g}" + (f"_tail{tail}" if tail else "")
        fig = plot_niah(agg, title=f"{model} {task} ({hay}): {tag}", vmax=100,
                        label="exact match (%)")
        p = folder / f"{model}_{task}_{hay}_{tag}.png"
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


# ---- command line ----------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``python -m dhsa tasks``."""
    from .tasks import HAYSTACKS, TASKS
    p.add_argument("--model", choices=tuple(MODELS), default="smollm2",
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
    p.add_argument("--decode-budgets", type=int, nargs="+", default=[],
                   help="also run every method with sparse decode of this many keys per step "
                        "(retrieval: the question's last %d prompt tokens and the answer through "
                        "decode steps; copy / ppl: every scored token one step) - dense gets an "
                        "exact prefill and sparse decode" % STEP_TAIL)
    p.add_argument("--decode-reuses", type=int, nargs="+", default=[1],
                   help="DHSAConfig.decode_reuse values of the decode cells: a step's chunk "
                        "scores serve this many steps (default 1: every step scores)")
    p.add_argument("--decode-scores", nargs="+", default=["mean"], choices=list(DECODE_SCORES),
                   help="DHSAConfig.decode_score values of the decode cells: how a step scores "
                        "closed chunks (default: mean)")
    p.add_argument("--haystack", choices=HAYSTACKS, default="noise",
                   help="noise sentences or essay text (passkey always uses noise)")
    p.add_argument("--haystack-dir", default=None,
                   help="folder of .txt essays for the essay haystack and ppl "
                        "(default: generated prose)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    p.add_argument("--out", required=True, help="JSONL file; finished cells are skipped on restart")
    p.add_argument("--threads", type=int, default=None, help="threads of the C core")
    p.add_argument("--no-progress", action="store_true", help="a log line per cell, no bar")


def run(args: argparse.Namespace) -> int:
    """``python -m dhsa tasks``: run the grid, then print its table."""
    for rho in args.densities:
        if not 0.0 < rho <= 1.0:
            args._parser.error(f"--densities: {rho} is not in (0, 1]")
    if args.samples < 1:
        args._parser.error(f"--samples must be >= 1, got {args.samples}")
    try:
        run_sweep(args.model, tasks=args.tasks, lengths=args.lengths, samples=args.samples,
                  methods=args.methods, densities=args.densities, tails=args.tails,
                  protocols=args.protocols, haystack=args.haystack,
                  haystack_dir=args.haystack_dir, out=args.out, seed=args.seed,
                  decode_budgets=args.decode_budgets, decode_reuses=args.decode_reuses,
                  decode_scores=args.decode_scores,
                  num_threads=args.threads, command=" ".join(["python -m dhsa"] + sys.argv[1:]),
                  progress=not args.no_progress)
    except ValueError as exc:
        args._parser.error(str(exc))
    print(markdown_table(summarize_sweep(read_jsonl(args.out))))
    return 0


def table_add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``python -m dhsa table``."""
    p.add_argument("files", nargs="+", help="sweep JSONL files")
    p.add_argument("--json", default=None, help="write the summary (with meta) to this JSON file")
    p.add_argument("--plots", default=None, help="folder for heat maps (needs matplotlib)")


def table_run(args: argparse.Namespace) -> int:
    """``python -m dhsa table``: the summary of sweep files, as Markdown, JSON, PNGs."""
    rows = [r for f in args.files for r in read_jsonl(f)]
    entries = summarize_sweep(rows)
    print(markdown_table(entries))
    if args.json:
        dates = sorted(r["date_utc"] for r in rows if r.get("date_utc"))
        doc = {"files": [str(f) for f in args.files],
               "commands": sorted({r.get("command", "") for r in rows}),
               "commits": sorted({r.get("commit") or "" for r in rows}),
               "core_sources_modified": any(r.get("core_sources_modified") for r in rows),
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
