"""Cross-host transfers: two engines in two network namespaces joined by a veth pair.

The same kernel serves both namespaces, so the engines are told to use the network path
(MF_TRANSPORT=tcp), which is what two real hosts would pick; the bytes cross the veth link.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random

import pytest

from memfabric_hybrid import _netns
import _te_target

REASON = _netns.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")

SIZE = 96 << 20
SIZES = [4096, 1 << 20, 64 << 20]


def initiator(ip: str, conn) -> None:
    """In host A: hosts the config store, writes to and reads from the target in host B."""
    os.environ["MF_TRANSPORT"] = "tcp"
    import memfabric_hybrid as mf

    server = mf.start_config_store(f"tcp://{ip}:0")
    conn.send(server.url)
    _, session, peer_addr = conn.recv()
    engine = mf.TransferEngine()
    assert engine.initialize(server.url, f"{ip}:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    buf = mmap.mmap(-1, SIZE)
    base = _te_target.buffer_address(buf)
    assert engine.register_memory(base, SIZE) == 0
    report = {"transport": engine.transport_for(session), "writes": [], "reads_ok": []}
    off = 0
    for n in SIZES:
        data = random.Random(n).randbytes(n)
        buf[off:off + n] = data
        rc = engine.transfer_sync_write(session, base + off, peer_addr + off, n)
        report["writes"].append((off, n, rc, hashlib.sha256(data).hexdigest(), mf.get_last_err_msg()))
        buf[off:off + n] = b"\0" * n
        rc = engine.transfer_sync_read(session, base + off, peer_addr + off, n)
        report["reads_ok"].append(rc == 0 and buf[off:off + n] == data)
        off += n
    # 1024 blocks of 16 KiB, landing in reverse order after the regions written above.
    buf[off:off + (16 << 20)] = random.Random(3).randbytes(16 << 20)
    blocks = [(base + off + i * 16384, peer_addr + off + (1023 - i) * 16384, 16384) for i in range(1024)]
    rc = engine.batch_transfer_sync_write(session, [b[0] for b in blocks], [b[1] for b in blocks], [b[2] for b in blocks])
    expected = b"".join(buf[off + i * 16384: off + (i + 1) * 16384] for i in reversed(range(1024)))
    report["batch"] = (off, rc, hashlib.sha256(expected).hexdigest())
    report["oob"] = engine.transfer_sync_write(session, base, peer_addr + SIZE - 10, 20)
    conn.send(report)
    conn.recv()  # keep the store up until the target is done
    engine.destroy()
    server.close()


def store_connection(url: str, conn) -> None:
    """How a client in this namespace reaches the store at ``url``."""
    import memfabric_hybrid as mf

    c = mf.StoreClient(url, timeout=10)
    c.set("seen/" + c.connection, b"1")
    conn.send(c.connection)


def test_store_local_socket_stays_on_its_host(spawn):
    # A client on the store's host takes the Unix socket; one on another host (namespace)
    # cannot see it and uses TCP.
    with _netns.TwoHosts() as hosts:
        got = {}
        parent, child = spawn.Pipe()
        server = spawn.Process(target=_netns.run_in, args=(hosts.a, _store_host, hosts.ip_a, child))
        server.start()
        assert parent.poll(60)
        url = parent.recv()
        for name, ns in (("a", hosts.a), ("b", hosts.b)):
            p_conn, c_conn = spawn.Pipe()
            p = spawn.Process(target=_netns.run_in, args=(ns, store_connection, url, c_conn))
            p.start()
            assert p_conn.poll(60), f"client in host {name} did not answer"
            got[name] = p_conn.recv()
            p.join(30)
        parent.send("stop")
        server.join(30)
    assert got == {"a": "local socket", "b": "tcp"}, got


def _store_host(ip: str, conn) -> None:
    import memfabric_hybrid as mf

    server = mf.start_config_store(f"tcp://{ip}:0")
    conn.send(server.url)
    conn.recv()
    server.close()


def test_transfers_cross_a_veth_link(spawn):
    with _netns.TwoHosts() as hosts:
        ci, ci_child = spawn.Pipe()
        pi = spawn.Process(target=_netns.run_in, args=(hosts.a, initiator, hosts.ip_a, ci_child))
        pi.start()
        assert ci.poll(60)
        url = ci.recv()
        ct, ct_child = spawn.Pipe()
        pt = spawn.Process(target=_netns.run_in, args=(hosts.b, _te_target.serve, url, f"{hosts.ip_b}:0", SIZE, ct_child, {"MF_TRANSPORT": "tcp"}))
        pt.start()
        assert ct.poll(60)
        tag, session, peer_addr, _ = ct.recv()
        assert tag == "ready" and session.startswith(hosts.ip_b)
        ci.send(("go", session, peer_addr))
        assert ci.poll(120)
        report = ci.recv()
        assert report["transport"] == "tcp"
        for off, n, rc, digest, msg in report["writes"]:
            assert rc == 0, msg
            ct.send(("hash", off, n))
            assert ct.recv() == digest, f"{n} bytes at {off} differ on the target"
        assert all(report["reads_ok"])
        off, rc, digest = report["batch"]
        assert rc == 0
        ct.send(("hash", off, 1024 * 16384))
        assert ct.recv() == digest
        assert report["oob"] == -3002
        ct.send(("guards",))
        assert ct.recv()
        ct.send(("stop",))
        ct.recv()
        ci.send("done")
        pt.join(30)
        pi.join(30)
        assert pi.exitcode == 0 and pt.exitcode == 0


def test_big_memory_across_a_veth_link(spawn):
    import _workers

    size = 8 << 20
    with _netns.TwoHosts() as hosts:
        out = spawn.Queue()
        pa = spawn.Process(target=_netns.run_in, args=(hosts.a, _workers.bm_netns_rank, None, 2, 0, size, hosts.ip_a, out))
        pa.start()
        tag, url = out.get(timeout=60)
        assert tag == "url"
        pb = spawn.Process(target=_netns.run_in, args=(hosts.b, _workers.bm_netns_rank, url, 2, 1, size, hosts.ip_b, out))
        pb.start()
        results = sorted([out.get(timeout=120), out.get(timeout=120)])
        pa.join(30)
        pb.join(30)
        for rank, rc_w, msg_w, rc_r, got_mine, rc_r2, got_remote, va, oob in results:
            assert rc_w == 0, msg_w
            assert rc_r == 0 and got_mine, f"rank {rank} did not find its peer's bytes"
            assert rc_r2 == 0 and got_remote
            assert va == 0  # the peer's part has no address here
            assert oob == -3002
        assert pa.exitcode == 0 and pb.exitcode == 0
