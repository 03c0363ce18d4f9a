#!/usr/bin/env bash
# Sets up everything (Rust build, venv, maturin develop) and runs every test: Rust and Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Each phase's header says when it began, so a slow run shows where its time went.
phase() { echo "== $* (at ${SECONDS}s)"; }
bash scripts/setup.sh
. .venv/bin/activate

phase "cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings

phase "cargo test"
# With the etcd feature, so that the core's etcd store tests run too (on a local etcd member).
cargo_log="$(mktemp)"
if ! cargo test -p memfabric -p memfabric-capi -p memfabric-cli -p ascend-sys --features memfabric/etcd -q \
    > "$cargo_log" 2>&1; then
    # Child processes of the multi-process tests print their panics long before the summary:
    # show every panic with its message, then the end of the log.
    grep -n -A4 "panicked at" "$cargo_log" | head -n 200 || true
    tail -n 60 "$cargo_log"
    exit 1
fi
tail -n 40 "$cargo_log"

phase "stubs (mypy.stubtest against the built module)"
python -m mypy.stubtest memfabric_hybrid._native --allowlist .stubtest-allowlist

phase "pytest"
python -m pytest tests -q

# Coverage-guided fuzzing of the decoders that peers and users feed (store frames, data-plane
# headers, store URLs, tls_info): 15 s per target on the committed corpus; any finding fails.
phase "fuzz"
bash scripts/fuzz.sh 15
phase "done"
