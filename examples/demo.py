"""Multi-rank demo on an embedded config store.

Rank 0 starts the config store inside its own process (as ``start_store=True`` does), every
rank joins the group with auto-ranking, passes a barrier, and all_gathers a record of itself.

    python examples/demo.py [--ranks 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(url: str, world: int, host_store: bool, out: "mp.Queue") -> None:
    import memfabric_hybrid as mf

    server = mf.start_config_store(url) if host_store else None
    t0 = time.perf_counter()
    g = mf.StoreGroup(url, "demo", world_size=world, timeout=60)
    joined = time.perf_counter() - t0
    t1 = time.perf_counter()
    g.barrier()
    barrier_s = time.perf_counter() - t1
    me = json.dumps({"rank": g.rank, "pid": os.getpid()}).encode()
    t2 = time.perf_counter()
    everyone = [json.loads(p) for p in g.all_gather(me)]
    gather_s = time.perf_counter() - t2
    out.put((g.rank, joined, barrier_s, gather_s, everyone))
    g.barrier()
    g.leave()
    if server is not None:
        # The store lives in this rank: keep it up until every other rank has left.
        with mf.StoreClient(url) as store:
            deadline = time.monotonic() + 30
            while store.list("demo/alive/") and time.monotonic() < deadline:
                time.sleep(0.01)
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8)
    args = p.parse_args()
    url = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(url, args.ranks, i == 0, out)) for i in range(args.ranks)]
    print(f"config store embedded in the first process at {url}; starting {args.ranks} ranks")
    for pr in procs:
        pr.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for pr in procs:
        pr.join(60)
    for rank, joined, barrier_s, gather_s, everyone in results:
        pids = [e["pid"] for e in everyone]
        assert [e["rank"] for e in everyone] == list(range(args.ranks))
        print(f"rank {rank}: joined in {joined * 1e3:7.1f} ms, barrier {barrier_s * 1e6:7.0f} us, "
              f"all_gather {gather_s * 1e6:7.0f} us -> pids {pids}")
    bad = [pr.exitcode for pr in procs if pr.exitcode != 0]
    print("demo finished:", "all ranks agree on the gathered records" if not bad else f"exit codes {bad}")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
