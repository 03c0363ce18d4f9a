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


def shm_rank(url: str, world: int, rank: int, size: int, out, victim: int = -1) -> None:
    """Writes its rank into its own part, then reads every part through the GVA."""
    import ctypes

    import memfabric_hybrid as mf

    rc = mf.shm.initialize(url, world, rank, 0, mf.shm.ShmConfig())
    assert rc == 0, mf.get_last_err_msg()
    s = mf.shm.create(0, world, rank, size)
    mine = s.gva + rank * s.stride
    ctypes.memset(mine, rank + 1, size)
    assert s.barrier() == 0, mf.get_last_err_msg()
    seen = []
    for r in range(world):
        part = ctypes.string_at(s.gva + r * s.stride, size)
        seen.append(part == bytes([r + 1]) * size)
    gathered = s.all_gather(bytes([rank]) * 4)
    if rank == 0:
        assert s.set_context(b"ctx-from-0") == 0
    assert s.barrier() == 0
    ctx = s.get_context()
    reach = [s.topology_can_reach(r) for r in range(world)]
    out.put((rank, s.gva, seen, gathered, ctx, reach, s.query_support_data_operation()))
    if victim >= 0:
        if rank == victim:
            import time
            time.sleep(60)
        t = __import__("time").monotonic()
        rc = s.barrier()
        out.put(("after-kill", rank, rc, __import__("time").monotonic() - t, mf.get_last_err_msg()))
        return
    assert s.barrier() == 0
    s.destroy()
    mf.shm.uninitialize()
