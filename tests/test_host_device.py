"""Device memory on the host backend (``MF_DEVICE_BACKEND=host``), on every machine.

With that setting host memory (shared memfd mappings) plays device memory: Big Memory HBM
parts are allocated by the host backend, shared between same-host ranks through its IPC
handles, and staged through the data server's device copies on the tcp path. These tests run
those paths in real processes and check every byte on the side that received it; the CUDA
runs of the same paths are in test_cuda.py. A process chooses its backend once, so each test
runs its ranks in child processes started with the variable set.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import memfabric_hybrid as mf
from conftest import NO_ASCEND, NO_CUDA, join_bm, run_child, run_ranks

MiB = 1 << 20


def test_the_choice_is_reported_and_checked():
    out = run_child(
        """
        import json, memfabric_hybrid as mf
        info = mf.device_info()
        print(json.dumps({k: [v["available"], v["selected"]] for k, v in info.items()}))
        """,
        MF_DEVICE_BACKEND="host",
    )
    assert out == {"host": [True, True], "cuda": [out["cuda"][0], False], "ascend": [out["ascend"][0], False]}

    probe = """
        import json, memfabric_hybrid as mf
        srv = mf.start_config_store("tcp://127.0.0.1:0")
        cfg = mf.bm.BmConfig(); cfg.auto_ranking = True; cfg.set_nic("lo")
        assert mf.bm.initialize(srv.url, 1, 0, cfg) == 0, mf.get_last_err_msg()
        try:
            mf.bm.create(0, 1 << 20, local_hbm_size=1 << 20)
            res = [0, ""]
        except mf.MemFabricError as e:
            res = [e.code, str(e)]
        selected = [k for k, v in mf.device_info().items() if v["selected"]]
        mf.bm.uninitialize()
        print(json.dumps({"create": res, "selected": selected}))
    """
    # A value that names no backend is a parameter error, saying what is accepted.
    out = run_child(probe, MF_DEVICE_BACKEND="gpu")
    code, msg = out["create"]
    assert code == mf.SMEM_INVALID_PARAM, msg
    assert 'MF_DEVICE_BACKEND="gpu" is not a device backend: expected auto, cuda, ascend or host' in msg
    assert out["selected"] == []
    # A backend named but missing says so, and does not fall back to another one.
    out = run_child(probe, MF_DEVICE_BACKEND="cuda", MF_CUDA_LIBRARY=NO_CUDA, MF_ASCEND_LIBRARY=NO_ASCEND)
    code, msg = out["create"]
    assert code == mf.MF_UNSUPPORTED, msg
    assert "no device backend: MF_DEVICE_BACKEND=cuda but CUDA driver not found: tried " + NO_CUDA in msg, msg
    # Case and blanks do not matter; the host backend then serves the HBM part.
    out = run_child(probe, MF_DEVICE_BACKEND=" Host ")
    assert out == {"create": [0, ""], "selected": ["host"]}


def _bm_rank(url: str, world: int, rank: int, transport: str, q) -> None:
    os.environ["MF_DEVICE_BACKEND"] = "host"
    if transport:
        os.environ["MF_TRANSPORT"] = transport
    import memfabric_hybrid as m

    T = m.bm.BmCopyType
    try:
        join_bm(url, world, rank)
        # Three staging chunks and a ragged tail per half.
        half = 8 * MiB + 4097
        n = 2 * half
        big = m.bm.create(0, 2 * MiB, local_hbm_size=n)
        group = m.StoreGroup(url, "host-device-test", world, rank)
        me, peer = big.peer_rank_ptr(rank), big.peer_rank_ptr((rank + 1) % world)
        mine = bytes((i * 7 + rank) % 251 for i in range(256)) * (half // 256) + bytes(half % 256)
        # Host buffers of this rank; copies over the network need them registered.
        back, got, moved = (np.zeros(half, dtype=np.uint8) for _ in range(3))
        for buf in (back, got, moved):
            assert big.register(buf.ctypes.data, half) == 0, m.get_last_err_msg()
        # Host -> own HBM part (second half), then own part -> the next rank's part (first
        # half): device memory to device memory of another process.
        assert big.copy_data(mine, me + half, half, T.H2G, 0) == 0, m.get_last_err_msg()
        src = big.gva_to_va(me + half)
        assert src != 0, m.get_last_err_msg()
        assert big.copy_data(src, peer, half, T.L2G, 0) == 0, m.get_last_err_msg()
        # Its part, read back into host memory here (device -> host across processes).
        assert big.copy_data(peer, back.ctypes.data, half, T.G2H, 0) == 0, m.get_last_err_msg()
        ok_out = back.tobytes() == mine
        group.barrier(60)
        # What the previous rank wrote into my part (device -> host here).
        writer = (rank - 1) % world
        want = bytes((i * 7 + writer) % 251 for i in range(256)) * (half // 256) + bytes(half % 256)
        assert big.copy_data(me, got.ctypes.data, half, T.G2H, 0) == 0, m.get_last_err_msg()
        # Across processes into device memory here (G2L), at an odd offset of both sides.
        assert big.copy_data(peer + 3, big.gva_to_va(me + half + 1), half - 3, T.G2L, 0) == 0, m.get_last_err_msg()
        assert big.copy_data(me + half + 1, moved.ctypes.data, half - 3, T.G2H, 0) == 0, m.get_last_err_msg()
        ok_moved = moved[: half - 3].tobytes() == mine[3:]
        # Past the end of the peer's part: refused, nothing moved.
        past = big.copy_data(src, peer + n - 8, 4096, T.L2G, 0)
        group.barrier(60)
        q.put((rank, ok_out, got.tobytes() == want, ok_moved, past, ""))
        group.leave()
        del big
        m.bm.uninitialize()
    except Exception as e:  # reported to the test, which fails with it
        q.put((rank, False, False, False, 0, repr(e)))


@pytest.mark.parametrize("transport", ["", "tcp"], ids=["same-host-ipc", "tcp-staged"])
def test_bm_hbm_parts_across_ranks(store, transport):
    world = 2
    results = run_ranks(_bm_rank, world, lambda r, q: (store.url, world, r, transport, q))
    for rank, ok_out, ok_in, ok_moved, past, err in results:
        assert not err, f"rank {rank}: {err}"
        assert ok_out, f"rank {rank}: the next rank's part read back wrong"
        assert ok_in, f"rank {rank}: wrong bytes in its own part"
        assert ok_moved, f"rank {rank}: G2L at an offset moved wrong bytes"
        assert past == mf.MF_OUT_OF_BOUNDS, f"rank {rank}: a copy past the part gave {past}"
