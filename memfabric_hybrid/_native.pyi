"""Type stubs of memfabric_hybrid._native (the Rust extension). Checked by mypy.stubtest."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from typing import final, overload

from typing_extensions import disjoint_base

from ._types import TransDataOpType as _TransDataOpType
from ._types import TransferOpcode as _TransferOpcode

__version__: str

_BytesLike = Union[bytes, bytearray, memoryview, str]

ERROR_NAMES: Dict[int, str]
SMEM_OK: int
SMEM_ERROR: int
SMEM_INVALID_PARAM: int
SMEM_MALLOC_FAILED: int
SMEM_NO_RESOURCES: int
SMEM_NOT_STARTED: int
SMEM_TIMEOUT: int
SMEM_REPEAT_INVOKE: int
SMEM_DUPLICATED: int
SMEM_NOT_EXIST: int
SMEM_NOT_INIT: int
SMEM_RES_IN_USE: int
SMEM_RECONNECTED: int
SMEM_PARTIAL_FAILED: int
SMEM_NOT_CONNECTED: int
SMEM_BUFFER_TOO_SMALL: int
MF_PEER_GONE: int
MF_OUT_OF_BOUNDS: int
MF_REFUSED: int
MF_TLS: int
MF_PROTOCOL: int
MF_UNSUPPORTED: int
MF_IO: int

class MemFabricError(RuntimeError):
    """A call that returns an object failed; `code` holds the library's numeric error code."""

    code: int

class StoreError(MemFabricError):
    """A config store call failed; `code` holds the library's numeric error code."""

    code: int

class StoreTimeoutError(StoreError):
    """A config store call did not finish within its timeout."""

def initialize(flags: int = 0) -> int:
    """Initialize the runtime environment. Returns 0 on success, otherwise an error code."""

def uninitialize() -> None:
    """Exit the runtime environment: stops the config stores this process created."""

def set_log_level(level: int) -> int:
    """Set the log level: 0 debug, 1 info, 2 warn (default), 3 error. Returns 0 or -2000."""

def set_extern_logger(log_fn: Optional[Callable[[int, str], None]]) -> int:
    """Send every log message at or above the log level to ``log_fn(level, message)``."""

def set_conf_store_tls_key(tls_pk: str, tls_pk_pw: str, py_decrypt_func: Callable[[str], str]) -> int:
    """Register the private key (path or PEM) and its encrypted pass phrase for store TLS."""

def set_conf_store_tls(enable: bool, tls_info: str) -> int:
    """Enable or disable TLS for config stores and clients created afterwards."""

def get_last_err_msg() -> str:
    """The last error message of this thread ("" when none)."""

def get_and_clear_last_err_msg() -> str:
    """The last error message of this thread; clears it."""

def device_info() -> Dict[str, Dict[str, Any]]:
    """Which device backends (host, cuda, ascend) this process can use, or why not."""

def create_config_store(store_url: str) -> int:
    """Create (start) a config store server in this process at ``store_url``."""

def start_config_store(store_url: str = "tcp://127.0.0.1:0") -> ConfigStoreServer:
    """Start a config store server and return it (port 0 picks a free port)."""

@final
class ConfigStoreServer:
    """A config store server owned by a Python object; stops on ``close()``."""

    @property
    def url(self) -> str: ...
    @property
    def port(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> ConfigStoreServer: ...
    def __exit__(self, *_args: object) -> None: ...

@final
class StoreClient:
    """A client of a config store, named like torch's ``TCPStore`` where the operations match.

    ``url``: ``tcp://ip:port`` (embedded store server) or ``etcd://ip:port[,ip:port...][/prefix]``
    (an etcd cluster; ephemeral keys live on a 3 s lease the client keeps alive).
    """

    def __new__(cls, url: str, timeout: float = 30.0) -> StoreClient: ...
    @property
    def url(self) -> str: ...
    @property
    def connection(self) -> str: ...
    def set(self, key: str, value: _BytesLike, ephemeral: bool = False) -> None: ...
    def get(self, key: str, wait: bool = True, timeout: Optional[float] = None) -> bytes: ...
    def add(self, key: str, amount: int = 1) -> int: ...
    def compare_set(self, key: str, expected: _BytesLike, desired: _BytesLike) -> bytes: ...
    def delete(self, key: str) -> bool: ...
    def delete_key(self, key: str) -> bool: ...
    def append(self, key: str, value: _BytesLike) -> int: ...
    def exists(self, key: str) -> bool: ...
    def check(self, keys: Sequence[str]) -> bool: ...
    def multi_get(self, keys: Sequence[str], wait: bool = True, timeout: Optional[float] = None) -> List[bytes]: ...
    def multi_set(self, keys: Sequence[str], values: Sequence[_BytesLike], ephemeral: bool = False) -> None: ...
    def list(self, prefix: str = ...) -> List[str]: ...
    def num_keys(self) -> int: ...
    def wait(self, keys: Sequence[str], timeout: Optional[float] = None) -> None: ...
    def ping(self) -> float: ...
    def close(self) -> None: ...
    def __enter__(self) -> StoreClient: ...
    def __exit__(self, *_args: object) -> None: ...

@final
class StoreGroup:
    """Membership in a group of ranks coordinated through a config store (``tcp://`` or ``etcd://``)."""

    def __new__(
        cls, store_url: str, name: str, world_size: int, rank: Optional[int] = None, timeout: float = 120.0
    ) -> StoreGroup: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    def barrier(self, timeout: Optional[float] = None) -> None: ...
    def all_gather(self, data: _BytesLike, timeout: Optional[float] = None) -> List[bytes]: ...
    def leave(self) -> None: ...

@final
class Stream:
    """An ordered host work queue for asynchronous transfers."""

    def __new__(cls) -> Stream: ...
    def synchronize(self, timeout: float = 600.0) -> int: ...
    def query(self) -> int: ...
    def record_event(self) -> Event: ...
    def wait_event(self, event: Event, timeout: float = 600.0) -> int: ...

@final
class Event:
    """A point in a Stream: done once everything submitted before it is done."""

    def query(self) -> bool: ...
    def synchronize(self, timeout: float = 600.0) -> int: ...

# None/0 (run now), a Stream (queued in order), a device stream handle (int), or an object with
# `cuda_stream` (torch.cuda.Stream) or `npu_stream` (torch_npu.npu.Stream).
_StreamArg = Union[None, int, Stream, object]
# An int address, or a tensor / numpy array / buffer-protocol object (see memfabric_hybrid.buffers).
_Memory = Union[int, bytearray, memoryview, bytes, object]

@disjoint_base
class TransferEngine:
    """The Transfer Engine: point-to-point writes and reads between engines' registered memory."""

    TransDataOpType: type[_TransDataOpType]
    TransferOpcode: type[_TransferOpcode]

    def __new__(cls) -> TransferEngine: ...
    def initialize(
        self,
        store_url: str,
        session_id: Optional[str] = None,
        role: Optional[str] = None,
        device_id: int = 0,
        data_op_type: int = 1,
        store_server_role: str = "Decode",
        nic: str = "",
        *,
        unique_id: Optional[str] = None,
    ) -> int: ...
    def get_rpc_port(self) -> int: ...
    @property
    def session_id(self) -> str: ...
    @property
    def transfer_timeout(self) -> float: ...
    @transfer_timeout.setter
    def transfer_timeout(self, seconds: float) -> None: ...
    def transport_for(self, dest_session: str) -> str: ...
    def update_store_url(self, store_url: str) -> int: ...
    def register_memory(self, buffer_addr: _Memory, capacity: Optional[int] = None) -> int: ...
    def unregister_memory(self, buffer_addr: _Memory) -> int: ...
    def batch_register_memory(self, buffer_addrs: Sequence[_Memory], capacities: Sequence[int]) -> int: ...
    @overload
    def transfer_sync_write(
        self, destflag: str, buffer: _Memory, peer_buffer_address: int, length: Optional[int] = None, flags: int = 0,
    ) -> int: ...
    @overload
    def transfer_sync_write(
        self, *, dest_session: str, buffer: _Memory, peer_buffer: int, length: Optional[int] = None, flags: int = 0,
    ) -> int: ...
    @overload
    def transfer_sync_read(
        self, destflag: str, buffer: _Memory, peer_buffer_address: int, length: Optional[int] = None, flags: int = 0,
    ) -> int: ...
    @overload
    def transfer_sync_read(
        self, *, dest_session: str, buffer: _Memory, peer_buffer: int, length: Optional[int] = None, flags: int = 0,
    ) -> int: ...
    @overload
    def batch_transfer_sync_write(
        self, destflag: str, buffers: Sequence[_Memory], peer_buffer_addresses: Sequence[int], lengths: Sequence[int], flags: int = 0,
    ) -> int: ...
    @overload
    def batch_transfer_sync_write(
        self, *, dest_session: str, buffers: Sequence[_Memory], peer_buffers: Sequence[int], lengths: Sequence[int], flags: int = 0,
    ) -> int: ...
    def batch_transfer_write_with_quant(
        self, dest_session: str, buffers: Sequence[int], peer_buffers: Sequence[int], lengths: Sequence[int],
        scale_buffers: Sequence[int], offset_buffers: Sequence[int], unit_num: int, input_type: int = 0,
        stream: int = 0, flags: int = 0,
    ) -> int:
        """Quantizing batch write (1.3): MF_UNSUPPORTED here (it runs as an Ascend kernel)."""
        ...
    @overload
    def batch_transfer_sync_read(
        self, destflag: str, buffers: Sequence[_Memory], peer_buffer_addresses: Sequence[int], lengths: Sequence[int], flags: int = 0,
    ) -> int: ...
    @overload
    def batch_transfer_sync_read(
        self, *, dest_session: str, buffers: Sequence[_Memory], peer_buffers: Sequence[int], lengths: Sequence[int], flags: int = 0,
    ) -> int: ...
    @overload
    def transfer_async_write_submit(
        self, destflag: str, buffer: _Memory, peer_buffer_address: int, length: Optional[int] = None, stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    @overload
    def transfer_async_write_submit(
        self, *, dest_session: str, buffer: _Memory, peer_buffer: int, length: Optional[int] = None, stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    @overload
    def transfer_async_read_submit(
        self, destflag: str, buffer: _Memory, peer_buffer_address: int, length: Optional[int] = None, stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    @overload
    def transfer_async_read_submit(
        self, *, dest_session: str, buffer: _Memory, peer_buffer: int, length: Optional[int] = None, stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    @overload
    def batch_transfer_async_write_submit(
        self, destflag: str, buffers: Sequence[_Memory], peer_buffer_addresses: Sequence[int], lengths: Sequence[int], stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    @overload
    def batch_transfer_async_write_submit(
        self, *, dest_session: str, buffers: Sequence[_Memory], peer_buffers: Sequence[int], lengths: Sequence[int], stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    @overload
    def batch_transfer_async_read_submit(
        self, destflag: str, buffers: Sequence[_Memory], peer_buffer_addresses: Sequence[int], lengths: Sequence[int], stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    @overload
    def batch_transfer_async_read_submit(
        self, *, dest_session: str, buffers: Sequence[_Memory], peer_buffers: Sequence[int], lengths: Sequence[int], stream: _StreamArg = None, flags: int = 0,
    ) -> int: ...
    def transfer_blocks(
        self,
        dest_session: str,
        local_segments: Sequence[Tuple[int, int, int, int]],
        peer_segments: Sequence[Tuple[int, int, int, int]],
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        opcode: int = 1,
        stream: _StreamArg = None,
    ) -> int: ...
    def destroy(self) -> None: ...
    def unInitialize(self) -> None: ...

@final
class ShmConfig:
    """Configuration of shm.initialize."""

    init_timeout: int
    create_timeout: int
    operation_timeout: int
    start_store: bool
    flags: int
    def __new__(cls) -> ShmConfig: ...

@final
class ShareMemory:
    """A Share Memory object."""

    @property
    def gva(self) -> int: ...
    @property
    def local_rank(self) -> int: ...
    @property
    def rank_size(self) -> int: ...
    @property
    def local_mem_size(self) -> int: ...
    @property
    def stride(self) -> int: ...
    def set_context(self, context: bytes) -> int: ...
    def get_context(self) -> bytes: ...
    def barrier(self) -> int: ...
    def all_gather(self, local_data: bytes) -> bytes: ...
    def topology_can_reach(self, remote_rank: int, reach_info: int = 0) -> int: ...
    def query_support_data_operation(self) -> int: ...
    def destroy(self, flags: int = 0) -> int: ...

def shm_initialize(store_url: str, world_size: int, rank_id: int, device_id: int, config: Optional[ShmConfig] = None) -> int: ...
def shm_uninitialize(flags: int = 0) -> None: ...
def shm_create(id: int, rank_size: int, rank_id: int, local_mem_size: int, data_op_type: int = 1, flags: int = 0) -> ShareMemory: ...

@final
class BmConfig:
    """Configuration of bm.initialize."""

    init_timeout: int
    create_timeout: int
    operation_timeout: int
    start_store: bool
    start_store_only: bool
    dynamic_world_size: bool
    unified_address_space: bool
    auto_ranking: bool
    rank_id: int
    flags: int
    network_interface: str
    def __new__(cls) -> BmConfig: ...
    def set_nic(self, nic: str) -> None: ...

@final
class BigMemory:
    """A Big Memory object."""

    def join(self, flags: int = 0) -> int: ...
    def leave(self, flags: int = 0) -> int: ...
    def local_mem_size(self, mem_type: int = 2) -> int: ...
    def peer_rank_ptr(self, peer_rank: int, mem_type: int = 2) -> int: ...
    def get_rank_id_by_gva(self, gva: int) -> int: ...
    def gva_to_va(self, gva: int, mem_type: int = 1) -> int: ...
    def register(self, addr: int, size: int) -> int: ...
    def unregister(self, addr: int) -> int: ...
    def wait(self) -> int: ...
    def members(self) -> List[int]: ...
    def set_group_event_handler(self, handler: Optional[Callable[[int, int], None]]) -> None: ...
    def extend_local_mem(self, mem_type: int = 3, size: int = 0) -> int: ...
    def copy_data(
        self, src_ptr: _Memory, dst_ptr: _Memory, size: int, type: int, flags: int = 0, stream: _StreamArg = None
    ) -> int: ...
    def copy_data_batch(
        self, src_addrs: Sequence[_Memory], dst_addrs: Sequence[_Memory], sizes: Sequence[int], count: int, type: int,
        flags: int = 0, stream: _StreamArg = None,
    ) -> int: ...
    def destroy(self) -> None: ...

def bm_initialize(store_url: str, world_size: int, device_id: int, config: Optional[BmConfig] = None) -> int: ...
def bm_uninitialize(flags: int = 0) -> None: ...
def bm_rank_id() -> int: ...
def bm_update_store_url(store_url: str) -> int: ...
def bm_create(id: int, local_dram_size: int, local_hbm_size: int = 0, data_op_type: int = 1, flags: int = 0) -> BigMemory: ...
