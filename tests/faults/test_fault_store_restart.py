"""Fault matrix row 3: the config store process is SIGKILLed, stays down for a while, and is
started again (empty, on the same address).

While it is down, calls that need it fail within their own timeout with a typed error, and
transfers between engines that already know each other go on (the data plane does not pass
through the store). Once it is back, clients, engines and group ranks reconnect by themselves."""

from __future__ import annotations

import time


import memfabric_hybrid as mf
from conftest import free_port
from _faults import SLACK, Target, engine, kill_store, start_store, timed, verified_write, wait_for
import _fault_workers

SIZE = 4 << 20
TIMEOUT = 2.0
STORE_TIMEOUT = 1.0
# Every client here is already disconnected when these calls start (the keeper saw the
# store close), so they all fail to reconnect rather than time out on an answer.
STORE_DOWN = {mf.SMEM_NOT_CONNECTED}


def store_call(fn, *args, **kw):
    """(error code or 0, seconds taken) of a StoreClient call."""
    t = time.monotonic()
    try:
        fn(*args, **kw)
        return 0, time.monotonic() - t
    except mf.StoreError as e:
        return e.code, time.monotonic() - t


def test_store_killed_and_restarted(spawn, monkeypatch):
    monkeypatch.setenv("MF_TRANSPORT", "tcp")
    url = f"tcp://127.0.0.1:{free_port()}"
    server = start_store(url)
    target = e = None
    ranks: list = []
    try:
        target = Target(spawn, url, SIZE)
        e, mem = engine(url, SIZE, timeout=TIMEOUT)
        verified_write(e, mem, target, SIZE, seed=20)
        cmds = [spawn.Queue() for _ in range(2)]
        out = spawn.Queue()
        ranks = [spawn.Process(target=_fault_workers.group_rank, args=(url, "fault", 2, r, cmds[r], out))
                 for r in range(2)]
        for p in ranks:
            p.start()
        assert sorted(out.get(timeout=60) for _ in ranks) == [("joined", 0), ("joined", 1)]
        client = mf.StoreClient(url, timeout=STORE_TIMEOUT)
        client.set("before", b"1")
        doomed = mf.TransferEngine()
        assert doomed.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()

        kill_store(server)
        server = None

        # Store calls fail within their timeout, typed. The first one finds the connection
        # broken: an add may or may not have been applied, and says so.
        code, took = store_call(client.add, "n", 1)
        assert code == mf.SMEM_RECONNECTED, code
        assert took < STORE_TIMEOUT + SLACK, took
        for fn, args in ((client.set, ("k", b"v")), (client.get, ("before",)), (client.add, ("n", 1))):
            code, took = store_call(fn, *args)
            assert code == mf.SMEM_NOT_CONNECTED, (fn.__name__, code)
            assert took < STORE_TIMEOUT + SLACK, (fn.__name__, took)
        code, took = store_call(mf.StoreClient, url, timeout=STORE_TIMEOUT)
        assert code == mf.SMEM_NOT_CONNECTED and took < STORE_TIMEOUT + SLACK, (code, took)
        for q in cmds:
            q.put(("barrier", 2.0))
        barrier_down = []
        for _ in ranks:
            tag, rank, code, took, msg = out.get(timeout=30)
            assert code in STORE_DOWN, (rank, code, msg)
            assert took < 2.0 + SLACK, (rank, took, msg)
            barrier_down.append((code, round(took, 2)))
        # A transfer to a peer this engine knows needs no store.
        verified_write(e, mem, target, SIZE, seed=21)
        # A transfer to a peer it has to look up fails within the transfer timeout.
        rc, took, msg = timed(e.transfer_sync_write, "127.0.0.1:9", mem.addr, target.addr, 4096)
        assert rc in STORE_DOWN, (rc, msg)
        assert took < TIMEOUT + SLACK, (took, msg)
        lookup_down = (rc, took)
        # Tearing an engine down does not wait for the store timeout (120 s for engines).
        t = time.monotonic()
        doomed.destroy()
        destroy_down = time.monotonic() - t
        assert destroy_down < 2 * 2.0 + SLACK, destroy_down

        server = start_store(url)
        # Ranks go on with barriers and gathers at once, whichever of them the restarted store
        # hears from first.
        for q in cmds:
            q.put(("barrier", 10.0))
        results = sorted(out.get(timeout=30) for _ in ranks)
        assert [(r, c) for _, r, c, _, _ in results] == [(0, 0), (1, 0)], results
        for q in cmds:
            q.put(("gather", 10.0))
        results = sorted(out.get(timeout=30) for _ in ranks)
        assert results == [("gather", 0, 0, [b"r0", b"r1"]), ("gather", 1, 0, [b"r0", b"r1"])], results

        # The same client reconnects on its next call; the store is empty.
        client.set("after", b"2")
        assert client.get("after") == b"2"
        assert not client.exists("before")
        # Engines re-publish themselves without being asked: the target is found again.
        assert wait_for(lambda: client.exists(f"mf/te/{target.session}"), 5.0)
        assert wait_for(lambda: client.exists(f"mf/te/{e.session_id}"), 5.0)
        verified_write(e, mem, target, SIZE, seed=22)
        # An engine that starts after the restart adopts the job secret the old ones hold, and
        # is admitted by the target's data server.
        e3, mem3 = engine(url, SIZE, timeout=TIMEOUT)
        try:
            verified_write(e3, mem3, target, SIZE, seed=23)
        finally:
            e3.destroy()
        # A barrier when both ranks have been idle since the restart.
        time.sleep(0.5)
        for q in cmds:
            q.put(("barrier", 10.0))
        results = sorted(out.get(timeout=30) for _ in ranks)
        assert [(r, c) for _, r, c, _, _ in results] == [(0, 0), (1, 0)], results
        for q in cmds:
            q.put(("stop",))
        assert sorted(out.get(timeout=30) for _ in ranks) == [("stopped", 0), ("stopped", 1)]
        assert target.proc.is_alive() and target.guards_ok() and mem.guards_ok()
        client.close()
        print(f"\n[row 3] store down: barriers {barrier_down}; transfer needing a lookup rc={lookup_down[0]} "
              f"in {lookup_down[1]:.2f}s; destroy {destroy_down:.2f}s")
    finally:
        if e is not None:
            e.destroy()
        if target is not None:
            target.stop()
        for p in ranks:
            p.join(10)
            if p.is_alive():
                p.kill()
        if server is not None:
            kill_store(server)
    for p in ranks:
        assert p.exitcode == 0
    assert target.proc.exitcode == 0
