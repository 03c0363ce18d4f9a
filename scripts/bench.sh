#!/usr/bin/env bash
# Sets up the package and the peers it is compared with, then runs a benchmark:
#   scripts/bench.sh store [args...]     config store vs torch TCPStore
#   scripts/bench.sh te [args...]        Transfer Engine vs Mooncake's (tcp), with memcpy/TCP limits
#   scripts/bench.sh bm [args...]        Big Memory copies beside memcpy (same host, across namespaces)
#   scripts/bench.sh kv [args...]        KV-cache blocks/s vs Mooncake's batch_transfer_sync_write
#   scripts/bench.sh soak [args...]      mixed traffic with faults; RSS, fds, errors per minute
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
which="${1:-store}"
shift || true
case "$which" in
    store)
        python -c "import torch.distributed" 2>/dev/null || python -m pip install -q torch
        ;;
    te|kv)
        # Mooncake's wheel links libibverbs, librdmacm and libnuma even for its tcp protocol.
        missing=""
        for lib in libibverbs.so.1 librdmacm.so.1 libnuma.so.1; do
            PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep "$lib" >/dev/null || missing="$missing $lib"
        done
        if [ -n "$missing" ]; then
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
                (apt-get update -qq && apt-get install -y -qq libibverbs1 librdmacm1 libnuma1 >/dev/null) \
                    || echo "note: could not install libibverbs1 librdmacm1 libnuma1; Mooncake may not load" >&2
            else
                echo "note: missing$missing (apt-get install libibverbs1 librdmacm1 libnuma1); Mooncake may not load" >&2
            fi
        fi
        python -c "import mooncake.engine" 2>/dev/null || python -m pip install -q mooncake-transfer-engine-non-cuda
        python -c "import matplotlib" 2>/dev/null || python -m pip install -q matplotlib
        ;;
esac
python -m memfabric_hybrid.bench "$which" "$@"
