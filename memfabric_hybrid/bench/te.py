"""Transfer Engine benchmark: ours vs Mooncake's, sync write/read, beside the machine's limits.

Latency (p50/p99) and GB/s of both engines per block size, batch size and path, with ratios,
single-thread memcpy and raw TCP measured in the same run.

    python -m memfabric_hybrid.bench te [--seconds 1] [--sizes 4096,...,67108864]
                                        [--batches 1,256,4096] [--paths same-host,cross-host]
                                        [--no-mooncake] [--tls] [--json FILE] [--plot FILE.png]

Paths:
  same-host   initiator and target are two processes on loopback. Our engine picks its
              same-host path by itself (cma: process_vm_writev/readv); Mooncake uses its "tcp"
              protocol over 127.0.0.1.
  cross-host  two network namespaces joined by a veth pair, created here and removed afterwards
              (needs root and iproute2; skipped with the reason otherwise). One engine in each;
              ours is told MF_TRANSPORT=tcp, which is what two real hosts would pick.

Every cell runs in two processes (multiprocessing spawn): a target that registers a buffer and
an initiator that registers its own and calls the sync API in a loop for ``--seconds``. A call's
latency is what the Python call takes; GB/s is bytes per call over the mean call time. A batch
of B descriptors of N bytes is one ``batch_transfer_sync_*`` call whose peer addresses are a
shuffled permutation of the target's slots (so nothing is adjacent on the peer side and no
engine can coalesce it into one copy). Data is verified (written, read back, compared) before
each sweep.

Our data plane admits only engines of the same config store (a job secret proved at connect);
``--tls`` also turns on mutual TLS (``set_conf_store_tls``) in our processes, with a CA and one
member certificate made here with the openssl command for the addresses in use, so the store and
every data connection run TLS. Mooncake's columns are unchanged by it.

Mooncake (``mooncake-transfer-engine-non-cuda`` from PyPI) runs with protocol "tcp" and
metadata "P2PHANDSHAKE" (no metadata server). Its per-peer TCP queue is bounded by default; a
batch of 4096 descriptors overflows it (the call returns -1, the log says "TCP lane queue-full
rejection", and later calls fail too), so the bench raises MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER
and MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER to 65535, as deployments that move many blocks do.
MC_LOG_LEVEL=ERROR and a log file (printed only when something failed) keep its log out of the
table; ``--verbose`` shows it. Values already in the environment win.

Limits, measured in the same run: single-thread memcpy (ctypes.memmove) per block size, and raw
TCP (one connection between two processes, Python sockets, TCP_NODELAY, each block followed by
a 1-byte acknowledgement, as a sync write is) over loopback and over the veth pair.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import mmap
import multiprocessing as mp
import os
import platform
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from typing import Any, Callable

from .. import _netns
from ._util import percentile, table, write_json

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_SIZES = "4096,65536,1048576,16777216,67108864"
DEFAULT_BATCHES = "1,256,4096"
GOAL_BATCH = (16 * KiB, 256)  # the "batch of 256 x 16 KiB" cell, always measured
SYSTEMS = ("memfabric", "mooncake")
PATHS = ("same-host", "cross-host")
MOONCAKE_ENV = {
    "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER": "65535",
    "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER": "65535",
    "MC_LOG_LEVEL": "ERROR",
}


def _addr(buf: mmap.mmap) -> int:
    """The address of an mmap's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _anon(n: int) -> mmap.mmap:
    """`n` bytes of private anonymous memory, like a tensor's (Python's default is MAP_SHARED)."""
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _human(n: int) -> str:
    """4096 -> '4 KiB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


# ---- network namespaces -------------------------------------------------------------------------

def netns_unavailable() -> str | None:
    """None when two namespaces can be created here, else why not."""
    return _netns.unavailable_reason()


def TwoHosts() -> _netns.TwoHosts:  # noqa: N802  (kept as the name callers use)
    return _netns.TwoHosts(net=214)


_enter = _netns.enter


def _child(ns: str | None, env: dict[str, str | None], log: str | None, fn: Callable[..., None], *args: Any) -> None:
    """Target of every spawned process: enter `ns`, set `env` (None removes), send stderr to
    `log` when given, call fn(*args)."""
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    if ns:
        _enter(ns)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if tls_info := os.environ.get(TLS_ENV):
        import memfabric_hybrid as mf

        if mf.set_conf_store_tls(True, tls_info) != 0:
            raise RuntimeError(f"set_conf_store_tls: {mf.get_last_err_msg()}")
    fn(*args)


TLS_ENV = "MF_BENCH_TLS_INFO"


def make_tls(d: str, ips: list[str]) -> str:
    """A CA and one member certificate (all `ips` as SANs) in `d`; returns the tls_info string."""
    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True)

    ca_key, ca, key, csr, cert = (os.path.join(d, f) for f in ("ca.key", "ca.pem", "m.key", "m.csr", "m.pem"))
    ec = ["-pkeyopt", "ec_paramgen_curve:P-256"]
    run("openssl", "req", "-x509", "-newkey", "ec", *ec, "-nodes", "-keyout", ca_key, "-out", ca,
        "-days", "2", "-subj", "/CN=memfabric bench CA")
    run("openssl", "genpkey", "-algorithm", "EC", *ec, "-out", key)
    san = ",".join(f"IP:{ip}" for ip in ips)
    run("openssl", "req", "-new", "-key", key, "-out", csr, "-subj", "/CN=member", "-addext", f"subjectAltName={san}")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "2", "-copy_extensions", "copy")
    return f"ca={ca};cert={cert};key={key}"


# ---- engines ------------------------------------------------------------------------------------

def _open_engine(system: str, ip: str, store_url: str | None, role: str):
    """An initialized engine of `system` reachable at `ip`, and its last-error function."""
    if system == "memfabric":
        import memfabric_hybrid as mf

        e = mf.TransferEngine()
        rc = e.initialize(store_url or "", f"{ip}:0", role, 0)
        if rc != 0:
            raise RuntimeError(f"memfabric initialize: {rc} {mf.get_last_err_msg()}")
        return e, mf.get_last_err_msg
    from mooncake.engine import TransferEngine

    e = TransferEngine()
    rc = e.initialize(ip, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"mooncake initialize(ip, 'P2PHANDSHAKE', 'tcp', '') returned {rc}")
    return e, lambda: ""


def _session(system: str, engine: Any, ip: str) -> str:
    """The name peers pass as the destination of a transfer to `engine`."""
    if system == "memfabric":
        return engine.session_id
    return f"{ip}:{engine.get_rpc_port()}"


def _close(system: str, engine: Any) -> None:
    if system == "memfabric":
        engine.destroy()


def _target(system: str, ip: str, store_url: str | None, size: int, conn) -> None:
    """Registers `size` bytes, reports ("ready", session, addr), then waits for "stop"."""
    try:
        engine, err = _open_engine(system, ip, store_url, "Decode")
        buf = _anon(size)
        ctypes.memset(_addr(buf), 0x5A, size)  # touch every page before anybody measures
        rc = engine.register_memory(_addr(buf), size)
        if rc != 0:
            raise RuntimeError(f"{system} register_memory({size}): {rc} {err()}")
        conn.send(("ready", _session(system, engine, ip), _addr(buf)))
    except Exception as e:  # reported to the parent, which goes on with the other cells
        conn.send(("error", repr(e)))
        return
    conn.recv()
    _close(system, engine)
    conn.send("stopped")


def _time_calls(fn: Callable[[], int], seconds: float, min_calls: int = 3) -> tuple[list[float], int]:
    """Calls fn (returning a status) until `seconds` passed and `min_calls` were made.

    Returns the sorted call times (after a short warm-up) and the first non-zero status (0 if
    every call succeeded; measuring stops at the first failure).
    """
    clock = time.perf_counter
    warm_end = clock() + min(0.2, seconds / 5)
    n = 0
    while True:
        rc = fn()
        if rc != 0:
            return [], rc
        n += 1
        if n >= 2 and clock() >= warm_end:
            break
    lat: list[float] = []
    end = clock() + seconds
    while True:
        t0 = clock()
        rc = fn()
        t1 = clock()
        if rc != 0:
            return sorted(lat), rc
        lat.append(t1 - t0)
        if t1 >= end and len(lat) >= min_calls:
            break
    return sorted(lat), 0


def _figures(lat: list[float], nbytes: int) -> dict[str, Any]:
    mean = sum(lat) / len(lat)
    return {"p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6,
            "gbps": nbytes / mean / 1e9, "calls": len(lat)}


def _verify(engine: Any, dest: str, base: int, buf: mmap.mmap, peer: int) -> str | None:
    """Writes, reads back and compares one 1 MiB block and one scattered 256 x 16 KiB batch."""
    n = MiB
    data = random.Random(1).randbytes(n)
    buf[:n] = data
    if (rc := engine.transfer_sync_write(dest, base, peer, n)) != 0:
        return f"write of 1 MiB returned {rc}"
    buf[n:2 * n] = b"\0" * n
    if (rc := engine.transfer_sync_read(dest, base + n, peer, n)) != 0:
        return f"read of 1 MiB returned {rc}"
    if buf[n:2 * n] != data:
        return "1 MiB read back differs from what was written"
    block, count = GOAL_BATCH
    order = list(range(count))
    random.Random(2).shuffle(order)
    data = random.Random(3).randbytes(block * count)
    buf[:block * count] = data
    src = [base + i * block for i in range(count)]
    dst = [peer + order[i] * block for i in range(count)]
    if (rc := engine.batch_transfer_sync_write(dest, src, dst, [block] * count)) != 0:
        return f"batch write of {count} x {block} returned {rc}"
    off = block * count
    buf[off:2 * off] = b"\0" * off
    back = [base + off + i * block for i in range(count)]
    if (rc := engine.batch_transfer_sync_read(dest, back, dst, [block] * count)) != 0:
        return f"batch read of {count} x {block} returned {rc}"
    if buf[off:2 * off] != data:
        return "scattered batch read back differs from what was written"
    return None


def _register_1g(engine: Any, err: Callable[[], str], rounds: int = 5) -> dict[str, Any]:
    """Times register_memory of 1 GiB of touched anonymous memory (unregistered in between)."""
    buf = _anon(GiB)
    a = _addr(buf)
    ctypes.memset(a, 1, GiB)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        rc = engine.register_memory(a, GiB)
        dt = time.perf_counter() - t0
        if rc != 0:
            return {"error": f"register_memory(1 GiB) returned {rc} {err()}"}
        times.append(dt * 1e3)
        if (rc := engine.unregister_memory(a)) != 0:
            return {"error": f"unregister_memory returned {rc} {err()}"}
    times.sort()
    return {"min_ms": times[0], "median_ms": times[len(times) // 2], "rounds": rounds}


def _initiator(system: str, path: str, ip: str, cells: list[tuple[int, int]], region: int,
               seconds: float, conn) -> None:
    """Runs one (system, path) sweep against the target whose session arrives on `conn`."""
    try:
        store = None
        store_url = None
        if system == "memfabric":
            import memfabric_hybrid as mf

            store = mf.start_config_store(f"tcp://{ip}:0")
            store_url = store.url
        engine, err = _open_engine(system, ip, store_url, "Prefill")
        buf = _anon(region)
        base = _addr(buf)
        ctypes.memset(base, 0xA5, region)
        if (rc := engine.register_memory(base, region)) != 0:
            raise RuntimeError(f"register_memory({region}): {rc} {err()}")
    except Exception as e:
        conn.send(("error", repr(e)))
        return
    conn.send(("hello", store_url))
    _, dest, peer = conn.recv()
    out: dict[str, Any] = {"system": system, "path": path, "cells": []}
    try:
        out["transport"] = engine.transport_for(dest) if system == "memfabric" else "tcp"
        out["verify_error"] = _verify(engine, dest, base, buf, peer)
        for size, batch in cells:
            for op in ("write", "read"):
                cell: dict[str, Any] = {"size": size, "batch": batch, "op": op}
                fn: Callable[[], int]
                if batch == 1:
                    call = engine.transfer_sync_write if op == "write" else engine.transfer_sync_read
                    fn = functools.partial(call, dest, base, peer, size)
                else:
                    order = list(range(batch))
                    random.Random(size * batch).shuffle(order)
                    src = [base + i * size for i in range(batch)]
                    dst = [peer + order[i] * size for i in range(batch)]
                    bcall = engine.batch_transfer_sync_write if op == "write" else engine.batch_transfer_sync_read
                    fn = functools.partial(bcall, dest, src, dst, [size] * batch)
                lat, rc = _time_calls(fn, seconds)
                if rc != 0:
                    cell["error"] = f"returned {rc} {err()}".strip()
                if lat:
                    cell.update(_figures(lat, size * batch))
                out["cells"].append(cell)
        if path == "same-host":
            out["register_1g"] = _register_1g(engine, err)
    except Exception as e:
        out["error"] = repr(e)
    conn.send(("result", out))
    conn.recv()
    _close(system, engine)
    if store is not None:
        store.close()


def _wait(conn, timeout: float, procs: list, what: str) -> Any:
    """The next message on `conn`, or RuntimeError when it does not come or a process died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if conn.poll(0.2):
            return conn.recv()
        dead = [p for p in procs if p.exitcode is not None]
        if dead and not conn.poll(0.5):
            raise RuntimeError(f"{what}: a process exited with code {dead[0].exitcode}")
    raise RuntimeError(f"{what}: no answer within {timeout:.0f} s")


def _stop(procs: list) -> None:
    for p in procs:
        p.join(20)
        if p.is_alive():
            p.kill()
            p.join(5)


def run_sweep(system: str, path: str, hosts: TwoHosts | None, cells: list[tuple[int, int]],
              region: int, seconds: float, verbose: bool, tls_info: str | None = None) -> dict[str, Any]:
    """One (system, path) sweep: a target and an initiator process, namespaces when cross-host."""
    ctx = mp.get_context("spawn")
    env: dict[str, str | None] = {}
    if system == "memfabric":
        env["MF_TRANSPORT"] = "tcp" if path == "cross-host" else None
        env[TLS_ENV] = tls_info
    else:
        for k, v in MOONCAKE_ENV.items():
            if not (verbose and k == "MC_LOG_LEVEL"):
                env[k] = os.environ.get(k, v)
    ns_a, ns_b = (hosts.a, hosts.b) if hosts else (None, None)
    ip_a, ip_b = (hosts.ip_a, hosts.ip_b) if hosts else ("127.0.0.1", "127.0.0.1")
    # Mooncake logs a few lines at start even at MC_LOG_LEVEL=ERROR (glog's "Logging before
    # InitGoogleLogging", "Local segment descriptor not found"): kept in a file, shown on failure.
    log = None
    if system == "mooncake" and not verbose:
        log = os.path.join(tempfile.gettempdir(), f"mf-bench-te-mooncake-{os.getpid()}-{path}.log")
        open(log, "w").close()
    ci, ci_child = ctx.Pipe()
    ct, ct_child = ctx.Pipe()
    pi = ctx.Process(target=_child, args=(ns_a, env, log, _initiator, system, path, ip_a, cells, region, seconds, ci_child))
    procs = [pi]
    pi.start()
    out: dict[str, Any] = {"system": system, "path": path, "cells": []}
    try:
        msg = _wait(ci, 120, procs, f"{system} {path} initiator start")
        if msg[0] != "hello":
            out["error"] = msg[1]
            return out
        pt = ctx.Process(target=_child, args=(ns_b, env, log, _target, system, ip_b, msg[1], region, ct_child))
        procs.append(pt)
        pt.start()
        msg = _wait(ct, 120, procs, f"{system} {path} target start")
        if msg[0] != "ready":
            out["error"] = msg[1]
            return out
        _, session, peer = msg
        ci.send(("go", session, peer))
        budget = 120 + len(cells) * 2 * (seconds * 2 + 30)
        out = _wait(ci, budget, procs, f"{system} {path} sweep")[1]
        # The target goes first: the initiator holds the config store the target is connected to.
        ct.send("stop")
        try:
            _wait(ct, 30, procs, f"{system} {path} target stop")
        except RuntimeError:
            pass
        ci.send("done")
        return out
    except RuntimeError as e:
        out["error"] = str(e)
        return out
    finally:
        _stop(procs)
        if log:
            with open(log, errors="replace") as f:
                text = f.read().strip()
            os.unlink(log)
            if text and (out.get("error") or any(c.get("error") for c in out.get("cells", []))):
                print(f"  {system} {path} log (last lines):\n    " + "\n    ".join(text.splitlines()[-15:]))


# ---- physical limits ----------------------------------------------------------------------------

def memcpy_limits(sizes: list[int], seconds: float) -> dict[int, dict[str, Any]]:
    """Single-thread memcpy (ctypes.memmove) between two touched buffers, per block size."""
    n = max(sizes)
    src, dst = _anon(n), _anon(n)
    a, b = _addr(src), _addr(dst)
    ctypes.memset(a, 1, n)
    ctypes.memset(b, 2, n)
    out = {}
    for size in sizes:

        def copy(size: int = size) -> int:
            ctypes.memmove(b, a, size)
            return 0

        lat, _ = _time_calls(copy, seconds)
        out[size] = _figures(lat, size)
    return out


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    while len(view):
        got = sock.recv_into(view)
        if got == 0:
            return False
        view = view[got:]
    return True


def _tcp_server(ip: str, max_size: int, conn) -> None:
    """Accepts one connection; for each (u64 n, n bytes) message answers one byte; n=0 ends."""
    lsock = socket.socket()
    lsock.bind((ip, 0))
    lsock.listen(1)
    conn.send(lsock.getsockname()[1])
    s, _ = lsock.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(max_size))
    hdr = memoryview(bytearray(8))
    while _recv_exact(s, hdr):
        (n,) = struct.unpack("<Q", hdr)
        if n == 0 or not _recv_exact(s, buf[:n]):
            break
        s.sendall(b"\x01")
    s.close()
    lsock.close()


def _tcp_client(ip: str, port: int, sizes: list[int], seconds: float, conn) -> None:
    s = socket.create_connection((ip, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = memoryview(bytearray(os.urandom(1024)) * (max(sizes) // 1024 + 1))
    ack = bytearray(1)
    out = {}
    for size in sizes:
        hdr = struct.pack("<Q", size)
        body = payload[:size]

        def once(hdr=hdr, body=body) -> int:
            sent = s.sendmsg([hdr, body])
            if sent < 8 + len(body):
                if sent < 8:
                    s.sendall(hdr[sent:])
                    sent = 8
                s.sendall(body[sent - 8:])
            return 0 if s.recv_into(ack) == 1 else -1

        lat, rc = _time_calls(once, seconds)
        out[size] = _figures(lat, size) if rc == 0 else {"error": f"connection failed ({rc})"}
    s.sendall(struct.pack("<Q", 0))
    s.close()
    conn.send(out)


def tcp_limits(hosts: TwoHosts | None, sizes: list[int], seconds: float) -> dict[int, dict[str, Any]] | str:
    """Raw TCP per block size between two processes (loopback, or across the veth pair)."""
    ctx = mp.get_context("spawn")
    ip_a, ip_b = (hosts.ip_a, hosts.ip_b) if hosts else ("127.0.0.1", "127.0.0.1")
    cs, cs_child = ctx.Pipe()
    cc, cc_child = ctx.Pipe()
    ps = ctx.Process(target=_child, args=(hosts.b if hosts else None, {}, None, _tcp_server, ip_b, max(sizes), cs_child))
    procs = [ps]
    ps.start()
    try:
        port = _wait(cs, 60, procs, "tcp server start")
        pc = ctx.Process(target=_child, args=(hosts.a if hosts else None, {}, None, _tcp_client, ip_b, port, sizes, seconds, cc_child))
        procs.append(pc)
        pc.start()
        return _wait(cc, 60 + len(sizes) * (seconds * 2 + 10), procs, "tcp client")
    except RuntimeError as e:
        return str(e)
    finally:
        _stop(procs)


# ---- report -------------------------------------------------------------------------------------

def _cell(result: dict[str, Any] | None, size: int, batch: int, op: str) -> dict[str, Any] | None:
    if not result:
        return None
    for c in result.get("cells", []):
        if c["size"] == size and c["batch"] == batch and c["op"] == op:
            return c
    return None


def _g(c: dict[str, Any] | None, key: str) -> float:
    return float(c[key]) if c and key in c else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if a == a and b == b and b > 0 else float("nan")


def _goals(res: dict[tuple[str, str], dict[str, Any]], memcpy: dict[int, dict[str, Any]],
           reg: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's benchmark goals, each with what was measured and PASS/MISS (n/a: not run)."""
    ours_sh, mc_sh = res.get(("memfabric", "same-host")), res.get(("mooncake", "same-host"))
    ours_ch, mc_ch = res.get(("memfabric", "cross-host")), res.get(("mooncake", "cross-host"))
    goals = []

    def add(name: str, value: float, target: str, ok: bool | None, detail: str) -> None:
        status = "n/a" if ok is None or value != value else ("PASS" if ok else "MISS")
        goals.append({"goal": name, "measured": value, "target": target, "status": status, "detail": detail})

    p50 = _g(_cell(ours_sh, 4 * KiB, 1, "write"), "p50_us")
    add("same-host 4 KiB sync write p50", p50, "<= 3 us", p50 <= 3.0,
        f"{p50:.2f} us (a Python call; mf-bench te gives the Rust figure)" if p50 == p50 else "not measured")

    parts, worst = [], float("nan")
    for op in ("write", "read"):
        r = _ratio(_g(_cell(ours_sh, 64 * MiB, 1, op), "gbps"), _g(memcpy.get(64 * MiB), "gbps"))
        if r == r:
            parts.append(f"{op} {r:.2f}x")
            worst = r if worst != worst else min(worst, r)
    add("same-host 64 MiB vs memcpy (min)", worst, ">= 0.6x", worst >= 0.6,
        ", ".join(parts) + f" (memcpy {_g(memcpy.get(64 * MiB), 'gbps'):.2f} GB/s)" if parts else "not measured")

    parts, worst = [], float("nan")
    for size in (MiB, 16 * MiB, 64 * MiB):
        for op in ("write", "read"):
            r = _ratio(_g(_cell(ours_ch, size, 1, op), "gbps"), _g(_cell(mc_ch, size, 1, op), "gbps"))
            if r == r:
                parts.append(f"{_human(size)} {op} {r:.2f}x")
                worst = r if worst != worst else min(worst, r)
    add("cross-namespace TCP 1..64 MiB vs Mooncake (min)", worst, ">= 1.5x", worst >= 1.5, ", ".join(parts) or "not measured")

    block, count = GOAL_BATCH
    for path, ours, mc in (("same-host", ours_sh, mc_sh), ("cross-host", ours_ch, mc_ch)):
        parts, worst = [], float("nan")
        for op in ("write", "read"):
            r = _ratio(_g(_cell(ours, block, count, op), "gbps"), _g(_cell(mc, block, count, op), "gbps"))
            if r == r:
                parts.append(f"{op} {r:.2f}x")
                worst = r if worst != worst else min(worst, r)
        add(f"batch {count} x 16 KiB vs Mooncake, {path} (min)", worst, ">= 3x", worst >= 3.0, ", ".join(parts) or "not measured")

    ms = float(reg["median_ms"]) if reg and "median_ms" in reg else float("nan")
    add("register_memory 1 GiB (median)", ms, "<= 1 ms", ms <= 1.0, f"{ms:.3f} ms" if ms == ms else str((reg or {}).get("error", "not measured")))
    return goals


def _plot(path: str, res: dict[tuple[str, str], dict[str, Any]], memcpy: dict[int, dict[str, Any]],
          tcp: dict[str, Any], sizes: list[int]) -> str | None:
    """GB/s and p50 latency of batch-1 writes against block size; None or why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib not importable ({e}); install it with: pip install matplotlib"
    fig, (ax_bw, ax_lat) = plt.subplots(1, 2, figsize=(13, 5))
    style = {"memfabric": "-", "mooncake": "--"}
    marker = {"same-host": "o", "cross-host": "s"}
    color = {("memfabric", "same-host"): "tab:blue", ("memfabric", "cross-host"): "tab:cyan",
             ("mooncake", "same-host"): "tab:red", ("mooncake", "cross-host"): "tab:orange"}

    def line(label: str, figs: dict[int, dict[str, Any]], **kw: Any) -> None:
        xs = [s for s in sizes if s in figs and "gbps" in figs[s]]
        if not xs:
            return
        ax_bw.plot(xs, [figs[s]["gbps"] for s in xs], label=label, **kw)
        ax_lat.plot(xs, [figs[s]["p50_us"] for s in xs], label=label, **kw)

    for (system, p), r in sorted(res.items()):
        figs = {c["size"]: c for c in r.get("cells", []) if c["batch"] == 1 and c["op"] == "write"}
        name = "ours" if system == "memfabric" else "Mooncake tcp"
        line(f"{name}, {p}" + (f" ({r.get('transport')})" if system == "memfabric" else ""), figs,
             linestyle=style[system], marker=marker[p], color=color[(system, p)])
    line("limit: memcpy (1 thread)", memcpy, linestyle=":", color="black", marker=".")
    for p, figs in tcp.items():
        if isinstance(figs, dict):
            line(f"limit: raw TCP, {p}", figs, linestyle=":", color="gray" if p == "same-host" else "tab:brown", marker="x")
    for ax, title, unit in ((ax_bw, "sync write throughput", "GB/s"), (ax_lat, "sync write latency (p50)", "us")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([_human(s).replace(" ", "") for s in sizes])
        ax.set_xlabel("block size (batch of 1)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_bw.legend(fontsize=8)
    fig.suptitle(f"Transfer Engine: ours vs Mooncake, sync write ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _mooncake_missing() -> str | None:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401

        return None
    except Exception as e:
        return (f"mooncake not importable ({e}); install it with: pip install mooncake-transfer-engine-non-cuda "
                "(and apt-get install libibverbs1 librdmacm1 libnuma1); scripts/bench.sh te does both")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m memfabric_hybrid.bench te", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.0, help="measuring time per cell and op")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="block sizes in bytes")
    p.add_argument("--batches", default=DEFAULT_BATCHES, help="descriptors per call")
    p.add_argument("--max-batch-bytes", type=int, default=16 * MiB,
                   help="batches larger than 1 run only where batch x size is at most this")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--no-mooncake", action="store_true", help="skip the Mooncake columns")
    p.add_argument("--verbose", action="store_true", help="leave Mooncake's log at its default level")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG file for GB/s and latency against block size")
    p.add_argument("--tls", action="store_true",
                   help="our store and data plane with mutual TLS (certificates made here with openssl)")
    a = p.parse_args(argv)
    sizes = sorted({int(x) for x in a.sizes.split(",") if x})
    batches = sorted({int(x) for x in a.batches.split(",") if x})
    paths = [x for x in a.paths.split(",") if x]
    if bad := [x for x in paths if x not in PATHS]:
        p.error(f"unknown path {bad[0]!r}; known: {', '.join(PATHS)}")
    cells = [(s, b) for s in sizes for b in batches if b == 1 or s * b <= a.max_batch_bytes]
    if GOAL_BATCH not in cells:
        cells.append(GOAL_BATCH)
    cells.sort()
    region = max(max(s * b for s, b in cells), 2 * GOAL_BATCH[0] * GOAL_BATCH[1], 2 * MiB)

    mooncake_missing = "skipped by --no-mooncake" if a.no_mooncake else _mooncake_missing()
    systems = ["memfabric"] + ([] if mooncake_missing else ["mooncake"])
    if mooncake_missing:
        print(f"Mooncake columns: {mooncake_missing}")
    ns_missing = None
    if "cross-host" in paths:
        ns_missing = netns_unavailable()
        if ns_missing:
            print(f"cross-host path skipped: network namespaces unavailable ({ns_missing})")
            paths.remove("cross-host")

    if a.tls and shutil.which("openssl") is None:
        p.error("--tls needs the openssl command to make certificates")
    if a.tls:
        print("memfabric with mutual TLS on its store and data plane (--tls)")
    print(f"{len(cells)} cells x (write, read) x {len(systems)} systems x {len(paths)} paths, "
          f"{a.seconds:g} s each; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    memcpy = memcpy_limits(sizes, a.seconds)
    print("  measured memcpy", flush=True)
    res: dict[tuple[str, str], dict[str, Any]] = {}
    tcp: dict[str, Any] = {}
    for path in paths:
        hosts_cm = TwoHosts() if path == "cross-host" else None
        hosts = hosts_cm.__enter__() if hosts_cm else None
        tls_dir = tempfile.mkdtemp(prefix="mf-bench-tls-") if a.tls else None
        try:
            tls_info = None
            if tls_dir:
                tls_info = make_tls(tls_dir, ["127.0.0.1"] + ([hosts.ip_a, hosts.ip_b] if hosts else []))
            tcp[path] = tcp_limits(hosts, sizes, a.seconds)
            print(f"  measured raw TCP, {path}", flush=True)
            for system in systems:
                t0 = time.monotonic()
                r = run_sweep(system, path, hosts, cells, region, a.seconds, a.verbose, tls_info)
                res[(system, path)] = r
                note = f" ERROR {r['error']}" if r.get("error") else ""
                if r.get("verify_error"):
                    note += f" VERIFY FAILED: {r['verify_error']}"
                print(f"  measured {system} {path} ({r.get('transport', '?')}) in {time.monotonic() - t0:.0f} s{note}", flush=True)
        finally:
            if tls_dir:
                shutil.rmtree(tls_dir, ignore_errors=True)
            if hosts_cm:
                hosts_cm.__exit__(None, None, None)

    rows = []
    for path in paths:
        for size, batch in cells:
            for op in ("write", "read"):
                o = _cell(res.get(("memfabric", path)), size, batch, op)
                m = _cell(res.get(("mooncake", path)), size, batch, op)
                rows.append([path, op, _human(size), batch,
                             _g(o, "p50_us"), _g(o, "p99_us"), _g(o, "gbps"),
                             _g(m, "p50_us"), _g(m, "p99_us"), _g(m, "gbps"),
                             _ratio(_g(o, "gbps"), _g(m, "gbps"))])
    print()
    print(table(["path", "op", "block", "batch", "ours p50 us", "p99 us", "GB/s",
                 "Mooncake p50 us", "p99 us", "GB/s", "ours/Mooncake"], rows))
    errors = [(k, c) for k, r in res.items() for c in r.get("cells", []) if c.get("error")]
    for (system, path), c in errors:
        print(f"  {system} {path} {c['op']} {_human(c['size'])} x{c['batch']}: {c['error']}")

    lim_rows = []
    for size in sizes:
        row: list[Any] = [_human(size), _g(memcpy.get(size), "p50_us"), _g(memcpy.get(size), "gbps")]
        for path in paths:
            t = tcp.get(path)
            f = t.get(size) if isinstance(t, dict) else None
            row += [_g(f, "p50_us"), _g(f, "gbps")]
        lim_rows.append(row)
    print("\nphysical limits (1 thread memcpy; raw TCP: one connection, block + 1-byte ack, Python sockets)")
    heads = ["block", "memcpy p50 us", "GB/s"]
    for path in paths:
        heads += [f"TCP {'loopback' if path == 'same-host' else 'veth'} p50 us", "GB/s"]
    print(table(heads, lim_rows))
    for path, t in tcp.items():
        if isinstance(t, str):
            print(f"  raw TCP {path}: {t}")

    reg_rows = []
    for system in systems:
        reg = res.get((system, "same-host"), {}).get("register_1g")
        if reg:
            reg_rows.append([system] + [f"{reg[k]:.3f}" if k in reg else "-" for k in ("min_ms", "median_ms")] + [reg.get("error", "")])
    if reg_rows:
        print("\nregister_memory of 1 GiB (touched anonymous memory)")
        print(table(["system", "min ms", "median ms", "error"], reg_rows))

    goals = _goals(res, memcpy, res.get(("memfabric", "same-host"), {}).get("register_1g"))
    print("\ngoals (issue 4)")
    print(table(["goal", "target", "measured", "status"], [[g["goal"], g["target"], g["detail"], g["status"]] for g in goals]))

    plot_note = None
    if a.plot:
        plot_note = _plot(a.plot, res, memcpy, tcp, sizes)
        print(f"plot: {plot_note}" if plot_note else f"plot written to {a.plot}")
    write_json(a.json, {
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "load_avg_at_start": os.getloadavg()},
        "seconds": a.seconds, "cells": [{"size": s, "batch": b} for s, b in cells], "tls": a.tls,
        "mooncake": mooncake_missing or "measured", "mooncake_env": {k: os.environ.get(k, v) for k, v in MOONCAKE_ENV.items()},
        "cross_host": ns_missing or "measured",
        "results": [r for r in res.values()],
        "limits": {"memcpy": {str(k): v for k, v in memcpy.items()},
                   "tcp": {p: ({str(k): v for k, v in t.items()} if isinstance(t, dict) else t) for p, t in tcp.items()}},
        "goals": goals,
        "plot": plot_note or a.plot,
    })
    failed = any(r.get("error") or r.get("verify_error") for r in res.values())
    return 1 if failed else 0
