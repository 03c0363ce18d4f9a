#!/usr/bin/env bash
# Sets up everything (Rust build, venv, maturin develop) and runs every test: Rust and Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
. .venv/bin/activate

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings

echo "== cargo test"
# With the etcd feature, so that the core's etcd store tests run too (on a local etcd member).
cargo test -p memfabric -p memfabric-capi -p memfabric-cli -p ascend-sys --features memfabric/etcd -q 2>&1 | tail -n 40

echo "== stubs (mypy.stubtest against the built module)"
python -m mypy.stubtest memfabric_hybrid._native --allowlist .stubtest-allowlist

echo "== pytest"
python -m pytest tests -q

# Coverage-guided fuzzing of the decoders that peers and users feed (store frames, data-plane
# headers, store URLs, tls_info): 15 s per target on the committed corpus; any finding fails.
echo "== fuzz"
bash scripts/fuzz.sh 15
