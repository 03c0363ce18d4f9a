"""The bad-input table: every public function given wrong types, negative or huge sizes, ids
out of range, unregistered or unmapped addresses, destroyed handles and calls after
uninitialize. Each row names the call and what it must give: an exception type (wrong Python
types and impossible values) or an error code with a message in ``get_last_err_msg()``; never
a crash or a hang (every row runs under the suite's timeout, in this process)."""

from __future__ import annotations

import mmap
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import pytest

import memfabric_hybrid as mf
from memfabric_hybrid import torch_ext

_CUDA = mf.device_info()["cuda"]["available"]

MiB = 1 << 20
HUGE = 1 << 62


class World:
    """One process's handles: a store, engines (live, destroyed, never initialized), a Big
    Memory object (live and destroyed), a Share Memory object (live and destroyed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = mf.TransferEngine()
        assert self.engine.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
        self.peer = mf.TransferEngine()
        assert self.peer.initialize(url, "127.0.0.1:0", "Decode", 0) == 0
        self.buf = np.zeros(MiB, dtype=np.uint8)
        self.addr = self.buf.ctypes.data
        assert self.engine.register_memory(self.buf) == 0
        self.peer_buf = np.zeros(MiB, dtype=np.uint8)
        self.peer_addr = self.peer_buf.ctypes.data
        assert self.peer.register_memory(self.peer_buf) == 0
        self.session = self.peer.session_id
        self.dead = mf.TransferEngine()
        assert self.dead.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0
        self.dead.destroy()
        self.fresh = mf.TransferEngine()
        cfg = mf.bm.BmConfig()
        cfg.auto_ranking = True
        assert mf.bm.initialize(url, 1, 0, cfg) == 0, mf.get_last_err_msg()
        self.bm = mf.bm.create(0, 2 * MiB)
        self.gva = self.bm.peer_rank_ptr(0)
        self.bm_dead = mf.bm.create(1, MiB)
        self.bm_dead.destroy()
        assert mf.shm.initialize(url, 1, 0, 0) == 0, mf.get_last_err_msg()
        self.shm = mf.shm.create(0, 1, 0, 2 * MiB)
        self.shm_dead = mf.shm.create(1, 1, 0, 2 * MiB)
        self.shm_dead.destroy()
        self.store = mf.StoreClient(url, timeout=5)
        self.stream = mf.Stream()

    def close(self) -> None:
        self.store.close()
        self.shm.destroy()
        mf.shm.uninitialize()
        self.bm.destroy()
        mf.bm.uninitialize()
        for e in (self.engine, self.peer):
            e.destroy()


Expect = Union[type, int]
Row = Tuple[str, Callable[[World], Any], Expect, str]

COPY = mf.bm.BmCopyType
ROWS: List[Row] = [
    # --- common -----------------------------------------------------------------------------
    ("set_log_level(9)", lambda w: mf.set_log_level(9), mf.SMEM_INVALID_PARAM, "level"),
    ("set_log_level('x')", lambda w: mf.set_log_level("x"), TypeError, ""),
    ("set_extern_logger(5)", lambda w: mf.set_extern_logger(5), TypeError, ""),
    ("set_conf_store_tls(True, garbage)", lambda w: mf.set_conf_store_tls(True, "nonsense"), mf.SMEM_INVALID_PARAM, ""),
    ("set_conf_store_tls(True, missing files)",
     lambda w: mf.set_conf_store_tls(True, "ca=/nope/ca.pem;cert=/nope/c.pem;key=/nope/k.pem"), "nonzero", ""),
    ("create_config_store('')", lambda w: mf.create_config_store(""), mf.SMEM_INVALID_PARAM, ""),
    ("create_config_store(bad port)", lambda w: mf.create_config_store("tcp://127.0.0.1:99999"), mf.SMEM_INVALID_PARAM, "port"),
    ("create_config_store(None)", lambda w: mf.create_config_store(None), TypeError, ""),
    ("start_config_store(http://)", lambda w: mf.start_config_store("http://1.2.3.4:5"), mf.StoreError, ""),
    # --- store client -----------------------------------------------------------------------
    ("StoreClient(no server)", lambda w: mf.StoreClient("tcp://127.0.0.1:1", timeout=0.5), mf.StoreError, ""),
    ("StoreClient(timeout=-1)", lambda w: mf.StoreClient(w.url, timeout=-1), (ValueError, mf.StoreError), ""),
    ("store.get(missing, timeout)", lambda w: w.store.get("bad/missing", True, 0.2), mf.StoreTimeoutError, ""),
    ("store.get(missing, no wait)", lambda w: w.store.get("bad/missing", False), KeyError, "missing"),
    ("store.set(key, int)", lambda w: w.store.set("bad/k", 5), TypeError, ""),
    ("store.add(key, 'x')", lambda w: w.store.add("bad/k", "x"), TypeError, ""),
    ("store.set(huge value)", lambda w: w.store.set("bad/huge", b"\0" * (129 * MiB)), mf.StoreError, ""),
    ("store.wait([missing], 0.2)", lambda w: w.store.wait(["bad/missing"], 0.2), mf.StoreTimeoutError, ""),
    ("StoreGroup(world 0)", lambda w: mf.StoreGroup(w.url, "bad", 0), (ValueError, mf.StoreError), ""),
    ("StoreGroup(rank >= world)", lambda w: mf.StoreGroup(w.url, "bad2", 2, rank=5), (ValueError, mf.StoreError), ""),
    # --- transfer engine ----------------------------------------------------------------------
    ("TE.register before initialize", lambda w: w.fresh.register_memory(w.addr, 64), mf.SMEM_NOT_INIT, "initialize"),
    ("TE.write before initialize", lambda w: w.fresh.transfer_sync_write(w.session, w.addr, w.peer_addr, 64), mf.SMEM_NOT_INIT, ""),
    ("TE.write after destroy", lambda w: w.dead.transfer_sync_write(w.session, w.addr, w.peer_addr, 64), mf.SMEM_NOT_INIT, ""),
    ("TE.initialize(bad url)", lambda w: mf.TransferEngine().initialize("nonsense", "127.0.0.1:0", "Prefill", 0), "nonzero", ""),
    ("TE.initialize(bad role)", lambda w: mf.TransferEngine().initialize(w.url, "127.0.0.1:0", "Chef", 0), mf.SMEM_INVALID_PARAM, "role"),
    ("TE.initialize(bad session)", lambda w: mf.TransferEngine().initialize(w.url, "not an ip", "Prefill", 0), mf.SMEM_INVALID_PARAM, ""),
    ("TE.initialize twice", lambda w: w.engine.initialize(w.url, "127.0.0.1:0", "Prefill", 0), "nonzero", ""),
    ("TE.register(size 0)", lambda w: w.engine.register_memory(w.addr + 8, 0), mf.SMEM_INVALID_PARAM, ""),
    ("TE.register(-1)", lambda w: w.engine.register_memory(-1, 64), OverflowError, ""),
    ("TE.register(huge)", lambda w: w.engine.register_memory(1 << 40, HUGE), "nonzero", ""),
    ("TE.register(overlap)", lambda w: w.engine.register_memory(w.addr + 64, 64), "nonzero", "overlap"),
    ("TE.register(str)", lambda w: w.engine.register_memory("addr", 64), TypeError, ""),
    ("TE.register(int, no size)", lambda w: w.engine.register_memory(w.addr), TypeError, "capacity|length"),
    ("TE.unregister(never registered)", lambda w: w.engine.unregister_memory(0x1000), mf.SMEM_NOT_EXIST, ""),
    ("TE.write(unregistered local)", lambda w: w.engine.transfer_sync_write(w.session, 0x1000, w.peer_addr, 64), mf.MF_OUT_OF_BOUNDS, ""),
    ("TE.write(peer out of range)", lambda w: w.engine.transfer_sync_write(w.session, w.addr, w.peer_addr + MiB, 64), mf.MF_OUT_OF_BOUNDS, ""),
    ("TE.write(past local end)", lambda w: w.engine.transfer_sync_write(w.session, w.addr, w.peer_addr, MiB + 1), mf.MF_OUT_OF_BOUNDS, ""),
    ("TE.write(length 0)", lambda w: w.engine.transfer_sync_write(w.session, w.addr, w.peer_addr, 0), mf.SMEM_INVALID_PARAM, ""),
    ("TE.write(length -1)", lambda w: w.engine.transfer_sync_write(w.session, w.addr, w.peer_addr, -1), OverflowError, ""),
    ("TE.write(huge length)", lambda w: w.engine.transfer_sync_write(w.session, w.addr, w.peer_addr, HUGE), "nonzero", ""),
    ("TE.write(unknown peer)", lambda w: w.engine.transfer_sync_write("127.0.0.1:9", w.addr, w.peer_addr, 64), "nonzero", ""),
    ("TE.write(garbage peer)", lambda w: w.engine.transfer_sync_write("garbage", w.addr, w.peer_addr, 64), mf.SMEM_INVALID_PARAM, ""),
    ("TE.write(float addr)", lambda w: w.engine.transfer_sync_write(w.session, 1.5, w.peer_addr, 64), TypeError, ""),
    ("TE.batch(lengths differ)", lambda w: w.engine.batch_transfer_sync_write(w.session, [w.addr], [w.peer_addr, 0], [64]), mf.SMEM_INVALID_PARAM, "differ"),
    ("TE.batch(not a list)", lambda w: w.engine.batch_transfer_sync_write(w.session, 5, [w.peer_addr], [64]), TypeError, ""),
    ("TE.batch(register 0 capacities)", lambda w: w.engine.batch_register_memory([w.addr], []), mf.SMEM_INVALID_PARAM, ""),
    ("TE.async(bad stream)", lambda w: w.engine.transfer_async_write_submit(w.session, w.addr, w.peer_addr, 64, "s"), TypeError, ""),
    # Without a device backend: unsupported; with CUDA: not a stream handle (never a crash).
    ("TE.async(device stream 0x1234)", lambda w: w.engine.transfer_async_write_submit(w.session, w.addr, w.peer_addr, 64, 0x1234),
     mf.SMEM_INVALID_PARAM if _CUDA else mf.MF_UNSUPPORTED, "stream handle" if _CUDA else "device"),
    ("TE.transfer_timeout = -1", lambda w: setattr(w.engine, "transfer_timeout", -1.0), ValueError, ""),
    ("TE.transport_for(unknown)", lambda w: w.engine.transport_for("127.0.0.1:9"), mf.StoreError, ""),
    ("TE.transfer_blocks(bad opcode)", lambda w: w.engine.transfer_blocks(w.session, [(w.addr, 4, 64, 64)], [(w.peer_addr, 4, 64, 64)], [0], [0], 3), mf.SMEM_INVALID_PARAM, "opcode"),
    ("TE.transfer_blocks(id out of range)", lambda w: w.engine.transfer_blocks(w.session, [(w.addr, 4, 64, 64)], [(w.peer_addr, 4, 64, 64)], [9], [0]), mf.MF_OUT_OF_BOUNDS, "out of range"),
    ("TE.transfer_blocks(bad segment)", lambda w: w.engine.transfer_blocks(w.session, [(w.addr,)], [], [0], [0]), (TypeError, ValueError), "tuple"),
    # --- streams ------------------------------------------------------------------------------
    ("Stream.synchronize(0)", lambda w: w.stream.synchronize(0), mf.SMEM_INVALID_PARAM, "timeout"),
    ("Stream.synchronize(nan)", lambda w: w.stream.synchronize(float("nan")), mf.SMEM_INVALID_PARAM, "timeout"),
    ("Stream.wait_event(not an event)", lambda w: w.stream.wait_event(5), TypeError, ""),
    # --- memory objects -----------------------------------------------------------------------
    ("closed mmap", lambda w: w.engine.transfer_sync_write(w.session, _closed_mmap(), w.peer_addr), ValueError, ""),
    ("read-only destination", lambda w: w.engine.transfer_sync_read(w.session, b"ro", w.peer_addr), ValueError, "read-only"),
    ("non-contiguous array", lambda w: w.engine.register_memory(np.zeros((8, 8))[:, ::2]), ValueError, "contiguous"),
    # --- big memory ---------------------------------------------------------------------------
    ("bm.initialize twice", lambda w: mf.bm.initialize(w.url, 1, 0, mf.bm.BmConfig()), "nonzero", ""),
    ("bm.create(size 0)", lambda w: mf.bm.create(7, 0), mf.MemFabricError, ""),
    ("bm.create(huge)", lambda w: mf.bm.create(8, HUGE), mf.MemFabricError, ""),
    ("bm.create(-1)", lambda w: mf.bm.create(9, -1), OverflowError, ""),
    ("bm.copy(gva out of range)", lambda w: w.bm.copy_data(w.addr, w.gva + 2 * MiB, 64, COPY.H2G), mf.MF_OUT_OF_BOUNDS, ""),
    ("bm.copy(unmapped host)", lambda w: w.bm.copy_data(0x1000, w.gva, 64, COPY.H2G), "nonzero", ""),
    ("bm.copy(bad type)", lambda w: w.bm.copy_data(w.addr, w.gva, 64, 99), mf.SMEM_INVALID_PARAM, ""),
    ("bm.copy(size -1)", lambda w: w.bm.copy_data(w.addr, w.gva, -1, COPY.H2G), OverflowError, ""),
    ("bm.copy(huge)", lambda w: w.bm.copy_data(w.addr, w.gva, HUGE, COPY.H2G), "nonzero", ""),
    ("bm.copy on destroyed", lambda w: w.bm_dead.copy_data(w.addr, w.gva, 64, COPY.H2G), mf.SMEM_NOT_INIT, "destroyed"),
    ("bm.peer_rank_ptr(rank 5)", lambda w: w.bm.peer_rank_ptr(5), 0, "outside"),
    ("bm.batch(count wrong)", lambda w: w.bm.copy_data_batch([w.addr], [w.gva], [64], 2, COPY.H2G), mf.SMEM_INVALID_PARAM, "count"),
    ("bm.unregister(unknown)", lambda w: w.bm.unregister(0x1000), mf.SMEM_NOT_EXIST, ""),
    # --- share memory -------------------------------------------------------------------------
    ("shm.create(rank out of range)", lambda w: mf.shm.create(5, 1, 3, 2 * MiB), mf.MemFabricError, ""),
    ("shm.create(size 0)", lambda w: mf.shm.create(6, 1, 0, 0), mf.MemFabricError, ""),
    ("shm.set_context(str)", lambda w: w.shm.set_context(5), TypeError, ""),
    ("shm.topology_can_reach(9)", lambda w: w.shm.topology_can_reach(9), "nonzero", ""),
    ("shm.barrier on destroyed", lambda w: w.shm_dead.barrier(), "nonzero", ""),
    ("shm.all_gather on destroyed", lambda w: w.shm_dead.all_gather(b"x"), (mf.MemFabricError, "nonzero"), ""),
    # --- torch_ext ----------------------------------------------------------------------------
    ("torch_ext.register(str)", lambda w: torch_ext.register_kv_cache(w.engine, "kv"), TypeError, ""),
    ("torch_ext.register(overlapping)", lambda w: torch_ext.register_kv_cache(w.engine, w.buf.reshape(16, -1)), mf.MemFabricError, ""),
    ("torch_ext.fetch(missing)", lambda w: torch_ext.fetch_kv_layout(w.store, "bad/layout", timeout=0.2), mf.StoreTimeoutError, ""),
    ("torch_ext.layout(garbage)", lambda w: torch_ext.KvCacheLayout.from_bytes(b"\xff"), ValueError, ""),
]


def _closed_mmap() -> mmap.mmap:
    m = mmap.mmap(-1, 4096)
    m.close()
    return m


# Runs before the module's `world` exists (pytest keeps file order): it owns the runtimes.
def test_calls_after_uninitialize_are_errors():
    with mf.start_config_store() as server:
        cfg = mf.bm.BmConfig()
        cfg.auto_ranking = True
        assert mf.bm.initialize(server.url, 1, 0, cfg) == 0
        big = mf.bm.create(0, MiB)
        g = big.peer_rank_ptr(0)
        mf.bm.uninitialize()
        # An object outliving its runtime is invalid: its calls fail cleanly, naming why.
        assert big.copy_data(np.zeros(8, np.uint8), g, 8, COPY.H2G) == mf.SMEM_NOT_INIT
        assert "uninitialize" in mf.get_last_err_msg()
        assert big.peer_rank_ptr(0) == 0
        with pytest.raises(mf.MemFabricError):
            mf.bm.create(1, MiB)
        assert mf.bm.bm_rank_id() == 4294967295
        assert mf.shm.initialize(server.url, 1, 0, 0) == 0
        sm = mf.shm.create(0, 1, 0, 2 * MiB)
        mf.shm.uninitialize()
        assert sm.barrier() == mf.SMEM_NOT_INIT and "uninitialize" in mf.get_last_err_msg()
        with pytest.raises(mf.MemFabricError):
            mf.shm.create(0, 1, 0, 2 * MiB)
        mf.uninitialize()
        e = mf.TransferEngine()
        assert e.initialize(server.url, "127.0.0.1:0", "Prefill", 0) == 0
        e.destroy()
        e.destroy()  # twice is fine
        assert e.register_memory(0x1000, 64) == mf.SMEM_NOT_INIT


@pytest.fixture(scope="module")
def world():
    with mf.start_config_store() as server:
        w = World(server.url)
        try:
            yield w
        finally:
            w.close()


@pytest.mark.parametrize("name,call,expect,msg", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(world, name, call, expect, msg):
    import re

    mf.get_and_clear_last_err_msg()
    exc_types = tuple(e for e in (expect if isinstance(expect, tuple) else (expect,)) if isinstance(e, type))
    codes = [e for e in (expect if isinstance(expect, tuple) else (expect,)) if not isinstance(e, type)]
    try:
        result = call(world)
    except Exception as e:  # noqa: BLE001  (the row says which exceptions are right)
        assert exc_types and isinstance(e, exc_types), f"{name}: raised {type(e).__name__}: {e}"
        if msg:
            assert re.search(msg, str(e), re.I), f"{name}: message {str(e)!r} lacks {msg!r}"
        assert str(e), f"{name}: exception without a message"
        return
    assert codes, f"{name}: returned {result!r} instead of raising {exc_types}"
    want = codes[0]
    if want == "nonzero":
        assert isinstance(result, int) and result < 0, f"{name}: returned {result!r}, not an error code"
    else:
        assert result == want, f"{name}: returned {result!r}, expected {want}"
    err = mf.get_last_err_msg()
    assert err, f"{name}: no message in get_last_err_msg()"
    if msg:
        assert re.search(msg, err, re.I), f"{name}: message {err!r} lacks {msg!r}"
