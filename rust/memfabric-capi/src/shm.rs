//! `smem_shm.h`: Share Memory. An object's global team is named by the object's own handle
//! (both are numbers in one table, so a destroyed or made-up one is refused).

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

use memfabric::shm::{self as core, ShareMemory, ShmRuntime};
use memfabric::{Error, Result};

use crate::handles::{Slot, Table};
use crate::{c_str, guarded, guarded_value};

/// A Share Memory object (or its global team) as C sees it.
pub type SmemShm = *mut c_void;

/// `smem_shm_config_t` (the layout of `smem_shm_def.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemShmConfig {
    pub shm_init_timeout: u32,
    pub shm_create_timeout: u32,
    pub control_operation_timeout: u32,
    pub start_config_store: bool,
    pub flags: u32,
}

/// Most bytes of user context an object carries (`smem_shm_set_extra_context`).
pub const MAX_CONTEXT: u32 = 64 << 10;

static RUNTIME: Slot<ShmRuntime> = Slot::new("Share Memory", "smem_shm_init");
static OBJECTS: Table<ShareMemory> = Table::new("Share Memory");
/// Longest a destroy waits for barriers and gathers that still use the object elsewhere.
const RELEASE_WAIT: Duration = Duration::from_secs(130);

fn runtime() -> Result<Arc<ShmRuntime>> {
    RUNTIME.get()
}

fn object(handle: SmemShm) -> Result<Arc<ShareMemory>> {
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
                start_config_store: d.start_store,
                flags: d.flags,
            })
        };
        Ok(())
    })
}

/// Joins Share Memory as rank `rankId` of `worldSize`. `gvaSpaceSize` is accepted and unused:
/// each object reserves its own address range at create.
///
/// # Safety
/// `store_url` is null or a NUL-terminated string; `config` null or a `smem_shm_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_init(
    store_url: *const c_char,
    world_size: u32,
    rank_id: u32,
    device_id: u16,
    gva_space_size: u64,
    config: *const SmemShmConfig,
) -> i32 {
    let _ = gva_space_size;
    guarded("smem_shm_init", || {
        // SAFETY: the caller's contract on `store_url`.
        let url = unsafe { c_str(store_url, "configStoreIpPort") }?;
        // SAFETY: null refused; otherwise a config valid for the call.
        let c = unsafe { crate::non_null(config, "config") }?;
        let cfg = core::ShmConfig {
            init_timeout: c.shm_init_timeout,
            create_timeout: c.shm_create_timeout,
            operation_timeout: c.control_operation_timeout,
            start_store: c.start_config_store,
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

/// Creates object `id` of `rankSize` ranks (collective), each contributing `symmetricSize`
/// bytes (a multiple of 2 MiB in [2 MiB, 4 GiB]); `*gva` (when not NULL) is its address,
/// the same in every rank. NULL on error.
///
/// # Safety
/// `gva` is null or points to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_create(
    id: u32,
    rank_size: u32,
    rank_id: u32,
    symmetric_size: u64,
    data_op_type: u32,
    flags: u32,
    gva: *mut *mut c_void,
) -> SmemShm {
    let _ = flags;
    guarded_value("smem_shm_create", std::ptr::null_mut(), || {
        if ![1, 2, 4].contains(&data_op_type) {
            return Err(Error::InvalidParam(format!(
                "dataOpType {data_op_type} is not a smem_shm_data_op_type (1, 2, 4)"
            )));
        }
        let obj = runtime()?.create(id, rank_size, rank_id, symmetric_size)?;
        // SAFETY: null is skipped; otherwise writable by the caller's contract.
        if let Some(out) = unsafe { gva.as_mut() } {
            *out = obj.gva() as *mut c_void;
        }
        OBJECTS.insert(obj, || Ok(()))
    })
}

/// Releases an object: its mapping goes, and other ranks' barriers on it fail.
#[no_mangle]
pub extern "C" fn smem_shm_destroy(handle: SmemShm, flags: u32) -> i32 {
    let _ = flags;
    guarded("smem_shm_destroy", || OBJECTS.destroy(handle, RELEASE_WAIT))
}

/// Attaches `size` bytes of user context (at most 64 KiB) that every rank can read.
///
/// # Safety
/// `context` is null (with size 0) or points to `size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn smem_shm_set_extra_context(
    handle: SmemShm,
    context: *const c_void,
    size: u32,
) -> i32 {
    guarded("smem_shm_set_extra_context", || {
        let obj = object(handle)?;
        if size > MAX_CONTEXT {
            return Err(Error::InvalidParam(format!(
                "context of {size} bytes; at most {MAX_CONTEXT}"
            )));
        }
        let bytes: &[u8] = if size == 0 {
            &[]
        } else if context.is_null() {
            return Err(Error::InvalidParam("context is NULL".into()));
        } else {
            // SAFETY: not null; `size` readable bytes by the caller's contract.
            unsafe { std::slice::from_raw_parts(context.cast::<u8>(), size as usize) }
        };
        obj.set_context(bytes)
    })
}

/// The object's global team (all its ranks); NULL for a bad handle.
#[no_mangle]
pub extern "C" fn smem_shm_get_global_team(handle: SmemShm) -> SmemShm {
    guarded_value("smem_shm_get_global_team", std::ptr::null_mut(), || {
        object(handle).map(|_| handle)
    })
}

/// This process's rank in `team`; `UINT32_MAX` for a bad team.
#[no_mangle]
pub extern "C" fn smem_shm_team_get_rank(team: SmemShm) -> u32 {
    guarded_value("smem_shm_team_get_rank", u32::MAX, || {
        object(team).map(|o| o.local_rank())
    })
}

/// The number of ranks in `team`; `UINT32_MAX` for a bad team.
#[no_mangle]
pub extern "C" fn smem_shm_team_get_size(team: SmemShm) -> u32 {
    guarded_value("smem_shm_team_get_size", u32::MAX, || {
        object(team).map(|o| o.rank_size())
    })
}

/// Waits until every rank of `team` reaches the barrier (MF_PEER_GONE at once when one died).
#[no_mangle]
pub extern "C" fn smem_shm_control_barrier(team: SmemShm) -> i32 {
    guarded("smem_shm_control_barrier", || object(team)?.barrier())
}

/// Gathers `sendSize` bytes from every rank of `team` into `recvBuf` in rank order; `recvSize`
/// must hold `sendSize * rank count` (SMEM_BUFFER_TOO_SMALL otherwise, checked before anything
/// is sent).
///
/// # Safety
/// `send_buf` points to `send_size` readable bytes, `recv_buf` to `recv_size` writable ones
/// (either may be null with a size of 0).
#[no_mangle]
pub unsafe extern "C" fn smem_shm_control_allgather(
    team: SmemShm,
    send_buf: *const c_char,
    send_size: u32,
    recv_buf: *mut c_char,
    recv_size: u32,
) -> i32 {
    guarded("smem_shm_control_allgather", || {
        let obj = object(team)?;
        let need = u64::from(send_size) * u64::from(obj.rank_size());
        if u64::from(recv_size) < need {
            return Err(Error::BufferTooSmall(format!(
                "recvSize {recv_size}: {} ranks x {send_size} bytes need {need}",
                obj.rank_size()
            )));
        }
        if send_size == 0 {
            return Err(Error::InvalidParam("sendSize is 0".into()));
        }
        if send_buf.is_null() || recv_buf.is_null() {
            return Err(Error::InvalidParam("sendBuf or recvBuf is NULL".into()));
        }
        // SAFETY: not null; `send_size` readable bytes by the caller's contract.
        let data = unsafe { std::slice::from_raw_parts(send_buf.cast::<u8>(), send_size as usize) };
        let gathered = obj.all_gather(data)?;
        // SAFETY: `recv_buf` has `recv_size` >= `gathered.len()` writable bytes (checked above:
        // the result is rank count x send size) and does not overlap the Vec.
        unsafe {
            std::ptr::copy_nonoverlapping(
                gathered.as_ptr(),
                recv_buf.cast::<u8>(),
                gathered.len().min(recv_size as usize),
            )
        };
        Ok(())
    })
}

/// `*reachInfo` = the bit mask of data paths that reach `remoteRank` (smem_shm_data_op_type
/// bits: MTE 1 load/store through the GVA, SDMA 2 same-host copy, ROCE 4 network).
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
