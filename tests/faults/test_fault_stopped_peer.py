"""Fault matrix row 5: the target is frozen with SIGSTOP while transfers run (a peer stalled by
swapping, a debugger, a cgroup freeze), then resumed with SIGCONT."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import memfabric_hybrid as mf
from _faults import SLACK, Target, engine, pattern, sha, timed, verified_write

SIZE = 32 << 20
TIMEOUT = 2.0


@pytest.mark.parametrize("path", ["cma", "tcp"])
def test_stopped_target_then_resumed(store, spawn, monkeypatch, path):
    if path == "tcp":
        monkeypatch.setenv("MF_TRANSPORT", "tcp")
    else:
        monkeypatch.delenv("MF_TRANSPORT", raising=False)
    target = Target(spawn, store.url, SIZE)
    e, mem = engine(store.url, SIZE, timeout=TIMEOUT)
    stopped = False
    try:
        assert e.transport_for(target.session) == path
        mem[0:SIZE] = pattern(SIZE, 5)
        calls: list = []
        halt = threading.Event()

        def hammer() -> None:
            n = 0
            while not halt.is_set():
                fn = e.transfer_sync_write if n % 2 == 0 else e.transfer_sync_read
                t0 = time.monotonic()
                rc = fn(target.session, mem.addr, target.addr, SIZE)
                calls.append((t0, time.monotonic(), rc, mf.get_last_err_msg()))
                n += 1

        t = threading.Thread(target=hammer)
        t.start()
        while len(calls) < 2:
            time.sleep(0.01)
        os.kill(target.pid, signal.SIGSTOP)
        stopped = True
        stopped_at = time.monotonic()
        # Long enough for two calls in a row to reach their deadline: the second one has to open
        # new connections, which a stopped server accepts (the kernel does) but never answers.
        time.sleep(TIMEOUT * 2 + 0.5)
        during = [c for c in calls if c[1] > stopped_at]
        os.kill(target.pid, signal.SIGCONT)
        stopped = False
        halt.set()
        t.join(TIMEOUT + 10)
        assert not t.is_alive()
        for started, ended, rc, msg in calls:
            assert ended - started < TIMEOUT + SLACK, (ended - started, rc, msg)
        codes = {rc for _, _, rc, _ in during}
        if path == "cma":
            # The kernel copies into a stopped process as into a running one.
            assert codes == {0}, during
        else:
            # Nobody drains the sockets of a stopped data server: every call made during the
            # stop hits its deadline, none earlier, none later.
            assert codes <= {0, mf.SMEM_TIMEOUT}, during
            assert sum(rc == mf.SMEM_TIMEOUT for _, _, rc, _ in during) >= 2, during
        assert target.proc.is_alive()
        assert target.guards_ok() and mem.guards_ok()
        verified_write(e, mem, target, SIZE, seed=6)
        # Bytes of the writes that timed out were already in the stopped target's socket
        # buffers; they must not land now, over the newer ones.
        fresh = sha(pattern(SIZE, 6))
        end = time.monotonic() + 2
        while time.monotonic() < end:
            assert target.hash() == fresh, "bytes of a timed-out write replaced newer ones"
            time.sleep(0.1)
        rc, took, msg = timed(e.transfer_sync_write, target.session, mem.addr, target.addr, 4096)
        assert rc == 0 and took < TIMEOUT, (rc, took, msg)
        timeouts = [ended - started for started, ended, rc, _ in during if rc != 0]
        print(f"\n[row 5 {path}] {len(during)} calls during the stop, codes {sorted(codes)}, "
              f"failed ones took {', '.join(f'{x:.2f}' for x in timeouts) or '-'} s")
    finally:
        if stopped:
            os.kill(target.pid, signal.SIGCONT)
        e.destroy()
        target.stop()
    assert target.proc.exitcode == 0
