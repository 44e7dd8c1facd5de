#!/usr/bin/env bash
# Longer fuzz run of dhsa._core (tests/fuzz/fuzz_core.py).
#
#   scripts/fuzz.sh [seconds]        default 60
#
# Uses atheris (libFuzzer) when it is installed, else the plain seeded random
# loop of the same target. FUZZ_MODE=random forces the random loop,
# FUZZ_SEED picks its seed (default: the time), FUZZ_OUT the directory of the
# corpus and crash files (default out/fuzz). Run it on a sanitizer build with
# scripts/sanitize.sh --fuzz [seconds]. Exit status 0: no finding.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL="${1:-60}"
OUT="${FUZZ_OUT:-out/fuzz}"
mkdir -p "$OUT/corpus"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
TARGET=tests/fuzz/fuzz_core.py
MODE="${FUZZ_MODE:-auto}"
if [[ "$MODE" == auto ]]; then
    if python -c "import atheris" 2>/dev/null; then MODE=atheris; else MODE=random; fi
fi
echo "fuzz: $MODE for ${SECONDS_TOTAL}s (python $(python -c 'import sys; print(sys.version.split()[0])'))"
if [[ "$MODE" == atheris ]]; then
    # seed corpus of long random inputs, so mutation starts from deep calls
    if [[ -z "$(ls -A "$OUT/corpus")" ]]; then python "$TARGET" --make-corpus "$OUT/corpus"; fi
    # one worker; -timeout is per input, -rss_limit_mb guards against a leak
    rc=0
    python "$TARGET" --summary-file "$OUT/summary.json" -max_total_time="$SECONDS_TOTAL" \
        -timeout=60 -rss_limit_mb=6144 -max_len=4096 -print_final_stats=1 \
        -artifact_prefix="$OUT/" "$OUT/corpus" || rc=$?
    [[ -f "$OUT/summary.json" ]] && echo "FUZZ-SUMMARY $(cat "$OUT/summary.json")"
    if [[ $rc -ne 0 ]]; then
        echo "fuzz: FINDING (exit $rc); crash input under $OUT/, replay with" \
             "python $TARGET --repro FILE -v" >&2
    fi
    exit $rc
else
    SEED="${FUZZ_SEED:-$(date +%s)}"
    exec python "$TARGET" --random --seed "$SEED" --seconds "$SECONDS_TOTAL" \
        --status-file "$OUT/last-input"
fi
