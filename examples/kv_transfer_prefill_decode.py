"""Prefill/decode disaggregation: KV-cache blocks move from a prefill engine to a decode engine.

A prefill process holds a paged KV cache (torch tensor: layers x blocks x block_tokens x
kv_heads x head_dim) filled with seeded random values. For each request the decode process
allocates blocks in its own cache and asks for the prefill's blocks; the prefill engine moves
them with one ``torch_ext.transfer_blocks`` call (queued on a ``mf.Stream``); the decode process
checks every received block bit for bit. Both engines meet through an embedded config store.

    python examples/kv_transfer_prefill_decode.py [--layers 4] [--blocks 256] [--requests 8]
        [--request-blocks 32] [--transport cma|tcp]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import socket
import time
from typing import Any, List, Tuple

SEED = 1234


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cache(args: argparse.Namespace, fill: bool) -> Any:
    import torch

    shape = (args.layers, args.blocks, args.block_tokens, args.kv_heads, args.head_dim)
    if not fill:
        return torch.zeros(shape, dtype=getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(shape, generator=g).to(getattr(torch, args.dtype))


def pick_blocks(rng: random.Random, free: List[int], n: int) -> List[int]:
    """Takes n blocks from a free list the way a paged allocator does: mostly in runs."""
    start = rng.randrange(0, max(1, len(free) - n))
    taken = free[start:start + n]
    del free[start:start + n]
    return taken


def prefill_main(url: str, args: argparse.Namespace, out: "mp.Queue") -> None:
    import memfabric_hybrid as mf
    from memfabric_hybrid import torch_ext

    kv = make_cache(args, fill=True)
    engine = mf.TransferEngine()
    assert engine.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, mf.get_last_err_msg()
    torch_ext.register_kv_cache(engine, kv, block_dim=1)
    store = mf.StoreClient(url, timeout=60)
    peer = torch_ext.fetch_kv_layout(store, "kv/decode/layout", timeout=60)
    stream = mf.Stream()
    moved_blocks, busy_s = 0, 0.0
    for r in range(args.requests):
        req = json.loads(store.get(f"kv/req/{r}", True, 60))
        t0 = time.perf_counter()
        rc = torch_ext.transfer_blocks(engine, peer, req["src"], req["dst"], stream)
        rc = rc or stream.synchronize(timeout=60)
        busy_s += time.perf_counter() - t0
        store.set(f"kv/done/{r}", json.dumps({"rc": rc, "msg": mf.get_last_err_msg() if rc else ""}).encode())
        moved_blocks += len(req["src"])
    out.put(("prefill", moved_blocks, busy_s, engine.transport_for(peer.session_id)))
    store.get("kv/decode/finished", True, 60)
    torch_ext.unregister_kv_cache(engine)
    engine.destroy()


def decode_main(url: str, args: argparse.Namespace, out: "mp.Queue") -> None:
    import torch

    import memfabric_hybrid as mf
    from memfabric_hybrid import torch_ext

    kv = make_cache(args, fill=False)
    expected = make_cache(args, fill=True)  # what the prefill holds (same seed)
    engine = mf.TransferEngine()
    assert engine.initialize(url, "127.0.0.1:0", "Decode", 0) == 0, mf.get_last_err_msg()
    layout = torch_ext.register_kv_cache(engine, kv, block_dim=1)
    store = mf.StoreClient(url, timeout=60)
    torch_ext.publish_kv_layout(store, "kv/decode/layout", layout)
    rng = random.Random(SEED)
    free = list(range(args.blocks))
    verified = 0
    for r in range(args.requests):
        if len(free) < args.request_blocks:
            kv.zero_()
            free = list(range(args.blocks))
        dst = pick_blocks(rng, free, args.request_blocks)
        src = rng.sample(range(args.blocks), args.request_blocks)
        src[: len(src) // 2] = sorted(src[: len(src) // 2])  # part of a request sits in runs
        store.set(f"kv/req/{r}", json.dumps({"src": src, "dst": dst}).encode())
        done = json.loads(store.get(f"kv/done/{r}", True, 60))
        if done["rc"] != 0:
            raise SystemExit(f"request {r}: transfer failed ({done['rc']}): {done['msg']}")
        got = kv[:, dst]
        want = expected[:, src]
        if not torch.equal(got.view(torch.uint8) if got.dtype != torch.uint8 else got,
                           want.view(torch.uint8) if want.dtype != torch.uint8 else want):
            raise SystemExit(f"request {r}: received blocks differ from the prefill's")
        verified += len(dst)
    store.set("kv/decode/finished", b"1")
    out.put(("decode", verified))
    torch_ext.unregister_kv_cache(engine)
    engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--blocks", type=int, default=256, help="blocks in each engine's cache")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--request-blocks", type=int, default=32)
    p.add_argument("--transport", choices=["auto", "cma", "tcp"], default="auto")
    args = p.parse_args()
    if args.request_blocks > args.blocks:
        p.error("--request-blocks cannot exceed --blocks")
    if args.transport != "auto":
        os.environ["MF_TRANSPORT"] = args.transport
    import memfabric_hybrid as mf

    url = f"tcp://127.0.0.1:{free_port()}"
    server = mf.start_config_store(url)
    block_bytes = args.block_tokens * args.kv_heads * args.head_dim * 2 * args.layers
    print(f"KV cache: {args.layers} layers x {args.blocks} blocks x {args.block_tokens} tokens x "
          f"{args.kv_heads} heads x {args.head_dim} ({args.dtype}); {block_bytes} bytes per block id")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=f, args=(url, args, out)) for f in (decode_main, prefill_main)]
    for pr in procs:
        pr.start()
    results: List[Tuple[Any, ...]] = []
    deadline = time.monotonic() + 300
    try:
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=0.2))
            except queue.Empty:
                dead = [pr.exitcode for pr in procs if pr.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    for pr in procs:
                        pr.terminate()
                    raise SystemExit(f"a process failed or timed out (exit codes {[pr.exitcode for pr in procs]})")
    finally:
        for pr in procs:
            pr.join(60)
        server.close()
    bad = [pr.exitcode for pr in procs if pr.exitcode != 0]
    if bad:
        raise SystemExit(f"a process failed (exit codes {[pr.exitcode for pr in procs]})")
    by = {r[0]: r for r in results}
    _, moved, busy_s, transport = by["prefill"]
    _, verified = by["decode"]
    print(f"moved {moved} blocks in {args.requests} requests over {transport}; "
          f"decode verified {verified} blocks bit for bit")
    print(f"{moved / busy_s:,.0f} blocks/s, {moved * block_bytes / busy_s / 1e9:.2f} GB/s "
          f"(transfer time only, {busy_s * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
