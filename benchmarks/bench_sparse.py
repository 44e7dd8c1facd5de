"""DHSA sparse attention vs the dense C kernel vs torch SDPA, long contexts.

For each shape (H, Hkv, D; B = 1), length L (causal, Lq = Lk = L) and token
budget b, with the default ``dhsa.DHSAConfig(budget=b)`` and T threads:

- DHSA total: ``dhsa.sparse_attention(q, k, v, cfg)`` (prediction + attention);
- DHSA prediction alone: ``dhsa.predict_selection(q, k, cfg)``;
- DHSA attention alone: ``dhsa.sparse_attention(q, k, v, cfg, selection=sel)``
  with the selection predicted beforehand;
- dense: ``dhsa.dense_attention(q, k, v, causal=True)`` (up to --max-dense-len);
- torch: ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``
  under no_grad with ``torch.set_num_threads(T)`` (up to --max-torch-len).

Each time is the minimum over the timed calls after a warm-up. Reported:
speed-ups vs dense and torch, the ideal speed-up (causal pairs / selected
pairs = 1 / density), the fraction of it reached, the prediction's share of
the DHSA time, effective GFLOP/s (dense causal FLOPs / time) and kernel
GFLOP/s (FLOPs of the selected pairs / time), and the peak RSS of one call of
each method in a fresh subprocess at a few lengths (--mem-lengths).

q, k, v are random normal: the dynamic chunking then cuts small chunks (no
structure to follow); the cost figures hold, the selection quality does not
mean anything here.

    python benchmarks/bench_sparse.py --quick
    python benchmarks/bench_sparse.py --shapes 9/3/64 --lengths 4K,8K,16K,32K \\
        --budgets 2K --max-dense-len 32K
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import common
import dhsa

NAME = "bench_sparse"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="9/3/64,32/8/128",
                   help="H/Hkv/D[@maxL], comma separated; 9/3/64 = SmolLM2, 32/8/128 = "
                        "Llama-3-8B (default: %(default)s)")
    p.add_argument("--lengths", default="4K,8K,16K,32K,64K",
                   help="sequence lengths (default: %(default)s)")
    p.add_argument("--with-128k", action="store_true", help="add L = 128K to --lengths")
    p.add_argument("--budgets", default="1K,2K,4K",
                   help="DHSA token budgets per query block (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="threads (default: usable CPUs)")
    common.add_timing_arguments(p, repeats=3, scope="length")
    p.add_argument("--max-dense-len", type=common.parse_length, default=16384,
                   help="skip the dense C kernel beyond this L (default: %(default)s)")
    p.add_argument("--max-torch-len", type=common.parse_length, default=None,
                   help="skip torch SDPA beyond this L (default: --max-dense-len)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--mem-lengths", default="8K,32K",
                   help="lengths at which to measure peak RSS per method in a subprocess "
                        "(first shape, --mem-budget); empty to skip (default: %(default)s)")
    p.add_argument("--mem-budget", type=common.parse_length, default=2048)
    p.add_argument("--mem-methods", default="dhsa,predict,dense,torch",
                   help="methods for the memory runs (dense/torch obey the max lengths)")
    p.add_argument("--sgemm-n", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="fast subset: L = 4K, 8K (H=32 shape at 4K only), budgets 1K, 2K, "
                        "2 repeats, memory at 4K and 8K")
    p.add_argument("--out", default=None,
                   help="output path (.json/.md added); default benchmarks/results/"
                        "bench_sparse[_quick]")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = "9/3/64,32/8/128@4K"
        args.lengths = "4K,8K"
        args.budgets = "1K,2K"
        args.repeats = min(args.repeats, 2)
        args.max_dense_len = min(args.max_dense_len, 8192)
        args.mem_lengths = "4K,8K"
    if args.max_torch_len is None:
        args.max_torch_len = args.max_dense_len
    if args.extra_repeats is None:
        args.extra_repeats = args.repeats
    return args


def skip_label(limit: int) -> str:
    return f"skip (L>{common.fmt_len(limit)})"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = common.utc_now()
    command = common.command_line()
    torch = None if args.no_torch else common.load_torch()
    machine = common.machine_info()
    shapes = common.parse_shapes(args.shapes)
    lengths = common.parse_lengths(args.lengths)
    if args.with_128k and 131072 not in lengths:
        lengths.append(131072)
    budgets = common.parse_lengths(args.budgets)
    T = args.threads or machine["cpu"]["usable_cpus"] or os.cpu_count() or 1
    B = args.batch
    print(common.describe_machine(machine))
    print(f"command: {command}")
    if torch is None:
        print("torch: not used (absent or --no-torch); its columns are skipped")
    else:
        torch.set_num_threads(T)
    peak = common.SgemmPeak(T, n=args.sgemm_n)
    print(f"OpenBLAS sgemm n={args.sgemm_n}, {T} thread(s): {peak.sample(repeats=5):.1f} GFLOP/s",
          flush=True)
    timing = dict(repeats=args.repeats, warmup=args.warmup, max_seconds=args.max_seconds,
                  extra_repeats=args.extra_repeats)

    rows = []
    for (H, Hkv, D, cap) in shapes:
        for L in lengths:
            if cap is not None and L > cap:
                continue
            q, k, v = common.make_qkv(B, H, Hkv, L, D, seed=args.seed)
            dflops = common.dense_flops(B, H, L, D)
            base = {"shape": common.shape_name(H, Hkv, D), "B": B, "H": H, "Hkv": Hkv, "D": D,
                    "L": L, "Lstr": common.fmt_len(L), "threads": T,
                    "dense_flops": dflops, "causal_head_pairs": B * H * common.causal_pairs(L)}
            if args.quiet_wait > 0:
                base["quiet_wait"] = common.wait_for_quiet(args.quiet_wait)
            # every method of this length in turns: they see the same machine conditions
            fns = {}
            if L <= args.max_dense_len:
                fns["dense"] = lambda: dhsa.dense_attention(q, k, v, causal=True, num_threads=T)
            if torch is not None and L <= args.max_torch_len:
                tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

                def run_torch():
                    with torch.no_grad():
                        return torch.nn.functional.scaled_dot_product_attention(
                            tq, tk, tv, is_causal=True, enable_gqa=True)
                fns["torch"] = run_torch
            cfgs, sels = {}, {}
            for b in budgets:
                cfg = cfgs[b] = dhsa.DHSAConfig(budget=b)
                sel = sels[b] = dhsa.predict_selection(q, k, cfg, num_threads=T)
                fns[f"total{b}"] = (lambda cfg=cfg: dhsa.sparse_attention(
                    q, k, v, cfg, return_info=True, num_threads=T))
                fns[f"predict{b}"] = (lambda cfg=cfg: dhsa.predict_selection(
                    q, k, cfg, num_threads=T))
                fns[f"attn{b}"] = (lambda cfg=cfg, sel=sel: dhsa.sparse_attention(
                    q, k, v, cfg, selection=sel, num_threads=T))
            tm = common.time_interleaved(
                fns, keep=["dense"] + [f"total{b}" for b in budgets], **timing)
            del fns
            dense_ms = torch_ms = None
            out_dense = dense_timing = torch_timing = None
            if "dense" in tm:
                dense_ms, out_dense, dense_timing = (tm["dense"].best * 1e3, tm["dense"].result,
                                                     tm["dense"].as_dict())
                tm["dense"].result = None
                print(f"{base['shape']:<14} L={base['Lstr']:>4}: dense {dense_ms:10.1f} ms",
                      flush=True)
            if "torch" in tm:
                torch_ms, torch_timing = tm["torch"].best * 1e3, tm["torch"].as_dict()
                del tq, tk, tv
                print(f"{base['shape']:<14} L={base['Lstr']:>4}: torch {torch_ms:10.1f} ms",
                      flush=True)

            for b in budgets:
                cfg, sel = cfgs[b], sels[b]
                row = dict(base)
                row.update(budget=b, budget_str=common.fmt_len(b),
                           dense_ms=dense_ms, torch_ms=torch_ms,
                           dense=dense_timing, torch=torch_timing,
                           dense_skipped=L > args.max_dense_len,
                           torch_skipped=torch is None or L > args.max_torch_len)
                tot, pre, att = tm[f"total{b}"], tm[f"predict{b}"], tm[f"attn{b}"]
                out_total, info = tot.result
                tot.result = None
                # the precomputed-selection path must give the same output (untimed check)
                out_att = dhsa.sparse_attention(q, k, v, cfg, selection=sel, num_threads=T)

                sel_pairs = common.selected_head_pairs(info.selection, H)
                all_pairs = common.allowed_head_pairs(info.selection, H)
                sflops = common.sparse_flops(info.selection, H, D)
                row.update(
                    dhsa_total=tot.as_dict(), dhsa_predict=pre.as_dict(),
                    dhsa_attention=att.as_dict(),
                    dhsa_ms=tot.best * 1e3, predict_ms=pre.best * 1e3, attn_ms=att.best * 1e3,
                    # the split inside the last timed total call, for comparison
                    incall_predict_ms=info.predict_seconds * 1e3,
                    incall_attn_ms=info.attention_seconds * 1e3,
                    density=info.density, selected_head_pairs=sel_pairs,
                    allowed_head_pairs=all_pairs, sparse_flops=sflops,
                    selection_groups=int(info.selection.groups),
                    num_ranges=int(len(info.selection.starts)),
                    num_chunks_mean=float(np.mean([len(x) - 1 for x in info.selection.boundaries]))
                    if info.selection.boundaries else None,
                    ideal_speedup=all_pairs / sel_pairs if sel_pairs else None,
                    predict_share=pre.best / tot.best,
                    maxdiff_selection_path=float(np.abs(out_att - out_total).max()),
                )
                if out_dense is not None:
                    row["maxdiff_dense"] = float(np.abs(out_total - out_dense).max())
                row["eff_gflops"] = common.gflops(dflops, tot.best)
                row["kernel_gflops"] = common.gflops(sflops, tot.best)
                row["attn_kernel_gflops"] = common.gflops(sflops, att.best)
                row["dense_gflops"] = common.gflops(dflops, dense_ms * 1e-3) if dense_ms else None
                row["torch_gflops"] = common.gflops(dflops, torch_ms * 1e-3) if torch_ms else None
                if dense_ms:
                    row["speedup_vs_dense"] = dense_ms / row["dhsa_ms"]
                    row["attn_speedup_vs_dense"] = dense_ms / row["attn_ms"]
                    if row["ideal_speedup"]:
                        row["frac_ideal"] = row["speedup_vs_dense"] / row["ideal_speedup"]
                        row["attn_frac_ideal"] = row["attn_speedup_vs_dense"] / row["ideal_speedup"]
                if torch_ms:
                    row["speedup_vs_torch"] = torch_ms / row["dhsa_ms"]
                row["others"] = common.others_label(row["dhsa_total"], row["dhsa_attention"],
                                                    dense_timing, torch_timing)
                rows.append(row)
                print(f"{row['shape']:<14} L={row['Lstr']:>4} b={row['budget_str']:>3}: "
                      f"dhsa {row['dhsa_ms']:9.1f} ms (predict {row['predict_ms']:.1f}, "
                      f"attention {row['attn_ms']:.1f}), density {row['density']:.4f}, "
                      f"ideal x{row['ideal_speedup']:.1f}"
                      + (f", x{row['speedup_vs_dense']:.2f} vs dense" if dense_ms else "")
                      + (f", x{row['speedup_vs_torch']:.2f} vs torch" if torch_ms else ""),
                      flush=True)
                del out_total, info, sel, out_att, pre, att, tot
            del q, k, v, out_dense, tm, sels
            peak.sample()

    peak.sample(repeats=5)
    sgemm = peak.best
    print(f"OpenBLAS sgemm: best {sgemm:.1f} GFLOP/s of {len(peak.samples)} samples over the run",
          flush=True)
    for row in rows:
        row["sgemm_gflops"] = sgemm
        row["kernel_frac_sgemm"] = row["kernel_gflops"] / sgemm
        row["attn_kernel_frac_sgemm"] = row["attn_kernel_gflops"] / sgemm
        if row.get("dense_gflops"):
            row["dense_frac_sgemm"] = row["dense_gflops"] / sgemm

    # peak memory, one call per method in a fresh process
    mem_rows = []
    mem_lengths = common.parse_lengths(args.mem_lengths) if args.mem_lengths else []
    methods = [m.strip() for m in args.mem_methods.split(",") if m.strip()]
    if mem_lengths:
        H, Hkv, D, _ = shapes[0]
        for L in mem_lengths:
            for m in methods:
                if m == "dense" and L > args.max_dense_len:
                    mem_rows.append({"shape": common.shape_name(H, Hkv, D), "L": L,
                                     "Lstr": common.fmt_len(L), "method": m,
                                     "note": skip_label(args.max_dense_len)})
                    continue
                if m == "torch" and (torch is None or L > args.max_torch_len):
                    mem_rows.append({"shape": common.shape_name(H, Hkv, D), "L": L,
                                     "Lstr": common.fmt_len(L), "method": m,
                                     "note": "no torch" if torch is None
                                     else skip_label(args.max_torch_len)})
                    continue
                r = common.measure_peak_rss(m, B, H, Hkv, L, D, T, budget=args.mem_budget,
                                            seed=args.seed)
                r.update(shape=common.shape_name(H, Hkv, D), L=L, Lstr=common.fmt_len(L),
                         method=m if m not in ("dhsa", "predict")
                         else f"{m} b={common.fmt_len(args.mem_budget)}")
                if "error" in r:
                    r["note"] = f"error: {r['error']}"
                elif r.get("call_peak_extra_mib") is not None:
                    r["extra_kib_per_token"] = r["call_peak_extra_mib"] * 1024.0 / L
                    if not r.get("hwm_reset"):
                        r["note"] = "VmHWM not reset: peak includes start-up"
                mem_rows.append(r)
                print(f"memory {r['shape']} L={r['Lstr']:>4} {r['method']:<12}: "
                      + (f"peak {r['peak_rss_mib']:.0f} MiB, call +{r['call_peak_extra_mib']:.0f}"
                         " MiB" if "peak_rss_mib" in r else r.get("note", "")), flush=True)

    # tables: mark what was skipped because of its length
    def display(row):
        d = dict(row)
        if row.get("dense_skipped"):
            lab = skip_label(args.max_dense_len)
            for key in ("dense_ms", "speedup_vs_dense", "frac_ideal", "attn_frac_ideal",
                        "dense_gflops"):
                d[key] = lab
        if row.get("torch_skipped"):
            lab = "no torch" if torch is None else skip_label(args.max_torch_len)
            for key in ("torch_ms", "speedup_vs_torch", "torch_gflops"):
                d[key] = lab
        return d
    drows = [display(r) for r in rows]
    cols_time = [("shape", "shape", ""), ("Lstr", "L", ""), ("budget_str", "budget", ""),
                 ("density", "density", ".4f"), ("ideal_speedup", "ideal x", ".2f"),
                 ("dhsa_ms", "DHSA ms", ".1f"), ("predict_ms", "predict ms", ".1f"),
                 ("attn_ms", "attn-only ms", ".1f"), ("predict_share", "predict share", ".1%"),
                 ("dense_ms", "dense ms", ".1f"), ("torch_ms", "torch ms", ".1f"),
                 ("speedup_vs_dense", "x vs dense", ".2f"),
                 ("speedup_vs_torch", "x vs torch", ".2f"),
                 ("frac_ideal", "of ideal", ".1%"), ("attn_frac_ideal", "attn-only of ideal", ".1%"),
                 ("others", "others CPU % DHSA/attn/dense/torch", "")]
    cols_rate = [("shape", "shape", ""), ("Lstr", "L", ""), ("budget_str", "budget", ""),
                 ("eff_gflops", "DHSA eff. GF/s", ".1f"),
                 ("kernel_gflops", "DHSA kernel GF/s", ".1f"),
                 ("attn_kernel_gflops", "attn-only kernel GF/s", ".1f"),
                 ("attn_kernel_frac_sgemm", "attn-only /sgemm", ".2f"),
                 ("dense_gflops", "dense GF/s", ".1f"), ("torch_gflops", "torch GF/s", ".1f"),
                 ("num_chunks_mean", "chunks/group", ".0f")]
    cols_mem = [("shape", "shape", ""), ("Lstr", "L", ""), ("method", "method", ""),
                ("inputs_mib", "q+k+v MiB", ".1f"), ("output_mib", "out MiB", ".1f"),
                ("rss_before_mib", "RSS before MiB", ".1f"),
                ("peak_rss_mib", "peak RSS MiB", ".1f"),
                ("call_peak_extra_mib", "call peak extra MiB", ".1f"),
                ("extra_kib_per_token", "extra KiB/token", ".2f"),
                ("seconds", "s", ".2f"), ("note", "note", "")]
    if torch is None:
        cols_time = [c for c in cols_time if "torch" not in c[0]]
        cols_rate = [c for c in cols_rate if "torch" not in c[0]]
    print()
    print(common.markdown_table(drows, cols_time))
    print()
    print(common.markdown_table(drows, cols_rate))
    if mem_rows:
        print()
        print(common.markdown_table(mem_rows, cols_mem))

    notes = [
        f"threads {T}; OpenBLAS sgemm rate (n={args.sgemm_n}) {sgemm:.1f} GFLOP/s (best of the "
        f"samples taken through the run: {', '.join('%.0f' % x for x in peak.samples)}; the "
        "machine may be shared)",
        "others CPU % = share of the CPUs that other processes (and steal) took during the best "
        "timed call of DHSA total / attn-only / dense / torch, from /proc/stat minus our own "
        "CPU time ('?' too short to tell, '-' not run); high values mean a shared machine and "
        f"inflated times; a contended best call earns up to {args.extra_repeats} extra calls",
        "times: minimum over the timed calls after warm-up, all methods of one length timed in "
        "turns (every time in the JSON); "
        "q, k, v random normal float32, causal, Lq = Lk = L, B = %d" % B,
        "DHSA = sparse_attention(q, k, v, DHSAConfig(budget=b)) (prediction + attention); "
        "predict = predict_selection alone; attn-only = sparse_attention(..., selection=sel) "
        "with a precomputed selection; predict share = predict ms / DHSA ms",
        "density = selected / causally allowed query-key pairs; ideal x = 1 / density = causal "
        "pairs / selected pairs; of ideal = (dense ms / DHSA ms) / ideal x (attn-only: dense ms / "
        "attn-only ms / ideal x)",
        "eff. GF/s = dense causal FLOPs (4 B H D L(L+1)/2) / time; kernel GF/s = FLOPs of the "
        "selected pairs (4 D x pairs_selected summed over groups x H/groups) / time; "
        "prediction FLOPs not counted",
        f"dense = dhsa.dense_attention, skipped for L > {args.max_dense_len}; torch = "
        + ("not used" if torch is None else
           f"torch {torch.__version__} F.scaled_dot_product_attention(is_causal=True, "
           f"enable_gqa=True) under no_grad, set_num_threads({T}), skipped for "
           f"L > {args.max_torch_len}"),
        "memory: each method run once in a fresh Python process on fresh inputs; peak RSS = "
        "VmHWM after the call (reset to the current RSS just before it via "
        "/proc/self/clear_refs); call peak extra = peak - RSS before the call (output "
        "included); extra KiB/token = that / L",
        "random inputs make dynamic chunking cut small chunks (min_chunk..max_chunk keys): "
        "many ranges per block; selection quality is meaningless here",
    ]
    name = NAME + ("_quick" if args.quick and not args.out else "")
    config = {"shapes": args.shapes, "lengths": [common.fmt_len(x) for x in lengths],
              "budgets": [common.fmt_len(x) for x in budgets], "batch": B, "threads": T,
              "repeats": args.repeats, "warmup": args.warmup, "max_seconds": args.max_seconds,
              "max_dense_len": args.max_dense_len, "max_torch_len": args.max_torch_len,
              "mem_lengths": args.mem_lengths, "mem_budget": args.mem_budget,
              "seed": args.seed, "sgemm_gflops": sgemm, "sgemm_samples": peak.as_dict(),
              "extra_repeats": args.extra_repeats, "quiet_wait": args.quiet_wait,
              "dhsa_config": {k: v for k, v in vars(dhsa.DHSAConfig()).items() if k != "budget"}}
    tables = [("Time and speed-up", drows, cols_time), ("Throughput", drows, cols_rate)]
    if mem_rows:
        tables.append(("Peak memory (one call, subprocess)", mem_rows, cols_mem))
    jp, mp = common.write_results(name, machine=machine, command=command, started=started,
                                  config=config, rows=rows, tables=tables, notes=notes,
                                  extra={"memory": mem_rows}, out=args.out)
    print(f"\nwrote {jp}\nwrote {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
