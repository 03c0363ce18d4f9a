#!/usr/bin/env bash
# Sets up everything, then runs the main demo: an embedded config store and N local ranks
# that rendezvous, barrier and all_gather, printing what happened.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
python examples/demo.py "$@"
