#!/usr/bin/env bash
# Sets up the package and the peers it is compared with, then runs a benchmark:
#   scripts/bench.sh store [args...]     config store vs torch TCPStore
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
esac
python -m memfabric_hybrid.bench "$which" "$@"
