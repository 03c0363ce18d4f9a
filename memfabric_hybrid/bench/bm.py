"""Big Memory copy benchmark: copy_data H2G / G2H between this rank's host buffer and the
other rank's part of the global address space, per size, with single-thread memcpy of the
same sizes in the same run.

    python -m memfabric_hybrid.bench bm [--sizes 4096,65536,1048576,16777216,67108864] [--seconds 0.5]
                                        [--no-cross-host] [--json FILE]

Two ranks (spawned processes); rank 0 measures, rank 1 holds its part. Same host: the part is
mapped (memory copies). Cross host: the ranks live in two network namespaces joined by a veth
pair and reach each other's parts over tcp (skipped with the reason where namespaces cannot be
made).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import multiprocessing as mp
import time
from typing import Any

from ._util import free_port, percentile, table, write_json


def _rank(url: str, rank: int, sizes: list[int], seconds: float, out, cross_host: bool = False) -> None:
    import os

    if cross_host:
        os.environ["MF_TRANSPORT"] = "tcp"
    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank
    assert mf.bm.initialize(url, 2, 0, cfg) == 0, mf.get_last_err_msg()
    top = max(sizes)
    big = mf.bm.create(0, top)
    host = mmap.mmap(-1, top)
    host.write(b"\x5a" * top)
    h = ctypes.addressof(ctypes.c_char.from_buffer(host))
    other = mmap.mmap(-1, top)
    o = ctypes.addressof(ctypes.c_char.from_buffer(other))
    # `other` is registered with the object (memcpy path); `host` is not (kernel-checked path).
    assert big.register(o, top) == 0, mf.get_last_err_msg()
    if rank == 0:
        peer = big.peer_rank_ptr(1)
        rows = []
        for n in sizes:
            cell: dict[str, Any] = {"bytes": n}
            unregistered = [] if cross_host else [  # remote parts need a registered buffer
                ("H2G", lambda: big.copy_data(h, peer, n, BmCopyType.H2G)),
                ("G2H", lambda: big.copy_data(peer, h, n, BmCopyType.G2H)),
            ]
            for name, fn in unregistered + [
                ("H2G reg", lambda: big.copy_data(o, peer, n, BmCopyType.H2G)),
                ("G2H reg", lambda: big.copy_data(peer, o, n, BmCopyType.G2H)),
                ("memcpy", lambda: ctypes.memmove(o, h, n)),
            ]:
                for _ in range(3):
                    fn()
                lat = []
                end = time.perf_counter() + seconds
                while True:
                    t0 = time.perf_counter()
                    rc = fn()
                    t1 = time.perf_counter()
                    if name != "memcpy" and rc != 0:
                        raise RuntimeError(f"{name} {n}: {mf.get_last_err_msg()}")
                    lat.append(t1 - t0)
                    if t1 > end and len(lat) >= 5:
                        break
                lat.sort()
                p50 = percentile(lat, 50)
                cell[name] = {"p50_us": p50 * 1e6, "p99_us": percentile(lat, 99) * 1e6, "gb_s": n / p50 / 1e9}
            rows.append(cell)
        out.put(rows)
    big.wait()
    big.destroy()
    mf.bm.uninitialize()


def _run(sizes: list[int], seconds: float, cross_host: bool) -> list[dict[str, Any]] | str:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    if not cross_host:
        url = f"tcp://127.0.0.1:{free_port()}"
        procs = [ctx.Process(target=_rank, args=(url, r, sizes, seconds, out)) for r in range(2)]
        for pr in procs:
            pr.start()
        rows = out.get(timeout=600)
        for pr in procs:
            pr.join(60)
        return rows
    from .. import _netns

    why = _netns.unavailable_reason()
    if why:
        return f"skipped: network namespaces unavailable ({why})"
    with _netns.TwoHosts(net=215) as hosts:
        url = f"tcp://{hosts.ip_a}:{free_port()}"
        procs = [
            ctx.Process(target=_netns.run_in, args=(hosts.a, _rank, url, 0, sizes, seconds, out, True)),
            ctx.Process(target=_netns.run_in, args=(hosts.b, _rank, url, 1, sizes, seconds, out, True)),
        ]
        for pr in procs:
            pr.start()
        rows = out.get(timeout=600)
        for pr in procs:
            pr.join(60)
        return rows


def _gb(c: dict[str, Any], k: str) -> float:
    return c[k]["gb_s"] if k in c else float("nan")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m memfabric_hybrid.bench bm", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,65536,1048576,16777216,67108864")
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--no-cross-host", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",") if x]
    result: dict[str, Any] = {}
    print("H2G/G2H: unregistered host buffer (kernel-checked copy); 'reg': buffer registered with")
    print("BigMemory.register (memcpy, parallel from 4 MiB; tcp across hosts). memcpy: one thread.")
    for path in ["same-host"] + ([] if a.no_cross_host else ["cross-host"]):
        rows = _run(sizes, a.seconds, path == "cross-host")
        result[path] = rows
        print(f"\n{path}:")
        if isinstance(rows, str):
            print(rows)
            continue
        print(table(
            ["bytes", "H2G GB/s", "G2H GB/s", "H2G reg GB/s", "G2H reg GB/s", "memcpy GB/s", "H2G reg p50 us",
             "G2H reg p50 us", "reg H2G/memcpy", "reg G2H/memcpy"],
            [[c["bytes"], _gb(c, "H2G"), _gb(c, "G2H"), _gb(c, "H2G reg"), _gb(c, "G2H reg"), _gb(c, "memcpy"),
              c["H2G reg"]["p50_us"], c["G2H reg"]["p50_us"],
              _gb(c, "H2G reg") / _gb(c, "memcpy"), _gb(c, "G2H reg") / _gb(c, "memcpy")] for c in rows]))
    write_json(a.json, result)
    return 0
