"""Share Memory: symmetric memory every rank reads and writes through one global address.

    import memfabric_hybrid as mf
    cfg = mf.shm.ShmConfig()
    mf.shm.initialize("tcp://127.0.0.1:8570", world_size, rank_id, device_id, cfg)   # 0 or code
    s = mf.shm.create(0, world_size, rank_id, 2 << 20)      # id 0..63, size a multiple of 2 MiB
    s.gva + r * s.stride                                    # rank r's part, a pointer here
    s.barrier(); s.all_gather(b"x" * 8); s.set_context(b"..."); s.get_context()
    s.topology_can_reach(r)                                 # ShmDataOpType bit mask
    s.destroy(); mf.shm.uninitialize()

Same-host ranks' parts are mapped in every process at the same address, so a GVA is a plain
pointer (numpy can view it). Parts of ranks on other hosts are not mapped here.
"""

from __future__ import annotations

import enum

from ._native import ShareMemory, ShmConfig
from ._native import shm_create as _create
from ._native import shm_initialize as _initialize
from ._native import shm_uninitialize as _uninitialize


class ShmDataOpType(enum.IntEnum):
    """Data operation kinds (bit flags): MTE is load/store through the GVA, SDMA a same-host
    copy engine, RDMA the network path (on hosts: mapped memory, memcpy/CMA, tcp)."""

    MTE = 1
    SDMA = 2
    RDMA = 4


def initialize(store_url: str, world_size: int, rank_id: int, device_id: int, config: ShmConfig | None = None) -> int:
    """Join Share Memory as ``rank_id`` of ``world_size`` ranks (at most 1024) through the
    config store at ``store_url`` (started here when its address is free on this host and
    ``config.start_store``). Returns 0 on success, otherwise an error code."""
    return _initialize(store_url, world_size, rank_id, device_id, config)


def uninitialize(flags: int = 0) -> None:
    """Leave Share Memory (``flags`` reserved)."""
    _uninitialize(flags)


def create(id: int, rank_size: int, rank_id: int, local_mem_size: int,
           data_op_type: ShmDataOpType = ShmDataOpType.MTE, flags: int = 0) -> ShareMemory:
    """Create Share Memory object ``id`` (0..63) over ``rank_size`` ranks (at most 1024); each
    rank contributes ``local_mem_size`` bytes in [2 MiB, 4 GiB], a multiple of 2 MiB.
    Returns a ShareMemory; raises MemFabricError (``.code``, ``get_last_err_msg()``) on failure."""
    return _create(id, rank_size, rank_id, local_mem_size, int(data_op_type), flags)


__all__ = ["initialize", "uninitialize", "create", "ShmConfig", "ShareMemory", "ShmDataOpType"]
