"""Fault matrix row 7: 1024 store clients at once (four processes of 256 connections), each
doing set/get/add, while one more client checks that the store keeps answering promptly."""

from __future__ import annotations

import threading
import time

import memfabric_hybrid as mf
from conftest import free_port
from _faults import kill_store, raise_fd_limit, start_store
import _fault_workers

PROCS, PER_PROC, THREADS, ROUNDS = 4, 256, 16, 20
CLIENTS = PROCS * PER_PROC


def test_1024_concurrent_store_clients(spawn):
    raise_fd_limit(4096)
    url = f"tcp://127.0.0.1:{free_port()}"
    server = start_store(url)
    procs = []
    try:
        out, go = spawn.Queue(), spawn.Event()
        procs = [spawn.Process(target=_fault_workers.store_storm,
                               args=(url, k * PER_PROC, PER_PROC, THREADS, ROUNDS, go, out))
                 for k in range(PROCS)]
        for p in procs:
            p.start()
        opened = [out.get(timeout=120) for _ in procs]
        assert all(tag == "open" and n == PER_PROC for tag, _, n in opened), opened
        # Every connection is open before anyone starts: 1024 at once, plus the probe.
        probe = mf.StoreClient(url, timeout=10)
        assert probe.ping() > 0
        pings: list = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                t = time.monotonic()
                probe.ping()
                pings.append(time.monotonic() - t)
                time.sleep(0.02)

        w = threading.Thread(target=watch)
        w.start()
        t0 = time.monotonic()
        go.set()
        done = [out.get(timeout=120) for _ in procs]
        took = time.monotonic() - t0
        stop.set()
        w.join(30)
        for tag, first, errors, n_errors, slowest in done:
            assert tag == "done" and n_errors == 0, (first, n_errors, errors)
        assert int(probe.get("storm/total", wait=False)) == CLIENTS * ROUNDS
        for k in (0, CLIENTS // 2, CLIENTS - 1):
            assert probe.get(f"storm/{k}", wait=False) == f"{k}:{ROUNDS - 1}".encode() * 8
        slowest_op = max(d[4] for d in done)
        assert pings and max(pings) < 2.0, max(pings)
        assert slowest_op < 10.0, slowest_op
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert server.poll() is None, "the store process died"
        assert probe.ping() < 1.0
        probe.close()
        ops = CLIENTS * ROUNDS * 3
        print(f"\n[row 7] {CLIENTS} clients, {ops} ops in {took:.2f}s ({ops / took:.0f} ops/s); "
              f"slowest set+get+add {slowest_op * 1000:.0f} ms; probe ping max {max(pings) * 1000:.1f} ms "
              f"over {len(pings)} pings")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        kill_store(server)
