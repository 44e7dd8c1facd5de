"""Dense causal attention: the dhsa C kernel vs torch SDPA vs the NumPy
float64 reference.

For each shape (H, Hkv, D; B = 1 by default) and length L (Lq = Lk = L,
causal), times ``dhsa.dense_attention`` (num_threads = T), torch's
``scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)``
under ``torch.no_grad()`` with ``torch.set_num_threads(T)``, and
``dhsa.reference.dense_attention`` (float64 NumPy, O(L^2) memory, only up
to --numpy-max-len; np.einsum, single-threaded). Each time is the minimum
over the repeats after a warm-up. GFLOP/s count the useful causal work
(4 B H D L(L+1)/2) and are compared with the OpenBLAS sgemm rate measured
in the same run with the same threads (sampled through the run; the best
sample is used, since the machine may be shared).

    python benchmarks/bench_dense.py --quick
    python benchmarks/bench_dense.py --shapes 9/3/64@8K,32/8/128@4K
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import common
import dhsa

NAME = "bench_dense"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="9/3/64,32/8/128",
                   help="H/Hkv/D[@maxL], comma separated (default: %(default)s)")
    p.add_argument("--lengths", default="1K,2K,4K,8K,16K",
                   help="sequence lengths, e.g. 1024,2K (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", default=None,
                   help="thread counts, comma separated (default: usable CPUs)")
    common.add_timing_arguments(p, repeats=5, scope="case")
    p.add_argument("--numpy-max-len", type=common.parse_length, default=2048,
                   help="run the float64 NumPy reference only up to this L (O(L^2) memory)")
    p.add_argument("--numpy-repeats", type=int, default=1,
                   help="timed calls of the NumPy reference (no warm-up)")
    p.add_argument("--no-numpy", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--sgemm-n", type=int, default=2048, help="size of the sgemm peak test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="fast subset: L = 1K, 2K (H=32 shape at 1K only), 3 repeats, "
                        "NumPy up to 1K")
    p.add_argument("--out", default=None,
                   help="output path (.json/.md added); default benchmarks/results/"
                        "bench_dense[_quick]")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = "9/3/64,32/8/128@1K"
        args.lengths = "1K,2K"
        args.repeats = min(args.repeats, 3)
        args.numpy_max_len = min(args.numpy_max_len, 1024)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = common.utc_now()
    command = common.command_line()
    torch = None if args.no_torch else common.load_torch()
    machine = common.machine_info()
    shapes = common.parse_shapes(args.shapes)
    lengths = common.parse_lengths(args.lengths)
    usable = machine["cpu"]["usable_cpus"] or os.cpu_count() or 1
    threads_list = ([int(t) for t in args.threads.split(",")] if args.threads else [usable])
    print(common.describe_machine(machine))
    print(f"command: {command}")
    if torch is None:
        print("torch: not used (absent or --no-torch); its columns are skipped")

    if args.extra_repeats is None:
        args.extra_repeats = args.repeats
    peaks = {t: common.SgemmPeak(t, n=args.sgemm_n) for t in threads_list}
    for t, pk in peaks.items():
        g = pk.sample(repeats=5)
        print(f"OpenBLAS sgemm n={args.sgemm_n}, {t} thread(s): {g:.1f} GFLOP/s")
    timing = dict(repeats=args.repeats, warmup=args.warmup, max_seconds=args.max_seconds,
                  extra_repeats=args.extra_repeats)

    rows = []
    B = args.batch
    for T in threads_list:
        if torch is not None:
            torch.set_num_threads(T)
        for (H, Hkv, D, cap) in shapes:
            for L in lengths:
                if cap is not None and L > cap:
                    continue
                q, k, v = common.make_qkv(B, H, Hkv, L, D, seed=args.seed)
                flops = common.dense_flops(B, H, L, D)
                row = {"shape": common.shape_name(H, Hkv, D), "B": B, "H": H, "Hkv": Hkv,
                       "D": D, "L": L, "Lstr": common.fmt_len(L), "threads": T,
                       "flops": flops}
                if args.quiet_wait > 0:
                    row["quiet_wait"] = common.wait_for_quiet(args.quiet_wait)

                fns = {"dhsa": lambda: dhsa.dense_attention(q, k, v, causal=True, num_threads=T)}
                if torch is not None:
                    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

                    def run_torch():
                        with torch.no_grad():
                            return torch.nn.functional.scaled_dot_product_attention(
                                tq, tk, tv, is_causal=True, enable_gqa=True)
                    fns["torch"] = run_torch
                # dhsa and torch in turns: both see the same machine conditions
                tm = common.time_interleaved(fns, **timing)
                td = tm["dhsa"]
                out_d = td.result
                row["dhsa"] = td.as_dict()
                row["dhsa_ms"] = td.best * 1e3
                if torch is not None:
                    tt = tm["torch"]
                    row["torch"] = tt.as_dict()
                    row["torch_ms"] = tt.best * 1e3
                    row["maxdiff_torch"] = float(np.abs(tt.result.numpy() - out_d).max())
                    row["speedup_vs_torch"] = tt.best / td.best
                    del tt
                del tm

                if not args.no_numpy and L <= args.numpy_max_len:
                    from dhsa import reference
                    tn = common.time_call(lambda: reference.dense_attention(q, k, v, causal=True),
                                          repeats=args.numpy_repeats, warmup=0)
                    row["numpy"] = tn.as_dict()
                    row["numpy_ms"] = tn.best * 1e3
                    row["maxdiff_numpy"] = float(np.abs(tn.result - out_d).max())
                    row["speedup_vs_numpy"] = tn.best / td.best
                    del tn

                for m in ("dhsa", "torch", "numpy"):
                    ms = row.get(f"{m}_ms")
                    if ms is not None:
                        row[f"{m}_gflops"] = common.gflops(flops, ms * 1e-3)
                row["others"] = common.others_label(
                    *[row.get(m) for m in (("dhsa", "torch") if torch is not None else ("dhsa",))])
                rows.append(row)
                peaks[T].sample()
                print(f"{row['shape']:<16} L={row['Lstr']:>4} T={T}: dhsa {row['dhsa_ms']:9.2f} ms"
                      f" ({row['dhsa_gflops']:6.1f} GF/s)"
                      + (f", torch {row['torch_ms']:9.2f} ms ({row['torch_gflops']:6.1f} GF/s)"
                         if "torch_ms" in row else "")
                      + (f", numpy {row['numpy_ms']:9.1f} ms" if "numpy_ms" in row else ""),
                      flush=True)
                del q, k, v, out_d, td

    # the machine may be shared: contention only lowers the sgemm rate, so
    # the best of the samples taken over the run is the machine's figure
    sgemm = {}
    for t in threads_list:
        peaks[t].sample(repeats=5)
        sgemm[t] = peaks[t].best
        print(f"OpenBLAS sgemm, {t} thread(s): best {sgemm[t]:.1f} GFLOP/s of "
              f"{len(peaks[t].samples)} samples over the run")
        for row in rows:
            if row["threads"] == t:
                row["sgemm_gflops"] = sgemm[t]
                for m in ("dhsa", "torch", "numpy"):
                    if row.get(f"{m}_gflops") is not None:
                        row[f"{m}_frac_sgemm"] = row[f"{m}_gflops"] / sgemm[t]

    cols = [("shape", "shape", ""), ("Lstr", "L", ""), ("threads", "T", "d"),
            ("dhsa_ms", "dhsa ms", ".2f"), ("torch_ms", "torch ms", ".2f"),
            ("numpy_ms", "numpy f64 ms", ".1f"), ("speedup_vs_torch", "dhsa/torch x", ".2f"),
            ("dhsa_gflops", "dhsa GF/s", ".1f"), ("torch_gflops", "torch GF/s", ".1f"),
            ("numpy_gflops", "numpy GF/s", ".2f"),
            ("dhsa_frac_sgemm", "dhsa /sgemm", ".2f"), ("torch_frac_sgemm", "torch /sgemm", ".2f"),
            ("numpy_frac_sgemm", "numpy /sgemm", ".3f"),
            ("maxdiff_torch", "max abs diff vs torch", ".1e"),
            ("maxdiff_numpy", "max abs diff vs numpy", ".1e"),
            ("others", "others CPU % dhsa/torch" if torch is not None else "others CPU % dhsa",
             "")]
    if torch is None:
        cols = [c for c in cols if "torch" not in c[0]]
    print()
    print(common.markdown_table(rows, cols))

    notes = [
        f"OpenBLAS sgemm rate (n={args.sgemm_n}, rows split over the threads; best of the "
        "samples taken at the start, after each case and at the end of this run, since the "
        "machine may be shared): "
        + ", ".join(f"{t} thread(s) {sgemm[t]:.1f} GFLOP/s (samples "
                    f"{', '.join('%.0f' % x for x in peaks[t].samples)})"
                    for t in threads_list),
        "others CPU % = share of the CPUs that other processes (and steal) took during the "
        "best timed call of dhsa / torch, from /proc/stat minus our own CPU time ('?' = call "
        "too short to tell); high values mean the machine was shared and times are inflated; "
        f"a contended best call earns up to {args.extra_repeats} extra calls",
        "times: minimum over the timed calls after warm-up, dhsa and torch timed in turns "
        "(median and every time in the JSON); q, k, v random normal float32, causal, "
        "Lq = Lk = L",
        "GFLOP/s = 4 B H D L(L+1)/2 useful FLOPs / time (exponentials not counted); "
        "'/sgemm' = that over the sgemm rate",
        "x = torch time / dhsa time (> 1: dhsa faster)",
        "numpy f64 = dhsa.reference.dense_attention (float64, full L x L matrices, np.einsum "
        f"single-threaded), only for L <= {args.numpy_max_len}, {args.numpy_repeats} call(s), "
        "no warm-up",
    ]
    if torch is None:
        notes.append("torch columns skipped: torch not installed or --no-torch")
    else:
        notes.append(f"torch {torch.__version__}: F.scaled_dot_product_attention(is_causal=True, "
                     "enable_gqa=True) under no_grad, torch.set_num_threads(T)")
    name = NAME + ("_quick" if args.quick and not args.out else "")
    config = {"shapes": args.shapes, "lengths": args.lengths, "batch": B,
              "threads": threads_list, "repeats": args.repeats, "warmup": args.warmup,
              "max_seconds": args.max_seconds, "numpy_max_len": args.numpy_max_len,
              "seed": args.seed, "sgemm_gflops": sgemm,
              "sgemm_samples": {t: pk.as_dict() for t, pk in peaks.items()},
              "extra_repeats": args.extra_repeats, "quiet_wait": args.quiet_wait}
    jp, mp = common.write_results(name, machine=machine, command=command, started=started,
                                  config=config, rows=rows,
                                  tables=[("Dense causal attention", rows, cols)],
                                  notes=notes, out=args.out)
    print(f"\nwrote {jp}\nwrote {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
