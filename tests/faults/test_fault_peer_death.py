"""Fault matrix rows 1 and 2: one end of a transfer is SIGKILLed while transfers are in flight.

Same-host pairs are tested on both paths: cma (the default, which copies without the target's
help) and tcp (forced with MF_TRANSPORT=tcp, what two hosts would use)."""

from __future__ import annotations

import threading
import time

import pytest

import memfabric_hybrid as mf
from _faults import SLACK, Target, engine, pattern, sha, timed, verified_write
import _fault_workers

SIZE = 64 << 20
TIMEOUT = 2.0
# The call in flight meets the dead target (reset connections for tcp, a pid gone for cma).
DEAD_PEER = {mf.MF_PEER_GONE}
# Later calls may find the target gone from the store too: to this engine it is then a session
# id nobody registered.
UNKNOWN_PEER = {mf.SMEM_INVALID_PARAM}


@pytest.fixture(params=["cma", "tcp"])
def path(request, monkeypatch):
    if request.param == "tcp":
        monkeypatch.setenv("MF_TRANSPORT", "tcp")
    else:
        monkeypatch.delenv("MF_TRANSPORT", raising=False)
    return request.param


def test_target_killed_mid_transfer(store, spawn, path):
    target = Target(spawn, store.url, SIZE)
    e, mem = engine(store.url, SIZE, timeout=TIMEOUT)
    assert e.transport_for(target.session) == path
    mem[0:SIZE] = pattern(SIZE, 1)
    block = 256 << 10
    count = SIZE // block
    # Scattered on the target (reversed order) so the batch cannot coalesce into one copy.
    local = [mem.addr + i * block for i in range(count)]
    remote = [target.addr + (count - 1 - i) * block for i in range(count)]
    calls: list = []

    def hammer() -> None:
        t_end = time.monotonic() + 20
        n = 0
        while time.monotonic() < t_end:
            fn = e.batch_transfer_sync_write if n % 2 == 0 else e.batch_transfer_sync_read
            t0 = time.monotonic()
            rc = fn(target.session, local, remote, [block] * count)
            calls.append((t0, time.monotonic(), rc, mf.get_last_err_msg()))
            n += 1
            if rc != 0:
                return

    t = threading.Thread(target=hammer)
    t.start()
    while len(calls) < 4:
        time.sleep(0.01)
    killed_at = time.monotonic()
    target.proc.kill()
    t.join(TIMEOUT * 3 + 10)
    assert not t.is_alive(), "a transfer call outlived its timeout by far"
    assert all(rc == 0 for _, _, rc, _ in calls[:-1]), calls[:-1]
    started, ended, rc, msg = calls[-1]
    assert rc in DEAD_PEER, (rc, msg)
    assert ended - max(started, killed_at) < TIMEOUT + SLACK, (ended - killed_at, msg)
    # The next call to the dead peer fails at once, without waiting for any timeout.
    rc2, took, msg = timed(e.transfer_sync_write, target.session, mem.addr, target.addr, 4096)
    assert rc2 in DEAD_PEER | UNKNOWN_PEER, (rc2, msg)
    assert took < 0.5, (took, msg)
    # An engine that never met it, looking it up while its record may still be in the store
    # (until the store lets its lease run out), is told at once that it is gone too.
    late, late_mem = engine(store.url, 4096, timeout=TIMEOUT)
    try:
        rc3, took, msg = timed(late.transfer_sync_write, target.session, late_mem.addr,
                               target.addr, 4096)
        assert rc3 in DEAD_PEER | UNKNOWN_PEER, (rc3, msg)
        assert took < 0.5, (took, msg)
        print(f"\n[row 1 {path}] new engine to the dead target: {rc3} in {took * 1e3:.1f} ms: {msg}")
    finally:
        late.destroy()
    # The reads wrote into this process's memory: nothing outside the registration changed.
    assert mem.guards_ok()
    target.proc.join(10)
    assert target.proc.exitcode == -9
    # The initiator keeps working: a new target is served, data verified both ways.
    fresh = Target(spawn, store.url, 1 << 20)
    try:
        verified_write(e, mem, fresh, 1 << 20, seed=2)
    finally:
        fresh.stop()
        e.destroy()
    print(f"\n[row 1 {path}] call in flight rc={rc} {ended - max(started, killed_at):.3f}s after the kill; "
          f"next call rc={rc2} in {took * 1000:.1f} ms; {len(calls) - 1} batches before")


def test_initiator_killed_mid_transfer(store, spawn, path):
    target = Target(spawn, store.url, SIZE)
    try:
        env = {"MF_TRANSPORT": "tcp"} if path == "tcp" else {}
        conn, child = spawn.Pipe()
        p = spawn.Process(target=_fault_workers.write_loop,
                          args=(store.url, target.session, target.addr, SIZE, child, env))
        p.start()
        assert conn.poll(60)
        msg = conn.recv()
        assert msg == ("ready", path), msg
        assert conn.poll(60)
        assert conn.recv() == ("looping",)
        time.sleep(0.05)
        p.kill()
        p.join(10)
        assert p.exitcode == -9
        # The target survived the half-sent batch and answers at once.
        t0 = time.monotonic()
        assert target.guards_ok()
        answered = time.monotonic() - t0
        assert answered < 2
        assert target.proc.is_alive()
        # Another initiator is served; its bytes, and only its bytes, are there afterwards.
        e, mem = engine(store.url, SIZE, timeout=TIMEOUT)
        try:
            assert e.transport_for(target.session) == path
            verified_write(e, mem, target, SIZE, seed=3)
            # A batch too, over the region the killed initiator was writing.
            data = pattern(SIZE, 4)
            mem[0:SIZE] = data
            block = 1 << 20
            n = SIZE // block
            rc, took, msg = timed(e.batch_transfer_sync_write, target.session,
                                  [mem.addr + i * block for i in range(n)],
                                  [target.addr + i * block for i in range(n)], [block] * n)
            assert rc == 0, msg
            assert took < TIMEOUT
            assert target.hash() == sha(data)
            assert target.guards_ok() and mem.guards_ok()
        finally:
            e.destroy()
        print(f"\n[row 2 {path}] target answered {answered * 1000:.1f} ms after the kill; "
              f"next initiator's 64 MiB batch ok in {took:.3f}s")
        assert target.proc.is_alive()
    finally:
        target.stop()
    assert target.proc.exitcode == 0
