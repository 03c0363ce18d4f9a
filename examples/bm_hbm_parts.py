"""Two Big Memory ranks with device memory (HBM parts): each rank fills its own part, copies it
into the other rank's part device to device, and reads back what the other rank sent.

The device is the accelerator this machine has (CUDA, or Ascend); where there is none, host
memory plays it (``MF_DEVICE_BACKEND=host``), which takes the same paths: parts shared through
IPC handles on one host, staged through the data server across hosts (``MF_TRANSPORT=tcp``).

    python examples/bm_hbm_parts.py            # same host
    MF_TRANSPORT=tcp python examples/bm_hbm_parts.py
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import os
import socket

MiB = 1 << 20


def rank_main(url: str, rank: int, backend: str, out) -> None:
    if backend == "host":
        os.environ["MF_DEVICE_BACKEND"] = "host"  # before the first device call of this process
    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType

    cfg = mf.bm.BmConfig()
    cfg.rank_id = rank  # rank 0 starts the config store at url
    assert mf.bm.initialize(url, 2, 0, cfg) == 0, mf.get_last_err_msg()
    n = 16 * MiB
    big = mf.bm.create(0, 2 * MiB, local_hbm_size=n)
    peer = 1 - rank
    host = mmap.mmap(-1, n)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(host))
    assert big.register(addr, n) == 0, mf.get_last_err_msg()  # network paths need it registered
    host[:] = f"rank {rank}'s device bytes ".encode().ljust(n, b"~")
    mine, theirs = big.peer_rank_ptr(rank), big.peer_rank_ptr(peer)
    half = n // 2
    # Host -> own HBM part (second half), then own part -> the other rank's part: device to device.
    assert big.copy_data(addr, mine + half, half, BmCopyType.H2G) == 0, mf.get_last_err_msg()
    src = big.gva_to_va(mine + half)  # this process's address of its own part
    assert big.copy_data(src, theirs, half, BmCopyType.L2G) == 0, mf.get_last_err_msg()
    big.wait()  # both have written
    host[:] = b"\0" * n
    assert big.copy_data(mine, addr, half, BmCopyType.G2H) == 0, mf.get_last_err_msg()
    got = host[:24].decode(errors="replace")
    want = f"rank {peer}'s device bytes "
    ok = host[:half] == want.encode().ljust(n, b"~")[:half]
    out.put(f"rank {rank}: {half >> 20} MiB from rank {peer}'s HBM part into its own, "
            f"{'verified' if ok else 'WRONG'}: {got!r}")
    big.wait()
    big.unregister(addr)
    big.destroy()
    mf.bm.uninitialize()
    if not ok:
        raise SystemExit(1)


def main() -> None:
    import memfabric_hybrid as mf

    info = mf.device_info()
    accel = [k for k in ("cuda", "ascend") if info[k]["available"]]
    backend = accel[0] if accel else "host"
    path = os.environ.get("MF_TRANSPORT", "") or "same host"
    print(f"device memory from the {backend} backend"
          + ("" if accel else " (no accelerator here: MF_DEVICE_BACKEND=host)") + f"; path: {path}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(url, r, backend, out)) for r in range(2)]
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
