"""KV-cache block benchmark: a prefill engine writes a request's paged KV-cache blocks into a
decode engine's cache. Ours (``torch_ext.transfer_blocks``: one call per request, adjacent
blocks coalesced) beside Mooncake's ``batch_transfer_sync_write`` given one descriptor per
layer and block, on the same caches, block ids and machine, in the same run.

    python -m memfabric_hybrid.bench kv [--layers 32] [--block-kib 8,64,256]
        [--request-blocks 1,16,256,4096] [--pattern scattered|runs] [--path same-host|cross-host]
        [--cache-gib 1] [--seconds 1] [--no-mooncake] [--json FILE]

A cache is ``layers x num_blocks x block`` bytes (block = one layer's share of one block id:
16 tokens x 8 KV heads x 128 dims x 2 bytes x K,V = 64 KiB at Llama-3-8B shapes), so a block id
stands for ``layers x block`` bytes. ``num_blocks`` is the largest request that fits
``--cache-gib``; larger requests are skipped and said so. ``scattered`` draws the destination
and source ids at random (nothing to coalesce: the engines' raw descriptor rate); ``runs``
draws them as runs of 16 consecutive blocks, as a paged allocator mostly hands them out.
Mooncake's descriptor lists are built before its timed calls (its best case); ours are built
inside ``transfer_blocks`` on every call. The first transfer of every cell is verified on the
decode side (SHA-256 of the destination blocks) for both systems.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from . import te as _te
from ._util import table, write_json


def _cache(size: int):
    import mmap

    buf = mmap.mmap(-1, size)
    return buf, _te._addr(buf)


def _hash_blocks(base: int, layers: int, num_blocks: int, block: int, ids: List[int]) -> str:
    import ctypes

    h = hashlib.sha256()
    for layer in range(layers):
        seg = base + layer * num_blocks * block
        for i in ids:
            h.update(ctypes.string_at(seg + i * block, block))
    return h.hexdigest()


def _decode(system: str, ip: str, layers: int, num_blocks: int, block: int, conn) -> None:
    """The decode side: starts the config store (ours), registers a cache, answers ("hash", ids),
    ("zero",) and ("stop",)."""
    server = None
    try:
        store_url = None
        if system == "memfabric":
            import memfabric_hybrid as mf

            server = mf.start_config_store(f"tcp://{ip}:0")
            store_url = server.url
        engine, err = _te._open_engine(system, ip, store_url, "Decode")
        buf, base = _cache(layers * num_blocks * block)
        rc = engine.register_memory(base, layers * num_blocks * block)
        if rc != 0:
            raise RuntimeError(f"{system} register_memory: {rc} {err()}")
        conn.send(("ready", _te._session(system, engine, ip), base, store_url))
    except Exception as e:
        conn.send(("error", repr(e)))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "hash":
            conn.send(_hash_blocks(base, layers, num_blocks, block, msg[1]))
        elif msg[0] == "zero":
            buf[:] = b"\0" * len(buf)
            conn.send("ok")
        else:
            break
    _te._close(system, engine)
    if server is not None:
        server.close()
    conn.send("stopped")


def _ids(rng: random.Random, n: int, num_blocks: int, pattern: str) -> List[int]:
    if pattern == "scattered" or n < 16:
        return rng.sample(range(num_blocks), n)
    runs = rng.sample(range(num_blocks // 16), n // 16)
    return [r * 16 + k for r in runs for k in range(16)]


def _prefill(system: str, ip: str, store_url: Optional[str], dest: str, peer_base: int, layers: int,
             num_blocks: int, block: int, requests: List[int], pattern: str, seconds: float, conn) -> None:
    """The prefill side: times each request size, verifies the first transfer of each."""
    out: Dict[int, Dict[str, Any]] = {}
    try:
        engine, err = _te._open_engine(system, ip, store_url, "Prefill")
        size = layers * num_blocks * block
        buf, base = _cache(size)
        pattern_bytes = hashlib.sha256(b"kv").digest() * (block // 32 + 1)
        for layer in range(layers):
            for b in range(num_blocks):
                off = (layer * num_blocks + b) * block
                buf[off:off + block] = bytes([(layer * 7 + b) & 0xFF]) + pattern_bytes[1:block]
        if system == "memfabric":
            import numpy as np

            from memfabric_hybrid import torch_ext

            arr = np.frombuffer(buf, dtype=np.uint8).reshape(layers, num_blocks, block)
            torch_ext.register_kv_cache(engine, arr, block_dim=1)
            peer = torch_ext.KvCacheLayout(
                tuple((peer_base + layer * num_blocks * block, num_blocks, block, block) for layer in range(layers)),
                num_blocks, dest)
        else:
            rc = engine.register_memory(base, size)
            if rc != 0:
                raise RuntimeError(f"mooncake register_memory: {rc}")
        rng = random.Random(7)
        for n in requests:
            src = _ids(rng, n, num_blocks, pattern)
            dst = _ids(rng, n, num_blocks, pattern)
            if system == "memfabric":
                def call(src=src, dst=dst) -> int:
                    return torch_ext.transfer_blocks(engine, peer, src, dst)
            else:
                bufs = [base + (layer * num_blocks + s) * block for layer in range(layers) for s in src]
                peers = [peer_base + (layer * num_blocks + d) * block for layer in range(layers) for d in dst]
                lens = [block] * len(bufs)

                def call(bufs=bufs, peers=peers, lens=lens) -> int:
                    return engine.batch_transfer_sync_write(dest, bufs, peers, lens)
            conn.send(("zero",))
            conn.recv()
            rc = call()
            if rc != 0:
                out[n] = {"error": f"rc {rc} {err()}"}
                continue
            conn.send(("hash", dst))
            got = conn.recv()
            want = _hash_blocks(base, layers, num_blocks, block, src)
            if got != want:
                out[n] = {"error": "data mismatch on the decode side"}
                continue
            lat, rc = _te._time_calls(call, seconds)
            if rc != 0 or not lat:
                out[n] = {"error": f"rc {rc} {err()}"}
                continue
            mean = sum(lat) / len(lat)
            out[n] = {"blocks_per_s": n / mean, "gbps": n * layers * block / mean / 1e9,
                      "p50_us": lat[len(lat) // 2] * 1e6, "calls": len(lat), "verified": True}
        _te._close(system, engine)
    except Exception as e:
        conn.send(("error", repr(e)))
        return
    conn.send(("done", out))


def run_cell(system: str, path: str, hosts: Optional[Any], layers: int, block: int, num_blocks: int,
             requests: List[int], pattern: str, seconds: float) -> Dict[int, Dict[str, Any]]:
    """One decode and one prefill process (in two namespaces when cross-host); the parent relays
    the prefill's verification questions to the decode side."""
    ctx = mp.get_context("spawn")
    env: Dict[str, Optional[str]] = {"MF_TRANSPORT": None}
    log = None
    if system == "mooncake":
        env.update({"MC_LOG_LEVEL": "ERROR", "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER": "65535",
                    "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER": "65535"})
        log = os.path.join(tempfile.gettempdir(), f"mf-bench-kv-mooncake-{os.getpid()}.log")
    ns_t = ns_i = None
    ip_t = ip_i = "127.0.0.1"
    if path == "cross-host" and hosts is not None:
        ns_t, ns_i, ip_t, ip_i = hosts.a, hosts.b, hosts.ip_a, hosts.ip_b
    dec, dec_child = ctx.Pipe()
    pre, pre_child = ctx.Pipe()
    procs: List[Any] = []
    try:
        t = ctx.Process(target=_te._child, args=(ns_t, env, log, _decode, system, ip_t, layers, num_blocks, block,
                                                 dec_child))
        t.start()
        procs.append(t)
        msg = _te._wait(dec, 120, procs, "decode engine")
        if msg[0] != "ready":
            return {n: {"error": msg[1]} for n in requests}
        _, dest, peer_base, store_url = msg
        i = ctx.Process(target=_te._child, args=(ns_i, env, log, _prefill, system, ip_i, store_url, dest, peer_base,
                                                 layers, num_blocks, block, requests, pattern, seconds, pre_child))
        i.start()
        procs.append(i)
        while True:
            msg = _te._wait(pre, 600, procs, "prefill engine")
            if msg[0] in ("hash", "zero"):
                dec.send(msg)
                pre.send(_te._wait(dec, 120, procs, "decode engine"))
                continue
            dec.send(("stop",))
            return msg[1] if msg[0] == "done" else {n: {"error": msg[1]} for n in requests}
    except RuntimeError as e:
        return {n: {"error": str(e)} for n in requests}
    finally:
        _te._stop(procs)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m memfabric_hybrid.bench kv", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--block-kib", default="8,64,256", help="one layer's share of a block, KiB (comma list)")
    p.add_argument("--request-blocks", default="1,16,256,4096", help="blocks per request (comma list)")
    p.add_argument("--pattern", choices=["scattered", "runs"], default="scattered")
    p.add_argument("--path", choices=["same-host", "cross-host"], default="same-host")
    p.add_argument("--cache-gib", type=float, default=1.0, help="size of each engine's cache")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per cell")
    p.add_argument("--no-mooncake", action="store_true")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    blocks_kib = [int(x) for x in a.block_kib.split(",") if x]
    requests = [int(x) for x in a.request_blocks.split(",") if x]
    systems = ["memfabric"]
    missing = "skipped by --no-mooncake" if a.no_mooncake else _te._mooncake_missing()
    if missing:
        print(f"Mooncake: {missing}")
    else:
        systems.append("mooncake")
    hosts = None
    if a.path == "cross-host":
        why = _te.netns_unavailable()
        if why:
            print(f"cross-host needs network namespaces: {why}")
            return 2
        hosts = _te.TwoHosts()
        hosts.__enter__()
    results: Dict[str, Any] = {}
    rows = []
    try:
        for kib in blocks_kib:
            block = kib << 10
            per_id = a.layers * block
            num_blocks = int(a.cache_gib * (1 << 30)) // per_id
            fit = [n for n in requests if n <= num_blocks]
            for n in requests:
                if n > num_blocks:
                    print(f"skipped: {n} blocks of {per_id >> 10} KiB need a {n * per_id / (1 << 30):.1f} GiB cache "
                          f"(--cache-gib {a.cache_gib})")
            if not fit:
                continue
            cell: Dict[str, Dict[int, Dict[str, Any]]] = {}
            for system in systems:
                cell[system] = run_cell(system, a.path, hosts, a.layers, block, num_blocks, fit, a.pattern, a.seconds)
            for n in fit:
                ours = cell["memfabric"].get(n, {})
                mc = cell.get("mooncake", {}).get(n, {})
                ratio = (ours.get("blocks_per_s", float("nan")) / mc["blocks_per_s"]) if mc.get("blocks_per_s") else float("nan")
                rows.append([f"{kib} KiB", n, ours.get("blocks_per_s", ours.get("error", "-")), ours.get("gbps", float("nan")),
                             mc.get("blocks_per_s", mc.get("error", "-")) if mc else "-", mc.get("gbps", float("nan")) if mc else float("nan"),
                             ratio])
            results[str(kib)] = {s: {str(n): v for n, v in c.items()} for s, c in cell.items()}
    finally:
        if hosts is not None:
            hosts.__exit__(None, None, None)
    print(f"\nKV blocks, {a.layers} layers, {a.pattern} ids, {a.path} ({os.cpu_count()} cores); "
          f"block = one layer's share; verified on the decode side")
    print(table(["block", "blocks/req", "ours blocks/s", "ours GB/s", "Mooncake blocks/s", "Mooncake GB/s", "ratio"], rows))
    write_json(a.json, {"layers": a.layers, "pattern": a.pattern, "path": a.path, "results": results})
    return 0
