"""Config store benchmark: ops/s and latency of set/get/add/compare_set on our embedded store,
on our store over a 3-member etcd cluster, on memfabric-hybrid 1.3.0's own config store and on
torch's TCPStore, plus the time for N ranks to rendezvous and all_gather 64 bytes (embedded and
etcd).

    python -m memfabric_hybrid.bench store [--seconds 1] [--clients 1,8] [--sizes 64,1048576]
                                           [--ranks 1024] [--etcd-ranks N] [--no-etcd]
                                           [--no-upstream] [--no-torch] [--json FILE]

Servers run in this process (etcd: three local members on loopback, data in /dev/shm, see
memfabric_hybrid.etcd_cluster); clients run in their own processes (spawn) so that eight
clients really are concurrent. Our store is measured twice: as clients on its host reach it
(its local Unix socket, and after a client's first 16 calls the shared-memory channel beside
it) and over TCP loopback (as clients on other hosts reach it). Every memfabric ``set`` is acknowledged by the server (on etcd:
committed by a majority); TCPStore's ``set`` is not, so its set figures measure sending, not
storing. ``multi_set`` is our bulk write. The etcd column is skipped, saying why, where etcd is
not installed.

The upstream column is memfabric-hybrid 1.3.0 (PyPI ``memfabric-hybrid``, fetched into
.cache/upstream-1.3.0 on first use): its store server (in a process of its own), and clients that
are a small C++ program calling its C++ store client (it has no Python one), see
memfabric_hybrid.bench._upstream_store.
Its clients reach the store over TCP, so "ours tcp" is the like-for-like comparison; they are
C++ where the other columns' clients are Python. Before the cells, that client is checked on a
fresh server (random round trips up to the largest size, add, compare_set); where it cannot be
built, checked or run (no network for the wheel, no compiler, not Linux x86_64), the column is
skipped, saying why.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
import uuid
from typing import Any

from . import _upstream_store as upstream
from ._util import free_port, percentile, table, write_json

OPS = ("set", "get", "add", "compare_set")


# ---- clients (run in worker processes) ----------------------------------------------------------

def _connect(backend: str, addr: Any):
    """``addr``: the store URL (memfabric, etcd) or TCPStore's port."""
    if backend == "memfabric-tcp":
        import os

        os.environ["MF_STORE_NO_LOCAL_SOCKET"] = "1"  # this client process only
    if backend in ("memfabric", "memfabric-tcp", "etcd"):
        import memfabric_hybrid as mf

        c = mf.StoreClient(addr, timeout=60)
        want = {"memfabric": "local socket", "memfabric-tcp": "tcp", "etcd": "etcd"}[backend]
        assert c.connection == want, (backend, c.connection)
        return c
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", addr, is_master=False, timeout=__import__("datetime").timedelta(seconds=60))


def _client_loop(backend: str, addr: Any, op: str, size: int, seconds: float, idx: int, go, out) -> None:
    store = _connect(backend, addr)
    value_a, value_b = b"a" * size, b"b" * size
    key = f"bench/{op}/{idx}"
    if op == "get":
        key = "bench/get"
    if op == "compare_set":
        store.set(key, value_a)
    if backend in ("memfabric", "memfabric-tcp", "etcd"):
        fn = {
            "set": lambda i: store.set(key, value_a),
            "get": lambda i: store.get(key),
            "add": lambda i: store.add(key, 1),
            "compare_set": lambda i: store.compare_set(key, value_a, value_b) if i % 2 == 0 else store.compare_set(key, value_b, value_a),
        }[op]
    else:
        fn = {
            "set": lambda i: store.set(key, value_a),
            "get": lambda i: store.get(key),
            "add": lambda i: store.add(key, 1),
            "compare_set": lambda i: store.compare_set(key, value_a, value_b) if i % 2 == 0 else store.compare_set(key, value_b, value_a),
        }[op]
    for i in range(20):  # warm-up
        fn(i)
    if op == "compare_set" and store.get(key) != value_a:
        fn(1)
    go.wait()
    lat = []
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    i = 0
    while True:
        t0 = clock()
        fn(i)
        t1 = clock()
        lat.append(t1 - t0)
        i += 1
        if t1 >= end:
            break
    if op == "compare_set":
        assert store.get(key) in (value_a, value_b)
    out.put((len(lat), clock() - start, lat, getattr(store, "connection", "tcp")))


def _measure(backend: str, addr: Any, op: str, size: int, clients: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client_loop, args=(backend, addr, op, size, seconds, i, go, out)) for i in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.5 + 0.15 * clients)  # let every client connect and warm up
    go.set()
    results = [out.get(timeout=120 + seconds) for _ in procs]
    for p in procs:
        p.join(30)
    ops = sum(r[0] for r in results)
    wall = max(r[1] for r in results)
    lat = sorted(x for r in results for x in r[2])
    return {"ops_per_s": ops / wall, "p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6, "ops": ops,
            "connection": sorted({r[3] for r in results})}


# ---- servers (in this process) -----------------------------------------------------------------

class _Server:
    """One cell's store: a fresh embedded server, a fresh prefix of the etcd cluster, or a
    fresh TCPStore. ``addr`` is what clients connect to."""

    def __init__(self, backend: str, etcd: Any = None):
        self.backend = backend
        self.port = free_port()
        self.addr: Any = self.port
        if backend in ("memfabric", "memfabric-tcp"):
            import memfabric_hybrid as mf

            self._server = mf.start_config_store(f"tcp://127.0.0.1:{self.port}")
            self._client = mf.StoreClient(self._server.url)
            self.addr = self._server.url
        elif backend == "etcd":
            import memfabric_hybrid as mf

            self.addr = etcd.url(f"bench/{uuid.uuid4().hex[:12]}")
            self._server = None
            self._client = mf.StoreClient(self.addr)
        else:
            from datetime import timedelta

            from torch.distributed import TCPStore

            self._server = TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
            self._client = self._server

    def set(self, key: str, value: bytes) -> None:
        self._client.set(key, value)

    def close(self) -> None:
        if self.backend in ("memfabric", "memfabric-tcp", "etcd"):
            self._client.close()
        if self.backend in ("memfabric", "memfabric-tcp"):
            self._server.close()
        self._server = self._client = None


def _torch_available() -> str | None:
    try:
        import torch.distributed  # noqa: F401

        return None
    except Exception as e:  # ImportError, or a torch without distributed
        return f"torch not importable ({e}); install it with: pip install torch (scripts/bench.sh does)"


# ---- rendezvous ---------------------------------------------------------------------------------

def _rendezvous_proc(url: str, name: str, world: int, threads: int, go, out) -> None:
    import memfabric_hybrid as mf

    payload = b"x" * 64
    ok = []
    errors = []

    def member():
        try:
            g = mf.StoreGroup(url, name, world_size=world, timeout=120)
            got = g.all_gather(payload)
            ok.append(len(got) == world and all(p == payload for p in got))
        except Exception as e:  # reported, not hidden
            errors.append(repr(e))

    ts = [threading.Thread(target=member) for _ in range(threads)]
    go.wait()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((time.monotonic(), sum(ok), errors[:3]))


def rendezvous(world: int, procs: int = 4, url: str | None = None) -> dict[str, Any]:
    """``world`` ranks (threads in ``procs`` processes, one client each) join one group and
    all_gather 64 bytes; on a fresh embedded store, or on ``url`` (an etcd prefix)."""
    import memfabric_hybrid as mf

    server = mf.start_config_store("tcp://127.0.0.1:0") if url is None else None
    if server is not None:
        url = server.url
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    per = [world // procs + (1 if i < world % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=_rendezvous_proc, args=(url, "rdv", world, n, go, out)) for n in per]
    for p in ps:
        p.start()
    time.sleep(2.0)  # interpreters up and imports done before the clock starts
    t0 = time.monotonic()
    go.set()
    res = [out.get(timeout=300) for _ in ps]
    for p in ps:
        p.join(30)
    if server is not None:
        server.close()
    took = max(r[0] for r in res) - t0
    good = sum(r[1] for r in res)
    errs = [e for r in res for e in r[2]]
    return {"ranks": world, "seconds": took, "verified_members": good, "errors": errs}


# ---- main ---------------------------------------------------------------------------------------

def _etcd_missing() -> str | None:
    from memfabric_hybrid.etcd_cluster import why_no_etcd

    return why_no_etcd()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m memfabric_hybrid.bench store", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.0, help="measuring time per cell")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--sizes", default="64,1048576", help="value sizes in bytes")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--ranks", type=int, default=1024, help="ranks for the rendezvous test (0: skip)")
    p.add_argument("--etcd-ranks", type=int, default=None,
                   help="ranks for the etcd rendezvous (default: --ranks; 0: skip)")
    p.add_argument("--no-etcd", action="store_true", help="skip the etcd column")
    p.add_argument("--no-upstream", action="store_true", help="skip the memfabric-hybrid 1.3.0 column")
    p.add_argument("--no-torch", action="store_true", help="skip the TCPStore column")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    clients = [int(x) for x in a.clients.split(",") if x]
    sizes = [int(x) for x in a.sizes.split(",") if x]
    ops = [o for o in a.ops.split(",") if o]
    torch_missing = "skipped by --no-torch" if a.no_torch else _torch_available()
    etcd_missing = "skipped by --no-etcd" if a.no_etcd else _etcd_missing()
    backends = (["memfabric", "memfabric-tcp"] + ([] if etcd_missing else ["etcd"])
                + ([] if torch_missing else ["tcpstore"]))
    if etcd_missing:
        print(f"etcd column: {etcd_missing}")
    if torch_missing:
        print(f"TCPStore column: {torch_missing}")
    upstream_missing = "skipped by --no-upstream" if a.no_upstream else None
    if upstream_missing is None:
        checked, upstream_missing = upstream.prepare(max(sizes, default=64))
        if checked:
            backends.append("upstream")
            print(f"upstream {upstream.VERSION} column: its C++ client checked ({checked})")
    if upstream_missing:
        print(f"upstream {upstream.VERSION} column: {upstream_missing}")
    cluster = None
    if not etcd_missing:
        from memfabric_hybrid.etcd_cluster import LocalEtcdCluster

        # Room for the 1 MiB cells: etcd keeps every revision until it compacts.
        cluster = LocalEtcdCluster(3, extra_args=["--quota-backend-bytes", str(8 << 30)])
    try:
        return _run(a, clients, sizes, ops, backends, cluster, torch_missing, etcd_missing, upstream_missing)
    finally:
        if cluster is not None:
            cluster.stop()


def _run(a: argparse.Namespace, clients: list[int], sizes: list[int], ops: list[str], backends: list[str],
         cluster: Any, torch_missing: str | None, etcd_missing: str | None, upstream_missing: str | None) -> int:
    rows, figures = [], []
    for op in ops:
        for size in sizes:
            if op == "add" and size != sizes[0]:
                continue  # a counter has one size
            for n in clients:
                cell: dict[str, Any] = {"op": op, "value_bytes": size if op != "add" else 8, "clients": n}
                for b in backends:
                    if b == "upstream":  # its own server per cell, in its own process
                        try:
                            cell[b] = upstream.measure(op, size, n, a.seconds)
                        except upstream.UpstreamError as e:
                            cell[b] = {"error": str(e)}
                            print(f"  upstream {upstream.VERSION}, {op} {cell['value_bytes']} B x{n}: failed: {e}",
                                  flush=True)
                        continue
                    srv = _Server(b, cluster)
                    if op == "get":
                        srv.set("bench/get", b"g" * size)
                    cell[b] = _measure(b, srv.addr, op, size, n, a.seconds)
                    srv.close()
                figures.append(cell)
                nan = {"ops_per_s": float("nan"), "p50_us": float("nan"), "p99_us": float("nan")}
                ours, etcd, theirs = cell["memfabric"], cell.get("etcd", nan), cell.get("tcpstore", nan)
                ours_tcp = cell["memfabric-tcp"]
                up = cell["upstream"] if "ops_per_s" in cell.get("upstream", {}) else nan
                rows.append([op, cell["value_bytes"], n,
                             ours["ops_per_s"], ours["p50_us"], ours["p99_us"],
                             ours_tcp["ops_per_s"], ours_tcp["p50_us"],
                             etcd["ops_per_s"], etcd["p50_us"], etcd["p99_us"],
                             up["ops_per_s"], up["p50_us"], up["p99_us"],
                             theirs["ops_per_s"], theirs["p50_us"], theirs["p99_us"],
                             ours_tcp["ops_per_s"] / up["ops_per_s"],
                             ours["ops_per_s"] / theirs["ops_per_s"],
                             ours_tcp["ops_per_s"] / theirs["ops_per_s"]])
                print(f"  measured {op} {cell['value_bytes']} B x{n}", flush=True)
    print()
    print(table(["op", "value B", "clients", "ours ops/s", "p50 us", "p99 us",
                 "ours tcp ops/s", "p50 us",
                 "etcd ops/s", "p50 us", "p99 us",
                 f"upstream {upstream.VERSION} ops/s", "p50 us", "p99 us",
                 "TCPStore ops/s", "p50 us", "p99 us",
                 "ours tcp/upstream", "ours/TCPStore", "ours tcp/TCPStore"], rows))
    print("ours: clients on the store's host: its local socket, then (after 16 calls) a shared-memory "
          "channel beside it; ours tcp: the same over TCP loopback (MF_STORE_NO_LOCAL_SOCKET=1), as "
          "clients on other hosts reach it")
    if "upstream" in backends:
        print(f"upstream {upstream.VERSION}: memfabric-hybrid's own config store (its server, and its C++ "
              "client in C++ processes) over TCP loopback: compare with ours tcp")
    result: dict[str, Any] = {"cells": figures, "tcpstore": torch_missing or "measured",
                              "etcd": etcd_missing or "measured (3 local members)",
                              "upstream": upstream_missing or f"measured (memfabric-hybrid {upstream.VERSION}, "
                                                              "C++ clients over TCP loopback)"}

    def say(what: str, r: dict[str, Any]) -> None:
        print(f"rendezvous + all_gather(64 B) of {r['ranks']} ranks (one connection each), {what}: "
              f"{r['seconds']:.3f} s, {r['verified_members']} members verified"
              + (f", errors: {r['errors']}" if r["errors"] else ""))

    print()
    if a.ranks > 0:
        r = rendezvous(a.ranks)
        result["rendezvous"] = r
        say("embedded store", r)
    etcd_ranks = a.ranks if a.etcd_ranks is None else a.etcd_ranks
    if cluster is not None and etcd_ranks > 0:
        r = rendezvous(etcd_ranks, url=cluster.url(f"bench/rdv-{uuid.uuid4().hex[:12]}"))
        result["rendezvous_etcd"] = r
        say("etcd", r)
    write_json(a.json, result)
    return 0
