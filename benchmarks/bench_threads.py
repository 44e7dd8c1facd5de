"""Thread scaling: the dense C kernel, DHSA and torch SDPA at 1..N threads.

For each length L (causal, B = 1, H/Hkv/D from --shape) and thread count T:
``dhsa.dense_attention`` (up to --max-dense-len), ``dhsa.sparse_attention``
with ``DHSAConfig(budget=b)`` (prediction + attention, and the prediction
alone), and ``F.scaled_dot_product_attention`` under
``torch.set_num_threads(T)``, timed interleaved (minimum of the timed calls).
Reported: seconds, speed-up over the same method at 1 thread, parallel
efficiency (speed-up / T), the ratio to torch at the same T, and the OpenBLAS
sgemm rate at each T (the machine's ceiling).

    python benchmarks/bench_threads.py --threads 1,2 --lengths 8K,16K

Results: benchmarks/results/bench_threads.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys

import common
import dhsa

NAME = "bench_threads"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="9/3/64", help="H/Hkv/D (default: %(default)s)")
    p.add_argument("--lengths", default="8K,16K")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1, 2, 4, ... usable CPUs)")
    p.add_argument("--budget", type=common.parse_length, default=2048)
    p.add_argument("--max-dense-len", type=common.parse_length, default=16384)
    p.add_argument("--no-torch", action="store_true")
    common.add_timing_arguments(p, repeats=3, scope="case")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ncpu = len(os.sched_getaffinity(0))
    if args.threads:
        counts = [int(x) for x in args.threads.split(",")]
    else:
        counts, t = [], 1
        while t < ncpu:
            counts.append(t)
            t *= 2
        counts.append(ncpu)
    torch = None if args.no_torch else common.load_torch()
    if torch is not None:
        import torch.nn.functional as F
    H, Hkv, D, _ = common.parse_shapes(args.shape)[0]
    cfg = dhsa.DHSAConfig(budget=args.budget)
    started = common.utc_now()
    machine = common.machine_info()
    rows, sgemm = [], {}
    for T in counts:
        sgemm[T] = common.sgemm_rate(T)
    for L in common.parse_lengths(args.lengths):
        q, k, v = common.make_qkv(1, H, Hkv, L, D, seed=L)
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        base = {}
        for T in counts:
            common.wait_for_quiet(args.quiet_wait)
            fns = {
                "dhsa_total": lambda T=T: dhsa.sparse_attention(q, k, v, cfg, num_threads=T),
                "dhsa_predict": lambda T=T: dhsa.predict_selection(q, k, cfg, num_threads=T),
            }
            if L <= args.max_dense_len:
                fns["dense"] = lambda T=T: dhsa.dense_attention(q, k, v, num_threads=T)
            if torch is not None and L <= args.max_dense_len:
                def run_torch(T=T):
                    torch.set_num_threads(T)
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                              enable_gqa=True)
                fns["torch_sdpa"] = run_torch
            tm = common.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup,
                                         max_seconds=args.max_seconds,
                                         extra_repeats=args.extra_repeats, keep=[])
            for name, t in tm.items():
                base.setdefault(name, t.best if T == counts[0] else None)
                row = {"L": L, "threads": T, "method": name, "seconds": t.best,
                       "sgemm_gflops": sgemm[T], "timing": t.as_dict(),
                       "others": common.others_label(t.as_dict())}
                b0 = base.get(name)
                if b0 is not None and counts[0] == 1:
                    row["speedup_vs_1"] = b0 / t.best
                    row["efficiency"] = row["speedup_vs_1"] / T
                if "torch_sdpa" in tm and name != "torch_sdpa":
                    row["x_torch"] = tm["torch_sdpa"].best / t.best
                if name == "dense":
                    row["gflops"] = common.gflops(common.dense_flops(1, H, L, D), t.best)
                rows.append(row)
            print(f"L={common.fmt_len(L):>4} T={T:>2}: " + ", ".join(
                f"{n} {t.best:.3f}s" for n, t in tm.items()) + f"; sgemm {sgemm[T]:.0f} GF/s",
                flush=True)
    cols = [("L", "L", "d"), ("threads", "threads", "d"), ("method", "method", ""),
            ("seconds", "seconds", ".3f"), ("speedup_vs_1", "speed-up vs 1 thread", ".2f"),
            ("efficiency", "efficiency", ".2f"), ("x_torch", "x torch SDPA", ".2f"),
            ("gflops", "GF/s", ".0f"), ("sgemm_gflops", "sgemm GF/s", ".0f"),
            ("others", "others CPU %", "")]
    j, m = common.write_results(
        NAME, machine=machine, command=common.command_line(), started=started,
        config=vars(args), rows=rows, extra={"sgemm_gflops_by_threads": sgemm},
        tables=[(f"Thread scaling (H={H}, Hkv={Hkv}, D={D}, DHSA budget {args.budget})",
                 rows, cols)],
        notes=["dhsa_total: prediction + sparse attention; dhsa_predict: the prediction alone",
               "x torch SDPA: torch time / this method's time at the same thread count",
               "GF/s (dense): 4 * H * D * causal pairs / time"],
        out=args.out)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
