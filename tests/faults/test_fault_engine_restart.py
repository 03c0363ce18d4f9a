"""Fault matrix row 6: an engine dies and a new one comes up under the same session id (same
ip:port, passed as the seed's `unique_id`). Its peers must find the new engine, and nothing may
go to the old one's memory layout or pid any more."""

from __future__ import annotations


import pytest

import memfabric_hybrid as mf
from conftest import free_port
from _faults import Target, engine, pattern, sha, timed, verified_write
import _fault_workers

SIZE = 4 << 20
TIMEOUT = 2.0


@pytest.mark.parametrize("path", ["cma", "tcp"])
def test_engine_restarted_under_the_same_session(store, spawn, monkeypatch, path):
    if path == "tcp":
        monkeypatch.setenv("MF_TRANSPORT", "tcp")
    else:
        monkeypatch.delenv("MF_TRANSPORT", raising=False)
    session = f"127.0.0.1:{free_port()}"
    first = Target(spawn, store.url, SIZE, session=session, serve=_fault_workers.serve_by_unique_id)
    assert first.session == session
    e, mem = engine(store.url, SIZE, timeout=TIMEOUT)
    targets = [first]
    try:
        assert e.transport_for(session) == path
        verified_write(e, mem, first, SIZE, seed=10)

        # 1. Killed and replaced before this engine calls again: its cached path to the old
        # process (pid for cma, pooled connections for tcp) is stale and must not be used.
        first.proc.kill()
        first.proc.join(10)
        second = Target(spawn, store.url, SIZE, session=session, serve=_fault_workers.serve_by_unique_id)
        targets.append(second)
        before = second.hash()
        data = pattern(SIZE, 11)
        mem[0:SIZE] = data
        rc, took, msg = timed(e.transfer_sync_write, session, mem.addr, second.addr, SIZE)
        assert rc == 0, (rc, msg)
        assert took < TIMEOUT
        first_call = took
        assert second.hash() == sha(data) != before
        verified_write(e, mem, second, SIZE, seed=12)
        # The old process's address means nothing in the new one unless the new one registered
        # it too; it is refused, never written.
        if not (second.addr <= first.addr < second.addr + SIZE):
            before = second.hash()
            rc, _, msg = timed(e.transfer_sync_write, session, mem.addr, first.addr, 4096)
            assert rc == mf.MF_OUT_OF_BOUNDS, (rc, msg)
            assert second.hash() == before
        assert second.guards_ok()

        # 2. Killed, and called while nobody holds the session: fails at once, typed.
        second.proc.kill()
        second.proc.join(10)
        while_down = []
        for _ in range(2):
            rc, took, msg = timed(e.transfer_sync_write, session, mem.addr, second.addr, 4096)
            assert rc in (mf.MF_PEER_GONE, mf.SMEM_INVALID_PARAM), (rc, msg)
            assert took < 1.0, (took, msg)
            while_down.append((rc, round(took * 1000, 1)))
        third = Target(spawn, store.url, SIZE, session=session, serve=_fault_workers.serve_by_unique_id)
        targets.append(third)
        assert e.transport_for(session) == path
        verified_write(e, mem, third, SIZE, seed=13)

        # 3. An engine that never knew the old ones finds the new one as well.
        e2, mem2 = engine(store.url, SIZE, timeout=TIMEOUT)
        try:
            verified_write(e2, mem2, third, SIZE, seed=14)
        finally:
            e2.destroy()
        assert third.proc.is_alive() and mem.guards_ok()
        print(f"\n[row 6 {path}] first call to the replacement ok in {first_call * 1000:.1f} ms; "
              f"calls while nobody holds the session (rc, ms): {while_down}")
    finally:
        e.destroy()
        for t in targets:
            t.stop()
    assert third.proc.exitcode == 0
