#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, for a GPU machine with no Rust toolchain and no network.
#
# Here (where Rust builds):  bash scripts/gpu_check.sh prepare
#   builds the release extension, the core's test binary and the device-paths test into
#   .devrun/ (stripped), and bundles Mooncake's CUDA wheel for the benchmark's comparison
#   (.devrun/mooncake.tar.xz).
# There (in a copy of this tree with .devrun/):  bash scripts/gpu_check.sh run [bench]
#   runs the Rust GPU tests, the Transfer Engine's device paths on CUDA, the Python device
#   tests and, with `bench`, the device benchmark;
#   logs go to $OUT (or /tmp/mf-gpu-out).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEV=.devrun
MOONCAKE_VERSION=0.3.11.post1

# Mooncake's CUDA wheel for a GPU machine without network: its engine for CPython 3.10-3.13
# and the libraries it loads, trimmed (scripts/mooncake_bundle.py) and compressed.
mooncake_bundle() {
    local dl=target/mooncake-wheels stage v rc=0
    mkdir -p "$dl"
    for v in 3.10 3.11 3.12 3.13; do
        python -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
            --platform manylinux_2_35_x86_64 -d "$dl" "mooncake-transfer-engine==$MOONCAKE_VERSION" || return 1
    done
    python -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        -d "$dl" "nvidia-cuda-runtime-cu12" || return 1
    stage=$(mktemp -d)
    python scripts/mooncake_bundle.py "$dl" "$stage" "$MOONCAKE_VERSION" &&
        tar -cJf "$DEV/mooncake.tar.xz" -C "$stage" . || rc=1
    rm -rf "$stage"
    return $rc
}

# Unpacks the bundle for this machine's Python and says where the benchmark finds it.
mooncake_unpack() {
    local dir=/tmp/mf-mooncake py f
    if [ ! -f "$DEV/mooncake.tar.xz" ]; then
        echo "no Mooncake bundle in $DEV (prepare could not make one)"
        return 0
    fi
    rm -rf "$dir" && mkdir -p "$dir/lib" && tar -xJf "$DEV/mooncake.tar.xz" -C "$dir" || return 0
    py=$(python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    if [ ! -f "$dir/engines/engine.$py.so" ]; then
        echo "Mooncake's CUDA wheel has no engine for $py"
        return 0
    fi
    cp "$dir/engines/engine.$py.so" "$dir/site/mooncake/engine.so"
    cp "$dir"/cudart/* "$dir/lib/"
    # The bundled system libraries only where this machine lacks them: its own stay in charge.
    for f in "$dir"/syslib/*; do
        PATH="$PATH:/sbin:/usr/sbin" ldconfig -p | grep -qF "$(basename "$f") " || cp "$f" "$dir/lib/"
    done
    echo "Mooncake $MOONCAKE_VERSION for $py unpacked; loaded from the bundle: $(ls "$dir/lib" | tr '\n' ' ')"
    export MF_BENCH_MOONCAKE_SITE="$dir/site" MF_BENCH_MOONCAKE_LIBS="$dir/lib"
}

# The executable cargo builds for the memfabric test target named $1 (cargo options follow).
test_binary() {
    local name=$1
    shift
    cargo test -p memfabric "$@" --no-run --message-format=json 2>/dev/null | python -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$name"
}

prepare() {
    set -e
    mkdir -p "$DEV"
    . .venv/bin/activate
    maturin develop --release -q
    cp memfabric_hybrid/_native.abi3.so "$DEV/"
    cp "$(test_binary memfabric --lib)" "$DEV/memfabric-tests"
    cp "$(test_binary device_paths --release --test device_paths)" "$DEV/device-paths-tests"
    strip "$DEV/_native.abi3.so" "$DEV/memfabric-tests" "$DEV/device-paths-tests"
    mooncake_bundle || echo "note: Mooncake's CUDA wheel not bundled; the device benchmark will skip it" >&2
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
    echo "== device paths of the Transfer Engine on CUDA (local, cma through IPC, tcp staged, teardown)"
    MF_TEST_DEVICE_BACKEND=cuda timeout 120 "$DEV/device-paths-tests" 2>&1 | grep -v WARN |
        tee "$out/device_paths.log" | tail -n 20 || rc=1
    MF_TEST_DEVICE_BACKEND=cuda MF_DEVICE_PATHS_TIMING=1 timeout 120 "$DEV/device-paths-tests" 2>&1 |
        grep -v WARN | tee "$out/device_paths_timing.log" | tail -n 50 || rc=1
    echo "== pytest (device)"
    timeout 400 python3 -m pytest tests/test_device.py tests/test_cuda.py -v -p no:cacheprovider -W ignore \
        -o timeout=120 2>&1 | tee "$out/pytest_device.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|Error|assert" | tail -n 60 || rc=1
    echo "== pytest (host paths with the CUDA backend loaded)"
    timeout 200 python3 -m pytest tests/test_tensors.py tests/test_buffers.py tests/test_bad_inputs.py tests/test_offload.py -q \
        -p no:cacheprovider -W ignore -o timeout=60 2>&1 | tee "$out/pytest_host.log" | tail -n 15 || rc=1
    if [ "${1:-}" = bench ]; then
        mooncake_unpack
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
