"""Memory objects in batch and async calls, DLPack-only objects, stream events, BM copies on a
stream, and torch_ext's paged KV-cache transfers, with data verified."""

from __future__ import annotations

import gc
import hashlib
import mmap

import numpy as np
import pytest

import memfabric_hybrid as mf
from memfabric_hybrid import torch_ext
from test_buffers import peer, target_hash  # noqa: F401  (fixture)

N = 1 << 20

try:
    import torch
except ImportError:  # the suite runs without torch; tensor cases skip with the reason
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


class DLPackOnly:
    """An object that exports its memory only through DLPack (as CuPy or JAX arrays do)."""

    def __init__(self, inner):
        self._inner = inner

    def __dlpack__(self, **kw):
        return self._inner.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._inner.__dlpack_device__()


def host_kinds():
    yield "numpy", lambda n: np.zeros(n, dtype=np.uint8), lambda b: memoryview(b)
    yield "bytearray", lambda n: bytearray(n), lambda b: memoryview(b)
    yield "mmap", lambda n: mmap.mmap(-1, n), lambda b: memoryview(b)
    yield "dlpack", lambda n: DLPackOnly(np.zeros(n, dtype=np.uint8)), lambda b: memoryview(b._inner)
    if torch is not None:
        yield "torch", lambda n: torch.zeros(n, dtype=torch.uint8), lambda b: memoryview(b.numpy())


KINDS = list(host_kinds())


@pytest.mark.parametrize("kind,make,view", KINDS, ids=[k[0] for k in KINDS])
def test_batch_and_async_batch_with_objects(peer, kind, make, view):  # noqa: F811
    engine, conn, session, peer_addr = peer
    blocks = [make(64 << 10) for _ in range(8)]
    region = make(N)  # a registered region the blocks are not in: they must be registered too
    for b in blocks:
        assert engine.register_memory(b) == 0, mf.get_last_err_msg()
    data = [bytes([i + 1]) * (64 << 10) for i in range(8)]
    for b, d in zip(blocks, data):
        view(b)[:] = d
    peers = [peer_addr + i * (64 << 10) for i in range(8)]
    sizes = [64 << 10] * 8
    assert engine.batch_transfer_sync_write(session, blocks, peers, sizes) == 0, mf.get_last_err_msg()
    assert target_hash(conn, 8 * (64 << 10)) == hashlib.sha256(b"".join(data)).hexdigest()
    for b in blocks:
        view(b)[:] = b"\0" * (64 << 10)
    assert engine.batch_transfer_sync_read(session, blocks, peers, sizes) == 0
    assert [bytes(view(b)) for b in blocks] == data
    # Async batch on a stream, the objects dropped by the caller before it runs.
    s = mf.Stream()
    for b in blocks:
        view(b)[:] = b"\0" * (64 << 10)
    assert engine.batch_transfer_async_read_submit(session, list(blocks), peers, sizes, s) == 0
    assert s.synchronize() == 0
    assert [bytes(view(b)) for b in blocks] == data
    # A length past an object's end is refused before anything moves.
    with pytest.raises(ValueError, match="exceeds"):
        engine.batch_transfer_sync_write(session, blocks[:1], peers[:1], [N])
    for b in blocks:
        assert engine.unregister_memory(b) == 0
    del region


def test_dlpack_only_objects_are_checked(peer):  # noqa: F811
    engine, conn, session, peer_addr = peer
    strided = DLPackOnly(np.zeros((64, 64), dtype=np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="contiguous"):
        engine.register_memory(strided)
    ro = np.zeros(4096, dtype=np.uint8)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only|refused"):
        engine.register_memory(DLPackOnly(ro))
    sliced = np.arange(4096, dtype=np.uint8)
    addr, nbytes, _ = mf.buffers.buffer_info(DLPackOnly(sliced[100:200]), writable=True)
    assert (addr, nbytes) == (sliced.ctypes.data + 100, 100)


def test_freed_buffers_are_refused(peer):  # noqa: F811
    engine, conn, session, peer_addr = peer
    m = mmap.mmap(-1, 4096)
    m.close()
    with pytest.raises(ValueError):
        engine.transfer_sync_write(session, m, peer_addr)
    v = memoryview(bytearray(4096))
    v.release()
    with pytest.raises(ValueError):
        engine.register_memory(v)
    for bad in ("text", 1.5):
        with pytest.raises(TypeError):
            engine.batch_transfer_sync_write(session, [bad], [peer_addr], [1])
    with pytest.raises(TypeError):
        engine.batch_transfer_sync_write(session, "text", [peer_addr], [1])


@needs_torch
def test_deleted_tensor_stays_registered_and_alive(peer):  # noqa: F811
    engine, conn, session, peer_addr = peer
    t = torch.full((N,), 9, dtype=torch.uint8)
    addr = t.data_ptr()
    assert engine.register_memory(t) == 0
    del t
    gc.collect()
    assert engine.transfer_sync_write(session, addr, peer_addr, N) == 0
    assert target_hash(conn, N) == hashlib.sha256(b"\x09" * N).hexdigest()
    assert engine.unregister_memory(addr) == 0


@needs_torch
def test_tensor_views_and_refusals(peer):  # noqa: F811
    engine, conn, session, peer_addr = peer
    t = torch.arange(N // 4, dtype=torch.int32)
    assert engine.register_memory(t) == 0
    view = t[1024:2048]  # a view inside the registered storage works as a source
    assert engine.transfer_sync_write(session, view, peer_addr) == 0
    assert target_hash(conn, 4096) == hashlib.sha256(view.numpy().tobytes()).hexdigest()
    with pytest.raises(ValueError, match="contiguous"):
        engine.transfer_sync_write(session, t.view(-1, 2)[:, 0], peer_addr)
    assert engine.unregister_memory(t) == 0


def test_stream_events_order_work_across_streams(peer):  # noqa: F811
    engine, conn, session, peer_addr = peer
    buf = np.zeros(N, dtype=np.uint8)
    assert engine.register_memory(buf) == 0
    a, b = mf.Stream(), mf.Stream()
    buf[:] = 5
    for i in range(16):
        assert engine.transfer_async_write_submit(session, buf, peer_addr, None, a) == 0
    ev = a.record_event()
    assert b.wait_event(ev) == 0
    out = np.zeros(N, dtype=np.uint8)
    assert engine.register_memory(out) == 0
    # Queued behind stream a's writes: reads what they wrote.
    assert engine.transfer_async_read_submit(session, out, peer_addr, None, b) == 0
    assert b.synchronize() == 0
    assert ev.query() and ev.synchronize() == 0
    assert (out == 5).all()
    assert a.synchronize() == 0
    # Errors stay with the stream: the event completes, synchronize reports.
    assert engine.transfer_async_write_submit(session, buf, 0x10, 64, a) == 0
    ev2 = a.record_event()
    assert ev2.synchronize() == 0
    assert a.synchronize() == mf.MF_OUT_OF_BOUNDS
    assert a.synchronize(timeout=-1) == mf.SMEM_INVALID_PARAM
    with pytest.raises(TypeError):
        engine.transfer_async_write_submit(session, buf, peer_addr, None, "stream")
    assert engine.unregister_memory(buf) == 0 and engine.unregister_memory(out) == 0


def test_bm_copies_on_a_stream_and_batches_of_objects(store):
    cfg = mf.bm.BmConfig()
    cfg.auto_ranking = True
    assert mf.bm.initialize(store.url, 1, 0, cfg) == 0, mf.get_last_err_msg()
    try:
        big = mf.bm.create(0, 4 * N)
        g = big.peer_rank_ptr(0)
        src = [np.full(4096, i, dtype=np.uint8) for i in range(16)]
        gvas = [g + i * 4096 for i in range(16)]
        s = mf.Stream()
        assert big.copy_data_batch(src, gvas, [4096] * 16, 16, mf.bm.BmCopyType.H2G, 0, s) == 0
        del src
        gc.collect()
        assert s.synchronize() == 0
        out = [bytearray(4096) for _ in range(16)]
        assert big.copy_data_batch(gvas, out, [4096] * 16, 16, mf.bm.BmCopyType.G2H) == 0
        assert all(bytes(o) == bytes([i]) * 4096 for i, o in enumerate(out))
        one = np.zeros(4096, dtype=np.uint8)
        assert big.copy_data(g + 4096 * 3, one, 4096, mf.bm.BmCopyType.G2H, 0, s) == 0
        assert s.synchronize() == 0 and (one == 3).all()
        # An out-of-range copy on a stream is reported by synchronize.
        assert big.copy_data(one, g + 4 * N, 4096, mf.bm.BmCopyType.H2G, 0, s) == 0
        assert s.synchronize() == mf.MF_OUT_OF_BOUNDS
        assert big.copy_data_batch(gvas, out, [4096] * 16, 15, mf.bm.BmCopyType.G2H) == mf.SMEM_INVALID_PARAM
        with pytest.raises(ValueError):
            big.copy_data_batch(gvas[:1], [bytearray(8)], [4096], 1, mf.bm.BmCopyType.G2H)
        big.destroy()
    finally:
        mf.bm.uninitialize()


# --- torch_ext -------------------------------------------------------------------------------


def two_engines(store_url):
    a, b = mf.TransferEngine(), mf.TransferEngine()
    assert a.initialize(store_url, "127.0.0.1:0", "Prefill", 0) == 0
    assert b.initialize(store_url, "127.0.0.1:0", "Decode", 0) == 0
    return a, b


def cache(layers, blocks, shape=(16, 4, 32)):
    if torch is not None:
        return torch.zeros((layers, blocks) + shape, dtype=torch.float16)
    return np.zeros((layers, blocks) + shape, dtype=np.float16)


def as_np(t):
    return t.numpy() if hasattr(t, "numpy") else t


def test_layouts_describe_segments_and_round_trip():
    lay = torch_ext.describe_kv_cache(np.zeros((4, 16, 1024), np.uint8), block_dim=1)
    assert len(lay.segments) == 4 and lay.segments[0][1:] == (16, 1024, 1024)
    assert lay.segments[1][0] - lay.segments[0][0] == 16 * 1024
    assert lay.bytes_per_block == 4096
    per_layer = [np.zeros((2, 8, 256), np.uint8) for _ in range(3)]  # vLLM's [2, blocks, ...]
    lay2 = torch_ext.describe_kv_cache(per_layer, block_dim=1)
    assert len(lay2.segments) == 6 and lay2.num_blocks == 8
    round_trip = torch_ext.KvCacheLayout.from_bytes(lay.to_bytes())
    assert round_trip.segments == lay.segments and round_trip.num_blocks == 16
    with pytest.raises(ValueError):
        torch_ext.KvCacheLayout.from_bytes(b"{}")
    with pytest.raises(ValueError, match="not contiguous"):
        torch_ext.describe_kv_cache(np.zeros((4, 16, 8, 2), np.uint8)[..., 0], block_dim=1)
    with pytest.raises(ValueError, match="number of blocks"):
        torch_ext.describe_kv_cache([np.zeros((8, 4)), np.zeros((9, 4))])
    with pytest.raises(ValueError, match="out of range"):
        torch_ext.describe_kv_cache(np.zeros((8, 4)), block_dim=3)
    with pytest.raises(TypeError):
        torch_ext.describe_kv_cache(["nope"])


def test_transfer_blocks_moves_and_coalesces(store):
    a, b = two_engines(store.url)
    try:
        src_kv, dst_kv = cache(4, 64), cache(4, 96)
        src_np, dst_np = as_np(src_kv), as_np(dst_kv)
        src_np[...] = np.random.default_rng(1).standard_normal(src_np.shape).astype(np.float16)
        mine = torch_ext.register_kv_cache(a, src_kv, block_dim=1)
        theirs = torch_ext.register_kv_cache(b, dst_kv, block_dim=1)
        with mf.StoreClient(store.url) as sc:
            torch_ext.publish_kv_layout(sc, "kv/test/decode", theirs)
            fetched = torch_ext.fetch_kv_layout(sc, "kv/test/decode", timeout=5)
        assert fetched.segments == theirs.segments and fetched.session_id == b.session_id
        src_ids = [3, 4, 5, 6, 40, 10, 11, 63]
        dst_ids = [90, 91, 92, 93, 0, 7, 8, 50]
        assert torch_ext.transfer_blocks(a, fetched, src_ids, dst_ids) == 0, mf.get_last_err_msg()
        for s_, d_ in zip(src_ids, dst_ids):
            assert np.array_equal(dst_np[:, d_], src_np[:, s_])
        assert not dst_np[:, 1].any()  # untouched blocks stay untouched
        # Read back into other blocks, on a stream, with numpy ids; via connect_kv_peer.
        src_np[:, 20:24] = 0
        torch_ext.connect_kv_peer(a, fetched)
        s = mf.Stream()
        rc = torch_ext.transfer_blocks(a, b.session_id, np.arange(20, 24), np.array([90, 91, 92, 93]), s,
                                       opcode=mf.TransferOpcode.READ)
        assert rc == 0 and s.synchronize() == 0
        assert np.array_equal(src_np[:, 20:24], src_np[:, 3:7])
        # Bad ids: typed errors, nothing moved.
        before = dst_np.copy()
        assert torch_ext.transfer_blocks(a, fetched, [64], [0]) == mf.MF_OUT_OF_BOUNDS
        assert "out of range" in mf.get_last_err_msg()
        assert torch_ext.transfer_blocks(a, fetched, [0], [96]) == mf.MF_OUT_OF_BOUNDS
        assert torch_ext.transfer_blocks(a, fetched, [0, 1], [5, 5]) == mf.SMEM_INVALID_PARAM
        assert torch_ext.transfer_blocks(a, fetched, [0, 1], [5]) == mf.SMEM_INVALID_PARAM
        assert np.array_equal(dst_np, before)
        with pytest.raises(ValueError, match="no layout known"):
            torch_ext.transfer_blocks(a, "127.0.0.1:1", [0], [0])
        with pytest.raises(ValueError, match="already has"):
            torch_ext.register_kv_cache(a, cache(1, 4), block_dim=1)
        assert mine.session_id == a.session_id
        assert torch_ext.unregister_kv_cache(a) == 0
        with pytest.raises(ValueError, match="no KV cache"):
            torch_ext.transfer_blocks(a, fetched, [0], [0])
        assert torch_ext.unregister_kv_cache(b) == 0
    finally:
        a.destroy()
        b.destroy()


def test_native_transfer_blocks_rejects_bad_layouts(store):
    a, b = two_engines(store.url)
    try:
        x, y = np.zeros(1 << 16, np.uint8), np.zeros(1 << 16, np.uint8)
        assert a.register_memory(x) == 0 and b.register_memory(y) == 0
        seg_a = [(x.ctypes.data, 16, 4096, 4096)]
        seg_b = [(y.ctypes.data, 16, 4096, 4096)]
        x[:4096] = 7
        assert a.transfer_blocks(b.session_id, seg_a, seg_b, [0], [15]) == 0
        assert (y[15 * 4096:] == 7).all()
        assert a.transfer_blocks(b.session_id, seg_a, seg_b + seg_b, [0], [1]) == mf.SMEM_INVALID_PARAM
        assert a.transfer_blocks(b.session_id, seg_a, [(y.ctypes.data, 16, 2048, 2048)], [0], [1]) == mf.SMEM_INVALID_PARAM
        assert a.transfer_blocks(b.session_id, seg_a, seg_b, [0], [1], 7) == mf.SMEM_INVALID_PARAM
        # A layout claiming memory the peer never registered is refused by the range checks.
        assert a.transfer_blocks(b.session_id, seg_a, [(y.ctypes.data, 32, 4096, 4096)], [0], [20]) == mf.MF_OUT_OF_BOUNDS
        with pytest.raises(TypeError):
            a.transfer_blocks(b.session_id, "seg", seg_b, [0], [1])
        with pytest.raises(OverflowError):
            a.transfer_blocks(b.session_id, seg_a, seg_b, [-1], [1])
    finally:
        a.destroy()
        b.destroy()


def test_new_functions_have_docstrings_with_examples():
    objs = [getattr(torch_ext, n) for n in torch_ext.__all__] + [
        mf.Stream, mf.Stream.synchronize, mf.Stream.query, mf.Stream.record_event, mf.Stream.wait_event,
        mf.Event, mf.TransferEngine.transfer_blocks, mf.bm.BigMemory.copy_data, mf.buffers.buffer_info,
        torch_ext.KvCacheLayout.to_bytes,
    ]
    for o in objs:
        doc = o.__doc__ or ""
        assert "Example" in doc or ">>>" in doc, f"{getattr(o, '__qualname__', o)} has no example in its docstring"
