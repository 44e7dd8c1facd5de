#!/usr/bin/env bash
# Run the test suite against an ASan + UBSan build of dhsa._core.
#
#   scripts/sanitize.sh [pytest args...]     default: tests/ minus the model tests
#   scripts/sanitize.sh --fuzz [seconds]     the fuzz target (random mode) instead
#
# The extension is built with DHSA_SANITIZE=1 into a throwaway copy of the
# tree (under $TMPDIR), so the normal in-place build is untouched. Python runs
# with gcc's libasan preloaded, leak detection off (CPython's own allocations
# are noisy), UBSan halting with a stack trace on the first report, and every
# report also written to a log directory. Exit status: non-zero when a test
# fails or any sanitizer report was written. KEEP=1 keeps the copy.
#
# Skipped under the sanitizer: test_patching.py, test_models.py, test_gemma3.py,
# test_eval.py, test_sweep.py and test_tasks.py (torch + Hugging Face models or
# tokenizers; slow and not our C code), and the
# tests that need a hard address-space limit (ASan reserves terabytes of
# shadow memory) - they see DHSA_UNDER_SANITIZER=1.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
START=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dhsa-sanitize.XXXXXX")"
cleanup() { if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

echo "sanitize: copying the tree to $WORK"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$WORK"
rm -f "$WORK"/dhsa/_core*.so

echo "sanitize: building with -fsanitize=address,undefined"
if ! (cd "$WORK" && DHSA_SANITIZE=1 python setup.py build_ext --inplace -q >build.log 2>&1); then
    cat "$WORK/build.log" >&2
    echo "sanitize: build failed" >&2
    exit 2
fi

LIBASAN="$(gcc -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
    echo "sanitize: libasan not found (gcc -print-file-name=libasan.so gave $LIBASAN)" >&2
    exit 2
fi
LOGS="$WORK/sanitizer-logs"
mkdir -p "$LOGS"

# libstdc++ right after libasan: without it ASan's __cxa_throw interceptor
# finds no real __cxa_throw (python is plain C) and aborts on the first C++
# exception of another extension (matplotlib's ft2font)
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so)"
export LD_PRELOAD="$LIBASAN${LIBSTDCXX:+ $LIBSTDCXX}"
# allocator_may_return_null: a failed huge allocation is a MemoryError, as
# without ASan; the core's own overflow checks must stop sizes before that
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:log_path=$LOGS/asan:log_exe_name=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan"
export PYTHONPATH="$WORK"
export PYTHONMALLOC=malloc          # let ASan see every Python buffer
export DHSA_UNDER_SANITIZER=1
export PYTHONFAULTHANDLER=1
export MPLBACKEND=Agg

cd "$WORK"
python -c "import dhsa, sys; assert dhsa.__file__.startswith('$WORK'), dhsa.__file__" || exit 2

if [[ "${1:-}" == --fuzz ]]; then
    SECS="${2:-60}"
    echo "sanitize: fuzzing for ${SECS}s"
    python tests/fuzz/fuzz_core.py --random --seed "${FUZZ_SEED:-$(date +%s)}" \
        --seconds "$SECS" --status-file "$LOGS/../last-fuzz-input"
    rc=$?
    [[ $rc -ne 0 ]] && cat "$LOGS/../last-fuzz-input" >&2
else
    if [[ $# -eq 0 ]]; then
        set -- tests -q -p no:cacheprovider --ignore=tests/test_patching.py \
            --ignore=tests/test_models.py --ignore=tests/test_eval.py \
            --ignore=tests/test_gemma3.py --ignore=tests/test_sweep.py \
            --ignore=tests/test_tasks.py
    fi
    echo "sanitize: python -m pytest $*"
    python -m pytest "$@"
    rc=$?
fi

reports=$(find "$LOGS" -type f | wc -l)
if [[ $reports -gt 0 ]]; then
    echo "sanitize: $reports sanitizer report(s):" >&2
    for f in "$LOGS"/*; do echo "== $f" >&2; head -60 "$f" >&2; done
    [[ $rc -eq 0 ]] && rc=1
fi
echo "sanitize: pytest/fuzz exit $rc, sanitizer reports $reports, $(( $(date +%s) - START ))s"
exit $rc
