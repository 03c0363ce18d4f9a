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


def bm_rank(url: str, world: int, rank: int, size: int, out) -> None:
    """Every copy direction against every rank's part, data verified."""
    import ctypes
    import mmap

    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType as T

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank
    assert mf.bm.initialize(url, world, 0, cfg) == 0, mf.get_last_err_msg()
    assert mf.bm.bm_rank_id() == rank
    big = mf.bm.create(1, size)
    assert big.join() == 0
    host = mmap.mmap(-1, size)
    h = ctypes.addressof(ctypes.c_char.from_buffer(host))
    chunk = size // world
    failures = []
    # Each rank writes its own chunk of every rank's part (disjoint), through H2G / L2GH.
    for r in range(world):
        data = bytes([(rank * 16 + r) % 251]) * chunk
        host[:chunk] = data
        dst = big.peer_rank_ptr(r) + rank * chunk
        ty = T.H2G if r % 2 == 0 else T.L2GH
        if big.copy_data(h, dst, chunk, ty) != 0:
            failures.append(("write", r, mf.get_last_err_msg()))
    assert big.wait() == 0
    # Then reads back everything everybody wrote, with G2H / GH2L / AUTO.
    for r in range(world):
        for w in range(world):
            src = big.peer_rank_ptr(r) + w * chunk
            ty = [T.G2H, T.GH2L, T.AUTO][(r + w) % 3]
            if big.copy_data(src, h, chunk, ty) != 0:
                failures.append(("read", r, w, mf.get_last_err_msg()))
            elif host[:chunk] != bytes([(w * 16 + r) % 251]) * chunk:
                failures.append(("data", r, w))
    # Everyone has read before the error cases below, one of which writes 8 bytes to part 0
    # (a batch stops at its first bad copy, after the good ones).
    assert big.wait() == 0
    nxt = (rank + 1) % world
    if big.copy_data(big.peer_rank_ptr(rank), h, chunk, T.G2H) != 0:
        failures.append(("g2h", mf.get_last_err_msg()))
    # Errors: past the part, crossing into the next rank, outside the GVA, bad local pointer.
    base = big.peer_rank_ptr(0)
    errs = [
        big.copy_data(h, base + size - 8, 16, T.H2G),
        big.copy_data(h, big.peer_rank_ptr(world - 1) + size, 8, T.H2G),
        big.copy_data(h, 0x1000, 8, T.H2G),
        big.copy_data(0x1000, base, 8, T.H2G),
        big.copy_data(h, base, 0, T.H2G),
        big.copy_data(h, base, 8, 42),
        big.copy_data_batch([h, h], [base, base + size * world], [8, 8], 2, T.H2G),
        big.copy_data_batch([h], [base], [8], 2, T.H2G),
    ]
    ranks = [big.get_rank_id_by_gva(big.peer_rank_ptr(r) + 5) for r in range(world)]
    assert big.wait() == 0
    big.leave()
    big.destroy()
    mf.bm.uninitialize()
    out.put((rank, failures, errs, ranks, nxt))


def bm_netns_rank(url: str | None, world: int, rank: int, size: int, ip: str, out) -> None:
    """A BM rank on its own test host: writes to and reads from the other rank's part."""
    import ctypes
    import mmap
    import os

    os.environ["MF_TRANSPORT"] = "tcp"
    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType as T

    server = None
    if url is None:
        server = mf.start_config_store(f"tcp://{ip}:0")
        url = server.url
        out.put(("url", url))
    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank
    cfg.start_store = False
    assert mf.bm.initialize(url, world, 0, cfg) == 0, mf.get_last_err_msg()
    big = mf.bm.create(2, size)
    host = mmap.mmap(-1, size)
    h = ctypes.addressof(ctypes.c_char.from_buffer(host))
    assert big.register(h, size) == 0, mf.get_last_err_msg()
    peer = 1 - rank
    data = bytes([rank + 7]) * size
    host[:] = data
    rc_w = big.copy_data(h, big.peer_rank_ptr(peer), size, T.H2G)
    msg_w = mf.get_last_err_msg()
    assert big.wait() == 0
    host[:] = b"\0" * size
    rc_r = big.copy_data(big.peer_rank_ptr(rank), h, size, T.G2H)  # what the peer wrote into mine
    got_mine = host[:] == bytes([peer + 7]) * size
    rc_r2 = big.copy_data(big.peer_rank_ptr(peer), h, size, T.G2H)  # remote read of my writes
    got_remote = host[:] == data
    va = big.gva_to_va(big.peer_rank_ptr(peer))
    oob = big.copy_data(h, big.peer_rank_ptr(peer) + size - 4, 8, T.H2G)
    assert big.wait() == 0
    big.destroy()
    mf.bm.uninitialize()
    out.put((rank, rc_w, msg_w, rc_r, got_mine, rc_r2, got_remote, va, oob))
    if server is not None:
        import time
        time.sleep(1.0)
        server.close()


def bm_doomed_rank(url: str, world: int, rank: int, victim: int, out) -> None:
    """Creates a BM object; the victim then waits to be killed, the others wait() and report."""
    import time

    import memfabric_hybrid as mf

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank
    cfg.operation_timeout = 60
    assert mf.bm.initialize(url, world, 0, cfg) == 0, mf.get_last_err_msg()
    big = mf.bm.create(3, 2 << 20)
    out.put(("created", rank))
    if rank == victim:
        time.sleep(120)
        return
    t = time.monotonic()
    rc = big.wait()
    out.put(("waited", rank, rc, time.monotonic() - t, mf.get_last_err_msg()))
    # A copy into the dead rank's part (mapped here, memory still valid) does not crash.
    import ctypes
    import mmap
    buf = mmap.mmap(-1, 4096)
    a = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    out.put(("copied", rank, big.copy_data(a, big.peer_rank_ptr(victim), 4096, mf.bm.BmCopyType.H2G)))


def bm_dynamic_rank(url: str, rank: int, size: int, cmds, out) -> None:
    """A member of a dynamic BM object (max 4 ranks) driven by commands from the test."""
    import ctypes
    import mmap

    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType as T

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank
    cfg.dynamic_world_size = True
    cfg.operation_timeout = 30
    assert mf.bm.initialize(url, 4, 0, cfg) == 0, mf.get_last_err_msg()
    big = mf.bm.create(7, size)
    events = []
    big.set_group_event_handler(lambda r, ev: events.append((r, int(ev))))
    buf = mmap.mmap(-1, size)
    a = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    out.put(("ready", rank))
    while True:
        cmd = cmds.get(timeout=60)
        if cmd[0] == "write":
            _, peer, byte = cmd
            buf[:] = bytes([byte]) * size
            rc = big.copy_data(a, big.peer_rank_ptr(peer), size, T.H2G)
            out.put(("write", rank, peer, rc, mf.get_last_err_msg()))
        elif cmd[0] == "read-own":
            rc = big.copy_data(big.peer_rank_ptr(rank), a, size, T.G2H)
            out.put(("read-own", rank, rc, buf[:4]))
        elif cmd[0] == "state":
            out.put(("state", rank, big.members(), list(events), big.wait()))
        elif cmd[0] == "leave":
            big.destroy()
            mf.bm.uninitialize()
            out.put(("left", rank))
            return
