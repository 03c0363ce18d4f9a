"""Run a standalone config store from Python: ``python -m memfabric_hybrid.store_server``.

    python -m memfabric_hybrid.store_server --listen tcp://0.0.0.0:8570 [--tls "ca=..;cert=..;key=.."]

Prints ``listening on tcp://ADDR`` once ready and runs until SIGINT/SIGTERM. The same as the
``mf-store`` binary, for installs that only have the wheel.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import memfabric_hybrid as mf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memfabric_hybrid.store_server", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default=os.environ.get("MF_CONFIG_STORE_URL", "tcp://0.0.0.0:8570"))
    p.add_argument("--tls", default=None, help="tls_info: ca=PATH;cert=PATH;key=PATH")
    p.add_argument("--log-level", type=int, default=None)
    args = p.parse_args(argv)
    if args.log_level is not None and mf.set_log_level(args.log_level) != 0:
        print(f"error: {mf.get_last_err_msg()}", file=sys.stderr)
        return 2
    if args.tls and mf.set_conf_store_tls(True, args.tls) != 0:
        print(f"error: {mf.get_last_err_msg()}", file=sys.stderr)
        return 2
    try:
        server = mf.start_config_store(args.listen)
    except mf.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {server.url}", flush=True)
    while not stop.wait(0.5):
        pass
    server.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
