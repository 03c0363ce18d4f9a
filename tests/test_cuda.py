"""Device memory on an NVIDIA GPU: Transfer Engine (same process, same host over CUDA IPC,
the staged tcp path), Big Memory HBM parts, transfers ordered on a torch CUDA stream.

Every test here needs the CUDA backend and torch with CUDA; without them the module skips
with the reason ``mf.device_info()`` gives (CI has no GPU). Data is verified byte for byte
with random contents; child processes are spawned (CUDA does not survive fork).
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

import memfabric_hybrid as mf
from conftest import join_bm, run_ranks

MiB = 1 << 20


def _why_not() -> str:
    c = mf.device_info()["cuda"]
    if not c["available"]:
        return f"no CUDA: {c['reason']}"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch has no CUDA here"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")

if not _why_not():
    import torch


def rand(n: int, device: str) -> "torch.Tensor":
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)


def engine(url: str, role: str = "Prefill") -> mf.TransferEngine:
    e = mf.TransferEngine()
    assert e.initialize(url, "127.0.0.1:0", role, 0) == 0, mf.get_last_err_msg()
    return e


# --- a peer process holding a CUDA buffer ----------------------------------------------------


def _peer_main(url: str, n: int, transport: str, conn) -> None:
    if transport:
        os.environ["MF_TRANSPORT"] = transport
    import torch as t

    import memfabric_hybrid as m

    e = m.TransferEngine()
    assert e.initialize(url, "127.0.0.1:0", "Decode", 0) == 0, m.get_last_err_msg()
    dev = t.zeros(n, dtype=t.uint8, device="cuda")
    host = t.zeros(n, dtype=t.uint8)
    assert e.register_memory(dev) == 0, m.get_last_err_msg()
    assert e.register_memory(host) == 0, m.get_last_err_msg()
    conn.send((e.session_id, dev.data_ptr(), host.data_ptr()))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "get":  # ("get", which, offset, length) -> bytes
            buf = dev if msg[1] == "dev" else host
            conn.send(buf[msg[2] : msg[2] + msg[3]].cpu().numpy().tobytes())
        if msg[0] == "set":  # ("set", which, offset, bytes)
            buf = dev if msg[1] == "dev" else host
            src = t.frombuffer(bytearray(msg[3]), dtype=t.uint8)
            buf[msg[2] : msg[2] + len(msg[3])].copy_(src)
            t.cuda.synchronize()
            conn.send("ok")
    e.destroy()
    conn.send("bye")


@pytest.fixture(params=["", "tcp"], ids=["same-host", "tcp"])
def gpu_peer(request, store, monkeypatch):
    """A spawned engine with a registered CUDA buffer and host buffer of 32 MiB."""
    transport = request.param
    if transport:
        monkeypatch.setenv("MF_TRANSPORT", transport)
    else:
        monkeypatch.delenv("MF_TRANSPORT", raising=False)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    n = 32 * MiB
    proc = ctx.Process(target=_peer_main, args=(store.url, n, transport, child), daemon=True)
    proc.start()
    assert parent.poll(120), "peer did not start"
    session, dev_addr, host_addr = parent.recv()
    me = engine(store.url)
    yield me, parent, session, dev_addr, host_addr, transport or "cma"
    me.destroy()
    parent.send(("stop",))
    parent.poll(30) and parent.recv()
    proc.join(30)


def peer_bytes(conn, which: str, off: int, n: int) -> bytes:
    conn.send(("get", which, off, n))
    assert conn.poll(60)
    return conn.recv()


def test_registering_device_memory_checks_its_allocation(store):
    e = engine(store.url)
    try:
        t = torch.zeros(MiB, dtype=torch.uint8, device="cuda")
        assert e.register_memory(t) == 0, mf.get_last_err_msg()
        # Past the end of the device allocation: refused, nothing registered.
        big = t.data_ptr() + (1 << 40)
        assert e.register_memory(big, 4096) != 0
        assert e.unregister_memory(t) == 0
        assert e.register_memory(t.data_ptr(), 64 * (1 << 30)) == mf.SMEM_INVALID_PARAM
        assert "device allocation" in mf.get_last_err_msg()
    finally:
        e.destroy()


def test_same_process_device_and_host_mixes(store):
    a, b = engine(store.url), engine(store.url, "Decode")
    try:
        n = 8 * MiB
        dev_a, dev_b = rand(n, "cuda"), torch.zeros(n, dtype=torch.uint8, device="cuda")
        host_a, host_b = rand(n, "cpu"), torch.zeros(n, dtype=torch.uint8)
        for e, ts in ((a, (dev_a, host_a)), (b, (dev_b, host_b))):
            for t in ts:
                assert e.register_memory(t) == 0, mf.get_last_err_msg()
        sb = b.session_id
        assert a.transport_for(sb) == "local"
        # device -> device, host -> device, device -> host, each verified.
        assert a.transfer_sync_write(sb, dev_a, dev_b.data_ptr()) == 0, mf.get_last_err_msg()
        assert torch.equal(dev_b.cpu(), dev_a.cpu())
        assert a.transfer_sync_write(sb, host_a, dev_b.data_ptr() + 4096, n - 4096) == 0, mf.get_last_err_msg()
        assert torch.equal(dev_b[4096:].cpu(), host_a[: n - 4096])
        assert a.transfer_sync_read(sb, host_a, dev_b.data_ptr(), 4096) == 0, mf.get_last_err_msg()
        assert torch.equal(host_a[:4096], dev_b[:4096].cpu())
        # A batch mixing host and device descriptors.
        srcs, dsts, sizes = [dev_a, host_a], [host_b.data_ptr(), dev_b.data_ptr()], [MiB, MiB]
        assert a.batch_transfer_sync_write(sb, srcs, dsts, sizes) == 0, mf.get_last_err_msg()
        assert torch.equal(host_b[:MiB], dev_a[:MiB].cpu()) and torch.equal(dev_b[:MiB].cpu(), host_a[:MiB])
        # Out of bounds on the device side: an error, no crash.
        assert a.transfer_sync_write(sb, dev_a, dev_b.data_ptr() + n - 16, 4096) == mf.MF_OUT_OF_BOUNDS
    finally:
        a.destroy()
        b.destroy()


def test_across_processes(gpu_peer):
    me, conn, session, dev_addr, host_addr, path = gpu_peer
    assert me.transport_for(session) == path
    n = 24 * MiB + 4097  # several staging chunks, and a ragged tail
    src_dev, src_host = rand(n, "cuda"), rand(n, "cpu")
    dst_dev, dst_host = torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(n, dtype=torch.uint8)
    for t in (src_dev, src_host, dst_dev, dst_host):
        assert me.register_memory(t) == 0, mf.get_last_err_msg()
    # GPU here -> GPU there (CUDA IPC on one host; staged on both sides over tcp).
    assert me.transfer_sync_write(session, src_dev, dev_addr + 3, n) == 0, mf.get_last_err_msg()
    assert peer_bytes(conn, "dev", 3, n) == src_dev.cpu().numpy().tobytes()
    # host here -> GPU there, then GPU there -> GPU here and -> host here.
    assert me.transfer_sync_write(session, src_host, dev_addr, MiB) == 0, mf.get_last_err_msg()
    assert peer_bytes(conn, "dev", 0, MiB) == src_host[:MiB].numpy().tobytes()
    assert me.transfer_sync_read(session, dst_dev, dev_addr + 3, n) == 0, mf.get_last_err_msg()
    # The peer's bytes [3, 3 + n) are src_dev, except [3, MiB) overwritten by src_host.
    assert torch.equal(dst_dev[MiB:].cpu(), src_dev[MiB:].cpu())
    assert torch.equal(dst_dev[: MiB - 3].cpu(), src_host[3:MiB])
    assert me.transfer_sync_read(session, dst_host, dev_addr, MiB) == 0, mf.get_last_err_msg()
    assert torch.equal(dst_host[:MiB], src_host[:MiB])
    # GPU here -> host memory there, and back.
    assert me.transfer_sync_write(session, src_dev, host_addr, 5 * MiB) == 0, mf.get_last_err_msg()
    assert peer_bytes(conn, "host", 0, 5 * MiB) == src_dev[: 5 * MiB].cpu().numpy().tobytes()
    assert me.transfer_sync_read(session, dst_dev, host_addr, 5 * MiB) == 0, mf.get_last_err_msg()
    assert torch.equal(dst_dev[: 5 * MiB], src_dev[: 5 * MiB])
    # Past the peer's device buffer: refused with a bounds error.
    assert me.transfer_sync_write(session, src_dev, dev_addr + 32 * MiB - 8, 4096) == mf.MF_OUT_OF_BOUNDS


def test_async_write_is_ordered_on_a_torch_stream(gpu_peer):
    me, conn, session, dev_addr, _, _ = gpu_peer
    n = 16 * MiB
    buf = torch.zeros(n, dtype=torch.uint8, device="cuda")
    back = torch.zeros(n, dtype=torch.uint8, device="cuda")
    assert me.register_memory(buf) == 0 and me.register_memory(back) == 0
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the fill
        buf.fill_(0x5A)
    # Queued after the fill on the same stream: must send 0x5A, not the zeros there now.
    assert me.transfer_async_write_submit(session, buf, dev_addr, n, s) == 0, mf.get_last_err_msg()
    assert me.transfer_async_read_submit(session, back, dev_addr, n, s) == 0, mf.get_last_err_msg()
    with torch.cuda.stream(s):
        total = back.sum(dtype=torch.int64)  # runs after the read, on the same stream
    s.synchronize()
    assert int(total.item()) == 0x5A * n
    assert peer_bytes(conn, "dev", 0, 4096) == bytes([0x5A]) * 4096
    # The default stream (torch.cuda.current_stream()) works too.
    buf.fill_(0x11)
    assert me.transfer_async_write_submit(session, buf, dev_addr, n, torch.cuda.current_stream()) == 0
    torch.cuda.current_stream().synchronize()
    assert peer_bytes(conn, "dev", n - 4096, 4096) == bytes([0x11]) * 4096


def test_a_failed_stream_transfer_is_reported_by_the_next_submit(gpu_peer):
    me, _, session, dev_addr, _, _ = gpu_peer
    buf = torch.zeros(MiB, dtype=torch.uint8, device="cuda")
    assert me.register_memory(buf) == 0
    s = torch.cuda.Stream()
    # Accepted at submit (the peer's table is checked when the job runs), fails when it runs.
    rc = me.transfer_async_write_submit("127.0.0.1:1", buf, dev_addr, MiB, s)
    s.synchronize()
    if rc == 0:
        rc = me.transfer_async_write_submit(session, buf, dev_addr, MiB, s)
        assert rc != 0 and "earlier transfer on device stream" in mf.get_last_err_msg()
    s.synchronize()
    # The error was handed out once; the stream works again.
    assert me.transfer_async_write_submit(session, buf, dev_addr, MiB, s) == 0, mf.get_last_err_msg()
    s.synchronize()


# --- Big Memory with HBM parts ---------------------------------------------------------------


def _bm_rank(url: str, world: int, rank: int, transport: str, q) -> None:
    if transport:
        os.environ["MF_TRANSPORT"] = transport
    import torch as t

    import memfabric_hybrid as m

    try:
        join_bm(url, world, rank)
        n = 4 * MiB
        big = m.bm.create(0, 2 * MiB, local_hbm_size=n)
        peer = (rank + 1) % world
        src = t.full((n,), rank + 1, dtype=t.uint8, device="cuda")
        if transport:  # network copies need registered local memory
            assert big.register(src.data_ptr(), n) == 0, m.get_last_err_msg()
        g = big.peer_rank_ptr(peer)
        assert big.copy_data(src.data_ptr(), g, n, m.bm.BmCopyType.L2G, 0) == 0, m.get_last_err_msg()
        assert big.wait() == 0
        mine = t.zeros(n, dtype=t.uint8)
        assert big.copy_data(big.peer_rank_ptr(rank), mine.data_ptr(), n, m.bm.BmCopyType.G2H, 0) == 0, m.get_last_err_msg()
        writer = (rank - 1) % world
        q.put((rank, bool((mine == writer + 1).all().item()), ""))
        assert big.wait() == 0
        del big
        m.bm.uninitialize()
    except Exception as e:  # reported to the test, which fails with it
        q.put((rank, False, repr(e)))


def test_bm_hbm_in_one_process(store):
    cfg = mf.bm.BmConfig()
    cfg.auto_ranking = True
    cfg.set_nic("lo")
    assert mf.bm.initialize(store.url, 1, 0, cfg) == 0, mf.get_last_err_msg()
    try:
        n = 8 * MiB
        big = mf.bm.create(0, 2 * MiB, local_hbm_size=n)
        assert big.local_mem_size() == n and big.local_mem_size(mf.bm.BmMemType.HOST) == 2 * MiB
        g = big.peer_rank_ptr(0)
        assert g != big.peer_rank_ptr(0, mf.bm.BmMemType.HOST)
        assert big.get_rank_id_by_gva(g + n - 1) == 0
        host, dev = rand(n, "cpu"), rand(n, "cuda")
        out_host, out_dev = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8, device="cuda")
        T = mf.bm.BmCopyType
        assert big.copy_data(host.data_ptr(), g, n, T.H2G, 0) == 0, mf.get_last_err_msg()
        assert big.copy_data(g, out_dev.data_ptr(), n, T.G2L, 0) == 0, mf.get_last_err_msg()
        assert torch.equal(out_dev.cpu(), host)
        assert big.copy_data(dev.data_ptr(), g, n, T.L2G, 0) == 0, mf.get_last_err_msg()
        assert big.copy_data(g, out_host.data_ptr(), n, T.G2H, 0) == 0, mf.get_last_err_msg()
        assert torch.equal(out_host, dev.cpu())
        # HBM <-> DRAM GVAs, and AUTO.
        gh = big.peer_rank_ptr(0, mf.bm.BmMemType.HOST)
        assert big.copy_data(g, gh, MiB, T.G2G, 0) == 0, mf.get_last_err_msg()
        assert big.copy_data(gh, out_host.data_ptr(), MiB, T.AUTO, 0) == 0, mf.get_last_err_msg()
        assert torch.equal(out_host[:MiB], dev[:MiB].cpu())
        # gva_to_va gives the device pointer of the part: read it through CuPy where present.
        va = big.gva_to_va(g)
        assert va != 0, mf.get_last_err_msg()
        try:
            import cupy
        except ImportError:
            cupy = None
        if cupy is not None:
            mem = cupy.cuda.UnownedMemory(va, n, None)
            view = cupy.ndarray((n,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
            assert bytes(cupy.asnumpy(view[:MiB])) == dev[:MiB].cpu().numpy().tobytes()
        # Pinned host tensors (checked against the driver's page-locked range, copied directly),
        # at sizes that pageable memory would bounce, and at an offset inside the tensor.
        for size in (4096, 64 * 1024, MiB):
            src = rand(size, "cpu").pin_memory()
            back = torch.zeros(size + 4096, dtype=torch.uint8).pin_memory()
            assert big.copy_data(src.data_ptr(), g + 3, size, T.H2G, 0) == 0, mf.get_last_err_msg()
            assert big.copy_data(g + 3, back.data_ptr() + 4096, size, T.G2H, 0) == 0, mf.get_last_err_msg()
            assert torch.equal(back[4096:], src) and int(back[:4096].sum()) == 0
        # Bounds: past the HBM part, and past a device buffer.
        assert big.copy_data(host.data_ptr(), g + n - 8, 4096, T.H2G, 0) == mf.MF_OUT_OF_BOUNDS
        # A raw int inside a framework's pooled allocation cannot be bounded by us (the pool
        # is one driver allocation); the tensor itself can: its size is checked.
        with pytest.raises(ValueError, match="exceeds"):
            big.copy_data(g, out_dev[n - 8 :], 4096, T.G2L, 0)
        # A wild address: an error, not a crash.
        assert big.copy_data(g, 0x10, 4096, T.G2L, 0) != 0
        assert big.copy_data(g, out_dev.data_ptr() + (1 << 46), 4096, T.G2L, 0) != 0
        # On a torch stream: ordered with the fill queued before it.
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(100_000_000)
            dev.fill_(0x33)
        assert big.copy_data(dev.data_ptr(), g, n, T.L2G, 0, s) == 0, mf.get_last_err_msg()
        s.synchronize()
        assert big.copy_data(g, out_host.data_ptr(), n, T.G2H, 0) == 0
        assert int(out_host.sum(dtype=torch.int64)) == 0x33 * n
        del big
    finally:
        mf.bm.uninitialize()


@pytest.mark.parametrize("transport", ["", "tcp"], ids=["same-host", "tcp"])
def test_bm_hbm_across_ranks(store, transport):
    world = 2
    results = run_ranks(_bm_rank, world, lambda r, q: (store.url, world, r, transport, q), timeout=180)
    for rank, ok, err in results:
        assert ok, f"rank {rank}: {err or 'wrong bytes in its HBM part'}"


BAD_STREAM_CHILD = """
import json, memfabric_hybrid as mf, torch
srv = mf.start_config_store("tcp://127.0.0.1:0")
a, b = mf.TransferEngine(), mf.TransferEngine()
assert a.initialize(srv.url, "127.0.0.1:0", "Prefill", 0) == 0
assert b.initialize(srv.url, "127.0.0.1:0", "Decode", 0) == 0
x = torch.zeros(4096, dtype=torch.uint8, device="cuda")
y = torch.zeros(4096, dtype=torch.uint8, device="cuda")
assert a.register_memory(x) == 0 and b.register_memory(y) == 0
rc = a.transfer_async_write_submit(b.session_id, x, y.data_ptr(), 4096, 0x1234)
print(json.dumps([rc, mf.get_last_err_msg()]))
"""


def test_a_bogus_stream_handle_is_an_error_not_a_crash():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BAD_STREAM_CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the process died (rc {out.returncode}): {out.stderr[-2000:]}"
    rc, msg = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc != 0 and msg, (rc, msg)
