"""DHSA's sparse kernel vs PyTorch FlexAttention on the same selection (CPU).

For each length L (causal, Lq = Lk = L, B = 1, SmolLM2's shape H=9, Hkv=3,
D=64 by default) and token budget b:

1. ``dhsa.predict_selection(q, k, DHSAConfig(budget=b))`` gives the ranges
   of keys every 64-query block attends to (one selection per KV head);
2. the same selection becomes a FlexAttention ``BlockMask`` with 64 x 64
   blocks: a key block is *full* when the selection keeps all its 64 keys and
   causality hides none, *partial* when it keeps some (a ``mask_mod`` then
   looks up the exact keys in a (B, groups, query blocks, Lk) table and
   applies causality), and skipped otherwise. FlexAttention thus computes the
   same output (checked: max relative error against ours) but does its work
   per 64 x 64 block, so partial blocks cost it full blocks;
3. timed side by side, interleaved: ``flex_attention`` compiled with
   ``torch.compile`` (CPU inductor backend; compile time reported apart, as
   the first call), DHSA's sparse attention with that selection (the same
   work), DHSA total (prediction + attention), FlexAttention with a plain
   causal block mask (its dense kernel), and torch SDPA (dense causal).

q, k, v are random normal (see bench_sparse.py: the costs hold, selection
quality does not matter here).

    python benchmarks/bench_flex.py --lengths 8K,16K,32K --budgets 2K

Needs torch (the torch extra). Results: benchmarks/results/bench_flex.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import common
import dhsa
from dhsa import rules

NAME = "bench_flex"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="9/3/64", help="H/Hkv/D (default: %(default)s)")
    p.add_argument("--lengths", default="8K,16K,32K")
    p.add_argument("--budgets", default="2K")
    p.add_argument("--threads", type=int, default=None, help="threads (default: usable CPUs)")
    common.add_timing_arguments(p, repeats=3, scope="length")
    p.add_argument("--no-sdpa", action="store_true", help="skip torch SDPA")
    p.add_argument("--out", default=None, help="results path prefix (default: results/)")
    return p.parse_args(argv)


def selection_keep_table(sel, L: int) -> np.ndarray:
    """keep (B, groups, query blocks, L) uint8: 1 where the selection keeps
    the key for that block (before causality)."""
    n = sel.batch * sel.groups * sel.num_blocks
    d = np.zeros((n, L + 1), np.int32)
    row = np.repeat(np.arange(n), np.diff(sel.offsets))
    np.add.at(d, (row, sel.starts.astype(np.int64)), 1)
    np.add.at(d, (row, sel.ends.astype(np.int64)), -1)
    keep = np.cumsum(d[:, :L], axis=1).astype(np.uint8)
    return keep.reshape(sel.batch, sel.groups, sel.num_blocks, L)


def flex_block_mask(torch, keep: np.ndarray, H: int, L: int, bs: int):
    """A FlexAttention BlockMask (bs x bs blocks) equal to the selection
    ``keep`` under a causal mask. Returns (mask, full blocks, partial blocks)
    summed over heads."""
    from torch.nn.attention.flex_attention import BlockMask

    B, G, NQB, _ = keep.shape
    NKB = -(-L // bs)
    pad = NKB * bs - L
    kp = np.pad(keep, ((0, 0), (0, 0), (0, 0), (0, pad)))
    per_block = kp.reshape(B, G, NQB, NKB, bs).sum(axis=-1)        # kept keys per block
    qb = np.arange(NQB)[:, None]
    kb = np.arange(NKB)[None, :]
    below = kb < qb                                                 # causality hides none
    full = (per_block == bs) & below[None, None]
    partial = (per_block > 0) & (kb <= qb)[None, None] & ~full
    rep = H // G

    def to_lists(flags):
        flags = rules.expand_kv(flags, H)                           # groups -> heads
        num = flags.sum(axis=-1).astype(np.int32)
        order = np.argsort(~flags, axis=-1, kind="stable").astype(np.int32)
        return torch.from_numpy(num), torch.from_numpy(order)

    pn, pi = to_lists(partial)
    fn, fi = to_lists(full)
    keep_t = torch.from_numpy(keep.astype(bool))

    def mask_mod(b, h, q_idx, kv_idx):  # traced by torch: dhsa.rules' head map and causality
        return keep_t[b, h // rep, q_idx // bs, kv_idx] & (kv_idx <= q_idx)

    mask = BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=(bs, bs), mask_mod=mask_mod,
                                    seq_lengths=(L, L))
    return mask, int(fn.sum()), int(pn.sum())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.load_torch()
    if torch is None:
        print("bench_flex needs torch (pip install '.[torch]')", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch.nn.functional as F

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    H, Hkv, D, _ = common.parse_shapes(args.shape)[0]
    started = common.utc_now()
    machine = common.machine_info()
    peak = common.SgemmPeak(threads)
    peak.sample()
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for L in common.parse_lengths(args.lengths):
        quiet = common.wait_for_quiet(args.quiet_wait)
        q, k, v = common.make_qkv(1, H, Hkv, L, D, seed=L)
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        scale = float(1.0 / np.sqrt(D))

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        causal_mask = create_block_mask(causal, None, None, L, L, device="cpu")
        t0 = time.perf_counter()
        with torch.no_grad():
            flex(tq, tk, tv, block_mask=causal_mask, enable_gqa=True, scale=scale)
        compile_dense_s = time.perf_counter() - t0
        for b in common.parse_lengths(args.budgets):
            if b >= L:
                continue
            cfg = dhsa.DHSAConfig(budget=b)
            sel = dhsa.predict_selection(q, k, cfg, num_threads=threads)
            t0 = time.perf_counter()
            keep = selection_keep_table(sel, L)
            mask, nfull, npartial = flex_block_mask(torch, keep, H, L, cfg.block_size)
            mask_build_s = time.perf_counter() - t0

            def run_flex(m=mask):
                with torch.no_grad():
                    return flex(tq, tk, tv, block_mask=m, enable_gqa=True, scale=scale)

            t0 = time.perf_counter()
            out_flex = run_flex().numpy()
            compile_s = time.perf_counter() - t0
            out_dhsa = dhsa.sparse_attention(q, k, v, cfg, selection=sel, num_threads=threads)
            err = float(np.max(np.abs(out_flex - out_dhsa)) / np.max(np.abs(out_dhsa)))

            def run_flex_dense():
                with torch.no_grad():
                    return flex(tq, tk, tv, block_mask=causal_mask, enable_gqa=True,
                                scale=scale)

            def run_sdpa():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                          enable_gqa=True)

            fns = {
                "flex_sparse": run_flex,
                "dhsa_attention": lambda: dhsa.sparse_attention(q, k, v, cfg, selection=sel,
                                                                num_threads=threads),
                "dhsa_total": lambda: dhsa.sparse_attention(q, k, v, cfg, num_threads=threads),
                "flex_dense": run_flex_dense,
            }
            if not args.no_sdpa:
                fns["sdpa"] = run_sdpa
            tm = common.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup,
                                         max_seconds=args.max_seconds,
                                         extra_repeats=args.extra_repeats, keep=[])
            pairs_sel = common.selected_head_pairs(sel, H)
            pairs_flex = (nfull + npartial) * cfg.block_size * cfg.block_size
            row = {
                "L": L, "budget": b, "H": H, "Hkv": Hkv, "D": D, "threads": threads,
                "density": pairs_sel / (H * common.causal_pairs(L)),
                "flex_full_blocks": nfull, "flex_partial_blocks": npartial,
                "pairs_selected": pairs_sel, "pairs_flex_computes": pairs_flex,
                "flex_work_ratio": pairs_flex / pairs_sel,
                "compile_sparse_s": compile_s, "compile_dense_s": compile_dense_s,
                "mask_build_s": mask_build_s, "max_rel_err_vs_dhsa": err,
                "quiet": quiet,
                **{f"{n}_s": t.best for n, t in tm.items()},
                "timings": {n: t.as_dict() for n, t in tm.items()},
                "others": common.others_label(*(t.as_dict() for t in tm.values())),
            }
            row["flex_over_dhsa"] = row["flex_sparse_s"] / row["dhsa_attention_s"]
            if "sdpa_s" in row:
                row["dhsa_total_vs_sdpa"] = row["sdpa_s"] / row["dhsa_total_s"]
                row["flex_sparse_vs_sdpa"] = row["sdpa_s"] / row["flex_sparse_s"]
            kflops = 4.0 * pairs_sel * D
            row["dhsa_attention_gflops"] = common.gflops(kflops, row["dhsa_attention_s"])
            row["flex_sparse_gflops"] = common.gflops(kflops, row["flex_sparse_s"])
            rows.append(row)
            print(f"L={common.fmt_len(L):>4} b={common.fmt_len(b)}: flex {row['flex_sparse_s']:.3f}s "
                  f"(compile {compile_s:.1f}s, x{row['flex_work_ratio']:.2f} work), dhsa attention "
                  f"{row['dhsa_attention_s']:.3f}s -> flex/dhsa {row['flex_over_dhsa']:.2f}; "
                  f"dhsa total {row['dhsa_total_s']:.3f}s, flex dense {row['flex_dense_s']:.3f}s"
                  + (f", sdpa {row['sdpa_s']:.3f}s" if "sdpa_s" in row else "")
                  + f"; err {err:.1e}; others {row['others']}", flush=True)
            assert err < 1e-3, f"FlexAttention and DHSA disagree: {err}"
    peak.sample()
    cols = [("L", "L", "d"), ("budget", "budget", "d"), ("density", "density", ".3f"),
            ("flex_work_ratio", "flex work / selected", ".2f"),
            ("dhsa_attention_s", "DHSA attention s", ".3f"),
            ("flex_sparse_s", "Flex sparse s", ".3f"), ("flex_over_dhsa", "Flex / DHSA", ".2f"),
            ("dhsa_total_s", "DHSA total s", ".3f"), ("flex_dense_s", "Flex dense s", ".3f"),
            ("sdpa_s", "SDPA s", ".3f"), ("dhsa_total_vs_sdpa", "DHSA total x SDPA", ".2f"),
            ("compile_sparse_s", "Flex compile s", ".1f"),
            ("dhsa_attention_gflops", "DHSA GF/s", ".0f"),
            ("flex_sparse_gflops", "Flex GF/s", ".0f"),
            ("max_rel_err_vs_dhsa", "max rel err", ".1e"), ("others", "others CPU %", "")]
    j, m = common.write_results(
        NAME, machine=machine, command=common.command_line(), started=started,
        config=vars(args), rows=rows, extra={"sgemm_peak": peak.as_dict()},
        tables=[(f"Same selection, two kernels (H={H}, Hkv={Hkv}, D={D}, {threads} threads; "
                 f"sgemm peak {peak.best:.0f} GF/s)", rows, cols)],
        notes=["Flex sparse: torch.compile(flex_attention) with a BlockMask built from the "
               "DHSA selection (64 x 64 blocks; partial blocks masked exactly by a mask_mod); "
               "its first call (compile) is reported apart as 'Flex compile s'",
               "flex work / selected: query-key pairs in the blocks FlexAttention visits over "
               "the pairs the selection keeps (partial blocks cost it whole blocks)",
               "GF/s: 4 * selected pairs * D / time for both kernels (the useful work)",
               "DHSA total: prediction + attention; SDPA: dense causal, enable_gqa",
               "others CPU %: share of the CPUs other processes took during each best call, "
               "in column order flex sparse / dhsa attention / dhsa total / flex dense / sdpa"],
        out=args.out)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
