"""Share Memory with 4 ranks: each writes its slot through the GVA pointer, barrier, then reads
every slot directly; all_gather and set_context too.

    python examples/shm_barrier_allgather.py [--ranks 4]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import socket


def rank_main(url: str, world: int, rank: int, out) -> None:
    import memfabric_hybrid as mf

    assert mf.shm.initialize(url, world, rank, 0, mf.shm.ShmConfig()) == 0, mf.get_last_err_msg()
    s = mf.shm.create(0, world, rank, 2 << 20)
    mine = s.gva + rank * s.stride
    ctypes.memmove(mine, f"slot of rank {rank}".encode(), 14)  # a plain store into shared memory
    s.barrier()
    slots = [ctypes.string_at(s.gva + r * s.stride, 14).decode() for r in range(world)]
    gathered = s.all_gather(rank.to_bytes(4, "little"))
    if rank == 0:
        s.set_context(b"set by rank 0")
    s.barrier()
    out.put((rank, slots, [int.from_bytes(gathered[i:i + 4], "little") for i in range(0, len(gathered), 4)],
             s.get_context().decode(), s.topology_can_reach((rank + 1) % world)))
    s.barrier()
    s.destroy()
    mf.shm.uninitialize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    world = p.parse_args().ranks
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{sk.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(url, world, r, out)) for r in range(world)]
    for pr in procs:
        pr.start()
    for rank, slots, gathered, ctx_bytes, reach in sorted(out.get(timeout=120) for _ in procs):
        print(f"rank {rank}: read slots {slots}; all_gather -> {gathered}; context {ctx_bytes!r}; "
              f"reach bits to next rank {reach}")
    for pr in procs:
        pr.join(60)
    if any(pr.exitcode for pr in procs):
        raise SystemExit("a rank failed")


if __name__ == "__main__":
    main()
