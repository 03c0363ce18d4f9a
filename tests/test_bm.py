"""Big Memory with real processes: every copy direction, data verified, and the errors."""

from __future__ import annotations

import pytest

import memfabric_hybrid as mf
import _workers
from conftest import free_port

MiB = 1 << 20


def test_four_ranks_copy_in_every_direction(spawn):
    world, size = 4, 4 * MiB
    url = f"tcp://127.0.0.1:{free_port()}"
    out = spawn.Queue()
    procs = [spawn.Process(target=_workers.bm_rank, args=(url, world, r, size, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for rank, failures, errs, ranks, _ in results:
        assert failures == [], failures
        oob, inv = mf.MF_OUT_OF_BOUNDS, mf.SMEM_INVALID_PARAM
        assert errs == [oob, oob, oob, oob, inv, inv, oob, inv], errs
        assert ranks == list(range(world))


def test_bm_argument_errors(store):
    assert mf.bm.bm_rank_id() == 4294967295
    with pytest.raises(mf.MemFabricError) as ei:
        mf.bm.create(0, MiB)
    assert ei.value.code == mf.SMEM_NOT_INIT
    cfg = mf.bm.BmConfig()
    assert (cfg.init_timeout, cfg.operation_timeout, cfg.auto_ranking, cfg.start_store) == (120, 120, False, True)
    cfg.rank_id = 3
    assert mf.bm.initialize(store.url, 2, 0, cfg) == mf.SMEM_INVALID_PARAM
    assert mf.bm.initialize(store.url, 1025, 0, mf.bm.BmConfig()) == mf.SMEM_INVALID_PARAM
    cfg = mf.bm.BmConfig()
    cfg.auto_ranking = True
    cfg.set_nic("lo")
    assert mf.bm.initialize(store.url, 1, 0, cfg) == 0, mf.get_last_err_msg()
    try:
        assert mf.bm.bm_rank_id() == 0
        with pytest.raises(mf.MemFabricError) as ei:
            mf.bm.create(0, MiB, local_hbm_size=MiB)
        assert ei.value.code == mf.MF_UNSUPPORTED
        assert "no device memory here" in str(ei.value)
        for bad in [(64, MiB), (0, 0)]:
            with pytest.raises(mf.MemFabricError) as ei:
                mf.bm.create(*bad)
            assert ei.value.code == mf.SMEM_INVALID_PARAM
        big = mf.bm.create(0, 2 * MiB)
        with pytest.raises(mf.MemFabricError) as ei:
            mf.bm.create(0, 2 * MiB)
        assert ei.value.code == mf.SMEM_DUPLICATED
        assert big.local_mem_size() == 2 * MiB
        assert big.peer_rank_ptr(1) == 0 and "outside" in mf.get_last_err_msg()
        assert big.gva_to_va(big.peer_rank_ptr(0)) == big.peer_rank_ptr(0)
        assert big.copy_data(0, 0, 8, mf.bm.BmCopyType.L2G) != 0
        assert big.copy_data(1, 2, 8, mf.bm.BmCopyType.H2G, 0, 0x1234) == mf.MF_UNSUPPORTED
        assert big.extend_local_mem(3, MiB) == mf.MF_UNSUPPORTED
        # A registered host buffer takes the memcpy path; data still verified both ways.
        import ctypes
        import mmap
        buf = mmap.mmap(-1, 2 * MiB)
        a = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert big.register(a, 2 * MiB) == 0
        assert big.register(a, 2 * MiB) == mf.SMEM_DUPLICATED
        buf[:] = bytes(range(256)) * (2 * MiB // 256)
        g = big.peer_rank_ptr(0)
        assert big.copy_data(a, g, 2 * MiB, mf.bm.BmCopyType.H2G) == 0
        buf[:] = b"\0" * (2 * MiB)
        assert big.copy_data(g + 256, a, MiB, mf.bm.BmCopyType.G2H) == 0
        assert buf[:MiB] == bytes(range(256)) * (MiB // 256)
        assert big.unregister(a) == 0 and big.unregister(a) == mf.SMEM_NOT_EXIST
        # Memory objects work in place of host addresses.
        import numpy as np
        arr = np.arange(4096, dtype=np.uint8)
        assert big.copy_data(arr, g, 4096, mf.bm.BmCopyType.H2G) == 0
        out = bytearray(4096)
        assert big.copy_data(g, out, 4096, mf.bm.BmCopyType.G2H) == 0
        assert bytes(out) == arr.tobytes()
        with pytest.raises(ValueError):
            big.copy_data(g, b"read-only", 9, mf.bm.BmCopyType.G2H)
        with pytest.raises(ValueError):
            big.copy_data(arr, g, 8192, mf.bm.BmCopyType.H2G)
        big.destroy()
        assert big.wait() == mf.SMEM_NOT_INIT
    finally:
        mf.bm.uninitialize()
    assert mf.bm.bm_rank_id() == 4294967295


def test_killed_rank_fails_the_others_wait(spawn):
    import time

    world, victim = 3, 2
    url = f"tcp://127.0.0.1:{free_port()}"
    out = spawn.Queue()
    procs = [spawn.Process(target=_workers.bm_doomed_rank, args=(url, world, r, victim, out)) for r in range(world)]
    for p in procs:
        p.start()
    assert sorted(out.get(timeout=120) for _ in procs) == [("created", r) for r in range(world)]
    time.sleep(0.5)
    procs[victim].kill()
    reports = [out.get(timeout=60) for _ in range(2 * (world - 1))]
    waited = [r for r in reports if r[0] == "waited"]
    assert len(waited) == world - 1
    for _, rank, rc, took, msg in waited:
        assert rc == mf.MF_PEER_GONE, msg
        assert took < 10
    # Its segment stays mapped in the survivors (shared memory outlives the process): no crash.
    assert all(r[2] == 0 for r in reports if r[0] == "copied")
    for p in procs:
        p.join(60)
        assert p.exitcode in (0, -9)


def test_dynamic_membership(spawn):
    """Ranks join and leave a live object; the others see it; copies to a departed rank fail."""
    import time

    size = 2 * MiB
    url = f"tcp://127.0.0.1:{free_port()}"
    out = spawn.Queue()
    cmds = [spawn.Queue() for _ in range(3)]

    def start(r):
        p = spawn.Process(target=_workers.bm_dynamic_rank, args=(url, r, size, cmds[r], out))
        p.start()
        assert out.get(timeout=60) == ("ready", r)
        return p

    def ask(r, *cmd):
        cmds[r].put(cmd)
        return out.get(timeout=60)

    p0 = start(0)
    # Rank 1 has not joined yet: copies to it fail cleanly.
    tag, _, _, rc, msg = ask(0, "write", 1, 0x11)
    assert rc == mf.MF_PEER_GONE, msg
    p1 = start(1)
    time.sleep(0.4)  # the watcher period is 100 ms
    _, _, members, events, wait_rc = ask(0, "state")
    assert members == [0, 1] and (1, 0) in events  # JOIN_EVENT for rank 1
    assert wait_rc == mf.MF_UNSUPPORTED
    assert ask(0, "write", 1, 0x22)[3] == 0
    assert ask(1, "read-own")[2:] == (0, b"\x22" * 4)
    assert ask(1, "write", 0, 0x33)[3] == 0
    assert ask(0, "read-own")[2:] == (0, b"\x33" * 4)
    assert ask(1, "leave") == ("left", 1)
    p1.join(30)
    time.sleep(0.4)
    _, _, members, events, _ = ask(0, "state")
    assert members == [0] and (1, 1) in events  # LEAVE_EVENT for rank 1
    tag, _, _, rc, msg = ask(0, "write", 1, 0x44)
    assert rc == mf.MF_PEER_GONE, msg
    # A rank can join again (a new process, a new segment) and is reachable.
    p1 = start(1)
    assert ask(0, "write", 1, 0x55)[3] == 0
    assert ask(1, "read-own")[2:] == (0, b"\x55" * 4)
    for r, p in ((1, p1), (0, p0)):
        assert ask(r, "leave") == ("left", r)
        p.join(30)
        assert p.exitcode == 0
