"""Offload (1.3's ``memfabric_hybrid.offload``): the pool, the four copy operators against
small references written from upstream's kernel semantics, refusals, and a SHARED pool over
two real processes."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

import memfabric_hybrid as mf
from memfabric_hybrid import offload
from conftest import free_port, run_ranks

GiB = 1 << 30


def view(ptr: int, n: int) -> np.ndarray:
    """The n bytes at ``ptr`` as a writable numpy array (no copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))


def addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class _DeviceView:
    """Device memory at ``dva`` for torch, through the CUDA array interface."""

    def __init__(self, dva: int, n: int) -> None:
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (dva, False), "version": 3}


def cuda_torch():
    """torch, where a CUDA device and this library's CUDA backend are both present; else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not mf.device_info()["cuda"]["available"]:
        return None
    return torch


def device_round_trip(torch, ptr: int, n: int, fill: int) -> bool:
    """Whether a kernel on the GPU reads the n bytes at host address ``ptr`` through its DVA,
    and writes ``fill`` over them where the host sees it."""
    dva = offload.get_dva(ptr)
    assert dva != 0, mf.get_last_err_msg()
    on_device = torch.as_tensor(_DeviceView(dva, n), device="cuda")
    seen = bool(np.array_equal(on_device.clone().cpu().numpy(), view(ptr, n)))
    on_device.fill_(fill)
    torch.cuda.synchronize()
    return seen and bool((view(ptr, n) == fill).all())


def pool_bytes(n: int) -> tuple[int, np.ndarray]:
    p = offload.malloc(n)
    assert p != 0, mf.get_last_err_msg()
    return p, view(p, n)


def local_config(size: int = GiB) -> offload.OffloadConfig:
    cfg = offload.OffloadConfig()
    cfg.reserve_size = size
    cfg.alloc_size = size
    return cfg


@pytest.fixture
def pool():
    offload.uninitialize()
    assert offload.initialize(local_config()) == 0, mf.get_last_err_msg()
    yield offload.pool_info()
    offload.uninitialize()


@pytest.fixture
def rng():
    return np.random.default_rng(20260501)


def u64(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def u32(values) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


# --- the module's surface ----------------------------------------------------------------


def test_surface_matches_upstream():
    assert mf.offload is offload and "offload" in mf.__all__
    assert offload.Scene.LOCAL == 0 and offload.Scene.SHARED == 1
    assert offload.LOCAL is offload.Scene.LOCAL and offload.SHARED is offload.Scene.SHARED
    assert offload.OFFLOAD_FLAG_GIANT_PAGE == 1
    cfg = offload.OffloadConfig()
    assert (cfg.device_id, cfg.reserve_size, cfg.alloc_size, cfg.world_size, cfg.rank_id) == (0, 0, 0, 0, 0)
    assert (cfg.flags, cfg.local_world_size, cfg.store_url) == (0, 0, "")
    assert cfg.scene is offload.Scene.LOCAL
    for name in ("initialize", "uninitialize", "malloc", "free", "get_dva", "register_entry_table", "empty",
                 "sparse_copy", "group_pack_copy", "kv_exchange_copy", "entry_gather"):
        assert callable(getattr(offload, name)) and getattr(offload, name).__doc__, name
    assert "row-grid" in offload.register_entry_table.__doc__
    assert offload.__doc__ and "sparse_copy" in offload.__doc__


def test_config_refuses_wrong_types_and_values():
    cfg = offload.OffloadConfig()
    with pytest.raises(TypeError):
        cfg.reserve_size = "1"
    with pytest.raises(TypeError):
        cfg.reserve_size = 1.0
    with pytest.raises(TypeError):
        cfg.world_size = -1
    with pytest.raises(TypeError):
        cfg.device_id = 1 << 32
    with pytest.raises(TypeError):
        cfg.scene = "LOCAL"
    with pytest.raises(ValueError):
        cfg.scene = 2
    cfg.scene = 1
    assert cfg.scene is offload.Scene.SHARED
    with pytest.raises(ValueError, match="store_url too long"):
        cfg.store_url = "tcp://127.0.0.1:" + "1" * 60
    with pytest.raises(TypeError):
        cfg.store_url = 5
    with pytest.raises(AttributeError):
        cfg.reserve = 1  # not a field: a typo is an error, not a silent new attribute
    with pytest.raises(TypeError):
        offload.initialize(None)
    with pytest.raises(TypeError):
        offload.malloc("8")
    with pytest.raises(TypeError):
        offload.malloc(-1)
    with pytest.raises(TypeError):
        offload.get_dva(1.5)
    with pytest.raises(TypeError):
        offload.register_entry_table(64, None)


def test_calls_before_initialize_fail_with_not_init():
    offload.uninitialize()
    assert offload.malloc(64) == 0
    assert "not initialized" in mf.get_last_err_msg()
    assert offload.get_dva(0x1000) == 0
    assert offload.register_entry_table(64, 8) == mf.SMEM_NOT_INIT
    one = u32([1])
    assert offload.sparse_copy(u64([1]), u64([2]), one, one, None) == mf.SMEM_NOT_INIT
    assert offload.group_pack_copy(u64([1]), u64([2]), one, one, np.ones(1, np.int64), np.ones(1, np.int64),
                                   None) == mf.SMEM_NOT_INIT
    assert offload.kv_exchange_copy(np.zeros(44, np.int64), None) == mf.SMEM_NOT_INIT
    assert offload.entry_gather(np.zeros(8, np.uint8), np.zeros(1, np.int64), one, None) == mf.SMEM_NOT_INIT
    offload.free(0x1000)
    assert "not initialized" in mf.get_last_err_msg()
    with pytest.raises(mf.MemFabricError) as ei:
        offload.pool_info()
    assert ei.value.code == mf.SMEM_NOT_INIT


def test_initialize_refuses_bad_configs():
    offload.uninitialize()
    cases = []
    cfg = local_config()
    cfg.alloc_size = 2 * GiB
    cases.append((cfg, mf.SMEM_INVALID_PARAM, "must be equal"))
    cases.append((local_config(0), mf.SMEM_INVALID_PARAM, "reserve_size 0"))
    cfg = local_config()
    cfg.flags = 2
    cases.append((cfg, mf.SMEM_INVALID_PARAM, "flags"))
    cfg = local_config()
    cfg.scene, cfg.world_size, cfg.rank_id = offload.SHARED, 2, 2
    cases.append((cfg, mf.SMEM_INVALID_PARAM, "rank_id"))
    cfg = local_config()
    cfg.scene, cfg.world_size, cfg.alloc_size, cfg.reserve_size = offload.SHARED, 1, 2 * GiB, GiB
    cases.append((cfg, mf.SMEM_INVALID_PARAM, "exceeds reserve_size"))
    cfg = local_config()
    cfg.scene, cfg.world_size, cfg.flags = offload.SHARED, 1, offload.OFFLOAD_FLAG_GIANT_PAGE
    cases.append((cfg, mf.SMEM_INVALID_PARAM, "LOCAL scene only"))
    cfg = local_config()
    cfg.scene, cfg.world_size, cfg.local_world_size = offload.SHARED, 4, 2
    cases.append((cfg, mf.MF_UNSUPPORTED, "several hosts"))
    for cfg, code, words in cases:
        assert offload.initialize(cfg) == code, cfg
        assert words in mf.get_last_err_msg(), (cfg, mf.get_last_err_msg())
    assert offload.malloc(8) == 0, "nothing was initialized"


def test_initialize_twice():
    offload.uninitialize()
    cfg = local_config()
    cfg.flags = offload.OFFLOAD_FLAG_GIANT_PAGE
    assert offload.initialize(cfg) == 0
    p = offload.malloc(100)
    # The same config again keeps the pool, as upstream; another config is refused.
    assert offload.initialize(cfg) == 0
    assert offload.get_dva(p) == p
    assert offload.initialize(local_config(2 * GiB)) == mf.SMEM_REPEAT_INVOKE
    assert "uninitialize" in mf.get_last_err_msg()
    offload.uninitialize()
    offload.uninitialize()
    assert offload.initialize(local_config(2 * GiB)) == 0
    assert offload.pool_info()["local_size"] == 2 * GiB
    offload.uninitialize()


# --- malloc / free / get_dva / empty -------------------------------------------------------


def test_malloc_free_get_dva_round_trip(pool):
    base, size = pool["local_base"], pool["local_size"]
    assert (pool["scene"], pool["slots"], pool["base"], size) == (0, 1, base, GiB)
    blocks = [offload.malloc(n) for n in (1, 17, 4096, 100_000, 3)]
    assert all(b % 16 == 0 and base <= b < base + size for b in blocks)
    spans = sorted((b, n) for b, n in zip(blocks, (1, 17, 4096, 100_000, 3)))
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), "blocks overlap"
    for b in blocks:
        assert offload.get_dva(b) == b, "the host is the device: the DVA is the address"
        assert offload.get_dva(b + 1) == b + 1
        view(b, 1)[0] = 0xAB
    assert offload.get_dva(base + size) == 0
    assert "not an address of this rank's offload pool" in mf.get_last_err_msg()
    assert offload.pool_info()["bytes_in_use"] == 16 + 32 + 4096 + 100_000 + 16
    offload.free(blocks[1])
    # Best fit: a block of the freed size goes back into its hole.
    assert offload.malloc(20) == blocks[1]
    offload.free(blocks[2] + 16)
    assert "not the start of a block in use" in mf.get_last_err_msg()
    for b in blocks:
        offload.free(b)
    offload.free(blocks[0])
    assert "freed already" in mf.get_last_err_msg()
    offload.free(blocks[1])  # the 20-byte block
    assert offload.pool_info()["bytes_in_use"] == 0
    assert offload.malloc(0) == 0 and "0 bytes" in mf.get_last_err_msg()
    assert offload.malloc(size + 1) == 0
    assert offload.malloc(1 << 63) == 0
    whole = offload.malloc(size)
    assert whole == base, "everything was freed and merged back"
    assert offload.malloc(16) == 0 and "no free block" in mf.get_last_err_msg()
    offload.free(whole)


def test_the_gpu_reads_and_writes_the_pool_through_its_dva(pool, rng):
    torch = cuda_torch()
    if torch is None:
        pytest.skip("needs a CUDA GPU, torch with CUDA and the CUDA backend")
    p, pv = pool_bytes(1 << 20)
    pv[:] = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    assert device_round_trip(torch, p, 1 << 20, 0x5A)
    offload.free(p)


def test_empty_is_a_tensor_over_pool_memory(pool):
    torch = pytest.importorskip("torch", reason="offload.empty returns a torch tensor")
    t = offload.empty([3, 5, 7])
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (3, 5, 7)
    p = t.data_ptr()
    assert pool["local_base"] <= p < pool["local_base"] + pool["local_size"]
    assert offload.get_dva(p) == p
    u = offload.empty((4, 4), dtype=torch.float32, pin_memory=True)
    u.copy_(torch.arange(16, dtype=torch.float32).reshape(4, 4))
    assert np.array_equal(view(u.data_ptr(), 64).view(np.float32), np.arange(16, dtype=np.float32))
    assert offload.pool_info()["bytes_in_use"] == 224 + 64  # 210 bytes rounded up to 16, and 64
    with pytest.raises(mf.MemFabricError) as ei:
        offload.empty([0, 4])
    assert ei.value.code == mf.SMEM_INVALID_PARAM
    with pytest.raises(mf.MemFabricError) as ei:
        offload.empty([GiB], dtype=torch.int64)
    assert ei.value.code == mf.SMEM_MALLOC_FAILED
    with pytest.raises(TypeError):
        offload.empty([2.5])
    offload.free(p)
    offload.free(u.data_ptr())


# --- sparse_copy -------------------------------------------------------------------------


def _sparse_case(rng, count: int, max_len: int, pool_src: np.ndarray, pool_dst: np.ndarray, host_src: np.ndarray,
                 host_dst: np.ndarray):
    """Random entries in every direction (host->pool, pool->host, pool->pool, host->host) with
    non-overlapping destinations; returns the descriptor arrays and the expected buffers."""
    srcs, dsts, lens = [], [], []
    want = {"pool": pool_dst.copy(), "host": host_dst.copy()}
    cursor = {"pool": 0, "host": 0}
    sources = {"pool": pool_src, "host": host_src}
    targets = {"pool": pool_dst, "host": host_dst}
    for _ in range(count):
        s, d = rng.choice(["pool", "host"]), rng.choice(["pool", "host"])
        n = int(rng.integers(0, max_len + 1))
        so = int(rng.integers(0, len(sources[s]) - n + 1))
        do = cursor[d] + int(rng.integers(0, 64))
        cursor[d] = do + n
        assert cursor[d] <= len(targets[d])
        srcs.append(addr(sources[s]) + so)
        dsts.append(addr(targets[d]) + do)
        lens.append(n)
        want[d][do:do + n] = sources[s][so:so + n]
    return u64(srcs), u64(dsts), u32(lens), want


@pytest.mark.parametrize("count,max_len", [(1, 300_000), (7, 70_000), (63, 5000), (64, 44 * 1024), (200, 3000)])
def test_sparse_copy_against_a_reference(pool, rng, count, max_len):
    region = count * (max_len + 64)
    _, pool_src = pool_bytes(max(region, 4096))
    _, pool_dst = pool_bytes(region)
    host_src = rng.integers(0, 256, max(region, 4096), dtype=np.uint8)
    host_dst = rng.integers(0, 256, region, dtype=np.uint8)
    pool_src[:] = rng.integers(0, 256, len(pool_src), dtype=np.uint8)
    pool_dst[:] = 0
    srcs, dsts, lens, want = _sparse_case(rng, count, max_len, pool_src, pool_dst, host_src, host_dst)
    if count >= 64:
        # Where the device kernel pairs entry i with entry i + n/2, pairs stay within 88 KiB.
        assert all(int(lens[i]) + int(lens[i + count // 2]) <= 88 * 1024 for i in range(count // 2))
    rc = offload.sparse_copy(srcs, dsts, lens, u32([count]), None)
    assert rc == 0, mf.get_last_err_msg()
    assert np.array_equal(pool_dst, want["pool"])
    assert np.array_equal(host_dst, want["host"])


def test_sparse_copy_takes_torch_tensors_and_devices(pool):
    torch = pytest.importorskip("torch", reason="the upstream wrapper's argument types")
    src = torch.arange(256, dtype=torch.uint8).repeat(8)
    dst = offload.empty([2048], dtype=torch.uint8)
    dst.zero_()
    srcs = torch.tensor([src.data_ptr() + 1000, src.data_ptr()], dtype=torch.int64)
    dsts = torch.tensor([dst.data_ptr(), dst.data_ptr() + 1048], dtype=torch.int64)
    lens = torch.tensor([1048, 1000], dtype=torch.int32)
    size = torch.tensor([2], dtype=torch.int32)
    for device in (torch.device("cpu"), None, 0):
        dst.zero_()
        assert offload.sparse_copy(srcs, dsts, lens, size, device) == 0, mf.get_last_err_msg()
        assert torch.equal(dst, torch.cat([src[1000:], src[:1000]]))
    with pytest.raises(TypeError, match="4-byte"):
        offload.sparse_copy(srcs, dsts, lens.to(torch.int64), size, None)
    with pytest.raises(TypeError, match="8-byte"):
        offload.sparse_copy(srcs.to(torch.int32), dsts, lens, size, None)
    with pytest.raises(TypeError):
        offload.sparse_copy(srcs, dsts, lens, 2.0, None)
    with pytest.raises(TypeError):
        offload.sparse_copy(srcs, dsts, lens, size, "cpu")
    with pytest.raises(ValueError, match="contiguous"):
        offload.sparse_copy(torch.zeros(4, dtype=torch.int64)[::2], dsts, lens, size, None)
    if not mf.device_info()["cuda"]["available"]:
        # A CUDA device without the CUDA backend: MF_UNSUPPORTED with the reason, no crash.
        assert offload.sparse_copy(srcs, dsts, lens, size, torch.device("cuda", 0)) == mf.MF_UNSUPPORTED
        assert "cuda backend" in mf.get_last_err_msg()
    assert offload.sparse_copy(srcs, dsts, lens, size, torch.device("meta")) == mf.MF_UNSUPPORTED
    offload.free(dst.data_ptr())


def test_sparse_copy_refusals_copy_nothing(pool, rng):
    p, pv = pool_bytes(4096)
    pv[:] = 7
    host = rng.integers(0, 256, 4096, dtype=np.uint8)
    base, size = pool["local_base"], pool["local_size"]
    good = (addr(host), p, 100)

    def run(entries, count=None):
        s, d, n = zip(*entries)
        return offload.sparse_copy(u64(s), u64(d), u32(n), u32([len(entries) if count is None else count]), None)

    # A pool range past the pool's end, an unmapped host address, a null pointer: each
    # refused. A range the library can check is refused before anything moves; a host
    # address only the kernel can check fails where the copy reaches it.
    for bad, code in [((addr(host), base + size - 50, 100), mf.MF_OUT_OF_BOUNDS),
                      ((0x10, p + 200, 100), mf.MF_OUT_OF_BOUNDS),
                      ((0, p + 200, 100), mf.SMEM_INVALID_PARAM)]:
        pv[:] = 7
        rc = run([good, bad])
        assert rc == code, mf.get_last_err_msg()
        assert "entry 1" in mf.get_last_err_msg()
        if bad[0] != 0x10:
            assert (pv == 7).all(), "nothing moved"
        else:
            assert np.array_equal(pv[:100], host[:100]), "the entry before the fault was applied"
    # A count beyond the arrays; a huge count; zero entries.
    assert run([good], count=2) == mf.MF_OUT_OF_BOUNDS
    assert "srcPtrs holds 8 bytes" in mf.get_last_err_msg()
    assert run([good], count=0xFFFFFFFF) == mf.MF_OUT_OF_BOUNDS
    assert run([good], count=0) == 0
    # A descriptor array given as a bare address that is not mapped.
    assert offload.sparse_copy(0x10, u64([p]), u32([1]), u32([1]), None) == mf.MF_OUT_OF_BOUNDS
    # From 64 entries on: an odd count, and a K/V pair over 88 KiB.
    many = [(addr(host) + i, p + i, 1) for i in range(65)]
    assert run(many) == mf.SMEM_INVALID_PARAM and "odd" in mf.get_last_err_msg()
    big = [(addr(host), p, 1)] * 64
    big[0] = (addr(host), p, 60 * 1024)
    big[32] = (addr(host), p, 30 * 1024)
    assert run(big) == mf.SMEM_INVALID_PARAM and "88" in mf.get_last_err_msg()
    # A read-only destination: refused by the kernel, no crash.
    ro = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    ro_addr = addr(np.frombuffer(ro, dtype=np.uint8))
    assert run([(addr(host), ro_addr, 8)]) == mf.MF_OUT_OF_BOUNDS
    assert ro[:8] == bytes(8)


# --- group_pack_copy ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 8, 33, 256])
def test_group_pack_copy_against_a_reference(pool, rng, n):
    src_region = rng.integers(0, 256, n * 2048, dtype=np.uint8)
    _, dst_region = pool_bytes(n * 2048)
    dst_region[:] = 0xEE
    lens = rng.integers(0, 2048, n).astype(np.uint32)
    groups = rng.integers(-3, 4, n).astype(np.int64)
    groups[rng.random(n) < 0.4] = 0
    srcs = u64([addr(src_region) + i * 2048 for i in range(n)])
    dsts = u64([addr(dst_region) + j * 2048 for j in range(n)])
    packed = np.full(n + 3, 0x5A5A, dtype=np.int64)
    # Reference: the j-th non-zero group i copies lens[i] bytes of source i to target j.
    want = dst_region.copy()
    want_packed = packed.copy()
    j = 0
    for i in range(n):
        if groups[i] != 0:
            want[j * 2048:j * 2048 + lens[i]] = src_region[i * 2048:i * 2048 + lens[i]]
            want_packed[j] = groups[i]
            j += 1
    rc = offload.group_pack_copy(srcs, dsts, lens, u32([n]), groups, packed, None)
    assert rc == 0, mf.get_last_err_msg()
    assert np.array_equal(dst_region, want), "targets past M and tails left alone"
    assert np.array_equal(packed, want_packed)


def test_group_pack_copy_refusals(pool):
    src = np.arange(64, dtype=np.uint8)
    p, pv = pool_bytes(64)
    pv[:] = 0
    groups = np.array([0, 5, 6], dtype=np.int64)
    srcs, dsts, lens = u64([addr(src)] * 3), u64([p, p + 16, p + 32]), u32([8, 8, 8])
    packed = np.zeros(1, dtype=np.int64)  # room for 1 of the 2 packed values
    assert offload.group_pack_copy(srcs, dsts, lens, u32([3]), groups, packed, None) == mf.MF_OUT_OF_BOUNDS
    assert "packedGroupList holds 8 bytes" in mf.get_last_err_msg()
    assert (pv == 0).all() and packed[0] == 0, "nothing moved"
    packed = np.zeros(2, dtype=np.int64)
    assert offload.group_pack_copy(srcs, dsts, lens, u32([4]), groups, packed, None) == mf.MF_OUT_OF_BOUNDS
    with pytest.raises(TypeError, match="8-byte"):
        offload.group_pack_copy(srcs, dsts, lens, u32([3]), groups.astype(np.int32), packed, None)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(2, dtype=np.int64)
        ro.setflags(write=False)
        offload.group_pack_copy(srcs, dsts, lens, u32([3]), groups, ro, None)
    # All groups zero: nothing copied, nothing packed.
    assert offload.group_pack_copy(srcs, dsts, lens, u32([3]), np.zeros(3, np.int64), packed, None) == 0
    assert (pv == 0).all() and (packed == 0).all()


# --- kv_exchange_copy --------------------------------------------------------------------

META = 8 + 9 * 4


def _meta(np_, ps, direction, mode, dev_idx, host_idx, comps):
    m = np.zeros(META, dtype=np.int64)
    m[:8] = [len(comps), np_, ps, direction, addr(dev_idx), addr(host_idx), mode, 0]
    for c, fields in enumerate(comps):
        m[8 + 9 * c:8 + 9 * c + 9] = fields
    return m


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("direction", [1, 2])
def test_kv_exchange_against_a_reference(pool, rng, mode, direction):
    """Device layout [layer, page, token, dim] (a host array plays the device); host layout in
    the pool, page first [page, layer, token, dim] or layer first [layer, page, token, dim].
    Pages map through token indices; components cover layer sub-ranges."""
    layers, dev_pages, host_pages, ps = 4, 9, 12, 4
    dims = [6, 10, 3]  # bytes per token of K, V and an index component
    ranges = [(0, 4), (1, 3), (2, 2)]  # the last component is empty (lo >= hi)
    np_ = 7
    dev_of = rng.permutation(dev_pages)[:np_]
    host_of = rng.permutation(host_pages)[:np_]
    # Token indices: page p's first token is its page's first token plus an offset below ps
    # (the kernel divides it by the page size).
    dev_idx = np.full(np_ * ps, -999, dtype=np.int64)
    host_idx = np.full(np_ * ps, -999, dtype=np.int64)
    dev_idx[::ps] = dev_of * ps + rng.integers(0, ps, np_)
    host_idx[::ps] = host_of * ps + rng.integers(0, ps, np_)
    devs, hosts, comps = [], [], []
    for dim, (lo, hi) in zip(dims, ranges):
        width = ps * dim
        dev = rng.integers(0, 256, (layers, dev_pages, ps, dim), dtype=np.uint8)
        hshape = (host_pages, layers, ps, dim) if mode == 0 else (layers, host_pages, ps, dim)
        _, hv = pool_bytes(int(np.prod(hshape)))
        host = hv.reshape(hshape)
        host[:] = rng.integers(0, 256, hshape, dtype=np.uint8)
        if mode == 0:
            hpp, hlp = layers * width, width
        else:
            hpp, hlp = width, host_pages * width
        comps.append([addr(dev), addr(host), dev_pages * width, width, hpp, hlp, width, lo, hi])
        devs.append(dev)
        hosts.append(host)
    want_dev = [d.copy() for d in devs]
    want_host = [h.copy() for h in hosts]
    for p in range(np_):
        d, h = dev_of[p], host_of[p]
        for c, (lo, hi) in enumerate(ranges):
            for layer in range(lo, hi):
                host_row = (h, layer) if mode == 0 else (layer, h)
                if direction == 1:
                    want_dev[c][layer, d] = hosts[c][host_row]
                else:
                    want_host[c][host_row] = devs[c][layer, d]
    meta = _meta(np_, ps, direction, mode, dev_idx, host_idx, comps)
    assert offload.kv_exchange_copy(meta, None) == 0, mf.get_last_err_msg()
    for c in range(len(dims)):
        assert np.array_equal(devs[c], want_dev[c]), f"component {c}"
        assert np.array_equal(hosts[c], want_host[c]), f"component {c}"


def test_kv_layer_first_merges_contiguous_pages_as_the_kernel_does(pool):
    """Layer-first walk on a page-first host (a mismatched layout): upstream's kernel splits
    the pages into two blocks and moves each run of contiguous pages as one span of
    run * width bytes from the run's first row; the result, worked out by hand here, shows it."""
    # 4 pages of 1 token, 2 layers, width 4; host page first: page pitch 8, layer pitch 4.
    _, host = pool_bytes(32)
    host[:] = np.arange(32, dtype=np.uint8)
    dev = np.zeros(32, dtype=np.uint8)  # layer pitch 16, page pitch 4
    idx = np.arange(4, dtype=np.int64)
    comp = [addr(dev), addr(host), 16, 4, 8, 4, 4, 0, 2]
    assert offload.kv_exchange_copy(_meta(4, 1, 1, 1, idx, idx, [comp]), None) == 0, mf.get_last_err_msg()
    # Blocks [0, 2) and [2, 4); layer l moves 8 bytes from host row (page 0 or 2, layer l).
    want = np.concatenate([host[0:8], host[16:24], host[4:12], host[20:28]])
    assert np.array_equal(dev, want)
    # The same meta walked page first moves one (page, layer) row at a time.
    dev[:] = 0
    assert offload.kv_exchange_copy(_meta(4, 1, 1, 0, idx, idx, [comp]), None) == 0
    want = np.concatenate([host[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]],
                           host[[4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]]])
    assert np.array_equal(dev, want)


def test_kv_exchange_refusals(pool, rng):
    _, host = pool_bytes(4096)
    host[:] = 9
    dev = np.zeros(4096, dtype=np.uint8)
    idx = np.arange(8, dtype=np.int64)
    comp = [addr(dev), addr(host), 512, 64, 64, 512, 64, 0, 1]
    ok = _meta(8, 1, 1, 0, idx, idx, [comp])
    assert offload.kv_exchange_copy(ok, None) == 0
    for i, v, words in [(3, 3, "direction"), (6, 2, "host_layout_mode"), (7, 1, "reserved"),
                        (2, 0, "page_size"), (1, -1, "num_pages"), (0, 5, "num_components")]:
        bad = ok.copy()
        bad[i] = v
        assert offload.kv_exchange_copy(bad, None) == mf.SMEM_INVALID_PARAM, words
        assert words in mf.get_last_err_msg()
    # A meta shorter than its components; indices at a bad address; rows past the pool.
    assert offload.kv_exchange_copy(ok[:12], None) == mf.MF_OUT_OF_BOUNDS
    bad = ok.copy()
    bad[5] = 0x10
    assert offload.kv_exchange_copy(bad, None) == mf.MF_OUT_OF_BOUNDS
    assert "host indices" in mf.get_last_err_msg()
    far = pool["local_base"] + pool["local_size"] - 100
    dev[:] = 0
    bad = _meta(8, 1, 1, 0, idx, idx, [[addr(dev), far, 512, 64, 64, 512, 64, 0, 1]])
    assert offload.kv_exchange_copy(bad, None) == mf.MF_OUT_OF_BOUNDS
    assert (dev == 0).all(), "nothing moved"
    with pytest.raises(TypeError, match="8-byte"):
        offload.kv_exchange_copy(ok.astype(np.int32), None)
    # A layer range no cache has: refused at once, not walked.
    huge = list(comp)
    huge[8] = 1 << 62
    assert offload.kv_exchange_copy(_meta(8, 1, 1, 0, idx, idx, [huge]), None) == mf.SMEM_INVALID_PARAM
    assert "at most" in mf.get_last_err_msg()
    # No pages, or only empty components: nothing to do.
    assert offload.kv_exchange_copy(_meta(0, 1, 1, 0, idx, idx, [comp]), None) == 0
    empty = list(comp)
    empty[6] = 0
    assert offload.kv_exchange_copy(_meta(8, 1, 2, 0, idx, idx, [empty]), None) == 0


# --- entry_gather ------------------------------------------------------------------------


def test_entry_gather_against_a_reference(pool, rng):
    entry, rows = 256, 1000
    base = pool["local_base"]
    assert offload.entry_gather(np.zeros(entry, np.uint8), np.zeros(1, np.int64), u32([1]), None) == mf.SMEM_NOT_INIT
    assert "register_entry_table" in mf.get_last_err_msg()
    for bad in [(0, rows), (64 * 1024 + 1, rows), (entry, 0), (64 * 1024, GiB // (64 * 1024) + 1)]:
        assert offload.register_entry_table(*bad) == mf.SMEM_INVALID_PARAM, bad
    assert offload.register_entry_table(entry, rows) == 0
    assert offload.register_entry_table(entry, rows) == mf.SMEM_REPEAT_INVOKE
    assert offload.pool_info()["entry_table"] == (entry, rows)
    # The grid starts at the slot's start, which is where a fresh pool's first block is.
    assert offload.malloc(entry * rows) == base
    table = view(base, entry * rows).reshape(rows, entry)
    table[:] = rng.integers(0, 256, table.shape, dtype=np.uint8)
    for count in (1, 17, 500):
        ids = rng.integers(0, rows, count).astype(np.int64)
        dst = np.zeros((count, entry), dtype=np.uint8)
        assert offload.entry_gather(dst, ids, u32([count]), None) == 0, mf.get_last_err_msg()
        assert np.array_equal(dst, table[ids])
        # dst as a bare address, into the pool.
        p, pv = pool_bytes(count * entry)
        assert offload.entry_gather(p, ids, u32([count]), None) == 0
        assert np.array_equal(pv.reshape(count, entry), table[ids])
        offload.free(p)
    dst = np.zeros((4, entry), dtype=np.uint8)
    ids = np.array([1, 2, 3, 4], dtype=np.int64)
    # Only count ids are read and gathered.
    assert offload.entry_gather(dst, ids, u32([2]), None) == 0
    assert np.array_equal(dst[:2], table[[1, 2]]) and not dst[2:].any()
    assert offload.entry_gather(dst, ids, u32([0]), None) == 0
    # Rows outside the pool, ids outside [0, 2^32), dst too small, count beyond ids.
    slot_rows = np.array([GiB // entry], dtype=np.int64)  # row 0 of slot 1: no slot 1 here
    assert offload.entry_gather(dst, np.array([rows]), u32([1]), None) == mf.MF_OUT_OF_BOUNDS
    assert offload.entry_gather(dst, slot_rows, u32([1]), None) == mf.MF_OUT_OF_BOUNDS
    assert offload.entry_gather(dst, np.array([-1], np.int64), u32([1]), None) == mf.SMEM_INVALID_PARAM
    assert offload.entry_gather(dst, np.array([1 << 32], np.int64), u32([1]), None) == mf.SMEM_INVALID_PARAM
    assert offload.entry_gather(dst[:3], ids, u32([4]), None) == mf.MF_OUT_OF_BOUNDS
    assert offload.entry_gather(dst, ids, u32([5]), None) == mf.MF_OUT_OF_BOUNDS
    assert offload.entry_gather(0x10, ids, u32([1]), None) == mf.MF_OUT_OF_BOUNDS


def test_a_new_pool_starts_without_a_table(pool):
    assert offload.register_entry_table(64, 8) == 0
    offload.uninitialize()
    assert offload.initialize(local_config()) == 0
    assert offload.pool_info()["entry_table"] is None
    assert offload.register_entry_table(128, 8) == 0


# --- SHARED: two processes -----------------------------------------------------------------

ENTRY = 4096


def _pattern(rank: int, n: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) * (rank + 3) + rank) % 251).astype(np.uint8)


def _shared_rank(url: str, rank: int, world: int, reserve: int, alloc: int, barrier, q) -> None:
    import memfabric_hybrid as m
    from memfabric_hybrid import offload as off

    cfg = off.OffloadConfig()
    cfg.scene = off.Scene.SHARED
    cfg.world_size, cfg.rank_id = world, rank
    cfg.reserve_size, cfg.alloc_size = reserve, alloc
    cfg.store_url = url
    rc = off.initialize(cfg)
    if rc != 0:
        q.put((rank, "init", rc, m.get_last_err_msg()))
        return
    info = off.pool_info()
    out = {"info": info}
    rows = 64
    own = off.malloc(rows * ENTRY)
    out["own_is_slot_start"] = own == info["base"] + rank * info["slot_stride"] == info["local_base"]
    view(own, rows * ENTRY)[:] = _pattern(rank, rows * ENTRY)
    barrier.wait()
    # Every slot is mapped here at the same address: read the others' directly.
    out["peers_seen"] = all(
        np.array_equal(view(info["base"] + r * info["slot_stride"], rows * ENTRY), _pattern(r, rows * ENTRY))
        for r in range(world))
    # get_dva covers this rank's own slot only (as upstream).
    peer = (rank + 1) % world
    out["dva_own"] = off.get_dva(own + 5) == own + 5
    out["dva_peer"] = off.get_dva(info["base"] + peer * info["slot_stride"])
    torch = cuda_torch()
    if torch is None:
        out["device_round_trip"] = None
    else:
        # A block of its own: the peers read the first one meanwhile.
        scratch = off.malloc(4096)
        view(scratch, 4096)[:] = _pattern(rank, 4096)
        out["device_round_trip"] = device_round_trip(torch, scratch, 4096, 0x40 + rank)
    # sparse_copy out of a peer's slot.
    dst = np.zeros(1000, np.uint8)
    rc = off.sparse_copy(u64([info["base"] + peer * info["slot_stride"] + 10]), u64([addr(dst)]), u32([1000]),
                         u32([1]), None)
    out["sparse_from_peer"] = rc == 0 and np.array_equal(dst, _pattern(peer, 1010)[10:])
    # entry_gather over both slots: global id = slot * rows_per_slot + row.
    rows_per_slot = min(info["backed"]) // ENTRY
    out["register"] = off.register_entry_table(ENTRY, rows_per_slot)
    ids = np.array([r * rows_per_slot + i for i in (0, 5, 63) for r in range(world)], dtype=np.int64)
    got = np.zeros((len(ids), ENTRY), np.uint8)
    rc = off.entry_gather(got, ids, u32([len(ids)]), None)
    want = np.stack([_pattern(int(i) // rows_per_slot, rows * ENTRY).reshape(rows, ENTRY)[int(i) % rows_per_slot]
                     for i in ids])
    out["gather"] = (rc, bool(rc == 0 and np.array_equal(got, want)))
    out["gather_past_last_slot"] = off.entry_gather(got, np.array([world * rows_per_slot]), u32([1]), None)
    barrier.wait()
    off.uninitialize()
    q.put((rank, "ok", out))


def _shared_args(url, world, reserves, allocs, barrier):
    return lambda r, q: (url, r, world, reserves[r], allocs[r], barrier, q)


def test_shared_pool_over_two_processes(spawn):
    url = f"tcp://127.0.0.1:{free_port()}"
    barrier = spawn.Barrier(2)
    results = run_ranks(_shared_rank, 2, _shared_args(url, 2, [GiB, GiB], [GiB, GiB], barrier))
    infos = []
    for rank, status, out in results:
        assert status == "ok", out
        info = out["info"]
        infos.append(info)
        assert (info["scene"], info["rank"], info["slots"], info["slot_stride"]) == (1, rank, 2, GiB)
        assert info["backed"] == [GiB, GiB]
        assert out["own_is_slot_start"]
        assert out["peers_seen"], "every slot is mapped at the same address in every rank"
        assert out["dva_own"] and out["dva_peer"] == 0
        assert out["device_round_trip"] in (None, True), "a GPU kernel reads and writes the own slot by its DVA"
        assert out["sparse_from_peer"]
        assert out["register"] == 0
        assert out["gather"] == (0, True)
        assert out["gather_past_last_slot"] == mf.MF_OUT_OF_BOUNDS
    assert infos[0]["base"] == infos[1]["base"], "one pool base in every rank"


def _shared_unequal_rank(url: str, rank: int, world: int, reserve: int, alloc: int, barrier, q) -> None:
    import memfabric_hybrid as m
    from memfabric_hybrid import offload as off

    cfg = off.OffloadConfig()
    cfg.scene = off.SHARED
    cfg.world_size, cfg.rank_id, cfg.reserve_size, cfg.alloc_size, cfg.store_url = world, rank, reserve, alloc, url
    rc = off.initialize(cfg)
    if rc != 0:
        q.put((rank, rc, m.get_last_err_msg(), None))
        return
    info = off.pool_info()
    # A grid of 1.5 GiB fits rank 0's 2 GiB, not rank 1's 1 GiB (each rank checks its own).
    entry = 64 * 1024
    reg = off.register_entry_table(entry, (3 * GiB // 2) // entry)
    res = {"backed": info["backed"], "register": reg}
    if rank == 0:
        rows = (3 * GiB // 2) // entry
        got = np.zeros(entry, np.uint8)
        # Row 100 of slot 1 lies in rank 1's backed GiB; row 20000 (1.22 GiB in) does not.
        res["inside"] = off.entry_gather(got, np.array([rows + 100]), u32([1]), None)
        res["past"] = off.entry_gather(got, np.array([rows + 20000]), u32([1]), None)
        res["past_msg"] = m.get_last_err_msg()
    barrier.wait()
    off.uninitialize()
    q.put((rank, 0, "", res))


def test_shared_pool_with_unequal_allocations(spawn):
    url = f"tcp://127.0.0.1:{free_port()}"
    barrier = spawn.Barrier(2)
    results = run_ranks(_shared_unequal_rank, 2, _shared_args(url, 2, [2 * GiB] * 2, [2 * GiB, GiB], barrier))
    (_, rc0, msg0, r0), (_, rc1, msg1, r1) = results
    assert rc0 == 0 and rc1 == 0, (msg0, msg1)
    assert r0["backed"] == r1["backed"] == [2 * GiB, GiB]
    assert r0["register"] == 0 and r1["register"] == mf.SMEM_INVALID_PARAM
    assert r0["inside"] == 0
    assert r0["past"] == mf.MF_OUT_OF_BOUNDS and "slot 1" in r0["past_msg"]


def test_shared_ranks_must_agree_on_the_slot_stride(spawn):
    url = f"tcp://127.0.0.1:{free_port()}"
    barrier = spawn.Barrier(2)
    results = run_ranks(_shared_unequal_rank, 2, _shared_args(url, 2, [GiB, 2 * GiB], [GiB, GiB], barrier))
    for rank, rc, msg, _ in results:
        assert rc == mf.SMEM_INVALID_PARAM, (rank, msg)
        assert "rank 1 has reserve_size" in msg
