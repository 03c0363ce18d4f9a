"""Functions that fault-matrix tests run in child processes (importable by multiprocessing spawn)."""

from __future__ import annotations

import os
import threading
import time


def write_loop(store_url: str, session: str, peer_addr: int, size: int, conn, env: dict) -> None:
    """An initiator that writes batches to the target until it is killed; says "looping" once
    a few batches have gone through, so the test kills it with one in flight."""
    os.environ.update(env)
    import mmap

    import memfabric_hybrid as mf
    from _te_target import buffer_address

    e = mf.TransferEngine()
    assert e.initialize(store_url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    buf = mmap.mmap(-1, size)
    buf.write(b"\x77" * size)
    a = buffer_address(buf)
    assert e.register_memory(a, size) == 0, mf.get_last_err_msg()
    block = 256 << 10
    count = size // block
    src = [a + i * block for i in range(count)]
    dst = [peer_addr + (count - 1 - i) * block for i in range(count)]
    conn.send(("ready", e.transport_for(session)))
    n = 0
    while True:
        rc = e.batch_transfer_sync_write(session, src, dst, [block] * count)
        if rc != 0:
            conn.send(("failed", rc, mf.get_last_err_msg()))
            return
        n += 1
        if n == 3:
            conn.send(("looping",))


def group_rank(url: str, name: str, world: int, rank: int, cmds, out) -> None:
    """A StoreGroup member with a short timeout that runs barriers when told and reports."""
    import memfabric_hybrid as mf

    g = mf.StoreGroup(url, name, world_size=world, rank=rank, timeout=20)
    out.put(("joined", rank))
    while True:
        cmd = cmds.get(timeout=120)
        if cmd[0] == "barrier":
            t = time.monotonic()
            try:
                g.barrier(timeout=cmd[1])
                out.put(("barrier", rank, 0, time.monotonic() - t, ""))
            except mf.StoreError as e:
                out.put(("barrier", rank, e.code, time.monotonic() - t, str(e)))
        elif cmd[0] == "gather":
            try:
                got = g.all_gather(f"r{rank}".encode(), timeout=cmd[1])
                out.put(("gather", rank, 0, got))
            except mf.StoreError as e:
                out.put(("gather", rank, e.code, str(e)))
        elif cmd[0] == "stop":
            g.leave()
            out.put(("stopped", rank))
            return


def store_storm(url: str, first: int, clients: int, threads: int, rounds: int, start, out) -> None:
    """Opens `clients` store connections, waits for every process of the storm to have opened
    theirs, then runs set/get/add rounds on all of them from `threads` threads."""
    import resource

    import memfabric_hybrid as mf

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    conns = []
    try:
        for i in range(clients):
            conns.append(mf.StoreClient(url, timeout=30))
    except mf.StoreError as e:
        out.put(("open-failed", first + len(conns), e.code, str(e)))
        return
    out.put(("open", first, len(conns)))
    start.wait(60)
    errors: list = []
    slowest = [0.0]

    def work(k: int) -> None:
        for j in range(k, clients, threads):
            c, me = conns[j], first + j
            try:
                for r in range(rounds):
                    t = time.monotonic()
                    value = f"{me}:{r}".encode() * 8
                    c.set(f"storm/{me}", value)
                    if c.get(f"storm/{me}", wait=False) != value:
                        errors.append((me, r, "get returned another value"))
                    c.add("storm/total", 1)
                    slowest[0] = max(slowest[0], time.monotonic() - t)
            except mf.StoreError as e:
                errors.append((me, e.code, str(e)))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(("done", first, errors[:10], len(errors), slowest[0]))
    for c in conns:
        c.close()


def serve_by_unique_id(store_url: str, session: str, size: int, conn, env: dict | None) -> None:
    """tests/_te_target.serve with the engine initialized through the seed's `unique_id=`
    keyword (the name serving frameworks pass the session id by)."""
    import memfabric_hybrid as mf
    import _te_target

    class SeedEngine(mf.TransferEngine):
        def initialize(self, store_url, session, role, device_id):
            return super().initialize(store_url, unique_id=session, role=role, device_id=device_id)

    mf.TransferEngine = SeedEngine
    _te_target.serve(store_url, session, size, conn, env)


def netns_initiator(ip: str, size: int, timeout: float, conn) -> None:
    """In test host A: serves the config store and drives transfers to the target in host B on
    command, reporting each call's times (CLOCK_MONOTONIC is shared by every namespace)."""
    os.environ["MF_TRANSPORT"] = "tcp"
    import memfabric_hybrid as mf
    from _faults import Guarded, pattern, sha

    server = mf.start_config_store(f"tcp://{ip}:0")
    conn.send(server.url)
    session, peer_addr = conn.recv()
    e = mf.TransferEngine()
    e.transfer_timeout = timeout
    assert e.initialize(server.url, f"{ip}:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    mem = Guarded(size)
    assert e.register_memory(mem.addr, size) == 0, mf.get_last_err_msg()
    conn.send(("ready", e.transport_for(session)))
    while True:
        cmd = conn.recv()
        if cmd[0] == "loop":
            # Batches of [off, off + n) until one fails, each reported.
            _, seed, off, n = cmd
            mem[off:off + n] = pattern(n, seed)
            block = 256 << 10
            k = n // block
            src = [mem.addr + off + i * block for i in range(k)]
            dst = [peer_addr + off + (k - 1 - i) * block for i in range(k)]
            end = time.monotonic() + 60
            while time.monotonic() < end:
                t0 = time.monotonic()
                rc = e.batch_transfer_sync_write(session, src, dst, [block] * k)
                conn.send(("call", t0, time.monotonic(), rc, mf.get_last_err_msg()))
                if rc != 0:
                    break
        elif cmd[0] == "write":
            # A write of [off, off + n), tried again for up to `retry_for` seconds while it
            # fails, read back once it worked:
            # (rc, seconds of the last try, message, digest, read back ok, guards ok, tries,
            #  seconds until it worked).
            _, seed, off, n, retry_for = cmd
            data = pattern(n, seed)
            mem[off:off + n] = data
            first = time.monotonic()
            tries = 0
            while True:
                tries += 1
                t0 = time.monotonic()
                rc = e.transfer_sync_write(session, mem.addr + off, peer_addr + off, n)
                took, msg = time.monotonic() - t0, mf.get_last_err_msg()
                if rc == 0 or time.monotonic() - first > retry_for:
                    break
                time.sleep(0.05)
            until = time.monotonic() - first
            read_ok = False
            if rc == 0:
                mem[off:off + n] = b"\0" * n
                read_ok = e.transfer_sync_read(session, mem.addr + off, peer_addr + off, n) == 0 \
                    and mem[off:off + n] == data
            conn.send((rc, took, msg, sha(data), read_ok, mem.guards_ok(), tries, until))
        elif cmd[0] == "record":
            # Seconds until the target's engine record is in the store, or None.
            _, within = cmd
            with mf.StoreClient(server.url, timeout=5) as c:
                t0 = time.monotonic()
                while not c.exists(f"mf/te/{session}"):
                    if time.monotonic() - t0 > within:
                        conn.send(None)
                        break
                    time.sleep(0.02)
                else:
                    conn.send(time.monotonic() - t0)
        elif cmd[0] == "stop":
            e.destroy()
            server.close()
            conn.send("stopped")
            return


def bm_mover_rank(url: str, rank: int, size: int, cmds, out) -> None:
    """One of two BM ranks reaching each other over tcp (so each object has an engine with a
    store client of its own); moves to another store when told, and proves each step by
    copies verified on the peer's part."""
    import ctypes
    import mmap

    os.environ["MF_TRANSPORT"] = "tcp"
    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType as T

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank
    cfg.start_store = False
    cfg.init_timeout = 2
    cfg.set_nic("lo")
    assert mf.bm.initialize(url, 2, 0, cfg) == 0, mf.get_last_err_msg()
    host = mmap.mmap(-1, size)
    h = ctypes.addressof(ctypes.c_char.from_buffer(host))
    objects = {}

    def create(oid: int):
        big = mf.bm.create(oid, size)
        assert big.join() == 0, mf.get_last_err_msg()
        assert big.register(h, size) == 0, mf.get_last_err_msg()
        objects[oid] = big

    def verified(oid: int, seed: int) -> bool:
        """Writes this rank's pattern into the peer's part and reads it back from there."""
        big = objects[oid]
        data = bytes([(seed * 2 + rank) % 251]) * size
        host[:] = data
        if big.copy_data(h, big.peer_rank_ptr(1 - rank), size, T.H2G) != 0:
            return False
        host[:] = b"\0" * size
        if big.copy_data(big.peer_rank_ptr(1 - rank), h, size, T.G2H) != 0:
            return False
        return host[:] == data

    create(0)
    out.put(("ready", rank))
    while True:
        cmd = cmds.get(timeout=120)
        if cmd[0] == "copy":
            out.put(("copy", rank, verified(0, cmd[1])))
        elif cmd[0] == "move":
            t = time.monotonic()
            rc = mf.bm.update_store_url(cmd[1])
            out.put(("move", rank, rc, time.monotonic() - t, mf.get_last_err_msg() if rc else ""))
        elif cmd[0] == "create":
            try:
                create(cmd[1])
                ok = verified(cmd[1], cmd[1] + 40)
                out.put(("create", rank, 0, ok))
            except mf.MemFabricError as e:
                out.put(("create", rank, e.code, str(e)))
        elif cmd[0] == "stop":
            for big in objects.values():
                big.unregister(h)
                big.destroy()
            mf.bm.uninitialize()
            out.put(("stopped", rank))
            return
