"""Transfer Engine between real processes: data paths, bounds, faults, async streams."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest

import memfabric_hybrid as mf
import _te_target
from _te_target import buffer_address
from conftest import free_port

SIZE = 256 << 20


class Pair:
    def __init__(self, engine, local, conn, session, peer_addr, pid, proc):
        self.engine, self.local, self.conn = engine, local, conn
        self.session, self.peer_addr, self.pid, self.proc = session, peer_addr, pid, proc
        self.local_addr = buffer_address(local)

    def ask(self, *cmd, timeout=60):
        self.conn.send(cmd)
        assert self.conn.poll(timeout), f"target did not answer {cmd[0]}"
        return self.conn.recv()


def start_target(spawn, store_url, size=SIZE, session="127.0.0.1:0", env=None):
    parent, child = spawn.Pipe()
    p = spawn.Process(target=_te_target.serve, args=(store_url, session, size, child, env))
    p.start()
    assert parent.poll(60), "target did not start"
    msg = parent.recv()
    assert msg[0] == "ready", msg
    return parent, p, msg


@pytest.fixture(params=["auto", "tcp"])
def pair(request, store, spawn, monkeypatch):
    if request.param == "tcp":
        monkeypatch.setenv("MF_TRANSPORT", "tcp")
    else:
        monkeypatch.delenv("MF_TRANSPORT", raising=False)
    conn, proc, (_, session, peer_addr, pid) = start_target(spawn, store.url)
    engine = mf.TransferEngine()
    assert engine.initialize(store.url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    local = mmap.mmap(-1, SIZE)
    assert engine.register_memory(buffer_address(local), SIZE) == 0, mf.get_last_err_msg()
    expected = "tcp" if request.param == "tcp" else "cma"
    assert engine.transport_for(session) == expected
    pr = Pair(engine, local, conn, session, peer_addr, pid, proc)
    yield pr
    engine.destroy()
    try:
        pr.ask("stop")
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # the test killed it
    proc.join(30)


def pattern(n: int, seed: int) -> bytes:
    block = random.Random(seed).randbytes(min(n, 1 << 20))
    return (block * (n // len(block) + 1))[:n]


@pytest.mark.parametrize("n", [1, 4096, 65536 + 7, 1 << 20, 16 << 20, SIZE])
def test_write_then_read_back(pair, n):
    data = pattern(n, n)
    pair.local[:n] = data
    assert pair.engine.transfer_sync_write(pair.session, pair.local_addr, pair.peer_addr, n) == 0, mf.get_last_err_msg()
    assert pair.ask("hash", 0, n) == hashlib.sha256(data).hexdigest()
    pair.local[:n] = b"\0" * n
    assert pair.engine.transfer_sync_read(pair.session, pair.local_addr, pair.peer_addr, n) == 0, mf.get_last_err_msg()
    assert hashlib.sha256(pair.local[:n]).digest() == hashlib.sha256(data).digest()
    assert pair.ask("guards")


def test_batch_of_4096_blocks(pair):
    block, count = 16 << 10, 4096
    data = pattern(block * count, 7)
    pair.local[: block * count] = data
    order = list(range(count))
    random.Random(1).shuffle(order)  # scattered: nothing to coalesce on the peer side
    src = [pair.local_addr + i * block for i in range(count)]
    dst = [pair.peer_addr + order[i] * block for i in range(count)]
    rc = pair.engine.batch_transfer_sync_write(pair.session, src, dst, [block] * count)
    assert rc == 0, mf.get_last_err_msg()
    expected = bytearray(block * count)
    for i in range(count):
        expected[order[i] * block:(order[i] + 1) * block] = data[i * block:(i + 1) * block]
    assert pair.ask("hash", 0, block * count) == hashlib.sha256(expected).hexdigest()
    # Read them back in the original order into the second half of the local buffer.
    base = block * count
    back = [pair.local_addr + base + i * block for i in range(count)]
    assert pair.engine.batch_transfer_sync_read(pair.session, back, dst, [block] * count) == 0
    assert pair.local[base: base + block * count] == data
    # Contiguous blocks (coalesced into one transfer) work too.
    contiguous = [pair.peer_addr + i * block for i in range(count)]
    assert pair.engine.batch_transfer_sync_write(pair.session, src, contiguous, [block] * count) == 0
    assert pair.ask("hash", 0, block * count) == hashlib.sha256(data).hexdigest()


def test_out_of_bounds_and_unregistered_are_refused(pair):
    e, s = pair.engine, pair.session
    pair.local[:8192] = b"\x55" * 8192
    before = pair.ask("hash", 0, 4096)
    # Runs past the end of the peer's region.
    assert e.transfer_sync_write(s, pair.local_addr, pair.peer_addr + SIZE - 100, 200) == mf.MF_OUT_OF_BOUNDS
    assert "peer" in mf.get_last_err_msg()
    # Starts before the region (in the guard page).
    assert e.transfer_sync_write(s, pair.local_addr, pair.peer_addr - 64, 128) == mf.MF_OUT_OF_BOUNDS
    # An address the peer never registered.
    assert e.transfer_sync_write(s, pair.local_addr, 0x10000, 64) == mf.MF_OUT_OF_BOUNDS
    assert e.transfer_sync_read(s, pair.local_addr, 0x10000, 64) == mf.MF_OUT_OF_BOUNDS
    # One bad descriptor fails the batch.
    rc = e.batch_transfer_sync_write(s, [pair.local_addr] * 2, [pair.peer_addr, pair.peer_addr + SIZE], [64, 64])
    assert rc == mf.MF_OUT_OF_BOUNDS
    assert "descriptor 1" in mf.get_last_err_msg()
    # Local buffer not registered with this engine.
    scratch = mmap.mmap(-1, 4096)
    assert e.transfer_sync_write(s, buffer_address(scratch), pair.peer_addr, 64) == mf.MF_OUT_OF_BOUNDS
    assert "local" in mf.get_last_err_msg()
    assert pair.ask("guards")
    assert pair.ask("hash", 0, 4096) == before


def test_argument_errors(pair):
    e, s = pair.engine, pair.session
    assert e.transfer_sync_write("127.0.0.1:1", pair.local_addr, pair.peer_addr, 64) == mf.SMEM_INVALID_PARAM
    assert "unknown peer session" in mf.get_last_err_msg()
    assert e.transfer_sync_write(s, pair.local_addr, pair.peer_addr, 0) == mf.SMEM_INVALID_PARAM
    assert e.batch_transfer_sync_write(s, [pair.local_addr], [pair.peer_addr, 1], [64]) == mf.SMEM_INVALID_PARAM
    assert e.batch_transfer_sync_write(s, [], [], []) == mf.SMEM_INVALID_PARAM
    with pytest.raises(TypeError):
        e.transfer_sync_write(s, "not an address", pair.peer_addr, 64)
    with pytest.raises(OverflowError):
        e.transfer_sync_write(s, -1, pair.peer_addr, 64)
    with pytest.raises(TypeError):
        e.transfer_async_write_submit(s, pair.local_addr, pair.peer_addr, 64, "stream")
    assert e.transfer_async_write_submit(s, pair.local_addr, pair.peer_addr, 64, 0xDEAD) == mf.MF_UNSUPPORTED
    assert e.initialize("tcp://127.0.0.1:1", "127.0.0.1:0", "Prefill", 0) == mf.SMEM_REPEAT_INVOKE


def test_quantizing_write_is_unsupported_after_its_lists_are_checked(pair):
    e, s = pair.engine, pair.session
    a, p = pair.local_addr, pair.peer_addr
    assert e.batch_transfer_write_with_quant(s, [a], [p, p], [64], [], [], 1) == mf.SMEM_INVALID_PARAM
    assert "peer_buffers has 2 entries" in mf.get_last_err_msg()
    assert e.batch_transfer_write_with_quant(s, [a], [p], [64], [a], [], 1, input_type=1) == mf.MF_UNSUPPORTED
    assert "Ascend device kernel" in mf.get_last_err_msg()


def test_c_api_paths(tmp_path):
    include = Path(mf.get_include_path())
    assert (include / "smem" / "host" / "smem_trans.h").exists()
    try:
        lib = Path(mf.get_lib_path())
    except FileNotFoundError as e:
        assert "cargo build --release -p memfabric-capi" in str(e)
        pytest.skip(f"libmf_smem.so not built beside the package: {e}")
    assert (lib / "libmf_smem.so").exists()


def test_seed_and_upstream_keyword_names(pair):
    """Callers may name arguments as the seed does (destflag, peer_buffer_address[es]) or as
    1.3 does (dest_session, peer_buffer[s]); each form moves the bytes it names."""
    e, s, n = pair.engine, pair.session, 4096
    calls = [
        lambda off: e.transfer_sync_write(destflag=s, buffer=pair.local_addr + off,
                                          peer_buffer_address=pair.peer_addr + off, length=n),
        lambda off: e.transfer_sync_write(dest_session=s, buffer=pair.local_addr + off,
                                          peer_buffer=pair.peer_addr + off, length=n, flags=0),
        lambda off: e.transfer_sync_write(s, pair.local_addr + off, peer_buffer=pair.peer_addr + off, length=n),
        lambda off: e.batch_transfer_sync_write(dest_session=s, buffers=[pair.local_addr + off],
                                                peer_buffers=[pair.peer_addr + off], lengths=[n]),
        lambda off: e.batch_transfer_sync_write(destflag=s, buffers=[pair.local_addr + off],
                                                peer_buffer_addresses=[pair.peer_addr + off], lengths=[n]),
        lambda off: e.transfer_async_write_submit(dest_session=s, buffer=pair.local_addr + off,
                                                  peer_buffer=pair.peer_addr + off, length=n, stream=0),
        lambda off: e.batch_transfer_async_write_submit(destflag=s, buffers=[pair.local_addr + off],
                                                        peer_buffer_addresses=[pair.peer_addr + off],
                                                        lengths=[n], stream=None),
        lambda off: e.batch_transfer_async_write_submit(dest_session=s, buffers=[pair.local_addr + off],
                                                        peer_buffers=[pair.peer_addr + off], lengths=[n], stream=0),
    ]
    data = pattern(n * len(calls), 11)
    pair.local[: len(data)] = data
    for i, call in enumerate(calls):
        assert call(i * n) == 0, (i, mf.get_last_err_msg())
    assert pair.ask("hash", 0, len(data)) == hashlib.sha256(data).hexdigest()
    pair.local[: len(data)] = b"\0" * len(data)
    assert e.transfer_sync_read(dest_session=s, buffer=pair.local_addr, peer_buffer=pair.peer_addr, length=n) == 0
    assert e.batch_transfer_sync_read(dest_session=s, buffers=[pair.local_addr + n],
                                      peer_buffers=[pair.peer_addr + n], lengths=[n]) == 0
    st = mf.Stream()
    assert e.transfer_async_read_submit(dest_session=s, buffer=pair.local_addr + 2 * n,
                                        peer_buffer=pair.peer_addr + 2 * n, length=n, stream=st) == 0
    assert e.batch_transfer_async_read_submit(dest_session=s, buffers=[pair.local_addr + 3 * n],
                                              peer_buffers=[pair.peer_addr + 3 * n], lengths=[n], stream=st) == 0
    assert st.synchronize() == 0
    assert pair.local[: 4 * n] == data[: 4 * n]
    # Missing or doubly named arguments are TypeErrors that name them.
    with pytest.raises(TypeError, match="destflag.*dest_session"):
        e.transfer_sync_write(buffer=pair.local_addr, peer_buffer=pair.peer_addr, length=n)
    with pytest.raises(TypeError, match="name the same argument"):
        e.transfer_sync_write(s, pair.local_addr, pair.peer_addr, n, dest_session=s)
    with pytest.raises(TypeError, match="'buffer'"):
        e.transfer_sync_read(dest_session=s, peer_buffer=pair.peer_addr, length=n)
    with pytest.raises(TypeError, match="peer_buffer_addresses.*peer_buffers"):
        e.batch_transfer_sync_write(s, [pair.local_addr], lengths=[n])
    with pytest.raises(TypeError, match="'lengths'"):
        e.batch_transfer_async_write_submit(s, [pair.local_addr], [pair.peer_addr])


def test_unregistered_region_is_refused_at_once(pair):
    n = 4096
    assert pair.engine.transfer_sync_write(pair.session, pair.local_addr, pair.peer_addr, n) == 0
    assert pair.ask("unregister") == 0
    assert pair.engine.transfer_sync_write(pair.session, pair.local_addr, pair.peer_addr, n) == mf.MF_OUT_OF_BOUNDS


def test_async_submits_on_a_stream(pair):
    s = mf.Stream()
    n = 1 << 20
    for i in range(8):
        pair.local[i * n:(i + 1) * n] = bytes([i]) * n
        rc = pair.engine.transfer_async_write_submit(pair.session, pair.local_addr + i * n, pair.peer_addr + i * n, n, s)
        assert rc == 0
    assert s.synchronize() == 0
    assert s.query() == 0
    assert pair.ask("hash", 0, 8 * n) == hashlib.sha256(b"".join(bytes([i]) * n for i in range(8))).hexdigest()
    # A failing async transfer is reported by synchronize, not lost.
    assert pair.engine.transfer_async_write_submit(pair.session, pair.local_addr, 0x10000, 64, s) == 0
    assert pair.engine.transfer_async_read_submit(pair.session, pair.local_addr, pair.peer_addr, 64, s) == 0
    assert s.synchronize() == mf.MF_OUT_OF_BOUNDS
    assert "out of bounds" in mf.get_last_err_msg()
    assert s.synchronize() == 0
    # None/0 run synchronously.
    assert pair.engine.transfer_async_write_submit(pair.session, pair.local_addr, pair.peer_addr, 64, None) == 0
    assert pair.engine.batch_transfer_async_write_submit(pair.session, [pair.local_addr], [pair.peer_addr], [64], 0) == 0


def test_killed_target_fails_the_transfer_within_its_timeout(pair):
    n = 64 << 20
    results = []

    def hammer():
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end:
            rc = pair.engine.transfer_sync_write(pair.session, pair.local_addr, pair.peer_addr, n)
            results.append((time.monotonic(), rc, mf.get_last_err_msg()))
            if rc != 0:
                return

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(0.3)
    killed_at = time.monotonic()
    pair.proc.kill()
    t.join(60)
    assert not t.is_alive()
    when, rc, msg = results[-1]
    assert rc in (mf.MF_PEER_GONE, mf.SMEM_NOT_CONNECTED, mf.MF_IO, mf.SMEM_INVALID_PARAM), (rc, msg)
    assert when - killed_at < pair.engine.transfer_timeout, (when - killed_at, msg)
    # The engine itself is fine: the next call to the dead peer fails fast, clearly.
    t0 = time.monotonic()
    assert pair.engine.transfer_sync_write(pair.session, pair.local_addr, pair.peer_addr, 64) != 0
    assert time.monotonic() - t0 < 5


def test_restarted_engine_with_the_same_session_is_found_again(store, spawn):
    port = free_port()
    session = f"127.0.0.1:{port}"
    conn, proc, (_, sid, peer_addr, _) = start_target(spawn, store.url, size=1 << 20, session=session)
    assert sid == session
    engine = mf.TransferEngine()
    assert engine.initialize(store.url, "127.0.0.1", "Prefill", 0) == 0
    local = mmap.mmap(-1, 1 << 20)
    assert engine.register_memory(buffer_address(local), 1 << 20) == 0
    local[:5] = b"hello"
    assert engine.transfer_sync_write(session, buffer_address(local), peer_addr, 5) == 0
    # A second engine cannot take a live session id.
    dup = mf.TransferEngine()
    assert dup.initialize(store.url, session, "Decode", 0) != 0
    conn.send(("stop",))
    conn.recv()
    proc.join(30)
    conn, proc, (_, sid, peer_addr2, _) = start_target(spawn, store.url, size=1 << 20, session=session)
    try:
        local[:5] = b"again"
        assert engine.transfer_sync_write(session, buffer_address(local), peer_addr2, 5) == 0, mf.get_last_err_msg()
        conn.send(("hash", 0, 5))
        assert conn.recv() == hashlib.sha256(b"again").hexdigest()
    finally:
        conn.send(("stop",))
        conn.recv()
        proc.join(30)
        engine.destroy()


def test_get_rpc_port_before_initialize_is_used(store):
    e = mf.TransferEngine()
    port = e.get_rpc_port()
    assert 15000 <= port <= 25000
    assert e.get_rpc_port() == port
    assert e.initialize(store.url, f"127.0.0.1:{port}", "prefill", 0) == 0, mf.get_last_err_msg()
    assert e.get_rpc_port() == port
    assert e.session_id == f"127.0.0.1:{port}"
    e.unInitialize()
    assert e.session_id == ""


def test_initialize_errors(store):
    e = mf.TransferEngine()
    assert e.get_rpc_port() != 0
    assert e.initialize(store.url, "127.0.0.1:0", "Observer", 0) == mf.SMEM_INVALID_PARAM
    assert e.initialize(store.url, "localhost:5", "Prefill", 0) == mf.SMEM_INVALID_PARAM
    assert e.initialize(store.url, "0.0.0.0:0", "Prefill", 0) == mf.SMEM_INVALID_PARAM
    assert e.initialize("tcp://bad", "127.0.0.1:0", "Prefill", 0) == mf.SMEM_INVALID_PARAM
    assert e.register_memory(4096, 4096) == mf.SMEM_NOT_INIT
    assert e.initialize(store.url, "127.0.0.1:0", "Prefill", -1) == mf.SMEM_INVALID_PARAM
    # The 1.3 keyword and the seed's keyword both work.
    assert e.initialize(store.url, unique_id="127.0.0.1:0", role="Decode", device_id=0) == 0
    e.destroy()
    e2 = mf.TransferEngine()
    assert e2.initialize(store_url=store.url, session_id="127.0.0.1", role="PREFILL", device_id=0,
                         data_op_type=mf.TransferEngine.TransDataOpType.SDMA) == 0
    e2.destroy()


def test_register_errors(store):
    e = mf.TransferEngine()
    assert e.initialize(store.url, "127.0.0.1:0", "Prefill", 0) == 0
    buf = mmap.mmap(-1, 1 << 20)
    a = buffer_address(buf)
    assert e.register_memory(a, 0) == mf.SMEM_INVALID_PARAM
    assert e.register_memory(0, 4096) == mf.SMEM_INVALID_PARAM
    assert e.register_memory(0x10000, 4096) == mf.SMEM_INVALID_PARAM  # not mapped
    assert "mapped" in mf.get_last_err_msg()
    assert e.register_memory(a, 1 << 20) == 0
    assert e.register_memory(a + 4096, 4096) == mf.SMEM_DUPLICATED
    assert e.unregister_memory(a + 1) == mf.SMEM_NOT_EXIST
    assert e.unregister_memory(a) == 0
    assert e.batch_register_memory([a, a + 8192], [4096, 4096]) == 0
    assert e.batch_register_memory([a + 4096 * 100], [4096, 1]) == mf.SMEM_INVALID_PARAM
    e.destroy()
