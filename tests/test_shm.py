"""Share Memory with real processes: GVA pointers, barrier, all_gather, context, limits."""

from __future__ import annotations

import time

import pytest

import memfabric_hybrid as mf
import _workers
from conftest import free_port

MiB = 1 << 20


def test_eight_ranks_share_one_address_space(spawn):
    world, size = 8, 2 * MiB
    url = f"tcp://127.0.0.1:{free_port()}"
    out = spawn.Queue()
    procs = [spawn.Process(target=_workers.shm_rank, args=(url, world, r, size, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    gvas = {g for _, g, *_ in results}
    assert len(gvas) == 1, "every rank sees the object at the same address"
    for rank, _, seen, gathered, ctx, reach, support in results:
        assert all(seen), f"rank {rank} read a wrong part: {seen}"
        assert gathered == b"".join(bytes([r]) * 4 for r in range(world))
        assert ctx == b"ctx-from-0"
        assert all(bits & mf.shm.ShmDataOpType.MTE for bits in reach)
        assert support & mf.shm.ShmDataOpType.MTE


def test_killed_rank_fails_the_others_barrier(spawn):
    world, victim = 3, 1
    url = f"tcp://127.0.0.1:{free_port()}"
    out = spawn.Queue()
    procs = [spawn.Process(target=_workers.shm_rank, args=(url, world, r, 2 * MiB, out, victim)) for r in range(world)]
    for p in procs:
        p.start()
    firsts = [out.get(timeout=120) for _ in procs]
    assert len(firsts) == world
    time.sleep(0.5)
    procs[victim].kill()
    # Rank 0 hosts the store, so the others' barriers fail through membership, not a lost store.
    reports = [out.get(timeout=60) for _ in range(world - 1)]
    for tag, rank, rc, took, msg in reports:
        assert tag == "after-kill"
        assert rc == mf.MF_PEER_GONE, msg
        assert took < 10
    for p in procs:
        p.join(30)


def test_limits_and_bad_arguments(store):
    with pytest.raises(mf.MemFabricError) as ei:
        mf.shm.create(0, 1, 0, 2 * MiB)
    assert ei.value.code == mf.SMEM_NOT_INIT
    assert mf.shm.initialize(store.url, 0, 0, 0) == mf.SMEM_INVALID_PARAM
    assert mf.shm.initialize(store.url, 1025, 0, 0) == mf.SMEM_INVALID_PARAM
    assert mf.shm.initialize(store.url, 2, 2, 0) == mf.SMEM_INVALID_PARAM
    cfg = mf.shm.ShmConfig()
    assert (cfg.init_timeout, cfg.create_timeout, cfg.operation_timeout, cfg.start_store, cfg.flags) == (120, 120, 120, True, 0)
    cfg.init_timeout = 0
    assert mf.shm.initialize(store.url, 1, 0, 0, cfg) == mf.SMEM_INVALID_PARAM
    with pytest.raises(OverflowError):
        cfg.init_timeout = -1
    assert mf.shm.initialize(store.url, 1, 0, 0, mf.shm.ShmConfig()) == 0
    try:
        assert mf.shm.initialize(store.url, 1, 0, 0) == mf.SMEM_REPEAT_INVOKE
        for args in [(64, 1, 0, 2 * MiB), (0, 0, 0, 2 * MiB), (0, 1025, 0, 2 * MiB), (0, 1, 1, 2 * MiB),
                     (0, 1, 0, MiB), (0, 1, 0, 3 * MiB), (0, 1, 0, 8 << 30)]:
            with pytest.raises(mf.MemFabricError) as ei:
                mf.shm.create(*args)
            assert ei.value.code == mf.SMEM_INVALID_PARAM, args
            assert mf.get_last_err_msg()
        with pytest.raises(mf.MemFabricError):
            mf.shm.create(0, 1, 0, 2 * MiB, data_op_type=3)
        s = mf.shm.create(5, 1, 0, 4 * MiB)
        with pytest.raises(mf.MemFabricError) as ei:
            mf.shm.create(5, 1, 0, 2 * MiB)
        assert ei.value.code == mf.SMEM_DUPLICATED
        assert s.rank_size == 1 and s.local_rank == 0 and s.local_mem_size == 4 * MiB
        assert s.all_gather(b"ok") == b"ok"
        assert s.set_context(b"c") == 0 and s.get_context() == b"c"
        assert s.topology_can_reach(1) == mf.SMEM_INVALID_PARAM
        assert s.destroy() == 0
        assert s.barrier() == mf.SMEM_NOT_INIT
        # The same id again: a fresh object (its own barriers and context).
        s2 = mf.shm.create(5, 1, 0, 2 * MiB)
        assert s2.barrier() == 0 and s2.barrier() == 0
        assert s2.get_context() == b""
        assert s2.destroy() == 0
    finally:
        mf.shm.uninitialize()
