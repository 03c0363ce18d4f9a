"""Shared fixtures: an embedded config store, an etcd cluster, free ports, spawn-based process
helpers."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import memfabric_hybrid as mf  # noqa: E402
from memfabric_hybrid.etcd_cluster import LocalEtcdCluster, why_no_etcd  # noqa: E402


# Driver paths that do not exist: makes the device backends' lookups deterministic.
NO_CUDA = "/nonexistent/mf-test/libcuda.so.1"
NO_ASCEND = "/nonexistent/mf-test/libascendcl.so"


def run_child(code: str, **env: str) -> dict:
    """Runs ``code`` in a fresh interpreter with ``env`` added; it prints one JSON line. (A
    process chooses its device backend once: settings of the environment need a new one.)"""
    full = dict(os.environ, **env)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ranks(target, world: int, args_of, timeout: float = 120.0) -> list:
    """Runs ``target(*args_of(rank, q))`` in ``world`` spawned processes and returns what each
    put on ``q``, sorted. A rank that dies without reporting fails the test at once, with its
    exit code (a crash shows as a crash, not as a timeout); every process is reaped."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=args_of(r, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                results.append(q.get(timeout=0.5))
            except queue.Empty:
                died = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if died:
                    pytest.fail(f"rank processes died without reporting (rank, exit code): {died}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{world - len(results)} of {world} ranks did not report within {timeout} s")
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join(5)
    return sorted(results)


def join_bm(url: str, world: int, rank: int) -> None:
    """In a rank process: ``bm.initialize`` as rank ``rank`` of ``world`` on the store at ``url``
    (started elsewhere), data paths on loopback."""
    import memfabric_hybrid as m

    cfg = m.bm.BmConfig()
    cfg.rank_id = rank
    cfg.start_store = False
    cfg.set_nic("lo")
    assert m.bm.initialize(url, world, 0, cfg) == 0, m.get_last_err_msg()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store():
    """A config store server in this process on a free port."""
    server = mf.start_config_store("tcp://127.0.0.1:0")
    yield server
    server.close()


@pytest.fixture
def spawn():
    """multiprocessing with the spawn start method (threads do not survive fork)."""
    return mp.get_context("spawn")


def need_etcd() -> None:
    """Skips the calling test when no etcd server binary is installed."""
    reason = why_no_etcd()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def etcd_cluster():
    """A 3-member etcd cluster on loopback ports, shared by the session's tests (each test
    uses a prefix of its own); skips when etcd is not installed."""
    need_etcd()
    cluster = LocalEtcdCluster(3)
    yield cluster
    cluster.stop()


class EtcdStore:
    """Stands where a ConfigStoreServer does for etcd: ``url`` names a fresh key prefix."""

    def __init__(self, cluster: LocalEtcdCluster) -> None:
        self.cluster = cluster
        self.url = cluster.url(f"pytest/{uuid.uuid4().hex[:12]}")

    def close(self) -> None:
        pass


@pytest.fixture
def etcd_store(etcd_cluster):
    """The shared etcd cluster under a prefix of this test's own."""
    return EtcdStore(etcd_cluster)
