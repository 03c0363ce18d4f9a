"""Fault matrix row 8: a hostile or broken peer sends garbage to a Transfer Engine's data port and
to the config store's port.

Each bad connection is closed by the server; everybody else keeps being served; the target's
registered memory and the store's keys stay as they were. Garbage is tried both before the
data-plane handshake (anyone who can reach the port) and after it (a peer that holds the job
secret, as any engine of the job does, but speaks nonsense)."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import socket
import struct
import time

import pytest

import memfabric_hybrid as mf
from conftest import free_port
from _faults import Target, closed_by_peer, engine, kill_store, start_store, verified_write

SIZE = 1 << 20
# The data server's own limit on finishing the handshake (transport/auth.rs).
HANDSHAKE_LIMIT = 10.0
# How long a server may take to close a connection it refuses.
CLOSE_WITHIN = 2.0

SECRET_KEY = "mf/auth/data_secret"
REQ = struct.Struct("<BB6xQQQ")
RESP = struct.Struct("<BBxxIQQ")
WRITE, READ = 1, 2


def connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=5)


def admitted(addr: tuple[str, int], secret: bytes) -> socket.socket:
    """A connection that passed the data-plane handshake (tcp.rs, "Connection start")."""
    s = connect(addr)
    cn = os.urandom(32)
    s.sendall(b"MFTD" + bytes([2, 0, 0, 0]) + cn)
    reply = recv_exactly(s, 40)
    assert reply[:6] == b"MFTD" + bytes([2, 0]), reply
    sn = reply[8:]
    s.sendall(hmac.new(secret, b"memfabric data client" + sn + cn, hashlib.sha256).digest())
    verdict = recv_exactly(s, 33)
    assert verdict[0] == 0, "not admitted"
    assert hmac.compare_digest(verdict[1:], hmac.new(secret, b"memfabric data server" + sn + cn,
                                                     hashlib.sha256).digest())
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        b = s.recv(n - len(got))
        assert b, f"closed after {len(got)} of {n} bytes"
        got += b
    return got


def response(s: socket.socket) -> tuple[int, int, bytes, bytes]:
    """(status, req_id, message, data) of one data-server response."""
    version, status, msg_len, req_id, data_len = RESP.unpack(recv_exactly(s, RESP.size))
    assert version == 2
    msg = recv_exactly(s, msg_len)
    return status, req_id, msg, recv_exactly(s, data_len) if data_len else b""


@pytest.fixture
def target(store, spawn):
    t = Target(spawn, store.url, SIZE)
    yield t
    t.stop()
    assert t.proc.exitcode == 0


def test_garbage_to_the_data_port(store, target):
    host, port = target.session.rsplit(":", 1)
    addr = (host, int(port))
    before = target.hash()
    with mf.StoreClient(store.url, timeout=5) as c:
        secret = c.get(SECRET_KEY, wait=False)
    assert len(secret) == 32
    # Opened first, checked last: a client that says half a hello and then nothing holds its
    # connection only until the handshake limit.
    stalled = connect(addr)
    stalled.sendall(b"MF")
    stalled_at = time.monotonic()

    rng = random.Random(8)
    before_handshake = {
        "random bytes": rng.randbytes(4096),
        "an HTTP request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "a TLS client hello": bytes([0x16, 0x03, 0x01, 0x00, 0x40]) + rng.randbytes(64),
        "the old protocol's hello": b"MFTD" + bytes([1, 0, 0, 0]),
        "a request where the hello belongs": REQ.pack(2, WRITE, 1, target.addr, 16) + b"\x66" * 16,
        "a wrong proof": b"MFTD" + bytes([2, 0, 0, 0]) + rng.randbytes(32 + 32),
        "1 MiB of 0xff": b"\xff" * (1 << 20),
    }
    for name, data in before_handshake.items():
        with connect(addr) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while we were still sending: that is the point
            closed, _ = closed_by_peer(s, CLOSE_WITHIN)
            assert closed, f"{name}: connection left open"

    after_handshake = {
        "a request of another version": REQ.pack(3, WRITE, 1, target.addr, 16) + b"\x66" * 16,
        "an unknown op": REQ.pack(2, 9, 1, target.addr, 16),
        "non-zero padding": REQ.pack(2, READ, 1, target.addr, 16)[:2] + b"\x01" + bytes(29),
        "a request over 64 MiB": REQ.pack(2, WRITE, 1, target.addr, (64 << 20) + 1),
        "random bytes": b"\x07" + rng.randbytes(4095),
        "half a header, then the end": REQ.pack(2, WRITE, 1, target.addr, 16)[:20],
    }
    for name, data in after_handshake.items():
        with admitted(addr, secret) as s:
            s.sendall(data)
            if name.endswith("the end"):
                s.shutdown(socket.SHUT_WR)
            closed, got = closed_by_peer(s, CLOSE_WITHIN)
            assert closed and got == b"", f"{name}: {got!r}, closed={closed}"

    # Well-formed requests for memory the target never offered are refused one by one; the
    # connection stays in step and serves a good request after them.
    with admitted(addr, secret) as s:
        bad = [
            (WRITE, target.addr - 4096, 4096),        # the guard page before the region
            (WRITE, target.addr + SIZE - 100, 200),   # across the end of the region
            (WRITE, 0x10000, 64),                      # nothing registered there
            (READ, target.addr + SIZE, 1),             # the first byte after the region
            (WRITE, (1 << 64) - 8, 16),                # wraps around the address space
        ]
        for i, (op, a, n) in enumerate(bad, start=1):
            s.sendall(REQ.pack(2, op, i, a, n) + (b"\x66" * n if op == WRITE else b""))
            status, req_id, msg, data = response(s)
            assert (status, req_id, data) == (1, i, b""), (i, status, msg)
        s.sendall(REQ.pack(2, READ, 99, target.addr, 64))
        status, req_id, msg, data = response(s)
        assert (status, req_id, len(data)) == (0, 99, 64), msg

    assert target.hash() == before
    assert target.guards_ok()
    assert target.proc.is_alive()
    # A real engine of the job is served as before, with the stalled client still connected.
    e, mem = engine(store.url, SIZE)
    try:
        verified_write(e, mem, target, SIZE, seed=80)
    finally:
        e.destroy()
    closed, _ = closed_by_peer(stalled, HANDSHAKE_LIMIT + 3 - (time.monotonic() - stalled_at))
    held = time.monotonic() - stalled_at
    stalled.close()
    assert closed, "a client that never finished its hello kept its connection"
    assert held < HANDSHAKE_LIMIT + 3, held
    print(f"\n[row 8 data] {len(before_handshake)} kinds before and {len(after_handshake)} after the "
          f"handshake closed within {CLOSE_WITHIN}s, 5 out-of-bounds requests refused in step; "
          f"stalled hello dropped after {held:.1f}s")


def test_garbage_to_the_store_port():
    url = f"tcp://127.0.0.1:{free_port()}"
    server = start_store(url)
    try:
        port = int(url.rsplit(":", 1)[1])
        addr = ("127.0.0.1", port)
        good = mf.StoreClient(url, timeout=5)
        good.set("kept", b"value")
        good.set("alive", b"1", ephemeral=True)
        assert good.add("counter", 5) == 5
        rng = random.Random(9)
        frames = {
            "random bytes": rng.randbytes(4096),
            "a 1 GiB length prefix": struct.pack(">IBB", 1 << 30, 1, 2),
            "an unknown version": struct.pack(">IBB", 2, 77, 1),
            "an unknown kind": struct.pack(">IBB", 3, 1, 250) + b"x",
            "a body shorter than its fields": b"\x00\x00\x00\x06\x01\x02\xff\xff\xff\xff",
            "an HTTP request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "a TLS client hello": bytes([0x16, 0x03, 0x01, 0x00, 0x40]) + rng.randbytes(64),
            "1 MiB of 0xff": b"\xff" * (1 << 20),
        }
        for name, data in frames.items():
            with connect(addr) as s:
                try:
                    s.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                closed, _ = closed_by_peer(s, CLOSE_WITHIN)
                assert closed, f"{name}: connection left open"
        # 200 garbage connections at once, and a few that stall inside a frame.
        flood = [connect(addr) for _ in range(200)]
        for s in flood:
            s.sendall(rng.randbytes(64))
        stalled = [connect(addr) for _ in range(8)]
        for s in stalled:
            s.sendall(struct.pack(">I", 100) + b"\x01")
        t0 = time.monotonic()
        other = mf.StoreClient(url, timeout=5)
        other.set("during", b"flood")
        served_in = time.monotonic() - t0
        for s in flood:
            closed, _ = closed_by_peer(s, CLOSE_WITHIN)
            assert closed
            s.close()
        for s in stalled:
            s.close()
        assert server.poll() is None, "the store process died"
        assert good.get("kept", wait=False) == b"value"
        assert good.get("alive", wait=False) == b"1"
        assert good.add("counter", 1) == 6
        assert other.get("during", wait=False) == b"flood"
        assert good.ping() < 1.0
        other.close()
        good.close()
        print(f"\n[row 8 store] {len(frames)} kinds and a flood of 200 closed within {CLOSE_WITHIN}s; "
              f"a client was served in {served_in * 1000:.1f} ms meanwhile")
    finally:
        kill_store(server)
