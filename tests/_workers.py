"""Functions run in child processes by the tests (importable by multiprocessing spawn)."""

from __future__ import annotations

import os
import time


def group_member(url: str, world: int, out, rounds: int = 2) -> None:
    import memfabric_hybrid as mf

    g = mf.StoreGroup(url, "pytest", world_size=world, timeout=60)
    for _ in range(rounds):
        g.barrier()
    pieces = g.all_gather(f"rank={g.rank};pid={os.getpid()}".encode())
    out.put((g.rank, os.getpid(), pieces))


def doomed_member(url: str, world: int, out, victim: int) -> None:
    """Joins; the victim then waits to be killed, the others enter a barrier and report."""
    import memfabric_hybrid as mf

    g = mf.StoreGroup(url, "doom", world_size=world, rank=None, timeout=60)
    out.put(("joined", g.rank, os.getpid()))
    if g.rank == victim:
        time.sleep(120)
        return
    t = time.monotonic()
    try:
        g.barrier(timeout=60)
        out.put(("passed", g.rank, time.monotonic() - t, 0, ""))
    except mf.StoreError as e:
        out.put(("failed", g.rank, time.monotonic() - t, e.code, str(e)))


def tls_store_server(tls_info: str, out, stop) -> None:
    import memfabric_hybrid as mf

    assert mf.set_conf_store_tls(True, tls_info) == 0, mf.get_last_err_msg()
    server = mf.start_config_store("tcp://127.0.0.1:0")
    out.put(server.url)
    stop.wait(120)
    server.close()


def tls_store_client(url: str, tls_info: str, key: str, enc_pw: str, out) -> None:
    """Uses set_conf_store_tls_key with an encrypted key whose pass phrase is 'decrypted' by
    reversing the string (standing in for a user's KMS call)."""
    import memfabric_hybrid as mf

    if key:
        rc = mf.set_conf_store_tls_key(key, enc_pw, lambda s: s[::-1])
        if rc != 0:
            out.put(("key", rc, mf.get_last_err_msg()))
            return
    rc = mf.set_conf_store_tls(True, tls_info)
    if rc != 0:
        out.put(("tls", rc, mf.get_last_err_msg()))
        return
    try:
        with mf.StoreClient(url, timeout=3) as c:
            c.set("tls-key", b"secret-value")
            out.put(("ok", 0, c.get("tls-key").decode()))
    except mf.StoreError as e:
        out.put(("refused", e.code, str(e)))
