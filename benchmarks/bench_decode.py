"""Sparse decode vs exact decode vs torch SDPA: attention per decode step.

For each shape (H, Hkv, D; B = 1) and context length L, a dhsa.KVCache holds
L keys and values; one decode step is the attention of one new query (the
cache's last position) over it:

- sparse: ``dhsa.decode_attention(q, cache)`` with ``decode_budget`` b (the
  selection from the cache's chunks, then the kernel on the selected keys);
- exact (cache): the same call with ``decode_budget=None`` (every key);
- exact (kernel): ``dhsa.dense_attention(q, k, v)`` on contiguous K/V;
- torch: ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` on the
  same contiguous K/V, under no_grad with ``torch.set_num_threads(T)``.

Also timed: appending one token to the cache (the chunk state's update),
filling the cache with all L keys at once (the chunking a prefill adds),
and ``--steps`` consecutive generation steps (append one new key, then one
decode step, new keys continuing the synthetic sequence so that chunks
close as they do in generation) with ``decode_reuse`` 1 and ``--reuse`` N:
the per-step time, and the share of steps' selection groups that reused
chunk scores.
Each time is the minimum over the timed calls after a warm-up, every method
of a length timed in turns. Memory: the cache's K/V bytes and its chunk
state's.

Keys are synthetic with content shifts every 4-16 positions (a random
walk of segment means plus noise), so dynamic chunking finds chunks of
about the length it finds in model keys; random normal keys would cut
every chunk at min_chunk and inflate the number of chunks a step scores.

    python benchmarks/bench_decode.py --quick
    python benchmarks/bench_decode.py --lengths 4K,8K,16K,32K,64K,128K --budgets 2K
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import common
import dhsa

NAME = "bench_decode"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="9/3/64,4/1/256",
                   help="H/Hkv/D, comma separated; 9/3/64 = SmolLM2, 4/1/256 = Gemma-3-270M "
                        "(default: %(default)s)")
    p.add_argument("--lengths", default="4K,8K,16K,32K,64K,128K",
                   help="context lengths (default: %(default)s)")
    p.add_argument("--budgets", default="1K,2K", help="decode budgets (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="K/V storage of the cache (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: usable CPUs)")
    common.add_timing_arguments(p, repeats=20, scope="length")
    p.add_argument("--reuse", type=int, default=8,
                   help="decode_reuse of the step sequence (0: skip it; default %(default)s)")
    p.add_argument("--steps", type=int, default=32,
                   help="generation steps per timed call of the step sequence "
                        "(default %(default)s)")
    p.add_argument("--decode-score", default=None,
                   help="DHSAConfig.decode_score of the sparse caches (default: the config's)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="L = 4K, 16K, budget 2K, 5 repeats")
    p.add_argument("--out", default=None,
                   help="output path (.json/.md added); default benchmarks/results/"
                        "bench_decode[_quick]")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths = "4K,16K"
        args.budgets = "2K"
        args.repeats = min(args.repeats, 5)
    if args.extra_repeats is None:
        args.extra_repeats = args.repeats
    return args


def segmented_keys(rng, Hkv: int, L: int, D: int) -> np.ndarray:
    """(1, Hkv, L, D) float32 keys whose mean shifts every 4-16 positions."""
    out = np.empty((1, Hkv, L, D), dtype=np.float32)
    for h in range(Hkv):
        lengths = rng.integers(4, 17, size=L // 4 + 1)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        seg = np.searchsorted(starts, np.arange(L), side="right") - 1
        means = np.cumsum(rng.standard_normal((len(lengths), D)) * 0.7, axis=0) * 0.2
        means += rng.standard_normal((len(lengths), D))
        out[0, h] = means[seg] + 0.5 * rng.standard_normal((L, D))
    return out


def _stepper(cache, pk, pv, pq, steps: int, T: int):
    """A call that runs `steps` generation steps on cache (append the next
    key of the pool, decode one query) and returns the share of selection
    groups that reused chunk scores."""
    at = [0]

    def run():
        reused = groups = 0
        for _ in range(steps):
            j = at[0] % pk.shape[2]
            at[0] += 1
            cache.append(pk[:, :, j:j + 1], pv[:, :, j:j + 1], num_threads=T)
            _, info = dhsa.decode_attention(pq[j], cache, num_threads=T, return_info=True)
            reused += info.reused_groups
            groups += len(info.offsets) - 1
        return reused / max(1, groups)
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    started = common.utc_now()
    command = common.command_line()
    torch = None if args.no_torch else common.load_torch()
    machine = common.machine_info()
    shapes = common.parse_shapes(args.shapes)
    lengths = common.parse_lengths(args.lengths)
    budgets = common.parse_lengths(args.budgets)
    T = args.threads or machine["cpu"]["usable_cpus"] or os.cpu_count() or 1
    dt = np.dtype(args.dtype)
    print(common.describe_machine(machine))
    print(f"command: {command}")
    if torch is not None:
        torch.set_num_threads(T)
    timing = dict(repeats=args.repeats, warmup=args.warmup, max_seconds=args.max_seconds,
                  extra_repeats=args.extra_repeats)
    base_cfg = dhsa.DHSAConfig()
    if args.decode_score:
        base_cfg = base_cfg.replace(decode_score=args.decode_score)
    rows = []
    for (H, Hkv, D, cap) in shapes:
        for L in lengths:
            if cap is not None and L > cap:
                continue
            rng = np.random.default_rng(args.seed)
            k = segmented_keys(rng, Hkv, L, D).astype(dt)
            v = rng.standard_normal((1, Hkv, L, D)).astype(dt)
            q = (rng.standard_normal((1, H, 1, D)) * 0.5).astype(dt)
            exact_cfg = base_cfg.replace(decode_budget=None)
            caches = {}
            for b in budgets:
                caches[b] = dhsa.KVCache(base_cfg.replace(decode_budget=b), Hkv, D, dtype=dt)
                caches[b].append(k, v, num_threads=T)
            exact = dhsa.KVCache(exact_cfg, Hkv, D, dtype=dt)
            exact.append(k, v, num_threads=T)
            fns = {
                "exact_cache": lambda: dhsa.decode_attention(q, exact, num_threads=T),
                "exact_kernel": lambda: dhsa.dense_attention(q, k, v, num_threads=T),
            }
            for b in budgets:
                fns[f"sparse{b}"] = (lambda c=caches[b]: dhsa.decode_attention(
                    q, c, num_threads=T, return_info=True))
            if args.reuse:
                # generation steps: the cache grows by `steps` keys per call
                # (at most (warm-up + repeats) * steps in all), plain and
                # reusing caches alike
                pool = args.steps * (1 + args.repeats + args.extra_repeats + 1)
                prng = np.random.default_rng(args.seed + 1)
                pk = segmented_keys(prng, Hkv, pool, D).astype(dt)
                pv = prng.standard_normal((1, Hkv, pool, D)).astype(dt)
                pq = (prng.standard_normal((pool, 1, H, 1, D)) * 0.5).astype(dt)
                for b in budgets:
                    for reuse in (1, args.reuse):
                        c = dhsa.KVCache(base_cfg.replace(decode_budget=b, decode_reuse=reuse),
                                         Hkv, D, dtype=dt)
                        c.append(k, v, num_threads=T)
                        fns[f"steps{b}_{reuse}"] = _stepper(c, pk, pv, pq, args.steps, T)
            if torch is not None:
                tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

                def run_torch():
                    with torch.no_grad():
                        return torch.nn.functional.scaled_dot_product_attention(
                            tq, tk, tv, enable_gqa=True)
                fns["torch"] = run_torch

            # filling a cache with L keys, and one append on top (on a copy
            # each time, so the measured caches keep L keys)
            k1 = k[:, :, -1:].copy()
            v1 = v[:, :, -1:].copy()

            def fill():
                c = dhsa.KVCache(base_cfg.replace(decode_budget=budgets[0]), Hkv, D, dtype=dt)
                c.append(k, v, num_threads=T)
                return c
            fill_t = common.time_call(fill, repeats=max(2, args.repeats // 5), warmup=1)
            grow = fill_t.result
            append_t = common.time_call(lambda: grow.append(k1, v1, num_threads=T),
                                        repeats=args.repeats, warmup=1)
            tm = common.time_interleaved(fns, **timing)
            ex_ms, ker_ms = tm["exact_cache"].best * 1e3, tm["exact_kernel"].best * 1e3
            torch_ms = tm["torch"].best * 1e3 if "torch" in tm else None
            mem = caches[budgets[0]].nbytes()
            exact_out = tm["exact_kernel"].result
            for b in budgets:
                out, info = tm[f"sparse{b}"].result
                sp_ms = tm[f"sparse{b}"].best * 1e3
                row = {"shape": common.shape_name(H, Hkv, D), "H": H, "Hkv": Hkv, "D": D,
                       "L": L, "Lstr": common.fmt_len(L), "budget": b,
                       "budget_str": common.fmt_len(b), "dtype": dt.name, "threads": T,
                       "sparse_ms": sp_ms, "exact_cache_ms": ex_ms, "exact_kernel_ms": ker_ms,
                       "torch_ms": torch_ms,
                       "select_ms_incall": info.select_seconds * 1e3,
                       "attention_ms_incall": info.attention_seconds * 1e3,
                       "keys_read": int(info.keys_selected.max()),
                       "density": info.density,
                       "chunks": int(np.mean([len(x) - 1 for x in info.boundaries])),
                       "fill_ms": fill_t.best * 1e3, "append1_ms": append_t.best * 1e3,
                       "kv_mib": mem["kv"] / 2**20, "state_mib": mem["chunk_state"] / 2**20,
                       "state_frac": mem["chunk_state"] / max(1, mem["kv"]),
                       "speedup_vs_exact_cache": ex_ms / sp_ms,
                       "speedup_vs_exact_kernel": ker_ms / sp_ms,
                       "speedup_vs_torch": torch_ms / sp_ms if torch_ms else None,
                       "exact_cache_vs_kernel": float(np.abs(
                           tm["exact_cache"].result - exact_out).max()),
                       "sparse": tm[f"sparse{b}"].as_dict(),
                       "exact_cache": tm["exact_cache"].as_dict(),
                       "exact_kernel": tm["exact_kernel"].as_dict(),
                       "torch": tm["torch"].as_dict() if "torch" in tm else None}
                row["others"] = common.others_label(row["sparse"], row["exact_kernel"],
                                                    row["torch"])
                if args.reuse:
                    plain, kept = tm[f"steps{b}_1"], tm[f"steps{b}_{args.reuse}"]
                    row.update(steps=args.steps, reuse=args.reuse,
                               step_ms=plain.best * 1e3 / args.steps,
                               step_reuse_ms=kept.best * 1e3 / args.steps,
                               reused_frac=kept.result,
                               speedup_reuse=plain.best / kept.best,
                               steps_plain=plain.as_dict(), steps_reuse=kept.as_dict())
                rows.append(row)
                print(f"{row['shape']:<12} L={row['Lstr']:>4} b={row['budget_str']:>3}: sparse "
                      f"{sp_ms:7.3f} ms, exact {ex_ms:7.3f} (kernel {ker_ms:7.3f}), torch "
                      f"{'-' if torch_ms is None else f'{torch_ms:7.3f}'} ms: "
                      f"x{row['speedup_vs_exact_kernel']:.1f} vs kernel"
                      + (f", x{row['speedup_vs_torch']:.1f} vs torch" if torch_ms else "")
                      + f"; append {row['append1_ms']:.3f} ms, fill {row['fill_ms']:.0f} ms, "
                      f"state {row['state_frac'] * 100:.1f}% of K/V"
                      + (f"; step {row['step_ms']:.3f} ms, reuse {args.reuse} "
                         f"{row['step_reuse_ms']:.3f} ms ({row['reused_frac'] * 100:.0f}% reused)"
                         if args.reuse else ""), flush=True)
            del fns, tm, caches, exact, grow

    cols = [("shape", "shape", ""), ("Lstr", "context", ""), ("budget_str", "budget", ""),
            ("sparse_ms", "sparse (ms)", ".3f"), ("exact_cache_ms", "exact, cache (ms)", ".3f"),
            ("exact_kernel_ms", "exact kernel (ms)", ".3f"), ("torch_ms", "torch SDPA (ms)", ".3f"),
            ("speedup_vs_exact_kernel", "x exact kernel", ".1f"),
            ("speedup_vs_torch", "x torch", ".1f"), ("append1_ms", "append 1 (ms)", ".3f"),
            ("fill_ms", "fill L (ms)", ".0f"), ("state_frac", "state / K-V", ".3f"),
            ("others", "others %", "")]
    if args.reuse:
        cols[-1:-1] = [("step_ms", "append + step (ms)", ".3f"),
                       ("step_reuse_ms", f"reuse {args.reuse} (ms)", ".3f"),
                       ("reused_frac", "reused", ".2f")]
    notes = [
        "sparse: dhsa.decode_attention with DHSAConfig(decode_budget=b) defaults otherwise "
        "(sink 64, local 256); exact: the same cache read whole; exact kernel: "
        "dhsa.dense_attention on contiguous K/V; torch: F.scaled_dot_product_attention "
        "(enable_gqa) on the same K/V.",
        "'others %': share of the CPUs other processes took during the best sparse / exact "
        "kernel / torch call.",
    ]
    if args.reuse:
        notes.append(f"append + step: {args.steps} consecutive steps (append one key, decode "
                     f"one query) per timed call, ms per step; reuse {args.reuse}: the same "
                     f"with DHSAConfig(decode_reuse={args.reuse}); reused: share of the "
                     f"steps' selection groups that reused chunk scores.")
    config = {"shapes": args.shapes, "lengths": args.lengths, "budgets": args.budgets,
              "dtype": args.dtype, "threads": T, "repeats": args.repeats,
              "reuse": args.reuse, "steps": args.steps, "decode_score": base_cfg.decode_score}
    name = NAME + ("_quick" if args.quick else "")
    jp, mp = common.write_results(name, machine=machine, command=command, started=started,
                                  config=config, rows=rows,
                                  tables=[("Attention per decode step", rows, cols)],
                                  notes=notes, out=args.out)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
