//! `smem_shm.h`: Share Memory, with the calls, types and values of the 1.3.0 release.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use memfabric::shm::{self as core, ShareMemory, ShmRuntime};
use memfabric::{Error, Result};

use crate::handles::{Slot, Table};
use crate::{c_str, guarded, guarded_value};

/// A Share Memory object as C sees it (`smem_shm_t`).
pub type SmemShm = *mut c_void;

/// `smem_shm_data_op_type`: bits of the data paths.
pub type SmemShmDataOpType = u32;
pub const SMEMS_DATA_OP_MTE: SmemShmDataOpType = 1 << 0;
pub const SMEMS_DATA_OP_SDMA: SmemShmDataOpType = 1 << 1;
pub const SMEMS_DATA_OP_RDMA: SmemShmDataOpType = 1 << 2;
const ALL_DATA_OPS: u32 = SMEMS_DATA_OP_MTE | SMEMS_DATA_OP_SDMA | SMEMS_DATA_OP_RDMA;

/// `SMEM_SHM_TIMEOUT_MAX`: the largest timeout of [`SmemShmConfig`], in seconds.
pub const SMEM_SHM_TIMEOUT_MAX: u32 = u32::MAX;
/// `SMEM_SHM_ATOMIC_NUM_LIMIT`: the largest limit of `smem_shm_atomic_alloc_value`.
pub const SMEM_SHM_ATOMIC_NUM_LIMIT: u32 = core::control::VALUE_LIMIT;

/// `smem_shm_config_t` (the layout of `smem_shm_def.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemShmConfig {
    pub shm_init_timeout: u32,
    pub shm_create_timeout: u32,
    pub control_operation_timeout: u32,
    pub start_config_store_server: bool,
    pub flags: u32,
}

/// The exit function of `smem_shm_register_exit`.
pub type ExitFn = Option<unsafe extern "C" fn(status: c_int)>;

/// Most bytes of user context an object carries (`smem_shm_set_extra_context`).
pub const MAX_CONTEXT: u32 = 64 << 10;
/// Most bytes a rank sends in one gather (`smem_shm_control_allgather` and the sub-group's).
pub const MAX_GATHER: u32 = 64 << 10;

static RUNTIME: Slot<ShmRuntime> = Slot::new("Share Memory", "smem_shm_init");
static OBJECTS: Table<ShareMemory> = Table::new("Share Memory");
/// Longest a destroy waits for barriers and gathers that still use the object elsewhere.
const RELEASE_WAIT: Duration = Duration::from_secs(130);

fn runtime() -> Result<Arc<ShmRuntime>> {
    RUNTIME.get()
}

/// The object behind `handle`: NULL is an invalid parameter, any handle before
/// `smem_shm_init` (or after `smem_shm_uninit`) finds Share Memory not initialized.
fn object(handle: SmemShm) -> Result<Arc<ShareMemory>> {
    if handle.is_null() {
        return Err(Error::InvalidParam("Share Memory handle is NULL".into()));
    }
    runtime()?;
    OBJECTS.get(handle)
}

/// Fills `config` with the defaults.
///
/// # Safety
/// `config` is null or points to a writable `smem_shm_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_config_init(config: *mut SmemShmConfig) -> i32 {
    guarded("smem_shm_config_init", || {
        if config.is_null() {
            return Err(Error::InvalidParam("config is NULL".into()));
        }
        let d = core::ShmConfig::default();
        // SAFETY: not null and writable by the caller's contract; `write` because the struct
        // is usually uninitialized, so no reference to it is made.
        unsafe {
            config.write(SmemShmConfig {
                shm_init_timeout: d.init_timeout,
                shm_create_timeout: d.create_timeout,
                control_operation_timeout: d.operation_timeout,
                start_config_store_server: d.start_store,
                flags: d.flags,
            })
        };
        Ok(())
    })
}

/// Joins Share Memory as rank `rankId` of `worldSize` through the store at
/// `configStoreIpPort`. The header's `config` is not const; it is only read.
///
/// # Safety
/// `store_url` is null or a NUL-terminated string; `config` null or a `smem_shm_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_init(
    store_url: *const c_char,
    world_size: u32,
    rank_id: u32,
    device_id: u16,
    config: *const SmemShmConfig,
) -> i32 {
    guarded("smem_shm_init", || {
        // SAFETY: the caller's contract on `store_url`.
        let url = unsafe { c_str(store_url, "configStoreIpPort") }?;
        // SAFETY: null refused; otherwise a config valid for the call.
        let c = unsafe { crate::non_null(config, "config") }?;
        let cfg = core::ShmConfig {
            init_timeout: c.shm_init_timeout,
            create_timeout: c.shm_create_timeout,
            operation_timeout: c.control_operation_timeout,
            start_store: c.start_config_store_server,
            flags: c.flags,
        };
        RUNTIME.fill(|| ShmRuntime::initialize(url, world_size, rank_id, i32::from(device_id), cfg))
    })
}

/// Destroys every object still alive and leaves Share Memory.
#[no_mangle]
pub extern "C" fn smem_shm_uninit(flags: u32) {
    let _ = flags;
    guarded("smem_shm_uninit", || {
        let first_error = OBJECTS.destroy_all(RELEASE_WAIT, || {});
        drop(RUNTIME.take());
        first_error
    });
}

/// The data paths this library can use (`smem_shm_data_op_type` bits).
#[no_mangle]
pub extern "C" fn smem_shm_query_support_data_operation() -> u32 {
    core::supported_data_operations()
}

/// Creates object `id` of `rankSize` ranks (collective), each contributing `localSize` bytes
/// (a multiple of 2 MiB in [2 MiB, 4 GiB]); `*gva` is its address, the same in every rank.
/// NULL on error.
///
/// # Safety
/// `gva` is null or points to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_create(
    id: u32,
    rank_size: u32,
    rank_id: u32,
    local_size: u64,
    data_op_type: SmemShmDataOpType,
    flags: u32,
    gva: *mut *mut c_void,
) -> SmemShm {
    let _ = flags;
    guarded_value("smem_shm_create", std::ptr::null_mut(), || {
        if data_op_type == 0 || data_op_type & !ALL_DATA_OPS != 0 {
            return Err(Error::InvalidParam(format!(
                "dataOpType {data_op_type:#x} is not a set of smem_shm_data_op_type bits \
                 (MTE 0x1, SDMA 0x2, RDMA 0x4)"
            )));
        }
        if gva.is_null() {
            return Err(Error::InvalidParam("gva is NULL".into()));
        }
        let obj = runtime()?.create(id, rank_size, rank_id, local_size)?;
        let address = obj.gva() as *mut c_void;
        let handle = OBJECTS.insert(obj, || Ok(()))?;
        // SAFETY: not null and writable by the caller's contract.
        unsafe { gva.write(address) };
        Ok(handle)
    })
}

/// The distance between ranks' parts; 0 for a bad handle.
#[no_mangle]
pub extern "C" fn smem_shm_get_symmetric_size(handle: SmemShm) -> u64 {
    guarded_value("smem_shm_get_symmetric_size", 0, || {
        object(handle).map(|o| o.symmetric_size())
    })
}

/// Releases an object: its mapping goes, and other ranks' waits on it fail.
#[no_mangle]
pub extern "C" fn smem_shm_destroy(handle: SmemShm, flags: u32) -> i32 {
    let _ = flags;
    guarded("smem_shm_destroy", || {
        object(handle)?;
        OBJECTS.destroy(handle, RELEASE_WAIT)
    })
}

/// Attaches `size` bytes of user context (1 to 64 KiB) to the object.
///
/// # Safety
/// `context` is null or points to `size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_set_extra_context(
    handle: SmemShm,
    context: *const c_void,
    size: u32,
) -> i32 {
    guarded("smem_shm_set_extra_context", || {
        if context.is_null() {
            return Err(Error::InvalidParam("context is NULL".into()));
        }
        if size == 0 || size > MAX_CONTEXT {
            return Err(Error::InvalidParam(format!(
                "context of {size} bytes; it must be 1 to {MAX_CONTEXT}"
            )));
        }
        let obj = object(handle)?;
        // SAFETY: not null; `size` readable bytes by the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(context.cast::<u8>(), size as usize) };
        obj.set_context(bytes)
    })
}

/// This process's rank in the object; `UINT32_MAX` for a bad handle.
#[no_mangle]
pub extern "C" fn smem_shm_get_global_rank(handle: SmemShm) -> u32 {
    guarded_value("smem_shm_get_global_rank", u32::MAX, || {
        object(handle).map(|o| o.local_rank())
    })
}

/// The object's number of ranks; `UINT32_MAX` for a bad handle.
#[no_mangle]
pub extern "C" fn smem_shm_get_global_rank_size(handle: SmemShm) -> u32 {
    guarded_value("smem_shm_get_global_rank_size", u32::MAX, || {
        object(handle).map(|o| o.rank_size())
    })
}

/// Waits until every rank of the object reaches the barrier (MF_PEER_GONE at once when one
/// died).
#[no_mangle]
pub extern "C" fn smem_shm_control_barrier(handle: SmemShm) -> i32 {
    guarded("smem_shm_control_barrier", || object(handle)?.barrier())
}

/// Checks a gather's buffers, runs `gather` on the bytes to send when `recv_size` holds
/// `ranks` pieces (checked before anything is sent), and copies its result to `recv_buf`.
///
/// # Safety
/// `send_buf` is null or points to `send_size` readable bytes, `recv_buf` null or to
/// `recv_size` writable ones.
unsafe fn gather_into(
    send_buf: *const c_char,
    send_size: u32,
    recv_buf: *mut c_char,
    recv_size: u32,
    ranks: u32,
    gather: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
) -> Result<()> {
    if send_buf.is_null() {
        return Err(Error::InvalidParam("sendBuf is NULL".into()));
    }
    if recv_buf.is_null() {
        return Err(Error::InvalidParam("recvBuf is NULL".into()));
    }
    if send_size == 0 || send_size > MAX_GATHER {
        return Err(Error::InvalidParam(format!(
            "sendSize {send_size}; it must be 1 to {MAX_GATHER}"
        )));
    }
    let need = u64::from(send_size) * u64::from(ranks);
    if u64::from(recv_size) < need {
        return Err(Error::BufferTooSmall(format!(
            "recvSize {recv_size}: {ranks} ranks x {send_size} bytes need {need}"
        )));
    }
    // SAFETY: not null; `send_size` readable bytes by the caller's contract.
    let data = unsafe { std::slice::from_raw_parts(send_buf.cast::<u8>(), send_size as usize) };
    let gathered = gather(data)?;
    if gathered.len() as u64 != need {
        return Err(Error::Protocol(format!(
            "the gather returned {} bytes, not {need}",
            gathered.len()
        )));
    }
    // SAFETY: `recv_buf` has `recv_size` >= `need` == `gathered.len()` writable bytes (checked
    // above) and does not overlap the Vec.
    unsafe {
        std::ptr::copy_nonoverlapping(gathered.as_ptr(), recv_buf.cast::<u8>(), gathered.len())
    };
    Ok(())
}

/// Gathers `sendSize` bytes from every rank into `recvBuf` in rank order; `recvSize` must
/// hold `sendSize * rank count` (SMEM_BUFFER_TOO_SMALL otherwise, checked before anything is
/// sent).
///
/// # Safety
/// `send_buf` points to `send_size` readable bytes, `recv_buf` to `recv_size` writable ones
/// (either may be null, which is refused).
#[no_mangle]
pub unsafe extern "C" fn smem_shm_control_allgather(
    handle: SmemShm,
    send_buf: *const c_char,
    send_size: u32,
    recv_buf: *mut c_char,
    recv_size: u32,
) -> i32 {
    guarded("smem_shm_control_allgather", || {
        let obj = object(handle)?;
        // SAFETY: the caller's contract on both buffers.
        unsafe {
            gather_into(
                send_buf,
                send_size,
                recv_buf,
                recv_size,
                obj.rank_size(),
                |data| obj.all_gather(data),
            )
        }
    })
}

/// A barrier of the `rankSize` ranks that call it with `key`, this one being `rankId`.
///
/// # Safety
/// `key` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_subgroup_barrier(
    handle: SmemShm,
    key: *const c_char,
    rank_size: u32,
    rank_id: u32,
) -> i32 {
    guarded("smem_shm_subgroup_barrier", || {
        // SAFETY: the caller's contract on `key`.
        let key = unsafe { c_str(key, "key") }?;
        object(handle)?.subgroup_barrier(key, rank_size, rank_id)
    })
}

/// Gathers `sendSize` bytes from each rank of sub-group `key` into `recvBuf`, in sub-group
/// rank order; `recvSize` must hold `sendSize * rankSize`.
///
/// # Safety
/// `key` is null or a NUL-terminated string; the buffers as for
/// [`smem_shm_control_allgather`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn smem_shm_subgroup_allgather(
    handle: SmemShm,
    key: *const c_char,
    rank_size: u32,
    rank_id: u32,
    send_buf: *const c_char,
    send_size: u32,
    recv_buf: *mut c_char,
    recv_size: u32,
) -> i32 {
    guarded("smem_shm_subgroup_allgather", || {
        // SAFETY: the caller's contract on `key`.
        let key = unsafe { c_str(key, "key") }?;
        let obj = object(handle)?;
        // SAFETY: the caller's contract on both buffers.
        unsafe {
            gather_into(
                send_buf,
                send_size,
                recv_buf,
                recv_size,
                rank_size,
                |data| obj.subgroup_all_gather(key, rank_size, rank_id, data),
            )
        }
    })
}

/// `*reachInfo` = the bit mask of data paths that reach `remoteRank` (smem_shm_data_op_type
/// bits: MTE and SDMA for same-host ranks, RDMA for ranks on other hosts).
///
/// # Safety
/// `reach_info` is null or points to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_topology_can_reach(
    handle: SmemShm,
    remote_rank: u32,
    reach_info: *mut u32,
) -> i32 {
    guarded("smem_shm_topology_can_reach", || {
        if reach_info.is_null() {
            return Err(Error::InvalidParam("reachInfo is NULL".into()));
        }
        let bits = object(handle)?.topology_can_reach(remote_rank)?;
        // SAFETY: not null and writable by the caller's contract.
        unsafe { reach_info.write(bits) };
        Ok(())
    })
}

/// `*value` = a number in `[0, limit)` no other rank of the object holds, held by this rank
/// until released.
///
/// # Safety
/// `value` is null or points to a writable `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_atomic_alloc_value(
    handle: SmemShm,
    limit: u32,
    value: *mut i32,
) -> i32 {
    guarded("smem_shm_atomic_alloc_value", || {
        if value.is_null() {
            return Err(Error::InvalidParam("value is NULL".into()));
        }
        if limit == 0 || limit > SMEM_SHM_ATOMIC_NUM_LIMIT {
            return Err(Error::InvalidParam(format!(
                "limit {limit} is outside [1, SMEM_SHM_ATOMIC_NUM_LIMIT = \
                 {SMEM_SHM_ATOMIC_NUM_LIMIT}]"
            )));
        }
        let v = object(handle)?.atomic_alloc_value(limit)?;
        let v = i32::try_from(v)
            .map_err(|_| Error::Protocol(format!("allocated value {v} does not fit an int32_t")))?;
        // SAFETY: not null and writable by the caller's contract.
        unsafe { value.write(v) };
        Ok(())
    })
}

/// Gives back a number this rank holds.
#[no_mangle]
pub extern "C" fn smem_shm_atomic_release_value(handle: SmemShm, value: i32) -> i32 {
    guarded("smem_shm_atomic_release_value", || {
        let v = u32::try_from(value).map_err(|_| {
            Error::InvalidParam(format!(
                "value {value} is negative; allocated values are in [0, \
                 {SMEM_SHM_ATOMIC_NUM_LIMIT})"
            ))
        })?;
        object(handle)?.atomic_release_value(v)
    })
}

/// Registers `exit`, run as `exit(status)` on a thread of the library when any rank calls
/// `smem_shm_global_exit` on the object.
#[no_mangle]
pub extern "C" fn smem_shm_register_exit(handle: SmemShm, exit: ExitFn) -> i32 {
    guarded("smem_shm_register_exit", || {
        let Some(exit) = exit else {
            return Err(Error::InvalidParam("exit function is NULL".into()));
        };
        object(handle)?.register_exit(Arc::new(move |status| {
            // SAFETY: `exit` is the caller's function of the declared signature, called with
            // no lock of the library held.
            unsafe { exit(status) }
        }))
    })
}

/// Makes every rank's registered exit function run with `status`; returns after this
/// process's own has run, when it registered one.
#[no_mangle]
pub extern "C" fn smem_shm_global_exit(handle: SmemShm, status: c_int) {
    guarded("smem_shm_global_exit", || {
        // The object is not held while waiting: the exit function may destroy it.
        let pending = object(handle)?.global_exit(status)?;
        pending.wait()
    });
}
