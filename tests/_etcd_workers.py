"""Process bodies for the etcd store tests (spawned: threads do not survive fork)."""

from __future__ import annotations

import os
import time


def busy_rank(url: str, world: int, rounds: int, out) -> None:
    """A group member that counts, logs and synchronizes for ``rounds`` rounds, reporting
    its progress; any failure is reported, not raised, so the test sees what happened."""
    import memfabric_hybrid as mf

    try:
        g = mf.StoreGroup(url, "busy", world_size=world, timeout=60)
        c = mf.StoreClient(url, timeout=30)
        out.put(("joined", g.rank, os.getpid()))
        slowest = 0.0
        for i in range(rounds):
            t = time.monotonic()
            c.add("total", 1)
            c.append("log", f"{g.rank}:{i};".encode())
            g.barrier(timeout=60)
            if i % 10 == 9:
                pieces = g.all_gather(f"{g.rank}/{i}".encode(), timeout=60)
                assert pieces == [f"{r}/{i}".encode() for r in range(world)], pieces
            slowest = max(slowest, time.monotonic() - t)
            c.set(f"progress/{g.rank}", str(i + 1))
        out.put(("done", g.rank, rounds, slowest, ""))
        g.barrier(timeout=60)
        c.close()
        g.leave()
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(("failed", -1, 0, 0.0, f"{type(e).__name__}: {e}"))


def ephemeral_holder(url: str, out) -> None:
    """Sets an ephemeral key, reports, then waits to be killed."""
    import memfabric_hybrid as mf

    c = mf.StoreClient(url, timeout=10)
    c.set("holder", b"alive", ephemeral=True)
    out.put(os.getpid())
    time.sleep(120)


def tls_client(url: str, tls_info: str, out) -> None:
    """Turns TLS on with ``tls_info`` (empty: stays plaintext) and uses the store."""
    import memfabric_hybrid as mf

    if tls_info:
        assert mf.set_conf_store_tls(True, tls_info) == 0, mf.get_last_err_msg()
    try:
        with mf.StoreClient(url, timeout=3) as c:
            c.set("tls-key", b"over-tls")
            c.set("mine", b"1", ephemeral=True)
            out.put(("ok", 0, c.get("tls-key").decode()))
    except mf.StoreError as e:
        out.put(("refused", e.code, str(e)))
