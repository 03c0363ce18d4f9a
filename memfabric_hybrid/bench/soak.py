"""Soak: mixed store / Transfer Engine / Big Memory traffic with random faults, reporting RSS,
open fds and errors per minute of the long-lived processes.

    python -m memfabric_hybrid.bench soak [--minutes 10] [--targets 2] [--fault-every 15]
        [--json FILE]

Processes: a config store; ``--targets`` Transfer Engine targets (fixed session ids); one
initiator doing random sync, batch and stream-queued writes and reads (64 B .. 4 MiB; every
100th is read back and compared) and store set/get/add/delete; two Big Memory ranks copying
into each other's part. Every ``--fault-every`` seconds (jittered) one target is hit at random:
SIGKILL then restarted under the same session id, or SIGSTOP for 1-3 s then SIGCONT. Calls that
hit a fault fail with an error code (counted, by code); none may hang past its timeout.
The store, the initiator and the BM ranks live through the whole run: their RSS and fd count
are sampled every 5 s. A final line says whether they were flat (RSS within 10 % or 8 MiB of
the end of minute 1, fds within 4).
"""

from __future__ import annotations

import argparse
import collections
import mmap
import multiprocessing as mp
import os
import random
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

from ._util import free_port, table, write_json

MiB = 1 << 20
TARGET_SIZE = 16 * MiB


def _addr(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _store_main(port: int, stop: Any) -> None:
    import memfabric_hybrid as mf

    server = mf.start_config_store(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        time.sleep(0.2)
    server.close()


def _target_main(url: str, session: str, ready: Any) -> None:
    import memfabric_hybrid as mf

    e = mf.TransferEngine()
    deadline = time.monotonic() + 30
    while e.initialize(url, session, "Decode", 0) != 0:
        if time.monotonic() > deadline:  # the old incarnation's port may linger briefly
            raise SystemExit(f"target {session}: {mf.get_last_err_msg()}")
        time.sleep(0.2)
    buf = mmap.mmap(-1, TARGET_SIZE)
    assert e.register_memory(_addr(buf), TARGET_SIZE) == 0
    with mf.StoreClient(url) as s:
        s.set(f"soak/target/{session}", str(_addr(buf)).encode())
    ready.set()
    while True:
        time.sleep(1)


def _initiator_main(url: str, sessions: List[str], stop: Any, counts: Any, errors: Any) -> None:
    import memfabric_hybrid as mf

    rng = random.Random(os.getpid())
    e = mf.TransferEngine()
    assert e.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    e.transfer_timeout = 3.0
    local = mmap.mmap(-1, 8 * MiB)
    base = _addr(local)
    assert e.register_memory(base, 8 * MiB) == 0
    store = mf.StoreClient(url, timeout=5)
    stream = mf.Stream()
    n = 0

    def peer_addr(session: str) -> Optional[int]:
        try:
            return int(store.get(f"soak/target/{session}", True, 2))
        except Exception:  # noqa: BLE001  (store unreachable or target gone: counted below)
            return None

    def count(rc: int) -> None:
        if rc == 0:
            with counts.get_lock():
                counts.value += 1
        else:
            errors.put((rc, mf.get_last_err_msg()[:200]))

    while not stop.is_set():
        n += 1
        session = rng.choice(sessions)
        op = rng.random()
        try:
            if op < 0.2:
                key = f"soak/k/{rng.randrange(1000)}"
                which = rng.randrange(4)
                if which == 0:
                    store.set(key, os.urandom(rng.randrange(1, 4096)))
                elif which == 1:
                    store.get(key, False) if store.exists(key) else None
                elif which == 2:
                    store.add("soak/counter", 1)
                else:
                    store.delete(key)
                count(0)
                continue
            peer = peer_addr(session)
            if peer is None:
                count(mf.SMEM_TIMEOUT)
                time.sleep(0.05)
                continue
            size = 1 << rng.randrange(6, 23)  # 64 B .. 4 MiB
            off = rng.randrange(0, (8 * MiB - size) // 64 + 1) * 64
            poff = rng.randrange(0, (TARGET_SIZE - size) // 64 + 1) * 64
            if n % 100 == 0:
                pattern = os.urandom(16) * (size // 16 or 1)
                local[off:off + len(pattern)] = pattern
                rc = e.transfer_sync_write(session, base + off, peer + poff, len(pattern))
                if rc == 0:
                    local[off:off + len(pattern)] = b"\0" * len(pattern)
                    rc = e.transfer_sync_read(session, base + off, peer + poff, len(pattern))
                    if rc == 0 and local[off:off + len(pattern)] != pattern:
                        raise SystemExit("data read back differs from what was written")
                count(rc)
            elif op < 0.5:
                count(e.transfer_sync_write(session, base + off, peer + poff, size))
            elif op < 0.7:
                count(e.transfer_sync_read(session, base + off, peer + poff, size))
            elif op < 0.85:
                k = rng.randrange(1, 64)
                bs = [base + i * 16384 for i in range(k)]
                ps = [peer + i * 16384 for i in range(k)]
                count(e.batch_transfer_sync_write(session, bs, ps, [16384] * k))
            else:
                rc = e.transfer_async_write_submit(session, base + off, peer + poff, size, stream)
                count(rc or stream.synchronize(timeout=10))
        except mf.StoreError as ex:
            errors.put((getattr(ex, "code", -1), str(ex)[:200]))
    e.destroy()


def _bm_main(url: str, rank: int, stop: Any, counts: Any, errors: Any) -> None:
    import numpy as np

    import memfabric_hybrid as mf

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank
    cfg.start_store = False
    assert mf.bm.initialize(url, 2, 0, cfg) == 0, mf.get_last_err_msg()
    big = mf.bm.create(0, 4 * MiB)
    assert big.join() == 0
    other = big.peer_rank_ptr(1 - rank)
    buf = np.zeros(MiB, dtype=np.uint8)
    while not stop.is_set():
        buf[:] = rank + 1
        rc = big.copy_data(buf, other + rank * MiB, MiB, mf.bm.BmCopyType.H2G)
        if rc == 0:
            rc = big.copy_data(other + rank * MiB, buf, MiB, mf.bm.BmCopyType.G2H)
            if rc == 0 and not (buf == rank + 1).all():
                raise SystemExit("BM data read back differs")
        if rc == 0:
            with counts.get_lock():
                counts.value += 1
        else:
            errors.put((rc, mf.get_last_err_msg()[:200]))
    big.destroy()
    mf.bm.uninitialize()


def _sample(pid: int) -> Tuple[float, int]:
    """(RSS MiB, open fds) of a process."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m memfabric_hybrid.bench soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--fault-every", type=float, default=15.0, help="mean seconds between faults")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    store = ctx.Process(target=_store_main, args=(port, stop), name="store")
    store.start()
    time.sleep(1.0)
    sessions = [f"127.0.0.1:{free_port()}" for _ in range(a.targets)]
    targets: Dict[str, Any] = {}

    def start_target(s: str) -> None:
        ready = ctx.Event()
        pr = ctx.Process(target=_target_main, args=(url, s, ready), name=f"target {s}")
        pr.start()
        if not ready.wait(60):
            raise SystemExit(f"target {s} did not start")
        targets[s] = pr

    for s in sessions:
        start_target(s)
    te_ops, bm_ops = ctx.Value("q", 0), ctx.Value("q", 0)
    errq: Any = ctx.Queue()
    init = ctx.Process(target=_initiator_main, args=(url, sessions, stop, te_ops, errq), name="initiator")
    ranks = [ctx.Process(target=_bm_main, args=(url, r, stop, bm_ops, errq), name=f"bm rank {r}") for r in range(2)]
    for pr in [init] + ranks:
        pr.start()
    watched = {"store": store, "initiator": init, "bm rank 0": ranks[0], "bm rank 1": ranks[1]}
    rng = random.Random(1)
    start = time.monotonic()
    end = start + a.minutes * 60
    next_fault = start + rng.expovariate(1 / a.fault_every)
    samples: Dict[str, List[Tuple[float, float, int]]] = {k: [] for k in watched}
    faults: List[Tuple[float, str]] = []
    minute_rows: List[Dict[str, Any]] = []
    errs: collections.Counter = collections.Counter()
    examples: Dict[int, str] = {}
    last_min, last_te, last_bm = 0, 0, 0
    died: List[str] = []
    next_sample = start
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            while True:
                try:
                    code, msg = errq.get_nowait()
                    errs[code] += 1
                    examples.setdefault(code, msg)
                except Exception:  # noqa: BLE001  (queue empty)
                    break
            for k, pr in watched.items():
                if not pr.is_alive() and k not in died:
                    died.append(k)
                    print(f"!! {k} died with exit code {pr.exitcode}")
            if now >= next_sample:
                for k, pr in watched.items():
                    if pr.is_alive():
                        rss, fds = _sample(pr.pid)
                        samples[k].append((now - start, rss, fds))
                next_sample += 5
            if now >= next_fault:
                s = rng.choice(sessions)
                if rng.random() < 0.5:
                    targets[s].kill()
                    targets[s].join(10)
                    start_target(s)
                    faults.append((now - start, f"SIGKILL + restart {s}"))
                else:
                    pause = rng.uniform(1, 3)
                    os.kill(targets[s].pid, signal.SIGSTOP)
                    time.sleep(pause)
                    os.kill(targets[s].pid, signal.SIGCONT)
                    faults.append((now - start, f"SIGSTOP {pause:.1f} s {s}"))
                next_fault = time.monotonic() + rng.expovariate(1 / a.fault_every)
            minute = int((time.monotonic() - start) // 60)
            if minute > last_min:
                te, bm = te_ops.value, bm_ops.value
                row = {"minute": minute, "te_store_ops": te - last_te, "bm_copies": bm - last_bm,
                       "errors": dict(errs), "faults": sum(1 for t, _ in faults if minute - 1 <= t / 60 < minute)}
                for k in watched:
                    if samples[k]:
                        row[f"{k} rss_mib"], row[f"{k} fds"] = samples[k][-1][1], samples[k][-1][2]
                minute_rows.append(row)
                print(f"minute {minute}: {row['te_store_ops']} TE/store ops, {row['bm_copies']} BM copies, "
                      f"{row['faults']} faults, errors {dict(errs) or 0}; " + ", ".join(
                          f"{k} {samples[k][-1][1]:.0f} MiB/{samples[k][-1][2]} fds" for k in watched if samples[k]),
                      flush=True)
                errs.clear()
                last_min, last_te, last_bm = minute, te, bm
            time.sleep(0.1)
    finally:
        stop.set()
        for pr in [init] + ranks:
            pr.join(30)
        for pr in targets.values():
            pr.kill()
            pr.join(10)
        store.join(10)
        for pr in [store, init] + ranks + list(targets.values()):
            if pr.is_alive():
                pr.kill()
    verdicts = []
    for k, ss in samples.items():
        base = [x for x in ss if x[0] >= 60][:1] or ss[:1]
        if not base:
            continue
        _, rss0, fd0 = base[0]
        _, rss1, fd1 = ss[-1]
        flat = abs(rss1 - rss0) <= max(8.0, 0.1 * rss0) and abs(fd1 - fd0) <= 4
        verdicts.append([k, rss0, rss1, fd0, fd1, "flat" if flat else "GROWING"])
    print()
    print(table(["process", "RSS MiB @1 min", "RSS MiB @end", "fds @1 min", "fds @end", "verdict"], verdicts))
    print(f"{len(faults)} faults injected; processes that died: {died or 'none'}; "
          f"exit codes: initiator {init.exitcode}, bm ranks {[r.exitcode for r in ranks]}")
    for code, msg in sorted(examples.items()):
        print(f"error {code}, e.g.: {msg}")
    write_json(a.json, {"minutes": minute_rows, "faults": faults, "verdicts": verdicts, "died": died,
                        "error_examples": examples})
    ok = not died and all(v[-1] == "flat" for v in verdicts) and init.exitcode == 0
    return 0 if ok else 1
