"""Data-plane admission between real processes: only engines admitted by the same config store
(and, with TLS on, holding the job's certificates) may read or write an engine's memory."""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import time

import pytest

import memfabric_hybrid as mf
import _auth_workers
import _te_target
import _workers

SIZE = 1 << 20


def start_target(spawn, store_url: str, env: dict | None = None):
    parent, child = spawn.Pipe()
    p = spawn.Process(target=_te_target.serve, args=(store_url, "127.0.0.1:0", SIZE, child, env))
    p.start()
    assert parent.poll(60), "target did not start"
    msg = parent.recv()
    assert msg[0] == "ready", msg
    return parent, p, msg[1], msg[2]


def ask(conn, *cmd):
    conn.send(cmd)
    assert conn.poll(60), f"target did not answer {cmd[0]}"
    return conn.recv()


def stop(conn, proc) -> None:
    try:
        ask(conn, "stop")
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass
    proc.join(30)


def hello(version: int = 2) -> bytes:
    return b"MFTD" + bytes([version, 0, 0, 0])


def write_frame(addr: int, n: int) -> bytes:
    return struct.pack("<BB6xQQQ", 2, 1, 1, addr, n) + b"\x66" * n


def closed_by_server(s: socket.socket, within: float = 5.0) -> bytes:
    """Everything the server sent until it closed; fails if it keeps the connection open."""
    s.settimeout(within)
    got = b""
    while True:
        try:
            b = s.recv(4096)
        except ConnectionResetError:
            return got
        except socket.timeout:
            pytest.fail(f"the data server kept the connection open (sent {got!r})")
        if not b:
            return got
        got += b


@pytest.fixture
def target(store, spawn):
    conn, proc, session, peer_addr = start_target(spawn, store.url)
    yield conn, session, peer_addr
    stop(conn, proc)


def test_raw_write_frame_without_the_handshake_changes_nothing(target, store, monkeypatch):
    conn, session, peer_addr = target
    host, port = session.rsplit(":", 1)
    before = ask(conn, "hash", 0, SIZE)
    frame = write_frame(peer_addr, 4096)

    # The frame alone, where a hello belongs.
    with socket.create_connection((host, int(port))) as s:
        s.sendall(frame)
        closed_by_server(s)
    # The hello of the protocol before admission existed, then the frame.
    with socket.create_connection((host, int(port))) as s:
        s.sendall(hello(1) + frame)
        assert closed_by_server(s)[:5] == hello(1)[:4] + bytes([2])  # "I speak 2", then closed
    # The right hello and a nonce, then the frame where the proof belongs.
    with socket.create_connection((host, int(port))) as s:
        s.sendall(hello() + b"\x01" * 32)
        reply = b""
        while len(reply) < 40:
            reply += s.recv(40 - len(reply))
        assert reply[:4] == b"MFTD"
        s.sendall(frame)
        assert closed_by_server(s) == b"\x01"  # refused

    time.sleep(0.2)
    assert ask(conn, "hash", 0, SIZE) == before
    assert ask(conn, "guards")

    # An engine of the job is still served.
    monkeypatch.setenv("MF_TRANSPORT", "tcp")
    e = mf.TransferEngine()
    assert e.initialize(store.url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    import mmap
    buf = mmap.mmap(-1, 4096)
    buf[:] = b"\x42" * 4096
    assert e.register_memory(_te_target.buffer_address(buf), 4096) == 0
    assert e.transport_for(session) == "tcp"
    assert e.transfer_sync_write(session, _te_target.buffer_address(buf), peer_addr, 4096) == 0, mf.get_last_err_msg()
    assert ask(conn, "hash", 0, 4096) == hashlib.sha256(b"\x42" * 4096).hexdigest()
    e.destroy()


def test_two_engines_on_one_store_transfer_over_tcp(target, store, spawn):
    conn, session, peer_addr = target
    out = spawn.Queue()
    p = spawn.Process(target=_auth_workers.tls_initiator, args=("", store.url, session, peer_addr, SIZE, out))
    p.start()
    r = out.get(timeout=120)
    p.join(30)
    assert r[0] == "ok", r
    _, transport, digest, read_back = r
    assert transport == "tcp"
    assert read_back
    assert ask(conn, "hash", 0, SIZE) == digest


def test_engine_of_another_store_is_refused(store, spawn, monkeypatch):
    """The target's records are copied into our store by hand, so the engine finds it; its data
    server still refuses us: we were admitted by another store."""
    other = mf.start_config_store("tcp://127.0.0.1:0")
    conn, proc, session, peer_addr = start_target(spawn, other.url)
    try:
        with mf.StoreClient(other.url, timeout=10) as src, mf.StoreClient(store.url, timeout=10) as dst:
            for key in (f"mf/te/{session}", f"mf/te/{session}/regions"):
                dst.set(key, src.get(key, timeout=10))
        monkeypatch.setenv("MF_TRANSPORT", "tcp")
        e = mf.TransferEngine()
        assert e.initialize(store.url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
        import mmap
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"\x42" * 4096
        a = _te_target.buffer_address(buf)
        assert e.register_memory(a, 4096) == 0
        before = ask(conn, "hash", 0, SIZE)
        t0 = time.monotonic()
        assert e.transfer_sync_write(session, a, peer_addr, 4096) == mf.MF_REFUSED
        msg = mf.get_last_err_msg()
        assert "refused this engine" in msg and "config store" in msg and session in msg, msg
        assert e.transfer_sync_read(session, a, peer_addr, 4096) == mf.MF_REFUSED
        assert buf[:] == b"\x42" * 4096
        assert time.monotonic() - t0 < 10
        assert ask(conn, "hash", 0, SIZE) == before
        e.destroy()
    finally:
        stop(conn, proc)
        other.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed to make test certificates")
def test_transfer_engine_over_tls(tmp_path, spawn):
    from test_tls import make_pki

    pki = make_pki(tmp_path, "job")
    info = f"ca={pki['ca']};cert={pki['cert']};key={pki['key']}"
    q, stop_store = spawn.Queue(), spawn.Event()
    ps = spawn.Process(target=_workers.tls_store_server, args=(info, q, stop_store))
    ps.start()
    try:
        url = q.get(timeout=30)
        parent, child = spawn.Pipe()
        pt = spawn.Process(target=_auth_workers.tls_target, args=(info, url, SIZE, child))
        pt.start()
        assert parent.poll(60), "target did not start"
        msg = parent.recv()
        assert msg[0] == "ready", msg
        session, peer_addr = msg[1], msg[2]
        try:
            out = spawn.Queue()
            pi = spawn.Process(target=_auth_workers.tls_initiator, args=(info, url, session, peer_addr, SIZE, out))
            pi.start()
            r = out.get(timeout=120)
            pi.join(30)
            assert r[0] == "ok", r
            _, transport, digest, read_back = r
            assert transport == "tcp"
            assert read_back
            assert ask(parent, "hash", 0, SIZE) == digest

            # A plaintext raw client is refused by the TLS data server; nothing changes.
            host, port = session.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as s:
                s.sendall(hello() + b"\x01" * 32 + write_frame(peer_addr, 4096))
                closed_by_server(s)
            assert ask(parent, "hash", 0, SIZE) == digest
        finally:
            stop(parent, pt)
    finally:
        stop_store.set()
        ps.join(30)
