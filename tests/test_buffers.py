"""Memory objects wherever an address is taken: numpy, bytearray, memoryview, mmap, bytes,
torch CPU tensors (when torch is installed), with data verified and the wrong kinds refused."""

from __future__ import annotations

import gc
import hashlib
import mmap

import numpy as np
import pytest

import memfabric_hybrid as mf
from test_trans import start_target

N = 1 << 20


@pytest.fixture
def peer(store, spawn, monkeypatch):
    monkeypatch.delenv("MF_TRANSPORT", raising=False)
    conn, proc, (_, session, peer_addr, _) = start_target(spawn, store.url, size=4 * N)
    engine = mf.TransferEngine()
    assert engine.initialize(store.url, "127.0.0.1:0", "Prefill", 0) == 0
    yield engine, conn, session, peer_addr
    engine.destroy()
    conn.send(("stop",))
    conn.recv()
    proc.join(30)


def target_hash(conn, n):
    conn.send(("hash", 0, n))
    return conn.recv()


def kinds():
    yield "numpy", lambda: np.zeros(N, dtype=np.uint8)
    yield "bytearray", lambda: bytearray(N)
    yield "mmap", lambda: mmap.mmap(-1, N)
    yield "memoryview", lambda: memoryview(bytearray(N))
    try:
        import torch
    except ImportError:
        yield "torch", None
        return
    yield "torch", lambda: torch.zeros(N, dtype=torch.uint8)


@pytest.mark.parametrize("kind,make", list(kinds()), ids=[k for k, _ in kinds()])
def test_buffer_kinds_as_source_and_destination(peer, kind, make):
    if make is None:
        pytest.skip("torch is not installed (the benchmarks install it; the suite runs without)")
    engine, conn, session, peer_addr = peer
    buf = make()
    assert engine.register_memory(buf) == 0, mf.get_last_err_msg()  # size taken from the object
    data = bytes(range(256)) * (N // 256)
    view = memoryview(buf.numpy() if kind == "torch" else buf).cast("B")
    view[:] = data
    assert engine.transfer_sync_write(session, buf, peer_addr) == 0, mf.get_last_err_msg()
    assert target_hash(conn, N) == hashlib.sha256(data).hexdigest()
    view[:] = b"\0" * N
    assert engine.transfer_sync_read(session, buf, peer_addr) == 0
    assert bytes(view) == data
    s = mf.Stream()
    assert engine.transfer_async_read_submit(session, buf, peer_addr, 4096, s) == 0
    assert s.synchronize() == 0
    assert engine.unregister_memory(buf) == 0


def test_registered_object_is_kept_alive(peer):
    engine, conn, session, peer_addr = peer
    a = np.full(N, 7, dtype=np.uint8)
    addr = a.__array_interface__["data"][0]
    assert engine.register_memory(a) == 0
    del a
    gc.collect()
    # The engine holds the array: its memory is still valid and still registered.
    assert engine.transfer_sync_write(session, addr, peer_addr, N) == 0
    assert target_hash(conn, N) == hashlib.sha256(b"\x07" * N).hexdigest()
    assert engine.unregister_memory(addr) == 0


def test_wrong_kinds_are_refused(peer):
    engine, conn, session, peer_addr = peer
    for bad in ("text", 1.5, None, object()):
        with pytest.raises(TypeError):
            engine.register_memory(bad, 64)
    strided = np.zeros((64, 64), dtype=np.uint8)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        engine.register_memory(strided)
    ro = np.zeros(N, dtype=np.uint8)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        engine.register_memory(ro)
    with pytest.raises(ValueError, match="read-only"):
        engine.transfer_sync_read(session, b"x" * 64, peer_addr)
    with pytest.raises(TypeError, match="length is required"):
        engine.transfer_sync_write(session, 4096, peer_addr)
    small = bytearray(64)
    assert engine.register_memory(small) == 0
    with pytest.raises(ValueError, match="exceeds"):
        engine.transfer_sync_write(session, small, peer_addr, 128)
    # bytes work as a source when registered memory holds them (here they do not: refused).
    assert engine.transfer_sync_write(session, b"y" * 64, peer_addr) == mf.MF_OUT_OF_BOUNDS
    assert engine.unregister_memory(small) == 0


def test_buffer_info_docstring_example():
    addr, nbytes, owner = mf.buffers.buffer_info(np.zeros(1024, dtype=np.uint8), writable=True)
    assert nbytes == 1024 and addr != 0
