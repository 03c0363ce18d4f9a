"""Entry point: ``python -m memfabric_hybrid.bench <store|te|bm|kv|soak|device> [options]``."""

from __future__ import annotations

import sys


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m memfabric_hybrid.bench {store,te,bm,kv,soak,device} [--help]")
        return 0 if len(sys.argv) >= 2 else 2
    which, rest = sys.argv[1], sys.argv[2:]
    if which == "store":
        from .store import main as run
    elif which == "te":
        from .te import main as run
    elif which == "bm":
        from .bm import main as run
    elif which == "kv":
        from .kv import main as run
    elif which == "soak":
        from .soak import main as run
    elif which == "device":
        from .device import main as run
    else:
        print(f"unknown benchmark {which!r}; known: store, te, bm, kv, soak, device", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
