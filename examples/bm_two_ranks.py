"""Two Big Memory ranks on one host: each writes into the other's part of the global address
space and reads back what the other wrote.

    python examples/bm_two_ranks.py
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import socket


def rank_main(url: str, rank: int, out) -> None:
    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank  # rank 0 starts the config store at url
    assert mf.bm.initialize(url, 2, 0, cfg) == 0, mf.get_last_err_msg()
    big = mf.bm.create(0, 8 << 20)
    big.join()
    n = 1 << 20
    host = mmap.mmap(-1, n)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(host))
    peer = 1 - rank
    host[:] = f"hello from rank {rank}".encode().ljust(n, b".")
    dst = big.peer_rank_ptr(peer)
    assert big.copy_data(addr, dst, n, BmCopyType.H2G) == 0, mf.get_last_err_msg()
    big.wait()  # both have written
    host[:] = b"\0" * n
    assert big.copy_data(big.peer_rank_ptr(rank), addr, n, BmCopyType.G2H) == 0
    out.put(f"rank {rank}: GVA {big.peer_rank_ptr(0):#x}, wrote 1 MiB to rank {peer} at {dst:#x}, "
            f"found in its own part: {host[:22].decode()!r}")
    big.wait()
    big.leave()
    big.destroy()
    mf.bm.uninitialize()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(url, r, out)) for r in range(2)]
    for p in procs:
        p.start()
    for line in sorted(out.get(timeout=120) for _ in procs):
        print(line)
    for p in procs:
        p.join(60)
    if any(p.exitcode for p in procs):
        raise SystemExit("a rank failed")


if __name__ == "__main__":
    main()
