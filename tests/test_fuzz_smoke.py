"""A short deterministic run of the fuzz target tests/fuzz/fuzz_core.py (issue 8).

2000 inputs from a fixed seed go through the same decoder as the atheris
target, in a child process so that a crash (or a sanitizer abort, under
scripts/sanitize.sh) fails this test with the input that caused it instead
of taking the whole suite down. Longer runs: scripts/fuzz.sh [seconds].
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import dhsa

FUZZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "fuzz_core.py")
ITERATIONS = int(os.environ.get("DHSA_FUZZ_SMOKE_ITERATIONS", "2000"))
KINDS = ("dense", "sparse", "predict", "count_pairs", "cache")


def run_fuzz(tmp_path, seed: int, iterations: int) -> dict:
    status = tmp_path / "status"
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(dhsa.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, FUZZ, "--random", "--seed", str(seed), "--iterations",
                           str(iterations), "--status-file", str(status)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        where = status.read_text().strip() if status.exists() else "?"
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else \
            f"exit status {proc.returncode}"
        pytest.fail(f"fuzz target failed ({how}) at seed/iteration {where}; reproduce with\n"
                    f"  python {FUZZ} --random --seed {seed} --start {where.split()[-1]} "
                    f"--iterations 1 -v\n{proc.stderr[-6000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FUZZ-SUMMARY ")]
    assert lines, proc.stdout[-2000:]
    return json.loads(lines[-1][len("FUZZ-SUMMARY "):])


def test_fuzz_smoke(tmp_path):
    summary = run_fuzz(tmp_path, seed=0, iterations=ITERATIONS)
    assert summary["inputs"] == ITERATIONS
    per_kind = summary["per_kind"]
    for kind in KINDS:  # every entry point both ran and refused, many times
        outcomes = per_kind.get(kind, {})
        assert outcomes.get("ok", 0) >= ITERATIONS // 40, (kind, outcomes)
        assert outcomes.get("ValueError", 0) >= ITERATIONS // 200, (kind, outcomes)
        assert outcomes.get("TypeError", 0) >= ITERATIONS // 200, (kind, outcomes)
    print(json.dumps(summary))
