"""Offload: a pool of host memory the device can address, and copy operators over descriptor
arrays (upstream memfabric_hybrid 1.3's ``memfabric_hybrid.offload``, same names, arguments,
defaults and return codes).

    import torch
    from memfabric_hybrid import offload

    cfg = offload.OffloadConfig()
    cfg.reserve_size = cfg.alloc_size = 1 << 30       # rounded up to 1 GiB
    assert offload.initialize(cfg) == 0                # 0 or an error code
    host = offload.empty([16, 4096], dtype=torch.uint8)  # a tensor over pool memory
    ptr = offload.malloc(4096)                         # an address in the pool; 0 on failure
    offload.get_dva(ptr)                               # the device's address of it; 0 on failure
    offload.sparse_copy(srcs, dsts, lens, size, dev)   # int64/uint64 pointers, uint32 lengths
    offload.free(ptr); offload.uninitialize()

Scenes: ``Scene.LOCAL`` (one pool in this process; ``reserve_size`` and ``alloc_size`` equal)
or ``Scene.SHARED`` (one slot per rank: ``world_size`` ranks join through the config store at
``store_url``, rank 0 hosting it; rank r's slot starts at ``base + r * stride``, stride being
``reserve_size`` rounded up, and holds the ``alloc_size`` bytes that rank backs; every slot of
the host is mapped in every rank at the same address).

Operators (upstream runs them as device kernels on the current stream; here they run on the
calling thread, after the current stream of a CUDA/NPU ``deviceId`` has been synchronized, and
return when the bytes are in place):

- ``sparse_copy(srcPtrs, dstPtrs, lenPtrs, sizePtr, deviceId)``: entry i copies
  ``lenPtrs[i]`` bytes from ``srcPtrs[i]`` to ``dstPtrs[i]``, ``i < sizePtr[0]``.
- ``group_pack_copy(srcPtrs, dstPtrs, lenPtrs, numLocalExpertPtr, groupList,
  packedGroupList, deviceId)``: the j-th entry i with ``groupList[i] != 0`` copies
  ``lenPtrs[i]`` bytes from ``srcPtrs[i]`` to ``dstPtrs[j]`` and sets
  ``packedGroupList[j] = groupList[i]``.
- ``kv_exchange_copy(metaPtr, deviceId)``: KV pages between a device layout and a host layout,
  all addresses derived from the 44 int64 values of ``metaPtr`` (see the README).
- ``entry_gather(dst, ids, count, deviceId)``: row ``ids[i]`` of the grid registered with
  ``register_entry_table`` to ``dst + i * entryBytes``, ``i < count[0]``.

Descriptor arrays are tensors (torch, numpy, anything ``mf.buffers`` accepts; CUDA tensors
where the CUDA backend loaded) or bare int addresses. Every address is checked before any byte
moves: pool ranges against the pool, device ranges against their allocation, other host memory
is copied by the kernel; a bad one gives an error code (``MF_OUT_OF_BOUNDS``, ...) and
``mf.get_last_err_msg()`` says which entry, never a crash.
"""

from __future__ import annotations

import ctypes
import enum
import operator
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _native
from .buffers import buffer_info

_Span = Tuple[int, Optional[int], Optional[str]]


class Scene(enum.IntEnum):
    """The pool's scene: LOCAL (one pool in this process), SHARED (one slot per rank of a
    group, shared by the group's processes on this host)."""

    LOCAL = 0
    SHARED = 1


LOCAL = Scene.LOCAL
SHARED = Scene.SHARED

OFFLOAD_FLAG_GIANT_PAGE = 1
"""``OffloadConfig.flags`` bit, LOCAL scene only: the pool is advised for huge pages."""

_BITS = {
    "device_id": 32,
    "reserve_size": 64,
    "alloc_size": 64,
    "world_size": 32,
    "rank_id": 32,
    "flags": 32,
    "local_world_size": 32,
}
_STORE_URL_MAX = 63


def _uint(value: Any, name: str, bits: int) -> int:
    """``value`` as an unsigned int of ``bits`` bits; TypeError otherwise (as upstream's
    binding refuses a value its C type cannot hold)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not 0 <= v < (1 << bits):
        raise TypeError(f"{name} {v} does not fit an unsigned {bits}-bit integer")
    return v


class OffloadConfig:
    """Configuration of ``offload.initialize`` (upstream's ``offload_config_t``).

    Attributes (all 0, ``""`` or ``Scene.LOCAL`` by default):
        device_id: the device the pool serves (CUDA: the pool is page-locked in its context).
        reserve_size: bytes of address space per slot, rounded up to 1 GiB; SHARED: the same on
            every rank (it is the slot stride).
        alloc_size: bytes this rank backs, rounded up to 1 GiB; LOCAL: equal to reserve_size;
            SHARED: at most reserve_size, and may differ between ranks.
        world_size: SHARED: ranks in the group (at most 1024).
        rank_id: SHARED: this rank; rank 0 hosts the config store (when its address is free on
            this host); slot r is rank r's.
        scene: ``Scene.LOCAL`` or ``Scene.SHARED`` (an int 0 or 1 is taken too).
        store_url: SHARED: the config store, at most 63 bytes; "" takes
            ``$ASCEND_MF_STORE_URL``, else ``tcp://127.0.0.1:<8500 + device_id //
            local_world_size>``.
        flags: ``OFFLOAD_FLAG_GIANT_PAGE`` (LOCAL only) or 0.
        local_world_size: SHARED: ranks on this host; 0 means world_size. A pool over several
            hosts is refused (MF_UNSUPPORTED): the copies load and store every slot directly.
    """

    __slots__ = tuple(_BITS) + ("scene", "store_url")

    device_id: int
    reserve_size: int
    alloc_size: int
    world_size: int
    rank_id: int
    scene: Scene
    store_url: str
    flags: int
    local_world_size: int

    def __init__(self) -> None:
        for name in _BITS:
            object.__setattr__(self, name, 0)
        object.__setattr__(self, "scene", Scene.LOCAL)
        object.__setattr__(self, "store_url", "")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _BITS:
            value = _uint(value, name, _BITS[name])
        elif name == "scene":
            if isinstance(value, bool):
                raise TypeError("scene must be an offload.Scene, not bool")
            try:
                value = Scene(operator.index(value))
            except TypeError:
                raise TypeError(f"scene must be an offload.Scene, not {type(value).__name__}") from None
            except ValueError:
                raise ValueError(f"scene {value!r} is not LOCAL (0) or SHARED (1)") from None
        elif name == "store_url":
            if not isinstance(value, str):
                raise TypeError(f"store_url must be a str, not {type(value).__name__}")
            if len(value.encode()) > _STORE_URL_MAX:
                raise ValueError(f"store_url too long, max {_STORE_URL_MAX} bytes, url: {value}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"OffloadConfig({fields})"


def initialize(config: OffloadConfig) -> int:
    """Build this process's offload pool as ``config`` describes (SHARED: together with the
    other ranks; returns once every rank has mapped every slot, or fails within 120 s).

    Called again with an equal config it returns 0 and keeps the pool (as upstream); with
    another config SMEM_REPEAT_INVOKE. Returns 0 or an error code (``mf.get_last_err_msg()``).
    """
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"config must be an offload.OffloadConfig, not {type(config).__name__}")
    c = config
    return _native.offload_initialize(
        c.device_id, c.reserve_size, c.alloc_size, c.world_size, c.rank_id, int(c.scene),
        c.store_url, c.flags, c.local_world_size,
    )


def uninitialize() -> None:
    """Release the pool (and, SHARED, leave the group; rank 0 waits up to 30 s for the others
    to leave the store it hosts). Addresses from ``malloc`` and tensors from ``empty`` must not
    be used afterwards. Nothing happens when the pool is not initialized."""
    _native.offload_uninitialize()


def malloc(size: int, flags: int = 0) -> int:
    """``size`` bytes of this rank's part of the pool (16-byte aligned, best fit); the address,
    or 0 on failure (``mf.get_last_err_msg()`` says why). ``flags`` is reserved."""
    return _native.offload_malloc(_uint(size, "size", 64), _uint(flags, "flags", 64))


def free(ptr: int, flags: int = 0) -> None:
    """Return memory from ``malloc`` (or ``empty``'s ``data_ptr()``). A pointer that is not one
    is reported through ``mf.get_last_err_msg()``. ``flags`` is reserved."""
    _native.offload_free(_uint(ptr, "ptr", 64), _uint(flags, "flags", 64))


def get_dva(ptr: int) -> int:
    """The device virtual address of pool address ``ptr`` (an interior address too), or 0 on
    failure. It is ``ptr`` itself where the device addresses host memory at its host address:
    no accelerator (the host is the device), ``MF_DEVICE_BACKEND=host``, or a LOCAL pool under
    CUDA (page-locked, unified addressing). Elsewhere 0 with MF_UNSUPPORTED saying why; the
    copies here take pool host addresses either way."""
    return _native.offload_get_dva(_uint(ptr, "ptr", 64))


def register_entry_table(entryBytes: int, rowsPerSlot: int) -> int:
    """Register the pool's single uniform row-grid layout (row pitch / rows per slot across
    all segments; callers with multiple same-width tables fold their per-segment offsets into
    the ids); returns 0 on success, negative on failure.

    Rows of ``entryBytes`` (1 .. 65536) start at every slot's start, ``rowsPerSlot`` of them,
    and must fit the bytes this rank backs; global row id = slot * rowsPerSlot + row. Once per
    pool (SMEM_REPEAT_INVOKE after), cleared by ``uninitialize``. A LOCAL pool is one slot.
    """
    return _native.offload_register_entry_table(
        _uint(entryBytes, "entryBytes", 32), _uint(rowsPerSlot, "rowsPerSlot", 32))


def pool_info() -> Dict[str, Any]:
    """The pool's layout (beyond upstream's API): ``scene``, ``rank``, ``slots``, ``base`` (slot
    0's start), ``slot_stride``, ``local_base``/``local_size`` (this rank's slot and the bytes
    it backs), ``backed`` (per slot), ``bytes_in_use``, ``dva_unsupported`` (why get_dva fails,
    or None) and ``entry_table`` ((entryBytes, rowsPerSlot) or None). Raises MemFabricError
    (``code`` SMEM_NOT_INIT) before ``initialize``."""
    return _native.offload_pool_info()


def empty(sizes: Sequence[int], dtype: Any = None, pin_memory: bool = False) -> Any:
    """A torch tensor of shape ``sizes`` and ``dtype`` (default ``torch.bfloat16``) over new
    pool memory (not initialized). The memory is not freed with the tensor: pass its
    ``data_ptr()`` to ``free`` once done, as upstream. ``pin_memory`` is accepted and ignored
    (the pool is already what the device addresses). Raises MemFabricError (``code``) when the
    pool cannot provide the bytes."""
    import torch

    if dtype is None:
        dtype = torch.bfloat16
    shape: List[int] = []
    for s in sizes:
        if isinstance(s, bool):
            raise TypeError("sizes must be ints")
        shape.append(operator.index(s))
    if any(s < 0 for s in shape):
        raise ValueError(f"sizes {shape} has a negative dimension")
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    ptr = _native.offload_alloc(nbytes)
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


# --- the operators ---------------------------------------------------------------------

_ITEM = {8: "8-byte integers (int64/uint64)", 4: "4-byte integers (int32/uint32)"}


def _span(obj: Any, name: str, itemsize: Optional[int], writable: bool = False) -> Tuple[_Span, Any]:
    """(address, nbytes or None, device type or None) of an argument, and what keeps it alive."""
    if obj is None or isinstance(obj, (bool, float, complex, str)):
        raise TypeError(f"{name} must be a tensor, an array or an int address, not {type(obj).__name__}")
    if isinstance(obj, int):
        return (_uint(obj, name, 64), None, None), None
    if itemsize is not None:
        size = obj.element_size() if callable(getattr(obj, "element_size", None)) else getattr(obj, "itemsize", None)
        if size is not None and size != itemsize:
            raise TypeError(f"{name} must hold {_ITEM[itemsize]}, not {getattr(obj, 'dtype', type(obj).__name__)}")
    device = getattr(getattr(obj, "device", None), "type", None)
    if isinstance(device, str) and device != "cpu" and hasattr(obj, "data_ptr"):
        # Device memory: the native side checks that a backend reaches it (MF_UNSUPPORTED,
        # with the reason, where none does) and bounds every access by the driver's allocation.
        if not obj.is_contiguous():
            raise ValueError(f"{name} is not contiguous")
        return (int(obj.data_ptr()), int(obj.numel() * obj.element_size()), device), obj
    addr, nbytes, owner = buffer_info(obj, writable)
    return (addr, nbytes, None), owner


def _device(deviceId: Any) -> Tuple[Optional[str], Any]:
    """The device type of upstream's ``deviceId`` (a ``torch.device``; an int ordinal or None
    are taken too), and the device object to synchronize."""
    if deviceId is None:
        return None, None
    if isinstance(deviceId, bool):
        raise TypeError("deviceId must be a torch.device, not bool")
    if isinstance(deviceId, int):
        _uint(deviceId, "deviceId", 16)
        return None, None
    kind = getattr(deviceId, "type", None)
    index = getattr(deviceId, "index", None)
    if not isinstance(kind, str):
        raise TypeError(f"deviceId must be a torch.device, not {type(deviceId).__name__}")
    if index is not None:
        _uint(index, "deviceId.index", 16)
    return kind, deviceId


def _sync(devices: Sequence[Any]) -> None:
    """Waits for the current stream of each CUDA/NPU device named: upstream queues the
    operators on it, so what was queued before them must be done before they run here."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    seen = set()
    for d in devices:
        kind = getattr(d, "type", None)
        if kind not in ("cuda", "npu") or str(d) in seen:
            continue
        seen.add(str(d))
        mod = getattr(torch, kind, None)
        # A device torch cannot use here has no stream to wait for; the call itself then
        # reports MF_UNSUPPORTED with the reason.
        if mod is not None and hasattr(mod, "current_stream") and mod.is_available():
            mod.current_stream(d).synchronize()


def _run(call: Any, deviceId: Any, args: Sequence[Tuple[Any, str, Optional[int], bool]]) -> int:
    kind, dev = _device(deviceId)
    spans = []
    owners = []
    devices = [dev]
    for obj, name, itemsize, writable in args:
        s, owner = _span(obj, name, itemsize, writable)
        spans.append(s)
        owners.append(owner)
        if s[2] is not None:
            devices.append(obj.device)
    _sync(devices)
    # `owners` keeps every argument's memory alive until the call has returned.
    rc = call(*spans, kind)
    return int(rc)


def sparse_copy(srcPtrs: Any, dstPtrs: Any, lenPtrs: Any, sizePtr: Any, deviceId: Any) -> int:
    """Copy ``lenPtrs[i]`` bytes from ``srcPtrs[i]`` to ``dstPtrs[i]`` for ``i <
    sizePtr[0]``. Pointers are 8-byte, lengths and the count 4-byte integers.

    From 64 entries on (where upstream's kernel pairs entry i with entry i + n/2 on every SoC)
    an odd count, or a pair of more than 88 KiB, is refused with SMEM_INVALID_PARAM: the kernel
    would skip the last entry, or overflow its buffer. Returns 0 or an error code."""
    return _run(_native.offload_sparse_copy, deviceId, [
        (srcPtrs, "srcPtrs", 8, False),
        (dstPtrs, "dstPtrs", 8, False),
        (lenPtrs, "lenPtrs", 4, False),
        (sizePtr, "sizePtr", 4, False),
    ])


def group_pack_copy(srcPtrs: Any, dstPtrs: Any, lenPtrs: Any, numLocalExpertPtr: Any, groupList: Any,
                    packedGroupList: Any, deviceId: Any) -> int:
    """Compact the entries with a non-zero group: with N = ``numLocalExpertPtr[0]``, the j-th
    i < N with ``groupList[i] != 0`` copies ``lenPtrs[i]`` bytes from ``srcPtrs[i]`` to
    ``dstPtrs[j]`` and sets ``packedGroupList[j] = groupList[i]``; the tails of ``dstPtrs``'
    targets and of ``packedGroupList`` are left alone. groupList/packedGroupList are int64.
    Returns 0 or an error code."""
    return _run(_native.offload_group_pack_copy, deviceId, [
        (srcPtrs, "srcPtrs", 8, False),
        (dstPtrs, "dstPtrs", 8, False),
        (lenPtrs, "lenPtrs", 4, False),
        (numLocalExpertPtr, "numLocalExpertPtr", 4, False),
        (groupList, "groupList", 8, False),
        (packedGroupList, "packedGroupList", 8, True),
    ])


def kv_exchange_copy(metaPtr: Any, deviceId: Any) -> int:
    """Move KV pages between a device layout and a host layout as the int64 ``metaPtr``
    describes: [0] components (<= 4), [1] pages, [2] page size (tokens), [3] direction (1 H2D,
    2 D2H), [4]/[5] addresses of the device/host int64 token indices (page p's pages are
    index[p * page_size] // page_size), [6] host layout (0 page first, 1 layer first: runs of
    contiguous pages move as one), [7] 0; then per component 9 values: device_base,
    host_base, device_layer_pitch, device_page_pitch, host_page_pitch, host_layer_pitch,
    width, layer_lo, layer_hi (bytes; layers [lo, hi)). Returns 0 or an error code."""
    return _run(_native.offload_kv_exchange_copy, deviceId, [(metaPtr, "metaPtr", 8, False)])


def entry_gather(dst: Any, ids: Any, count: Any, deviceId: Any) -> int:
    """Gather rows of the registered grid: row ``ids[i]`` (int64, < 2^32) of slot
    ``ids[i] // rowsPerSlot`` to ``dst + i * entryBytes`` for ``i < count[0]`` (uint32).
    ``dst`` is a tensor or an int address. Returns 0 or an error code (SMEM_NOT_INIT before
    ``register_entry_table``; MF_OUT_OF_BOUNDS for a row outside the pool)."""
    return _run(_native.offload_entry_gather, deviceId, [
        (dst, "dst", None, True),
        (ids, "ids", 8, False),
        (count, "count", 4, False),
    ])


__all__ = [
    "Scene",
    "LOCAL",
    "SHARED",
    "OFFLOAD_FLAG_GIANT_PAGE",
    "OffloadConfig",
    "initialize",
    "uninitialize",
    "malloc",
    "free",
    "get_dva",
    "register_entry_table",
    "pool_info",
    "empty",
    "sparse_copy",
    "group_pack_copy",
    "kv_exchange_copy",
    "entry_gather",
]
