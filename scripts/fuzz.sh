#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS_PER_TARGET seconds (default 15) on its committed
# corpus, all targets at once. Exits non-zero on any crash, panic, hang or runaway memory; the
# input that caused it is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#   FUZZ_SANITIZER=address scripts/fuzz.sh 60     # with AddressSanitizer
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
SECS="${1:-15}"

# cargo-fuzz passes -Z flags to rustc; a stable toolchain accepts them only with this set.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

# The decoders under test are safe Rust, so AddressSanitizer adds nothing there but a third
# more build time; panics, overflow checks (debug assertions stay on), hangs and memory
# blow-ups are caught without it. Several codegen units shorten the cold build, in which
# every dependency is compiled with coverage instrumentation.
BUILD=(--sanitizer "${FUZZ_SANITIZER:-none}" --codegen-units 16)
cargo fuzz build "${BUILD[@]}"

# New inputs go to a scratch directory, so a run never grows the committed corpus, which is
# passed as a second, read-only corpus directory.
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

mapfile -t targets < <(cargo fuzz list)
pids=()
for t in "${targets[@]}"; do
    mkdir -p "$SCRATCH/$t" "corpus/$t"
    # -timeout: one input taking this long is a hang; -rss_limit_mb: a decoder that lets a
    # forged length allocate is a finding, not a slow run.
    cargo fuzz run "${BUILD[@]}" "$t" "$SCRATCH/$t" "corpus/$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$SCRATCH/$t.log" 2>&1 &
    pids+=($!)
done

failed=()
for i in "${!targets[@]}"; do
    t="${targets[$i]}"
    if wait "${pids[$i]}"; then
        echo "== fuzz $t: $(grep -E '^Done' "$SCRATCH/$t.log" || echo 'no summary')"
    else
        echo "== fuzz $t: FAILED"
        tail -n 60 "$SCRATCH/$t.log"
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: no findings (${SECS}s per target)"
