"""Fault matrix row 5b: a same-host initiator is frozen with SIGSTOP in the middle of its
copies into this engine, which then unregisters the region. Same-host copies run without the
owner's help, so `unregister_memory` waits for the copies in flight: against a frozen one it
must give up at its deadline (SMEM_TIMEOUT, the region unregistered all the same), and a
second call must wait again until the copy has ended (the writer resumed, or killed)."""

from __future__ import annotations

import os
import signal
import time

import pytest

import _fault_workers
import memfabric_hybrid as mf
from _faults import SLACK, engine, timed

SIZE = 32 << 20
TIMEOUT = 2.0
ATTEMPTS = 5


def start_writer(spawn, store_url: str, session: str, addr: int):
    """A process writing 32 MiB batches into `addr` over cma, once they run back to back."""
    conn, child = spawn.Pipe()
    p = spawn.Process(target=_fault_workers.write_loop,
                      args=(store_url, session, addr, SIZE, child, {}))
    p.start()
    assert conn.poll(60), "writer did not start"
    assert conn.recv() == ("ready", "cma")
    assert conn.poll(60), "writer did not loop"
    assert conn.recv() == ("looping",)
    return p, conn


@pytest.mark.parametrize("then", ["resumed", "killed"])
def test_frozen_writer_holds_unregister_until_its_deadline(store, spawn, monkeypatch, then):
    monkeypatch.delenv("MF_TRANSPORT", raising=False)
    e, mem = engine(store.url, SIZE, timeout=TIMEOUT)
    writer = None
    try:
        outcomes = []
        # The writer is frozen inside a batch nearly always (its copies are almost all of its
        # time); when it was frozen between two, nothing is in flight and unregister returns 0
        # at once, and the row is tried again with a new writer.
        for _ in range(ATTEMPTS):
            writer, conn = start_writer(spawn, store.url, e.session_id, mem.addr)
            os.kill(writer.pid, signal.SIGSTOP)
            rc, took, msg = timed(e.unregister_memory, mem.addr)
            outcomes.append((rc, round(took, 3)))
            if rc == mf.SMEM_TIMEOUT:
                break
            assert rc == 0, (rc, msg)
            assert took < SLACK, took
            os.kill(writer.pid, signal.SIGCONT)
            assert conn.poll(TIMEOUT + 30)
            assert conn.recv()[:2] == ("failed", mf.MF_OUT_OF_BOUNDS)
            writer.join(30)
            assert e.register_memory(mem.addr, SIZE) == 0, mf.get_last_err_msg()
        assert outcomes[-1][0] == mf.SMEM_TIMEOUT, outcomes
        assert TIMEOUT - 0.05 <= took < TIMEOUT + SLACK, (took, msg)
        assert "still had a copy" in msg and f"pid {writer.pid}" in msg, msg

        # Still frozen: a second call waits again, and gives up again.
        rc, took, msg = timed(e.unregister_memory, mem.addr)
        assert rc == mf.SMEM_TIMEOUT and took >= TIMEOUT - 0.05, (rc, took, msg)
        if then == "resumed":
            os.kill(writer.pid, signal.SIGCONT)
            # Its batch ends; the next one is refused: the region was gone for new copies.
            assert conn.poll(TIMEOUT + 30)
            assert conn.recv()[:2] == ("failed", mf.MF_OUT_OF_BOUNDS)
        else:
            # Killed and not yet reaped (a zombie): its copy is over all the same.
            writer.kill()
            time.sleep(0.2)
        rc, took, msg = timed(e.unregister_memory, mem.addr)
        assert rc == 0 and took < SLACK, (rc, took, msg)
        # Done with: a third call knows the region no more.
        assert e.unregister_memory(mem.addr) == mf.SMEM_NOT_EXIST
        writer.join(30)
        assert mem.guards_ok()
        # The engine serves new registrations as before.
        assert e.register_memory(mem.addr, SIZE) == 0, mf.get_last_err_msg()
        print(f"\n[row 5b {then}] unregister outcomes {outcomes}")
    finally:
        if writer is not None and writer.is_alive():
            os.kill(writer.pid, signal.SIGCONT)
            writer.kill()
            writer.join(30)
        e.destroy()
