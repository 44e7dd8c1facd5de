"""Accuracy of DHSA and the baselines on a real model: NIAH, perplexity, recall.

Every method runs through the same patched attention and the same sparse
kernel (``DHSAConfig.method``), so the numbers compare like for like.
Command line: ``python -m dhsa niah | ppl | recall`` (``--help`` on each).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..config import DHSAConfig
from .cli import add_config_options, config_changes
from .models import MODELS

__all__ = ["NEEDLE", "QUESTION", "ANSWER_PREFIX", "rouge1_f1", "niah_score", "niah_retrieved",
           "haystack_text",
           "build_niah_prompt", "method_config", "run_niah", "run_ppl", "run_recall"]

NEEDLE = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
          "on a sunny day.")
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = "The best thing to do in San Francisco is:"
METHODS = ("dense", "dhsa", "block_topk", "streaming", "vertical_slash", "oracle")

_GENERATED = [
    "The committee met on a Tuesday to discuss the harvest and the price of grain.",
    "A river ran along the edge of the town, slow and brown after the spring rains.",
    "Most of the shops closed early in winter, when the light went before five.",
    "The old library kept its maps in long drawers that smelled of cedar and dust.",
    "Engineers argued for weeks about where the new bridge should cross the valley.",
    "In the evenings the square filled with people walking dogs and eating ice cream.",
    "The school taught Latin until the year the last teacher of it retired.",
    "Trains to the coast left every hour and were always late on Fridays.",
    "Her grandfather had built the house himself, one room at a time, over twenty years.",
    "The newspaper printed the tide tables every morning beside the weather.",
    "Nobody remembered why the clock on the church tower had stopped at ten past three.",
    "The bakery sold out of rye bread by nine, so regulars came early.",
]


def _words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_f1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1: unigram overlap (lower-cased alphanumeric words, with counts)."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return 0.0
    from collections import Counter
    overlap = sum((Counter(p) & Counter(r)).values())
    if overlap == 0:
        return 0.0
    prec, rec = overlap / len(p), overlap / len(r)
    return 2 * prec * rec / (prec + rec)


def niah_score(answer: str, needle: str = NEEDLE) -> float:
    """The NIAH score of an answer, 0-10: 10 x ROUGE-1 F1 against the needle."""
    return 10.0 * rouge1_f1(answer, needle)


def niah_retrieved(answer: str) -> bool:
    """Whether an answer holds the needle's key facts: "sandwich" and "Dolores Park"."""
    a = " ".join(_words(answer))
    return "sandwich" in a.split() and "dolores park" in a


def haystack_text(haystack_dir: Optional[str] = None, n_chars: int = 200_000) -> str:
    """The PG essays of ``haystack_dir`` (all *.txt, sorted), or generated
    filler sentences when no directory is given."""
    if haystack_dir:
        files = sorted(Path(haystack_dir).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files in haystack directory {haystack_dir}")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        while len(text) < n_chars:
            text += "\n\n" + text
        return text[:n_chars]
    rng = np.random.default_rng(0)
    parts, size = [], 0
    while size < n_chars:
        s = _GENERATED[int(rng.integers(len(_GENERATED)))]
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts)


def build_niah_prompt(tokenizer, haystack: str, context: int, depth: float, fmt: str = "chat"):
    """input_ids (1, <= context): "Read the document and answer the question.
    Document: <haystack with the needle at ``depth`` (0-1), cut at a sentence
    end> Question: <QUESTION>" - in the tokenizer's chat format as a user
    turn followed by the assistant turn opened with ANSWER_PREFIX
    (``fmt="chat"``), or as plain text after BOS ending in ANSWER_PREFIX
    (``fmt="completion"``, for base models).
    Returns (input_ids, needle token index)."""
    import torch

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if fmt not in ("chat", "completion"):
        raise ValueError(f"fmt must be 'chat' or 'completion', got {fmt!r}")
    body = ("Read the document and answer the question.\n\nDocument:\n<<CTX>>\n\nQuestion: "
            + QUESTION)
    if fmt == "chat":
        head = tokenizer.apply_chat_template([{"role": "user", "content": body}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        head = (tokenizer.bos_token or "") + body + "\nAnswer: "
    pre, post = head.split("<<CTX>>")
    pre_ids = tokenizer(pre, add_special_tokens=False).input_ids
    tail_ids = tokenizer(post, add_special_tokens=False).input_ids
    ans_ids = tokenizer(ANSWER_PREFIX, add_special_tokens=False).input_ids
    needle_ids = tokenizer(" " + NEEDLE + " ", add_special_tokens=False).input_ids
    room = context - len(pre_ids) - len(tail_ids) - len(ans_ids) - len(needle_ids)
    if room < 16:
        raise ValueError(f"context {context} is too short for the NIAH prompt")
    hay = tokenizer(haystack, add_special_tokens=False).input_ids[:room]
    cut = int(round(depth * len(hay)))
    # move the cut back to the end of a sentence (a token ending in '.')
    while cut > 0 and not tokenizer.decode(hay[cut - 1:cut]).rstrip().endswith("."):
        cut -= 1
    ids = pre_ids + hay[:cut] + needle_ids + hay[cut:] + tail_ids + ans_ids
    return torch.tensor([ids]), len(pre_ids) + cut


def method_config(method: str, budget: int, base: Optional[DHSAConfig] = None) -> Optional[DHSAConfig]:
    """DHSAConfig of a method at a budget (None for dense)."""
    if method == "dense":
        return None
    base = base or DHSAConfig()
    return base.replace(method=method, budget=budget)


def _generate(model, ids, max_new_tokens: int) -> List[int]:
    import torch
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=getattr(model.config, "eos_token_id", None))
    return out[0, ids.shape[1]:].tolist()


def _with_method(model, method: str, budget: int, base: Optional[DHSAConfig], fn,
                 dense_layers: int = 0, **patch_kw):
    """Run fn() with the model patched for ``method`` (dense: unpatched)."""
    from .. import patching
    cfg = method_config(method, budget, base)
    if cfg is None:
        return fn(), None
    handle = patching.patch(model, cfg, dense_layers=range(dense_layers), **patch_kw)
    try:
        # density over the layers that ran sparse (Gemma-3's sliding layers run exact)
        d = handle.mean_density(include_dense=False)
        return fn(), (d if d is not None else handle.mean_density())
    finally:
        patching.unpatch(model)


def run_niah(model, tokenizer, *, methods: Sequence[str], lengths: Sequence[int],
             depths: Sequence[float], budget: int, haystack_dir: Optional[str] = None,
             base: Optional[DHSAConfig] = None, max_new_tokens: int = 24,
             oracle_max_len: int = 2048, dense_layers: int = 0,
             num_threads: Optional[int] = None, fmt: str = "chat", log=print) -> List[Dict]:
    """Every (method, length, depth) cell: answer, ROUGE score 0-10, whether
    the answer retrieved the needle's key facts ("sandwich" and "Dolores
    Park"), density, time. ``num_threads``: threads of the C core (default:
    all cores); ``fmt``: "chat" or "completion" prompts."""
    hay = haystack_text(haystack_dir, n_chars=8 * max(lengths) + 10_000)
    cells = []
    for L in lengths:
        for d in depths:
            ids, needle_at = build_niah_prompt(tokenizer, hay, L, d, fmt)
            for m in methods:
                if m == "oracle" and ids.shape[1] > oracle_max_len:
                    continue
                t = time.perf_counter()
                toks, density = _with_method(model, m, budget, base,
                                             lambda: _generate(model, ids, max_new_tokens),
                                             dense_layers=dense_layers, num_threads=num_threads)
                dt = time.perf_counter() - t
                answer = " ".join(tokenizer.decode(toks, skip_special_tokens=True).split())
                cell = {"method": m, "length": int(ids.shape[1]), "target_length": L,
                        "depth": d, "needle_token": needle_at, "answer": answer,
                        "score": niah_score(answer), "retrieved": niah_retrieved(answer),
                        "density": density, "seconds": dt,
                        "budget": budget}
                cells.append(cell)
                log(f"[niah] L={L:>5} depth={d:4.2f} {m:>14}: score {cell['score']:4.1f} "
                    f"density {density if density is not None else 1:.3f} {dt:5.1f}s | {answer[:70]}")
    return cells


def run_ppl(model, tokenizer, *, methods: Sequence[str], budgets: Sequence[int], length: int,
            haystack_dir: Optional[str] = None, base: Optional[DHSAConfig] = None,
            dense_layers: int = 0, num_threads: Optional[int] = None, scored: int = 256,
            protocol: str = "causal", log=print) -> List[Dict]:
    """Perplexity of the last ``scored`` of ``length`` tokens of long text per
    method and budget. ``protocol="causal"`` (default): the first length -
    scored tokens are prefilled with the method, then each scored token sees
    only its past through exact attention over that cache (what exact decode
    steps compute); ``"leaky"``: one forward over everything with the method,
    the last ``scored`` positions scored - block selection lets a later
    token's query shape what an earlier position sees, so it is optimistic.
    ``num_threads``: threads of the C core (default: all cores)."""
    from .protocol import Runner
    if protocol not in ("causal", "leaky"):
        raise ValueError(f"protocol must be 'causal' or 'leaky', got {protocol!r}")
    if not 0 < scored < length:
        raise ValueError(f"scored ({scored}) must be in (0, length={length})")
    text = haystack_text(haystack_dir, n_chars=8 * length + 10_000)
    ids = tokenizer(text).input_ids[:length]
    rows = []
    with Runner(model, tokenizer, num_threads=num_threads,
                dense_layers=range(dense_layers)) as runner:
        for m in methods:
            for b in (budgets if m != "dense" else [None]):
                if m == "oracle" and len(ids) > 2048:
                    continue
                cfg = method_config(m, b or 0, base)
                t = time.perf_counter()
                if protocol == "causal":
                    r = runner.causal_nll(ids[:-scored], ids[-scored:], cfg)
                else:
                    r = runner.leaky_nll(ids, cfg)
                    r["nll"] = r["nll"][-scored:]
                loss = float(np.mean(r["nll"]))
                if r["density"] is None:  # no layer ran sparse: the budget covers every key
                    r["density"] = 1.0
                rows.append({"method": m, "budget": b, "length": len(ids), "scored": scored,
                             "protocol": protocol, "nll": loss, "ppl": math.exp(loss),
                             "density": r["density"], "seconds": time.perf_counter() - t})
                log(f"[ppl] {m:>14} budget {b}: ppl {math.exp(loss):.3f} density "
                    f"{r['density']:.3f} ({protocol})")
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    for r in rows:
        r["delta_ppl_pct"] = 100.0 * (r["ppl"] / dense[0] - 1.0) if dense else None
    return rows


def run_recall(model, tokenizer, *, methods: Sequence[str], budgets: Sequence[int],
               length: int, haystack_dir: Optional[str] = None,
               base: Optional[DHSAConfig] = None, layers: Optional[Sequence[int]] = None,
               num_threads: Optional[int] = None, log=print) -> List[Dict]:
    """Attention-mass recall and output error per method, budget and layer
    on real Q/K/V (captured once). ``num_threads``: threads of the C core."""
    from ..analysis import capture_qkv, dense_probabilities, output_error, recall_from_probabilities
    from ..api import predict_selection
    text = haystack_text(haystack_dir, n_chars=8 * length + 10_000)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    cap = capture_qkv(model, ids, layers=layers)
    rows = []
    for li in sorted(cap):
        q, k, v, kw = cap[li]
        if kw.get("sliding_window"):  # the model never attends past its window there
            log(f"[recall] layer {li} skipped: sliding window of {kw['sliding_window']} keys")
            continue
        P = dense_probabilities(q, k, scale=kw.get("scaling"), softcap=kw.get("softcap"))
        for m in methods:
            if m == "dense":
                continue
            for b in budgets:
                cfg = method_config(m, b, base)
                sel = predict_selection(q, k, cfg, scale=kw.get("scaling"),
                                        softcap=kw.get("softcap"), num_threads=num_threads)
                rec = recall_from_probabilities(P, sel)
                err = output_error(q, k, v, sel, scale=kw.get("scaling"),
                                   softcap=kw.get("softcap"), num_threads=num_threads)
                rows.append({"layer": li, "method": m, "budget": b, "length": int(ids.shape[1]),
                             "recall": float(rec.mean()), "recall_min_head": float(rec.min()),
                             "output_error": float(err.mean()), "density": sel.density})
        log(f"[recall] layer {li} done")
    return rows


# ---- command line ----------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=tuple(MODELS), default="smollm2",
                   help="smollm2 (chat prompts, 8K context) or gemma3 (base model, completion "
                        "prompts, 32K context)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to compare (default: all; dense is exact attention)")
    p.add_argument("--haystack-dir", default=None,
                   help="directory of .txt essays (default: generated filler text)")
    p.add_argument("--out", default="dhsa_eval", help="output directory")
    add_config_options(p, threshold=False)
    p.set_defaults(_config=_base)


def _base(args) -> DHSAConfig:
    """The base DHSAConfig of the options, checked at every budget the command uses."""
    base = DHSAConfig(**config_changes(args))
    budgets = getattr(args, "budgets", None) or [getattr(args, "budget", base.budget)]
    for b in budgets:
        try:
            base.replace(budget=b)  # the budget must hold the keys every block keeps
        except ValueError as exc:
            if getattr(args, "budgets", None):
                raise ValueError(f"--budgets {b}: {exc}") from None
            raise
    return base


def _config(args) -> DHSAConfig:
    """args.config when ``python -m dhsa`` made it, else from the options."""
    return getattr(args, "config", None) or _base(args)


def _save(out: str, name: str, doc: Dict) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    f = path / f"{name}.json"
    f.write_text(json.dumps(doc, indent=1) + "\n")
    return f


def _meta(args) -> Dict:
    """Command, date, machine and git state of a run, and its arguments."""
    import platform
    import sys
    from .provenance import git_state, machine
    return {"command": " ".join(["python -m dhsa"] + sys.argv[1:]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{machine()}, {platform.platform()}", "git": git_state(),
            "args": {k: dataclasses.asdict(v) if isinstance(v, DHSAConfig) else v
                     for k, v in vars(args).items() if not k.startswith("_")}}


def niah_add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the needle sits, 0..1")
    p.add_argument("--budget", type=int, default=1024,
                   help="keys per query block of the sparse methods (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="tokens to generate for each answer (default 24)")


def niah_run(args) -> int:
    from .sweep import load_model
    model, tok = load_model(args.model)
    cells = run_niah(model, tok, methods=args.methods, lengths=args.lengths, depths=args.depths,
                     budget=args.budget, haystack_dir=args.haystack_dir, base=_config(args),
                     max_new_tokens=args.max_new_tokens, dense_layers=args.dense_layers,
                     num_threads=args.threads,
                     fmt="completion" if args.model == "gemma3" else "chat")
    f = _save(args.out, "niah", {**_meta(args), "cells": cells})
    print(f"wrote {f}")
    try:
        from .viz import plot_niah
        for m in sorted({c["method"] for c in cells}):
            fig = plot_niah([c for c in cells if c["method"] == m], title=f"NIAH: {m}")
            fig.savefig(Path(args.out) / f"niah_{m}.png", dpi=110, bbox_inches="tight")
    except ImportError:
        print("matplotlib not installed: no heat maps (pip install 'dhsa[viz]')")
    for m in sorted({c["method"] for c in cells}):
        s = [c["score"] for c in cells if c["method"] == m]
        hits = sum(c["retrieved"] for c in cells if c["method"] == m)
        print(f"{m:>14}: mean ROUGE score {np.mean(s):.2f}, retrieved {hits} of {len(s)} cells")
    return 0


def ppl_add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--length", type=int, default=8192, help="tokens of text (default 8192)")
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048],
                   help="keys per query block of the sparse methods")
    p.add_argument("--scored", type=int, default=256,
                   help="last tokens whose loss is measured (default 256)")
    p.add_argument("--leaky", action="store_true",
                   help="score from one forward with the method (not causal: optimistic)")


def ppl_run(args) -> int:
    from .sweep import load_model
    model, tok = load_model(args.model)
    rows = run_ppl(model, tok, methods=args.methods, budgets=args.budgets, length=args.length,
                   haystack_dir=args.haystack_dir, base=_config(args),
                   dense_layers=args.dense_layers, num_threads=args.threads, scored=args.scored,
                   protocol="leaky" if args.leaky else "causal")
    print(f"wrote {_save(args.out, 'ppl', {**_meta(args), 'rows': rows})}")
    return 0


def recall_add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--length", type=int, default=4096, help="tokens of text (default 4096)")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048],
                   help="keys per query block of the sparse methods")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to measure (default: all)")


def recall_run(args) -> int:
    from .sweep import load_model
    model, tok = load_model(args.model)
    rows = run_recall(model, tok, methods=args.methods, budgets=args.budgets, length=args.length,
                      haystack_dir=args.haystack_dir, base=_config(args), layers=args.layers,
                      num_threads=args.threads)
    print(f"wrote {_save(args.out, 'recall', {**_meta(args), 'rows': rows})}")
    for m in sorted({r["method"] for r in rows}):
        for b in args.budgets:
            rs = [r["recall"] for r in rows if r["method"] == m and r["budget"] == b]
            if rs:
                print(f"{m:>14} budget {b:>5}: mean recall {np.mean(rs):.4f}")
    return 0
