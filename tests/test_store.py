"""Config store and groups from Python, with real processes."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest

import memfabric_hybrid as mf
from conftest import free_port
import _workers


@pytest.fixture(params=["embedded", "etcd"])
def store(request):
    """The same tests against both backends: an embedded server, and a prefix of a 3-member
    etcd cluster (skipped, saying why, where etcd is not installed)."""
    if request.param == "etcd":
        yield request.getfixturevalue("etcd_store")
        return
    server = mf.start_config_store("tcp://127.0.0.1:0")
    yield server
    server.close()


@pytest.fixture
def embedded_store():
    """Tests of the embedded server itself (its port, its wire format)."""
    server = mf.start_config_store("tcp://127.0.0.1:0")
    yield server
    server.close()


def test_client_operations(store):
    with mf.StoreClient(store.url, timeout=5) as c:
        c.set("a", b"1")
        c.set("s", "text")
        c.set("ba", bytearray(b"xy"))
        c.set("mv", memoryview(b"mv"))
        assert c.get("a") == b"1" and c.get("s") == b"text"
        assert c.get("ba") == b"xy" and c.get("mv") == b"mv"
        assert c.add("n", 2) == 2 and c.add("n", -5) == -3 and c.add("n") == -2
        assert c.compare_set("cas", b"", b"first") == b"first"
        assert c.compare_set("cas", b"nope", b"second") == b"first"
        assert c.compare_set("cas", b"first", b"second") == b"second"
        assert c.append("log", b"ab") == 2 and c.append("log", b"c") == 3
        assert c.exists("log") and not c.exists("missing")
        assert c.check(["a", "s"]) and not c.check(["a", "missing"])
        c.multi_set(["m/1", "m/2"], [b"x", b"y"])
        assert c.multi_get(["m/1", "m/2"]) == [b"x", b"y"]
        assert c.list("m/") == ["m/1", "m/2"]
        assert c.num_keys() == len(c.list())
        assert c.delete("a") and not c.delete_key("a")
        with pytest.raises(KeyError):
            c.get("a", wait=False)
        t = time.monotonic()
        with pytest.raises(mf.StoreTimeoutError) as ei:
            c.get("never", timeout=0.2)
        assert ei.value.code == mf.SMEM_TIMEOUT
        assert time.monotonic() - t < 3
        with pytest.raises(mf.StoreTimeoutError):
            c.wait(["never"], timeout=0.2)
        with pytest.raises(mf.StoreError) as ei:
            c.add("s", 1)  # not a counter
        assert ei.value.code == -2000
        with pytest.raises(mf.StoreError) as ei:
            c.multi_get(["m/1", "nope"], wait=False)
        assert ei.value.code == mf.SMEM_NOT_EXIST
        big = bytes(range(256)) * 4096  # 1 MiB
        c.set("big", big)
        assert c.get("big") == big
        assert c.ping() > 0
    with pytest.raises(mf.StoreError):
        c.get("s")  # closed


def test_client_type_errors(store):
    with mf.StoreClient(store.url, timeout=5) as c:
        with pytest.raises(TypeError):
            c.set("k", 5)
        with pytest.raises(TypeError):
            c.set(5, b"v")
        with pytest.raises(TypeError):
            c.add("k", "1")
        with pytest.raises(ValueError):
            c.get("k", timeout=-1)
        with pytest.raises(ValueError):
            c.multi_set(["a", "b"], [b"1"])
    with pytest.raises(ValueError):
        mf.StoreClient(store.url, timeout=0)


@pytest.mark.parametrize("backend", ["embedded", "etcd"])
def test_missing_store_fails_within_timeout(backend):
    missing, host_name = {
        "embedded": (f"tcp://127.0.0.1:{free_port()}", "tcp://no-such-host:1"),
        "etcd": (f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/p", "etcd://no-such-host:1/p"),
    }[backend]
    t = time.monotonic()
    with pytest.raises(mf.StoreError) as ei:
        mf.StoreClient(missing, timeout=0.5)
    assert ei.value.code == mf.SMEM_NOT_CONNECTED
    assert time.monotonic() - t < 3
    with pytest.raises(mf.StoreError) as ei:
        mf.StoreClient(host_name, timeout=0.5)
    assert ei.value.code == mf.SMEM_INVALID_PARAM


def test_32_processes_rendezvous_barrier_all_gather(store, spawn):
    world = 32
    out = spawn.Queue()
    procs = [spawn.Process(target=_workers.group_member, args=(store.url, world, out)) for _ in range(world)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    ranks = sorted(r for r, _, _ in results)
    assert ranks == list(range(world))
    pid_of = {r: pid for r, pid, _ in results}
    for _, _, pieces in results:
        assert pieces == [f"rank={r};pid={pid_of[r]}".encode() for r in range(world)]


def test_killed_rank_fails_the_others_barrier(store, spawn):
    world, victim = 4, 2
    out = spawn.Queue()
    procs = [spawn.Process(target=_workers.doomed_member, args=(store.url, world, out, victim)) for _ in range(world)]
    for p in procs:
        p.start()
    joined = [out.get(timeout=60) for _ in procs]
    victim_pid = next(pid for tag, r, pid in joined if r == victim)
    time.sleep(0.5)  # the others are now waiting in the barrier
    victim_proc = next(p for p in procs if p.pid == victim_pid)
    victim_proc.kill()
    reports = [out.get(timeout=30) for _ in range(world - 1)]
    for tag, rank, took, code, msg in reports:
        assert tag == "failed", reports
        assert code == mf.MF_PEER_GONE, msg
        assert took < 10, f"rank {rank} needed {took:.1f}s"
        assert "barrier" in msg and "member" in msg
    for p in procs:
        p.join(30)


def _start_store_process(url: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-m", "memfabric_hybrid.store_server", "--listen", url],
        stdout=subprocess.PIPE, text=True,
    )
    line = p.stdout.readline()
    assert line.startswith("listening on"), line
    return p


def _stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()
    p.stdout.close()


def test_store_restart_is_reconnected():
    url = f"tcp://127.0.0.1:{free_port()}"
    server = _start_store_process(url)
    try:
        c = mf.StoreClient(url, timeout=20)
        c.set("before", b"1")
        c.set("me", b"alive", ephemeral=True)
        _stop(server)
        server = _start_store_process(url)
        c.set("after", b"2")  # reconnects transparently
        assert c.get("after") == b"2"
        assert not c.exists("before")  # the in-memory store restarted empty
        assert c.get("me", wait=False) == b"alive"  # liveness re-published
        c.close()
    finally:
        _stop(server)


def test_store_process_stops_cleanly_on_sigterm():
    url = f"tcp://127.0.0.1:{free_port()}"
    server = _start_store_process(url)
    server.terminate()
    out, _ = server.communicate(timeout=10)
    assert server.returncode == 0
    assert "stopped" in out


def _send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        try:
            return s.recv(64)
        except ConnectionResetError:
            return b""


def test_malformed_frames_do_not_crash_the_server(embedded_store):
    store = embedded_store
    port = store.port
    assert _send_raw(port, struct.pack(">IBB", 1 << 30, 1, 2)) == b""  # 1 GiB length prefix
    assert _send_raw(port, struct.pack(">IBB", 2, 77, 1)) == b""  # unknown version
    assert _send_raw(port, struct.pack(">IBB", 3, 1, 250) + b"x") == b""  # unknown kind
    assert _send_raw(port, b"\x00\x00\x00\x06\x01\x02\xff\xff\xff\xff") == b""  # forged length
    assert _send_raw(port, b"GET / HTTP/1.0\r\n\r\n") == b""
    with mf.StoreClient(store.url, timeout=5) as c:
        c.set("ok", b"1")
        assert c.get("ok") == b"1"


def test_group_argument_errors(store):
    with pytest.raises(mf.StoreError) as ei:
        mf.StoreGroup(store.url, "g", world_size=0)
    assert ei.value.code == -2000
    with pytest.raises(mf.StoreError):
        mf.StoreGroup(store.url, "g", world_size=1025)
    with pytest.raises(mf.StoreError):
        mf.StoreGroup(store.url, "g", world_size=2, rank=2)
    with pytest.raises(TypeError):
        mf.StoreGroup(store.url, "g", world_size="2")
    g = mf.StoreGroup(store.url, "solo", world_size=1, timeout=5)
    assert (g.rank, g.world_size) == (0, 1)
    g.barrier()
    assert g.all_gather(b"only") == [b"only"]
    g.leave()
    with pytest.raises(mf.StoreError):
        g.barrier()


def test_same_host_clients_take_the_local_socket(embedded_store):
    store = embedded_store
    c = mf.StoreClient(store.url, timeout=5)
    assert c.connection == "local socket"
    c.set("k", b"v", ephemeral=True)
    assert c.get("k") == b"v"
    # Turned off (both sides read the variable; the client's side is enough here): plain TCP.
    code = (
        "import memfabric_hybrid as mf, sys\n"
        f"c = mf.StoreClient({store.url!r}, timeout=5)\n"
        "c.set('t', b'1')\n"
        "print(c.connection)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "MF_STORE_NO_LOCAL_SOCKET": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tcp"
    assert c.get("t") == b"1"
    c.close()
    assert c.connection == "none"


_COUNTING_CLIENT = (
    "import memfabric_hybrid as mf, sys\n"
    "c = mf.StoreClient(sys.argv[1], timeout=10)\n"
    "for _ in range(3000):\n"
    "    c.add('count', 1)\n"
    "print(c.connection)\n"
)


def test_busy_clients_on_shared_memory_and_tcp_count_exactly(embedded_store):
    # Four processes add to one counter: two take the shared-memory channel after their first
    # calls, two are kept on TCP. Every add lands once.
    import os

    env_tcp = {**os.environ, "MF_STORE_NO_LOCAL_SOCKET": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _COUNTING_CLIENT, embedded_store.url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env_tcp if i % 2 else dict(os.environ))
        for i in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert sorted(o[0].strip() for o in outs) == ["shared memory", "shared memory", "tcp", "tcp"]
    c = mf.StoreClient(embedded_store.url, timeout=5)
    assert c.get("count") == b"12000"
    # The channel can be turned off on the client side.
    out = subprocess.run([sys.executable, "-c", _COUNTING_CLIENT, embedded_store.url],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MF_STORE_NO_SHM_CHANNEL": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "local socket"
    assert c.get("count") == b"15000"
