#!/usr/bin/env bash
# Sets up everything, then runs the main demo: an embedded config store and N local ranks that
# rendezvous, barrier and all_gather; then Big Memory (two ranks copying into each other's part
# of the global address space), Share Memory (four ranks sharing one address range), and a
# prefill engine moving paged KV-cache blocks to a decode engine (torch tensors).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
echo "== store: rendezvous, barrier, all_gather"
python examples/demo.py "$@"
echo
echo "== Big Memory: two ranks"
python examples/bm_two_ranks.py
echo
echo "== Big Memory with device memory (HBM parts): two ranks"
python examples/bm_hbm_parts.py
echo
echo "== Share Memory: four ranks"
python examples/shm_barrier_allgather.py
echo
echo "== Transfer Engine: KV-cache blocks from a prefill engine to a decode engine"
if python -c "import torch" >/dev/null 2>&1; then
    python examples/kv_transfer_prefill_decode.py
else
    echo "skipped: torch is not installed (scripts/setup.sh installs it unless MF_NO_TORCH is set)"
fi
