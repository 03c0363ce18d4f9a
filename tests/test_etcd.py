"""The config store on etcd: URL and prefix rules, leases, member failures, TLS, and the
products (Transfer Engine, SHM) on an etcd:// URL.

The shared store suite (tests/test_store.py) runs against etcd too; this file holds what only
etcd has. Every test runs a real etcd (Debian's etcd-server) and skips where it is missing.
"""

from __future__ import annotations

import hashlib
import mmap
import shutil
import time
import uuid

import pytest

import memfabric_hybrid as mf
import _etcd_workers
import _te_target
import _workers
from conftest import need_etcd
from memfabric_hybrid.etcd_cluster import LocalEtcdCluster

LEASE_TTL = 3.0  # seconds; rust/memfabric/src/store/etcd.rs


@pytest.fixture
def own_cluster():
    """A 3-member cluster of this test's own (for tests that kill members)."""
    need_etcd()
    cluster = LocalEtcdCluster(3)
    yield cluster
    cluster.stop()


def _prefix() -> str:
    return f"pytest/{uuid.uuid4().hex[:12]}"


def test_keys_live_under_the_prefix(etcd_cluster):
    p = _prefix()
    with mf.StoreClient(etcd_cluster.url(p), timeout=10) as parent, \
            mf.StoreClient(etcd_cluster.url(p + "/a"), timeout=10) as a, \
            mf.StoreClient(etcd_cluster.url(p + "/b"), timeout=10) as b:
        a.set("k", b"from-a")
        b.set("k", b"from-b")
        assert a.add("n", 5) == 5 and a.compare_set("c", b"", b"x") == b"x"
        assert a.get("k") == b"from-a" and b.get("k") == b"from-b"
        # The markers that make add/compare_set exactly-once are not keys of the store.
        assert a.list() == ["c", "k", "n"] and b.list() == ["k"]
        assert parent.list() == ["a/c", "a/k", "a/n", "b/k"]
        assert a.url == etcd_cluster.url(p + "/a")


def test_bad_etcd_urls_are_refused():
    for url in ["etcd://", "etcd://127.0.0.1", "etcd://localhost:2379/p", "etcd://127.0.0.1:1,/p",
                "etcd://127.0.0.1:2379/a//b"]:
        with pytest.raises(mf.StoreError) as ei:
            mf.StoreClient(url, timeout=1)
        assert ei.value.code == mf.SMEM_INVALID_PARAM, url
        assert "etcd://" in str(ei.value)


def test_concurrent_adds_are_exact(etcd_store):
    """Several threads on one client and several clients: each add counted once."""
    import threading

    clients = [mf.StoreClient(etcd_store.url, timeout=30) for _ in range(3)]
    per_thread, errors = 25, []

    def work(c):
        try:
            for _ in range(per_thread):
                c.add("ctr", 1)
                c.append("log", b"x")
        except mf.StoreError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(clients[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert clients[0].get("ctr") == str(6 * per_thread).encode()
    assert clients[1].get("log") == b"x" * (6 * per_thread)
    for c in clients:
        c.close()


def test_ephemeral_keys_go_with_their_client(etcd_store, spawn):
    watcher = mf.StoreClient(etcd_store.url, timeout=10)
    c = mf.StoreClient(etcd_store.url, timeout=10)
    c.set("eph", b"1", ephemeral=True)
    c.set("plain", b"1")
    assert watcher.exists("eph")
    c.close()  # revokes the lease: gone at once
    assert not watcher.exists("eph") and watcher.exists("plain")
    # A killed process cannot revoke: its keys go when the lease runs out.
    out = spawn.Queue()
    p = spawn.Process(target=_etcd_workers.ephemeral_holder, args=(etcd_store.url, out))
    p.start()
    out.get(timeout=60)
    assert watcher.get("holder") == b"alive"
    p.kill()
    p.join()
    t = time.monotonic()
    while watcher.exists("holder"):
        assert time.monotonic() - t < LEASE_TTL + 5, "the dead client's key outlived its lease"
        time.sleep(0.1)
    assert time.monotonic() - t > 1.0  # it was the lease, not a close
    watcher.close()


def test_kill_one_member_mid_run(own_cluster, spawn):
    """Ranks keep going through the loss of the leader; no operation lost or doubled."""
    world, rounds = 4, 40
    url = own_cluster.url(_prefix())
    out = spawn.Queue()
    procs = [spawn.Process(target=_etcd_workers.busy_rank, args=(url, world, rounds, out)) for _ in range(world)]
    for p in procs:
        p.start()
    joined = [out.get(timeout=120) for _ in procs]
    assert all(j[0] == "joined" for j in joined), joined
    watch = mf.StoreClient(url, timeout=30)
    deadline = time.monotonic() + 120
    while int(watch.get("total") or b"0") < world * rounds // 4:
        assert time.monotonic() < deadline, "the ranks made no progress"
        time.sleep(0.05)
    victim = own_cluster.leader()
    assert victim is not None
    own_cluster.kill(victim)
    killed_at = int(watch.get("total"))
    reports = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(60)
    for tag, rank, done, slowest, msg in reports:
        assert tag == "done", reports
        assert done == rounds
    assert killed_at < world * rounds, "the member died after the work was over"
    print(f"\nleader killed after {killed_at} of {world * rounds} adds; "
          f"slowest round {max(r[3] for r in reports):.2f} s")
    assert watch.get("total") == str(world * rounds).encode()
    records = watch.get("log").decode().strip(";").split(";")
    assert sorted(records) == sorted(f"{r}:{i}" for r in range(world) for i in range(rounds))
    # The member comes back and catches up.
    own_cluster.start_member(victim)
    own_cluster.wait_healthy(30)
    watch.set("after", b"1")
    watch.close()


def test_kill_two_members_fails_clearly_then_recovers(own_cluster):
    url = own_cluster.url(_prefix())
    c = mf.StoreClient(url, timeout=3)
    c.set("before", b"1")
    c.set("mine", b"eph", ephemeral=True)
    leader = own_cluster.leader()
    victims = [leader, (leader + 1) % 3]
    for v in victims:
        own_cluster.kill(v)
    for call in (lambda: c.set("during", b"2"), lambda: c.get("before"), lambda: c.add("n", 1),
                 lambda: c.compare_set("cas", b"", b"x"), lambda: c.get("absent", timeout=2)):
        t = time.monotonic()
        with pytest.raises(mf.StoreError) as ei:
            call()
        took = time.monotonic() - t
        assert ei.value.code == mf.SMEM_TIMEOUT, str(ei.value)
        assert took < 3 + 2, f"failed after {took:.1f}s"
        assert "etcd" in str(ei.value)
    assert "majority" in str(ei.value) or "leader" in str(ei.value) or "within" in str(ei.value), str(ei.value)
    for v in victims:
        own_cluster.start_member(v)
    own_cluster.wait_healthy(30)
    # The same client works again, with its data and its ephemeral key.
    t = time.monotonic()
    while True:
        try:
            c.set("after", b"3")
            break
        except mf.StoreError:
            assert time.monotonic() - t < 20
    assert c.get("before") == b"1" and c.get("after") == b"3"
    assert c.get("mine") == b"eph"
    assert c.add("n", 1) == 1  # the failed add did not land
    c.close()


def test_transfer_engine_on_etcd(etcd_store, spawn):
    url = etcd_store.url
    size = 4 << 20
    parent, child = spawn.Pipe()
    p = spawn.Process(target=_te_target.serve, args=(url, "127.0.0.1:0", size, child, None))
    p.start()
    assert parent.poll(60), "target did not start"
    msg = parent.recv()
    assert msg[0] == "ready", msg
    _, session, peer_addr, _ = msg
    engine = mf.TransferEngine()
    assert engine.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    local = mmap.mmap(-1, size)
    addr = _te_target.buffer_address(local)
    assert engine.register_memory(addr, size) == 0, mf.get_last_err_msg()
    data = bytes(range(256)) * (size // 256)
    local[:] = data
    assert engine.transfer_sync_write(session, addr, peer_addr, size) == 0, mf.get_last_err_msg()
    parent.send(("hash", 0, size))
    assert parent.recv() == hashlib.sha256(data).hexdigest()
    parent.send(("stop",))
    assert parent.recv() == "stopped"
    p.join(30)
    engine.destroy()


def test_share_memory_on_etcd(etcd_store, spawn):
    world, size = 3, 2 << 20
    out = spawn.Queue()
    procs = [spawn.Process(target=_workers.shm_rank, args=(etcd_store.url, world, r, size, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len({g for _, g, *_ in results}) == 1
    for rank, _, seen, gathered, ctx, _, _ in results:
        assert all(seen), rank
        assert gathered == b"".join(bytes([r]) * 4 for r in range(world))
        assert ctx == b"ctx-from-0"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed to make test certificates")
def test_tls_to_etcd(tmp_path, spawn):
    need_etcd()
    from test_tls import make_pki

    pki = make_pki(tmp_path, "etcd")
    with LocalEtcdCluster(3, tls=pki) as cluster:
        url = cluster.url(_prefix())
        info = f"ca={pki['ca']};cert={pki['cert']};key={pki['key']}"
        for tls_info, want in [(info, "ok"), ("", "refused")]:
            out = spawn.Queue()
            p = spawn.Process(target=_etcd_workers.tls_client, args=(url, tls_info, out))
            p.start()
            r = out.get(timeout=60)
            p.join(30)
            assert r[0] == want, r
            if want == "ok":
                assert r[2] == "over-tls"
            else:
                assert r[1] == mf.SMEM_NOT_CONNECTED, r
