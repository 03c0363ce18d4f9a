//! `smem_bm.h`: Big Memory. As for transfer objects, a handle is a number in a table, so a
//! destroyed or made-up handle is refused rather than followed.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

use memfabric::bm::{self as core, BigMemory, BmRuntime, CopyType};
use memfabric::{Error, Result};

use crate::handles::{Slot, Table};
use crate::{c_str, guarded, guarded_value};

/// A Big Memory object handle as C sees it.
pub type SmemBm = *mut c_void;

/// `smem_bm_config_t` (the layout of `smem_bm_def.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemBmConfig {
    pub init_timeout: u32,
    pub create_timeout: u32,
    pub control_operation_timeout: u32,
    pub start_config_store: bool,
    pub start_config_store_only: bool,
    pub dynamic_world_size: bool,
    pub unified_address_space: bool,
    pub auto_ranking: bool,
    pub rank_id: u16,
    pub flags: u32,
    /// Accepted and unused: the network path is found through the store.
    pub hcom_url: [c_char; 64],
}

/// `smem_batch_copy_params`.
#[repr(C)]
#[derive(Debug)]
pub struct SmemBatchCopyParams {
    pub sources: *const *const c_void,
    pub destinations: *const *mut c_void,
    pub data_sizes: *const u32,
    pub batch_size: u32,
}

static RUNTIME: Slot<BmRuntime> = Slot::new("Big Memory", "smem_bm_init");
/// Longest a destroy waits for copies that still use the object on other threads.
const RELEASE_WAIT: Duration = Duration::from_secs(130);
static OBJECTS: Table<BigMemory> = Table::new("Big Memory");

fn runtime() -> Result<Arc<BmRuntime>> {
    RUNTIME.get()
}

fn object(handle: SmemBm) -> Result<Arc<BigMemory>> {
    OBJECTS.get(handle)
}

/// Fills `config` with the defaults (those of the Python `BmConfig()`).
///
/// # Safety
/// `config` is null or points to a writable `smem_bm_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_config_init(config: *mut SmemBmConfig) -> i32 {
    guarded("smem_bm_config_init", || {
        if config.is_null() {
            return Err(Error::InvalidParam("config is NULL".into()));
        }
        let d = core::BmConfig::default();
        let defaults = SmemBmConfig {
            init_timeout: d.init_timeout,
            create_timeout: d.create_timeout,
            control_operation_timeout: d.operation_timeout,
            start_config_store: d.start_store,
            start_config_store_only: d.start_store_only,
            dynamic_world_size: d.dynamic_world_size,
            unified_address_space: d.unified_address_space,
            auto_ranking: d.auto_ranking,
            rank_id: u16::try_from(d.rank_id).unwrap_or(0),
            flags: d.flags,
            hcom_url: [0; 64],
        };
        // SAFETY: not null and writable by the caller's contract; `write` because the struct
        // is usually uninitialized (its bools may hold any byte), so no reference is made.
        unsafe { config.write(defaults) };
        Ok(())
    })
}

/// Joins Big Memory as one of `worldSize` ranks through the store at `storeURL`.
///
/// # Safety
/// `store_url` is null or a NUL-terminated string; `config` null or a `smem_bm_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_init(
    store_url: *const c_char,
    world_size: u32,
    device_id: u16,
    config: *const SmemBmConfig,
) -> i32 {
    guarded("smem_bm_init", || {
        // SAFETY: the caller's contract on `store_url`.
        let url = unsafe { c_str(store_url, "storeURL") }?;
        // SAFETY: null refused; otherwise a config valid for the call.
        let c = unsafe { crate::non_null(config, "config") }?;
        let cfg = core::BmConfig {
            init_timeout: c.init_timeout,
            create_timeout: c.create_timeout,
            operation_timeout: c.control_operation_timeout,
            start_store: c.start_config_store,
            start_store_only: c.start_config_store_only,
            dynamic_world_size: c.dynamic_world_size,
            unified_address_space: c.unified_address_space,
            auto_ranking: c.auto_ranking,
            rank_id: u32::from(c.rank_id),
            flags: c.flags,
        };
        RUNTIME.fill(|| BmRuntime::initialize(url, world_size, i32::from(device_id), cfg))
    })
}

/// Destroys every object still alive and leaves Big Memory.
#[no_mangle]
pub extern "C" fn smem_bm_uninit(flags: u32) {
    let _ = flags;
    guarded("smem_bm_uninit", || {
        let first_error = OBJECTS.destroy_all(RELEASE_WAIT, || {});
        drop(RUNTIME.take());
        first_error
    });
}

/// This process's rank; `UINT32_MAX` before `smem_bm_init` (or with startConfigStoreOnly).
#[no_mangle]
pub extern "C" fn smem_bm_get_rank_id() -> u32 {
    guarded_value("smem_bm_get_rank_id", u32::MAX, || {
        runtime()?
            .rank()
            .ok_or_else(|| Error::NotInit("this process only hosts the store".into()))
    })
}

/// Moves this rank to the config store now at `storeURL` (see `bm.update_store_url`).
///
/// # Safety
/// `store_url` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_update_store_url(store_url: *const c_char) -> i32 {
    guarded("smem_bm_update_store_url", || {
        // SAFETY: the caller's contract on `store_url`.
        let url = unsafe { c_str(store_url, "storeURL") }?;
        runtime()?.update_store_url(url)
    })
}

/// Creates object `id` (collective). `memberSize` must be the world size. NULL on error.
#[no_mangle]
pub extern "C" fn smem_bm_create(
    id: u32,
    member_size: u32,
    data_op_type: u32,
    local_dram_size: u64,
    local_hbm_size: u64,
    flags: u32,
) -> SmemBm {
    let _ = flags;
    guarded_value("smem_bm_create", std::ptr::null_mut(), || {
        let rt = runtime()?;
        if data_op_type == 0 || data_op_type > 255 {
            return Err(Error::InvalidParam(format!(
                "dataOpType {data_op_type} is not a smem_bm_data_op_type"
            )));
        }
        if let Some(world) = rt.world().filter(|w| *w != member_size) {
            return Err(Error::InvalidParam(format!(
                "memberSize {member_size}: every rank of the world ({world}) takes part in an \
                 object in this version"
            )));
        }
        let obj = rt.create(id, local_dram_size, local_hbm_size)?;
        OBJECTS.insert(obj, || Ok(()))
    })
}

/// Releases an object (an unknown handle is reported through the last error).
#[no_mangle]
pub extern "C" fn smem_bm_destroy(handle: SmemBm) {
    guarded("smem_bm_destroy", || OBJECTS.destroy(handle, RELEASE_WAIT));
}

/// Makes the object usable and gives this rank's part: `*localGvaAddress` (when not NULL).
///
/// # Safety
/// `local_gva` is null or points to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_join(
    handle: SmemBm,
    flags: u32,
    local_gva: *mut *mut c_void,
) -> i32 {
    let _ = flags;
    guarded("smem_bm_join", || {
        let obj = object(handle)?;
        let rank = obj.memory().rank();
        let gva = match obj.peer_rank_hbm_ptr(rank)? {
            Some(p) => p,
            None => obj.peer_rank_ptr(rank)?,
        };
        // SAFETY: null is skipped; otherwise writable by the caller's contract.
        if let Some(out) = unsafe { local_gva.as_mut() } {
            *out = gva as *mut c_void;
        }
        Ok(())
    })
}

/// Leaves the object (it stays usable until destroyed, as in the Python API).
#[no_mangle]
pub extern "C" fn smem_bm_leave(handle: SmemBm, flags: u32) -> i32 {
    let _ = flags;
    guarded("smem_bm_leave", || object(handle).map(|_| ()))
}

/// Bytes this rank contributes (its HBM part when it has one, else its DRAM part); 0 on error.
#[no_mangle]
pub extern "C" fn smem_bm_get_local_mem_size(handle: SmemBm) -> u64 {
    guarded_value("smem_bm_get_local_mem_size", 0, || {
        let obj = object(handle)?;
        Ok(match obj.local_hbm_size() {
            0 => obj.local_mem_size(),
            hbm => hbm,
        })
    })
}

/// The GVA of `peerRankId`'s part (HBM when the object has it, else DRAM); NULL on error.
#[no_mangle]
pub extern "C" fn smem_bm_ptr(handle: SmemBm, peer_rank_id: u16) -> *mut c_void {
    guarded_value("smem_bm_ptr", std::ptr::null_mut(), || {
        let obj = object(handle)?;
        let rank = u32::from(peer_rank_id);
        let gva = match obj.peer_rank_hbm_ptr(rank)? {
            Some(p) => p,
            None => obj.peer_rank_ptr(rank)?,
        };
        Ok(gva as *mut c_void)
    })
}

/// The rank whose part holds `gva`; `UINT32_MAX` when none does.
#[no_mangle]
pub extern "C" fn smem_bm_get_rank_id_by_gva(handle: SmemBm, gva: *mut c_void) -> u32 {
    guarded_value("smem_bm_get_rank_id_by_gva", u32::MAX, || {
        object(handle)?.rank_of_gva(gva as u64)
    })
}

/// Copies `size` bytes in direction `t` (an `smem_bm_copy_type`). Checked like every copy:
/// a range outside a part, or a bad local address, is an error code, never a crash.
#[no_mangle]
pub extern "C" fn smem_bm_copy(
    handle: SmemBm,
    src: *const c_void,
    dest: *mut c_void,
    size: u64,
    t: u32,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_bm_copy", || {
        let ty = CopyType::from_value(i64::from(t))?;
        object(handle)?.copy(src as u64, dest as u64, size, ty)
    })
}

/// Copies `params->batchSize` ranges in direction `t`.
///
/// # Safety
/// `params` is null or points to a `smem_batch_copy_params` whose arrays hold `batchSize`
/// entries each.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_copy_batch(
    handle: SmemBm,
    params: *const SmemBatchCopyParams,
    t: u32,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_bm_copy_batch", || {
        let obj = object(handle)?;
        let ty = CopyType::from_value(i64::from(t))?;
        // SAFETY: null refused; otherwise valid for the call by the caller's contract.
        let p = unsafe { crate::non_null(params, "params") }?;
        let n = p.batch_size;
        // SAFETY: the caller's contract: each array holds `batchSize` entries.
        let (src, dst, sizes) = unsafe {
            (
                crate::trans::array(p.sources, n, "sources")?,
                crate::trans::array(p.destinations, n, "destinations")?,
                crate::trans::array(p.data_sizes, n, "dataSizes")?,
            )
        };
        let src: Vec<u64> = src.iter().map(|p| *p as u64).collect();
        let dst: Vec<u64> = dst.iter().map(|p| *p as u64).collect();
        let sizes: Vec<u64> = sizes.iter().map(|s| u64::from(*s)).collect();
        obj.copy_batch(&src, &dst, &sizes, ty)
    })
}

/// A barrier over the object's ranks.
#[no_mangle]
pub extern "C" fn smem_bm_wait(handle: SmemBm) -> i32 {
    guarded("smem_bm_wait", || object(handle)?.wait())
}

/// Registers memory of this process for copies to ranks on other hosts.
#[no_mangle]
pub extern "C" fn smem_bm_register_user_mem(handle: SmemBm, addr: u64, size: u64) -> i32 {
    guarded("smem_bm_register_user_mem", || {
        object(handle)?.register(addr, size)
    })
}

/// Undoes `smem_bm_register_user_mem`.
#[no_mangle]
pub extern "C" fn smem_bm_unregister_user_mem(handle: SmemBm, addr: u64) -> i32 {
    guarded("smem_bm_unregister_user_mem", || {
        object(handle)?.unregister(addr)
    })
}
