#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: a Python venv with the package built in release mode.
# Idempotent and safe to run on a fresh machine: it installs what is missing and nothing else.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() { echo "-- setup: $* (at ${SECONDS}s)"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo (a stable Rust toolchain) is required: https://rustup.rs" >&2
    exit 1
fi
# Debian packages, installed when missing (as root, where apt-get exists):
#   iproute2           network namespaces for the multi-host tests (optional: they skip);
#   etcd-server        a local etcd cluster for the etcd store tests (optional: they skip);
#   protobuf-compiler  protoc, which the etcd client's build uses to generate its gRPC code.
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null) \
        || echo "note: could not install ${need[*]}; namespace and etcd tests will skip" >&2
fi
if ! command -v protoc >/dev/null 2>&1 && [ -z "${PROTOC:-}" ]; then
    echo "protoc is needed to build the etcd store client: install Debian's protobuf-compiler" \
         "(or set PROTOC to a protoc binary)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
step "python packages"
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "maturin>=1.5,<2" "pytest>=7" "pytest-timeout>=2" "numpy>=1.22" "mypy>=1.18"
# torch: the KV-cache example and the tensor tests use it (CPU is enough; about 1-4 minutes and
# 5 GB on a fresh machine). MF_NO_TORCH=1 skips it: those tests then skip, saying why.
if [ -z "${MF_NO_TORCH:-}" ] && ! python -c "import torch" >/dev/null 2>&1; then
    step "torch"
    python -m pip install -q torch || echo "note: torch could not be installed; tensor tests and the KV example skip" >&2
fi
# Upstream memfabric_hybrid 1.3.0's C headers (from its PyPI wheel), for the tests that build C
# programs against them and run them on our libmf_smem.so; those tests skip without them.
step "upstream headers"
python scripts/fetch_upstream_headers.py \
    || echo "note: upstream's headers could not be fetched; the C API compatibility tests skip" >&2
step "extension (maturin, release)"
maturin develop --release -q
# The C API library beside the package, where mf.get_lib_path() points (headers: include/).
step "C API library"
# As a cdylib alone, like the extension's build: with the crate's rlib type too, cargo compiles
# every dependency with object code beside the LTO bitcode, which is another build of the core.
cargo rustc --release -q -p memfabric-capi --lib --crate-type cdylib
mkdir -p memfabric_hybrid/lib
cp -f target/release/libmf_smem.so memfabric_hybrid/lib/
python -c "import memfabric_hybrid as mf; print('memfabric_hybrid', mf.__version__, 'ready')"
