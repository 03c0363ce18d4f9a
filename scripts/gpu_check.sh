#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, for a GPU machine with no Rust toolchain and no network.
#
# Here (where Rust builds):  bash scripts/gpu_check.sh prepare
#   builds the release extension and the core's test binary into .devrun/ (stripped).
# There (in a copy of this tree with .devrun/):  bash scripts/gpu_check.sh run [bench]
#   runs the Rust GPU tests, the Python device tests and, with `bench`, the device benchmark;
#   logs go to $OUT (or /tmp/mf-gpu-out).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEV=.devrun

prepare() {
    set -e
    mkdir -p "$DEV"
    . .venv/bin/activate
    maturin develop --release -q
    cp memfabric_hybrid/_native.abi3.so "$DEV/"
    local bin
    bin=$(cargo test -p memfabric --lib --no-run --message-format=json 2>/dev/null |
        python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "memfabric":
        print(m["executable"])')
    cp "$bin" "$DEV/memfabric-tests"
    strip "$DEV/_native.abi3.so" "$DEV/memfabric-tests"
    ls -la "$DEV"
}

run() {
    local out=${OUT:-/tmp/mf-gpu-out} rc=0
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT" MF_GPU_TEST_BINARY="$ROOT/$DEV/memfabric-tests"
    cp "$DEV/_native.abi3.so" memfabric_hybrid/
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
    python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' | tee -a "$out/gpu.txt"
    echo "== rust GPU tests"
    timeout 300 "$DEV/memfabric-tests" device:: --nocapture --test-threads=1 2>&1 | tee "$out/rust_gpu.log" | tail -n 40 || rc=1
    echo "== pytest (device)"
    timeout 400 python3 -m pytest tests/test_device.py tests/test_cuda.py -v -p no:cacheprovider -W ignore \
        -o timeout=120 2>&1 | tee "$out/pytest_device.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|Error|assert" | tail -n 60 || rc=1
    echo "== pytest (host paths with the CUDA backend loaded)"
    timeout 200 python3 -m pytest tests/test_tensors.py tests/test_buffers.py tests/test_bad_inputs.py -q \
        -p no:cacheprovider -W ignore -o timeout=60 2>&1 | tee "$out/pytest_host.log" | tail -n 15 || rc=1
    if [ "${1:-}" = bench ]; then
        echo "== device benchmark"
        timeout 300 python3 -m memfabric_hybrid.bench device --json "$out/bench_device.json" 2>&1 | tee "$out/bench_device.log" || rc=1
    fi
    return $rc
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run [bench]" >&2; exit 2 ;;
esac
