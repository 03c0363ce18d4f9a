"""Big Memory: one global address space over every rank's contributed DRAM.

    import memfabric_hybrid as mf
    cfg = mf.bm.BmConfig(); cfg.rank_id = rank
    mf.bm.initialize("tcp://127.0.0.1:8570", world_size, device_id, cfg)    # 0 or an error code
    big = mf.bm.create(0, 64 << 20)                  # collective: every rank contributes 64 MiB
    big.join()
    dst = big.peer_rank_ptr(peer)                     # a GVA: the same number in every rank
    big.copy_data(host_addr, dst, n, mf.bm.BmCopyType.H2G)
    big.copy_data(dst, host_addr, n, mf.bm.BmCopyType.G2H)
    big.leave(); big.destroy(); mf.bm.uninitialize()

On a host, "L" (local device) and "H" (host) buffers are both memory of this process; G/GH are
GVAs. Same-host ranks' parts are mapped here (copies are kernel-checked memory copies); parts of
ranks on other hosts are reached over the network path (register the local buffer first).
"""

from __future__ import annotations

import enum

from ._native import BigMemory, BmConfig
from ._native import bm_create as _create
from ._native import bm_initialize as _initialize
from ._native import bm_rank_id as _rank_id
from ._native import bm_uninitialize as _uninitialize
from ._native import bm_update_store_url as _update_store_url


class BmCopyType(enum.IntEnum):
    """Copy directions: L local (device) memory, H host memory, G global (GVA), GH the
    global host part."""

    L2G = 0
    G2L = 1
    G2H = 2
    H2G = 3
    L2GH = 4
    GH2L = 5
    GH2H = 6
    H2GH = 7
    G2G = 8
    AUTO = 9


class BmDataOpType(enum.IntEnum):
    """Requested data path kinds (bit flags). ROCE is the seed's name; the others are 1.3's.
    On a host each maps to the real path: same host, memory copies; other hosts, tcp."""

    SDMA = 1
    HOST_RDMA = 2
    ROCE = 2
    HOST_TCP = 4
    DEVICE_RDMA = 8
    HOST_URMA = 16
    HOST_SHM = 32
    DEVICE_URMA = 64
    DEVICE_UBOE = 128


class BmMemType(enum.IntEnum):
    LOCAL_DEVICE = 0
    LOCAL_HOST = 1
    DEVICE = 2
    HOST = 3


class BmGroupEvent(enum.IntEnum):
    JOIN_EVENT = 0
    LEAVE_EVENT = 1


def initialize(store_url: str, world_size: int, device_id: int, config: BmConfig | None = None) -> int:
    """Join Big Memory as one of ``world_size`` ranks (at most 1024) through the config store
    at ``store_url``. The rank is ``config.rank_id``, or assigned in join order with
    ``config.auto_ranking``. Returns 0 on success, otherwise an error code."""
    return _initialize(store_url, world_size, device_id, config)


def uninitialize(flags: int = 0) -> None:
    """Leave Big Memory (``flags`` reserved)."""
    _uninitialize(flags)


def bm_rank_id() -> int:
    """This process's rank; 4294967295 (u32 max) when Big Memory is not initialized."""
    return _rank_id()


def update_store_url(store_url: str) -> int:
    """Move this process to the config store now at ``store_url`` (``tcp://ip:port``), after the
    store was restarted at a new address. Within ``init_timeout`` it connects there and publishes
    this rank's records and those of its objects' engines again, so the new store learns who is
    alive; later operations (barriers, creates, peer lookups) use it. Every rank calls it.
    Returns 0, or an error code with nothing moved: SMEM_NOT_INIT before ``initialize``,
    SMEM_INVALID_PARAM for a malformed URL, SMEM_NOT_CONNECTED when no store answers there
    (should the store stop answering midway, the message says the rank moved but not all of
    its objects' engines: calling again finishes the move)."""
    return _update_store_url(store_url)


def create(id: int, local_dram_size: int, local_hbm_size: int = 0,
           data_op_type: BmDataOpType = BmDataOpType.SDMA, flags: int = 0) -> BigMemory:
    """Create Big Memory object ``id`` (0..63); every rank contributes ``local_dram_size``
    bytes of DRAM (``local_hbm_size`` > 0 needs a device). Collective. Returns a BigMemory;
    raises MemFabricError (``.code``; ``get_last_err_msg()``) on failure."""
    return _create(id, local_dram_size, local_hbm_size, int(data_op_type), flags)


def create2(id: int, local_dram_size: int, max_dram_size: int, local_hbm_size: int = 0, max_hbm_size: int = 0,
            data_op_type: BmDataOpType = BmDataOpType.SDMA, enable_56bits_gva: bool = False, flags: int = 0,
            shm_fd: int = -1, tag: str = "", tag_op_info: str = "") -> BigMemory:
    """1.3's create with maximum sizes: contributions are fixed at create here, so the
    maximum must equal the local size (anything else is refused, not silently ignored)."""
    if max_dram_size not in (0, local_dram_size) or max_hbm_size not in (0, local_hbm_size):
        raise ValueError("max sizes larger than the local sizes need extend_local_mem, which this version does not support")
    if shm_fd != -1:
        raise ValueError("shm_fd: bringing an external segment is not supported in this version")
    return create(id, local_dram_size, local_hbm_size, data_op_type, flags)


__all__ = ["initialize", "uninitialize", "bm_rank_id", "update_store_url", "create", "create2", "BmConfig", "BigMemory",
           "BmCopyType", "BmDataOpType", "BmMemType", "BmGroupEvent"]
