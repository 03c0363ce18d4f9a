"""memfabric_hybrid: a memory fabric for distributed AI serving.

Ranks on one or many hosts pool memory into one global address space and move bytes between
each other's memory with one call. A TCP config store coordinates them.

Common interface (this module):
    initialize(flags=0) -> int, uninitialize()
    set_log_level(level) -> int, set_extern_logger(fn(level, msg)) -> int
    set_conf_store_tls(enable, tls_info) -> int, set_conf_store_tls_key(pk, pk_pw, decrypt) -> int
    get_last_err_msg() -> str, get_and_clear_last_err_msg() -> str
    create_config_store(store_url) -> int
    device_info() -> dict   (host/cuda/ascend: available, devices, or why not)
    get_include_path(), get_lib_path()   (the C API: headers and libmf_smem.so)

Transfer Engine:
    TransferEngine(): initialize(store_url, session_id, role, device_id), register_memory,
    transfer_sync_write/read, batch_*, transfer_async_*_submit(..., stream), transfer_blocks,
    destroy
    TransferOpcode, TransDataOpType, Stream/Event (host work queue for async submits)

Submodules:
    mf.bm     Big Memory: one global address space over every rank's DRAM, copy_data
    mf.shm    Share Memory: symmetric memory at one address, barrier, all_gather
    mf.buffers  tensors/arrays/buffers/DLPack objects accepted wherever an address is taken
    mf.torch_ext  paged KV caches: register_kv_cache, layouts through the store, transfer_blocks
    mf.offload  1.3's offload pool (malloc/free/get_dva, empty) and its copy operators

Beyond the seed:
    start_config_store(url) -> ConfigStoreServer   (port 0 picks a free port)
    StoreClient(url, timeout)                      (set/get/add/compare_set/... like TCPStore)
    StoreGroup(url, name, world_size, rank=None)   (rendezvous, barrier, all_gather)

Return codes: 0 is success; negative values are error codes (see ERROR_NAMES and the README),
and get_last_err_msg() explains the last failure of the calling thread.
"""

from ._native import (  # noqa: F401
    ERROR_NAMES,
    MemFabricError,
    Event,
    Stream,
    TransferEngine,
    ConfigStoreServer,
    StoreClient,
    StoreError,
    StoreGroup,
    StoreTimeoutError,
    __version__,
    create_config_store,
    device_info,
    get_and_clear_last_err_msg,
    get_last_err_msg,
    initialize,
    set_conf_store_tls,
    set_conf_store_tls_key,
    set_extern_logger,
    set_log_level,
    start_config_store,
    uninitialize,
)
from ._native import (  # noqa: F401  error code constants
    MF_IO,
    MF_OUT_OF_BOUNDS,
    MF_PEER_GONE,
    MF_PROTOCOL,
    MF_REFUSED,
    MF_TLS,
    MF_UNSUPPORTED,
    SMEM_BUFFER_TOO_SMALL,
    SMEM_DUPLICATED,
    SMEM_ERROR,
    SMEM_INVALID_PARAM,
    SMEM_MALLOC_FAILED,
    SMEM_NO_RESOURCES,
    SMEM_NOT_CONNECTED,
    SMEM_NOT_EXIST,
    SMEM_NOT_INIT,
    SMEM_NOT_STARTED,
    SMEM_OK,
    SMEM_PARTIAL_FAILED,
    SMEM_RECONNECTED,
    SMEM_REPEAT_INVOKE,
    SMEM_RES_IN_USE,
    SMEM_TIMEOUT,
)

from . import bm, buffers, shm, torch_ext  # noqa: E402  (submodules; none imports torch)
from . import offload  # noqa: E402  (1.3's offload pool and copy operators; imports no torch)
from ._types import TransDataOpType, TransferOpcode

_PACKAGE = __import__("pathlib").Path(__file__).resolve().parent


def get_include_path() -> str:
    """The directory of the C API's headers (``smem/host/smem.h``, ``smem_trans.h``,
    ``smem_bm.h``, ``smem_shm.h``, ``smem_config_store_api.h``): compile with ``-I`` it.

    They declare upstream memfabric_hybrid 1.3.0's C API, so C and C++ code written against it
    builds against them and runs on ``libmf_smem.so`` (see ``get_lib_path``)."""
    return str(_PACKAGE / "include")


def get_lib_path() -> str:
    """The directory that holds ``libmf_smem.so``, the C API: link with ``-L`` it and
    ``-lmf_smem`` (and ``-Wl,-rpath,`` it, or set ``LD_LIBRARY_PATH``).

    ``scripts/setup.sh`` builds the library there (``cargo build --release -p
    memfabric-capi``); a wheel built after it carries it. Raises ``FileNotFoundError``,
    saying how to build it, when it is not there."""
    lib = _PACKAGE / "lib"
    if not (lib / "libmf_smem.so").exists():
        raise FileNotFoundError(
            f"{lib / 'libmf_smem.so'} is missing: build it with `cargo build --release -p memfabric-capi` "
            f"and copy target/release/libmf_smem.so there (scripts/setup.sh does both)")
    return str(lib)


# SGLang writes TransferEngine.TransDataOpType.SDMA: reachable from the class too.
TransferEngine.TransDataOpType = TransDataOpType
TransferEngine.TransferOpcode = TransferOpcode

__all__ = [
    "TransferEngine",
    "TransferOpcode",
    "TransDataOpType",
    "Stream",
    "Event",
    "initialize",
    "uninitialize",
    "set_log_level",
    "set_extern_logger",
    "set_conf_store_tls_key",
    "set_conf_store_tls",
    "get_last_err_msg",
    "get_and_clear_last_err_msg",
    "create_config_store",
    "start_config_store",
    "device_info",
    "get_include_path",
    "get_lib_path",
    "ConfigStoreServer",
    "StoreClient",
    "StoreGroup",
    "MemFabricError",
    "bm",
    "buffers",
    "torch_ext",
    "shm",
    "offload",
    "StoreError",
    "StoreTimeoutError",
    "ERROR_NAMES",
]
