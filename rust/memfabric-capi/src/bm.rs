//! `smem_bm.h`: Big Memory, with the 1.3 names, signatures and layouts. As for transfer
//! objects, a handle is a number in a table, so a destroyed or made-up handle is refused
//! rather than followed.
//!
//! Where 1.3 offers more than this library does (growing a part after create, an existing
//! shared memory segment, a config store with leader election, TLS settings per init), a valid
//! request is refused with `MF_UNSUPPORTED` and a message saying why, never answered with a
//! success that did nothing.

use std::ffi::{c_char, c_void};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use memfabric::bm::{self as core, BigMemory, BmRuntime, CopyType};
use memfabric::device::{stream_order, StreamHandle};
use memfabric::fabric::GroupEventHandler;
use memfabric::trans::DEFAULT_TRANSFER_TIMEOUT;
use memfabric::{Error, Result};

use crate::common::SmemTlsConfig;
use crate::gate::{Gate, Gates};
use crate::handles::{Slot, Table};
use crate::trans::array;
use crate::{c_str, guarded, guarded_value, non_null};

/// A Big Memory object handle as C sees it.
pub type SmemBm = *mut c_void;

/// `smem_bm_mem_type`.
pub const SMEM_MEM_TYPE_LOCAL_DEVICE: u32 = 0;
pub const SMEM_MEM_TYPE_LOCAL_HOST: u32 = 1;
pub const SMEM_MEM_TYPE_DEVICE: u32 = 2;
pub const SMEM_MEM_TYPE_HOST: u32 = 3;

/// `smem_bm_group_event_t`.
pub const SMEM_GROUP_EVENT_JOIN: u32 = 0;
pub const SMEM_GROUP_EVENT_LEAVE: u32 = 1;

/// `SMEM_BM_FLAG_CREATE_WITH_SHM`: the DRAM part is the caller's segment `dramShmFd`.
pub const SMEM_BM_FLAG_CREATE_WITH_SHM: u32 = 1 << 8;

/// `SMEM_BM_FLAG_USE_EXTERNAL_STREAM` (1.3's `smem.h`): a copy uses its params' `stream` only
/// with this flag, so a stream field left uninitialized by a caller is never followed.
pub const SMEM_BM_FLAG_USE_EXTERNAL_STREAM: u32 = 1 << 2;

/// `rankId` of a fresh config: no rank chosen (the 1.3 value; unused while autoRanking).
pub const UNSET_RANK_ID: u32 = u16::MAX as u32;

/// Most ranks a world may have (`SMEM_WORLD_SIZE_MAX`).
const WORLD_SIZE_MAX: u32 = 1024;

/// `smem_bm_config_t` (the layout of `smem_bm_def.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemBmConfig {
    pub init_timeout: u32,
    pub create_timeout: u32,
    pub control_operation_timeout: u32,
    pub start_config_store_server: bool,
    pub start_config_store_only: bool,
    pub dynamic_world_size: bool,
    pub unified_address_space: bool,
    pub auto_ranking: bool,
    pub rank_id: u32,
    pub flags: u32,
    /// Accepted and unused: peers are found through the store.
    pub hcom_url: [c_char; 64],
    pub hcom_tls_config: SmemTlsConfig,
    pub store_tls_config: SmemTlsConfig,
}

/// `smem_bm_create_option_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemBmCreateOption {
    pub max_dram_size: u64,
    pub max_hbm_size: u64,
    pub local_dram_size: u64,
    pub local_hbm_size: u64,
    /// `smem_bm_data_op_type` bits.
    pub data_op_type: u32,
    pub enable_56bits_gva: bool,
    pub flags: u32,
    pub tag: [c_char; 32],
    pub tag_op_info: [c_char; 256],
    pub dram_shm_fd: i32,
}

/// `smem_copy_params`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemCopyParams {
    pub src: *const c_void,
    pub dest: *mut c_void,
    pub data_size: usize,
    pub stream: *mut c_void,
}

/// `smem_batch_copy_params`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemBatchCopyParams {
    pub sources: *mut *mut c_void,
    pub destinations: *mut *mut c_void,
    pub data_sizes: *const u64,
    pub batch_size: u32,
    pub stream: *mut c_void,
}

/// `smem_batch_copy_result` (declared by 1.3's header; no call of this version takes it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemBatchCopyResult {
    pub results: *mut i32,
    pub batch_size: u32,
}

/// The gate in front of each object's group-event handler (see [`crate::gate`]).
static EVENT_GATES: Gates = Gates::new();

/// `smem_bm_group_event_cb`: `(handle, rankId, smem_bm_group_event_t, context)`.
pub type GroupEventCb =
    Option<unsafe extern "C" fn(handle: SmemBm, rank_id: u32, event: u32, context: *mut c_void)>;

/// `smem_bm_leader_change_cb`.
pub type LeaderChangeCb = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

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

/// Refuses a fixed-size string field that has no NUL inside its array (reading it would run
/// past the field).
fn nul_terminated(field: &[c_char], name: &str) -> Result<()> {
    if field.contains(&0) {
        Ok(())
    } else {
        Err(Error::InvalidParam(format!(
            "{name} is not NUL-terminated within its {} bytes",
            field.len()
        )))
    }
}

/// Writes every field of `config`: the 1.3 defaults, TLS off, empty strings.
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
            start_config_store_server: d.start_store,
            start_config_store_only: d.start_store_only,
            dynamic_world_size: d.dynamic_world_size,
            unified_address_space: d.unified_address_space,
            // 1.3's C default (the Python BmConfig's is false): a program that only calls
            // smem_bm_config_init gets distinct ranks instead of every process claiming 0.
            auto_ranking: true,
            rank_id: UNSET_RANK_ID,
            flags: d.flags,
            hcom_url: [0; 64],
            hcom_tls_config: SmemTlsConfig::DISABLED,
            store_tls_config: SmemTlsConfig::DISABLED,
        };
        // SAFETY: not null and writable by the caller's contract; `write` because the struct
        // is usually uninitialized (its bools may hold any byte), so no reference is made.
        unsafe { config.write(defaults) };
        Ok(())
    })
}

/// The core's config for a C config, refusing what this library cannot honour.
fn core_config(c: &SmemBmConfig) -> Result<core::BmConfig> {
    if !c.unified_address_space {
        return Err(Error::InvalidParam(
            "config.unifiedAddressSpace is false: a GVA is the same number in every rank here, \
             so it must be true"
                .into(),
        ));
    }
    nul_terminated(&c.hcom_url, "config.hcomUrl")?;
    for (tls, name) in [
        (&c.hcom_tls_config, "hcomTlsConfig"),
        (&c.store_tls_config, "storeTlsConfig"),
    ] {
        if tls.tls_enable {
            return Err(Error::Unsupported(format!(
                "config.{name}.tlsEnable: TLS here is one process-wide setting for the store and \
                 the data path; turn it on with smem_set_conf_store_tls (and \
                 smem_set_config_store_tls_key) before smem_bm_init and leave {name} off"
            )));
        }
    }
    Ok(core::BmConfig {
        init_timeout: c.init_timeout,
        create_timeout: c.create_timeout,
        operation_timeout: c.control_operation_timeout,
        start_store: c.start_config_store_server,
        start_store_only: c.start_config_store_only,
        dynamic_world_size: c.dynamic_world_size,
        unified_address_space: c.unified_address_space,
        auto_ranking: c.auto_ranking,
        rank_id: c.rank_id,
        flags: c.flags,
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
        let cfg = core_config(unsafe { non_null(config, "config") }?)?;
        RUNTIME.fill(|| BmRuntime::initialize(url, world_size, i32::from(device_id), cfg))
    })
}

/// Destroys every object still alive and leaves Big Memory.
#[no_mangle]
pub extern "C" fn smem_bm_uninit(flags: u32) {
    let _ = flags;
    guarded("smem_bm_uninit", || {
        EVENT_GATES.close_all();
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

/// `tcp://ip:port` for an address given in parts (an IPv6 address in brackets or not).
fn store_url_of(ip: &str, port: u16) -> Result<String> {
    let text = ip.trim();
    let addr = match text.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        Some(inner) => inner.parse::<Ipv6Addr>().map(IpAddr::V6),
        None => text.parse::<IpAddr>(),
    }
    .map_err(|_| {
        Error::InvalidParam(format!(
            "ip {ip:?} is not an IP address (IPv4, or IPv6 with or without brackets)"
        ))
    })?;
    if port == 0 {
        return Err(Error::InvalidParam(
            "port 0: a store listens on a port of its own".into(),
        ));
    }
    Ok(format!("tcp://{}", SocketAddr::new(addr, port)))
}

/// `smem_bm_update_store_url("tcp://ip:port")`.
///
/// # Safety
/// `ip` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_update_store_server(ip: *const c_char, port: u16) -> i32 {
    guarded("smem_bm_update_store_server", || {
        // SAFETY: the caller's contract on `ip`.
        let url = store_url_of(unsafe { c_str(ip, "ip") }?, port)?;
        runtime()?.update_store_url(&url)
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

fn no_leader() -> Error {
    Error::Unsupported(
        "the config store here is one server without leader election (no HA mode), so no \
         leader publishes a bindable address; use the address your services were configured \
         with"
            .into(),
    )
}

/// Checks the output arguments of the leader address calls and clears them, so that a caller
/// ignoring the code reads an empty address rather than stale bytes.
///
/// # Safety
/// `ip` is null or points to `ip_len` writable bytes; `port` is null or writable.
unsafe fn clear_address(ip: *mut c_char, ip_len: usize, port: *mut u16) -> Result<()> {
    if ip.is_null() {
        return Err(Error::InvalidParam("ip is NULL".into()));
    }
    if ip_len == 0 {
        return Err(Error::InvalidParam(
            "ipLen is 0: no room even for the terminating NUL".into(),
        ));
    }
    if port.is_null() {
        return Err(Error::InvalidParam("port is NULL".into()));
    }
    // SAFETY: both checked non-null; `ip` has at least one writable byte (ip_len > 0) and
    // `port` is writable, by the caller's contract.
    unsafe {
        ip.write(0);
        port.write(0);
    }
    Ok(())
}

/// No leader address exists here: the arguments are checked, then `MF_UNSUPPORTED`.
///
/// # Safety
/// `ip` is null or points to `ip_len` writable bytes; `port` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_get_bindable_leader_address(
    ip: *mut c_char,
    ip_len: usize,
    port: *mut u16,
) -> i32 {
    guarded("smem_bm_get_bindable_leader_address", || {
        // SAFETY: the caller's contract on the outputs.
        unsafe { clear_address(ip, ip_len, port) }?;
        Err(no_leader())
    })
}

/// As `smem_bm_get_bindable_leader_address`, for a process without a Big Memory rank.
///
/// # Safety
/// `store_url` is null or a NUL-terminated string; `tls_option` is not read; `ip` and `port`
/// as for `smem_bm_get_bindable_leader_address`.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_get_bindable_leader_address_by_store_url(
    store_url: *const c_char,
    tls_option: *const SmemTlsConfig,
    world_size: u32,
    ip: *mut c_char,
    ip_len: usize,
    port: *mut u16,
) -> i32 {
    let _ = tls_option;
    guarded("smem_bm_get_bindable_leader_address_by_store_url", || {
        // SAFETY: the caller's contract on `store_url`.
        let url = unsafe { c_str(store_url, "storeUrl") }?;
        if url.trim().is_empty() {
            return Err(Error::InvalidParam("storeUrl is empty".into()));
        }
        if world_size == 0 || world_size > WORLD_SIZE_MAX {
            return Err(Error::InvalidParam(format!(
                "worldSize {world_size} is outside [1, {WORLD_SIZE_MAX}]"
            )));
        }
        // SAFETY: the caller's contract on the outputs.
        unsafe { clear_address(ip, ip_len, port) }?;
        Err(no_leader())
    })
}

/// Leader discovery never caches a store here, so there is nothing to release.
#[no_mangle]
pub extern "C" fn smem_bm_release_leader_address_store() {}

/// The leader never changes here: a callback is refused; NULL (no callback) is 0.
#[no_mangle]
pub extern "C" fn smem_bm_register_leader_change_callback(
    callback: LeaderChangeCb,
    user_data: *mut c_void,
) -> i32 {
    let _ = user_data;
    guarded("smem_bm_register_leader_change_callback", || {
        if callback.is_none() {
            return Ok(());
        }
        Err(Error::Unsupported(
            "the config store here has no leader election, so the leader never changes and the \
             callback would never run; nothing was registered"
                .into(),
        ))
    })
}

/// The bytes a rank contributes of one kind: the max must be 0 or the local size, because
/// contributions are fixed at create.
fn fixed_size(max_name: &str, max: u64, local_name: &str, local: u64) -> Result<u64> {
    if max == 0 || max == local {
        Ok(local)
    } else if max < local {
        Err(Error::InvalidParam(format!(
            "option.{max_name} {max} is below option.{local_name} {local}"
        )))
    } else {
        Err(Error::Unsupported(format!(
            "option.{max_name} {max} above option.{local_name} {local} leaves room for \
             smem_bm_extend_local_mem, which this version does not support: contributions are \
             fixed at create (give equal sizes)"
        )))
    }
}

/// Creates object `id` as `option` says (`member_size`: smem_bm_create's, checked against the
/// world).
fn create_object(id: u32, member_size: Option<u32>, o: &SmemBmCreateOption) -> Result<SmemBm> {
    let rt = runtime()?;
    if o.data_op_type == 0 || o.data_op_type > 255 {
        return Err(Error::InvalidParam(format!(
            "dataOpType {} is not a smem_bm_data_op_type",
            o.data_op_type
        )));
    }
    if let Some(m) = member_size {
        if let Some(world) = rt.world().filter(|w| *w != m) {
            return Err(Error::InvalidParam(format!(
                "memberSize {m}: every rank of the world ({world}) takes part in an object in \
                 this version"
            )));
        }
    }
    let dram = fixed_size(
        "maxDramSize",
        o.max_dram_size,
        "localDRAMSize",
        o.local_dram_size,
    )?;
    let hbm = fixed_size(
        "maxHbmSize",
        o.max_hbm_size,
        "localHBMSize",
        o.local_hbm_size,
    )?;
    nul_terminated(&o.tag, "option.tag")?;
    nul_terminated(&o.tag_op_info, "option.tagOpInfo")?;
    if o.flags & SMEM_BM_FLAG_CREATE_WITH_SHM != 0 {
        let fd = o.dram_shm_fd;
        if fd < 0 || o.local_dram_size == 0 {
            return Err(Error::InvalidParam(format!(
                "SMEM_BM_FLAG_CREATE_WITH_SHM needs dramShmFd >= 0 and localDRAMSize > 0 \
                 (dramShmFd {fd}, localDRAMSize {})",
                o.local_dram_size
            )));
        }
        return Err(Error::Unsupported(format!(
            "SMEM_BM_FLAG_CREATE_WITH_SHM: an existing shared memory segment (dramShmFd {fd}) \
             cannot be brought in this version; each rank's segment is made by the library"
        )));
    }
    let obj = rt.create(id, dram, hbm)?;
    OBJECTS.insert(obj, || Ok(()))
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
    guarded_value("smem_bm_create", std::ptr::null_mut(), || {
        let option = SmemBmCreateOption {
            max_dram_size: local_dram_size,
            max_hbm_size: local_hbm_size,
            local_dram_size,
            local_hbm_size,
            data_op_type,
            enable_56bits_gva: false,
            flags,
            tag: [0; 32],
            tag_op_info: [0; 256],
            dram_shm_fd: -1,
        };
        create_object(id, Some(member_size), &option)
    })
}

/// Creates object `id` as `option` says (collective). NULL on error.
///
/// # Safety
/// `option` is null or points to a `smem_bm_create_option_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_create2(id: u32, option: *const SmemBmCreateOption) -> SmemBm {
    guarded_value("smem_bm_create2", std::ptr::null_mut(), || {
        // SAFETY: null refused; otherwise an option valid for the call.
        let o = unsafe { non_null(option, "option") }?;
        create_object(id, None, o)
    })
}

/// Releases an object (an unknown handle is reported through the last error).
#[no_mangle]
pub extern "C" fn smem_bm_destroy(handle: SmemBm) {
    guarded("smem_bm_destroy", || {
        object(handle)?;
        EVENT_GATES.replace(handle, None);
        OBJECTS.destroy(handle, RELEASE_WAIT)
    });
}

/// Peers are mapped at create: checks the handle.
#[no_mangle]
pub extern "C" fn smem_bm_join(handle: SmemBm, flags: u32) -> i32 {
    let _ = flags;
    guarded("smem_bm_join", || object(handle).map(|_| ()))
}

/// Checks the handle; the object stays usable until destroyed, as in the Python API.
#[no_mangle]
pub extern "C" fn smem_bm_leave(handle: SmemBm, flags: u32) -> i32 {
    let _ = flags;
    guarded("smem_bm_leave", || object(handle).map(|_| ()))
}

/// A part of the global space, as `SMEM_MEM_TYPE_DEVICE` and `SMEM_MEM_TYPE_HOST` name them.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    Hbm,
    Dram,
}

fn global_part(mem_type: u32) -> Result<Part> {
    match mem_type {
        SMEM_MEM_TYPE_DEVICE => Ok(Part::Hbm),
        SMEM_MEM_TYPE_HOST => Ok(Part::Dram),
        SMEM_MEM_TYPE_LOCAL_DEVICE | SMEM_MEM_TYPE_LOCAL_HOST => Err(Error::InvalidParam(format!(
            "memType {mem_type} names memory of this process; the parts of the global space are \
             SMEM_MEM_TYPE_DEVICE (2) and SMEM_MEM_TYPE_HOST (3)"
        ))),
        other => Err(Error::InvalidParam(format!(
            "memType {other} is not a smem_bm_mem_type (0..3)"
        ))),
    }
}

/// Growing a part after create is not supported in this version; invalid requests are still
/// told apart from valid ones.
#[no_mangle]
pub extern "C" fn smem_bm_extend_local_mem(handle: SmemBm, mem_type: u32, size: u64) -> i32 {
    guarded("smem_bm_extend_local_mem", || {
        object(handle)?;
        global_part(mem_type)?;
        if size == 0 {
            return Err(Error::InvalidParam("size 0".into()));
        }
        Err(Error::Unsupported(format!(
            "extend_local_mem({size}): contributions are fixed at create in this version"
        )))
    })
}

/// Bytes this rank contributes to the HBM (`DEVICE`) or DRAM (`HOST`) part; 0 on error.
#[no_mangle]
pub extern "C" fn smem_bm_get_local_mem_size_by_mem_type(handle: SmemBm, mem_type: u32) -> u64 {
    guarded_value("smem_bm_get_local_mem_size_by_mem_type", 0, || {
        let obj = object(handle)?;
        Ok(match global_part(mem_type)? {
            Part::Hbm => obj.local_hbm_size(),
            Part::Dram => obj.local_mem_size(),
        })
    })
}

/// The GVA of `peerRankId`'s HBM (`DEVICE`) or DRAM (`HOST`) part; NULL on error.
#[no_mangle]
pub extern "C" fn smem_bm_ptr_by_mem_type(
    handle: SmemBm,
    mem_type: u32,
    peer_rank_id: u16,
) -> *mut c_void {
    guarded_value("smem_bm_ptr_by_mem_type", std::ptr::null_mut(), || {
        let obj = object(handle)?;
        let rank = u32::from(peer_rank_id);
        let gva = match global_part(mem_type)? {
            Part::Hbm => obj.peer_rank_hbm_ptr(rank)?.ok_or_else(|| {
                Error::InvalidParam(
                    "this object has no HBM part (it was created with localHBMSize 0)".into(),
                )
            })?,
            Part::Dram => {
                let gva = obj.peer_rank_ptr(rank)?;
                if obj.local_mem_size() == 0 {
                    return Err(Error::InvalidParam(
                        "this object has no DRAM part (it was created with localDRAMSize 0)".into(),
                    ));
                }
                gva
            }
        };
        Ok(gva as *mut c_void)
    })
}

/// Which part `gva` falls in.
fn part_of(obj: &BigMemory, gva: u64) -> Result<(u32, Part)> {
    let rank = obj.rank_of_gva(gva)?;
    let in_hbm = obj
        .peer_rank_hbm_ptr(rank)?
        .is_some_and(|start| gva >= start && gva - start < obj.local_hbm_size());
    Ok((rank, if in_hbm { Part::Hbm } else { Part::Dram }))
}

/// `*va`: the address of `gva` in this process, for a part on this host.
///
/// # Safety
/// `va` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_gva_to_va(
    handle: SmemBm,
    gva: *mut c_void,
    va_mem_type: u32,
    va: *mut *mut c_void,
) -> i32 {
    guarded("smem_bm_gva_to_va", || {
        let obj = object(handle)?;
        if gva.is_null() {
            return Err(Error::InvalidParam("gva is NULL".into()));
        }
        if va.is_null() {
            return Err(Error::InvalidParam("va is NULL".into()));
        }
        let wanted = match va_mem_type {
            SMEM_MEM_TYPE_LOCAL_DEVICE => Part::Hbm,
            SMEM_MEM_TYPE_LOCAL_HOST => Part::Dram,
            SMEM_MEM_TYPE_DEVICE | SMEM_MEM_TYPE_HOST => {
                return Err(Error::InvalidParam(format!(
                    "vaMemType {va_mem_type}: the address asked for is one of this process, \
                     SMEM_MEM_TYPE_LOCAL_DEVICE (0) or SMEM_MEM_TYPE_LOCAL_HOST (1)"
                )))
            }
            other => {
                return Err(Error::InvalidParam(format!(
                    "vaMemType {other} is not a smem_bm_mem_type (0..3)"
                )))
            }
        };
        let g = gva as u64;
        let (rank, part) = part_of(&obj, g)?;
        if part != wanted {
            let (kind, ask) = match part {
                Part::Hbm => ("HBM", "SMEM_MEM_TYPE_LOCAL_DEVICE"),
                Part::Dram => ("DRAM", "SMEM_MEM_TYPE_LOCAL_HOST"),
            };
            return Err(Error::InvalidParam(format!(
                "gva {gva:p} is in rank {rank}'s {kind} part: its address here is of kind {ask}"
            )));
        }
        let address = obj.gva_to_va(g)?;
        // SAFETY: checked non-null; writable by the caller's contract.
        unsafe { va.write(address as *mut c_void) };
        Ok(())
    })
}

/// The stream a copy runs on: the params' only with `SMEM_BM_FLAG_USE_EXTERNAL_STREAM`.
fn stream_of(stream: *mut c_void, flags: u32) -> *mut c_void {
    if flags & SMEM_BM_FLAG_USE_EXTERNAL_STREAM != 0 {
        stream
    } else {
        std::ptr::null_mut()
    }
}

/// Runs `copy` now (`stream` NULL) or in order with the work on a device stream.
fn run_on(stream: *mut c_void, copy: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    if stream.is_null() {
        return copy();
    }
    let dev = memfabric::device::select().map_err(|why| {
        Error::Unsupported(format!(
            "stream {stream:p} given with SMEM_BM_FLAG_USE_EXTERNAL_STREAM, but {why}; pass a \
             NULL stream (or leave the flag out) to copy now"
        ))
    })?;
    stream_order::submit(
        &dev,
        StreamHandle(stream as u64),
        Box::new(copy),
        DEFAULT_TRANSFER_TIMEOUT,
    )
}

/// Copies `params->dataSize` bytes in direction `t` (an `smem_bm_copy_type`). Checked like
/// every copy: a range outside a part, or a bad local address, is an error code, never a crash.
///
/// # Safety
/// `params` is null or points to a `smem_copy_params`.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_copy(
    handle: SmemBm,
    params: *const SmemCopyParams,
    t: u32,
    flags: u32,
) -> i32 {
    guarded("smem_bm_copy", || {
        let obj = object(handle)?;
        // SAFETY: null refused; otherwise valid for the call by the caller's contract.
        let p = unsafe { non_null(params, "params") }?;
        let ty = CopyType::from_value(i64::from(t))?;
        if p.src.is_null() {
            return Err(Error::InvalidParam("params->src is NULL".into()));
        }
        if p.dest.is_null() {
            return Err(Error::InvalidParam("params->dest is NULL".into()));
        }
        let (src, dst, size) = (p.src as u64, p.dest as u64, p.data_size as u64);
        run_on(stream_of(p.stream, flags), move || {
            obj.copy(src, dst, size, ty)
        })
    })
}

/// Copies `params->batchSize` ranges in direction `t`; stops at the first failure.
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
    guarded("smem_bm_copy_batch", || {
        let obj = object(handle)?;
        // SAFETY: null refused; otherwise valid for the call by the caller's contract.
        let p = unsafe { non_null(params, "params") }?;
        let ty = CopyType::from_value(i64::from(t))?;
        let n = p.batch_size;
        // SAFETY: the caller's contract: each array holds `batchSize` entries.
        let (src, dst, sizes) = unsafe {
            (
                array(p.sources.cast_const(), n, "params->sources")?,
                array(p.destinations.cast_const(), n, "params->destinations")?,
                array(p.data_sizes, n, "params->dataSizes")?,
            )
        };
        let addresses = |list: &[*mut c_void], name: &str| -> Result<Vec<u64>> {
            match list.iter().position(|a| a.is_null()) {
                Some(i) => Err(Error::InvalidParam(format!("params->{name}[{i}] is NULL"))),
                None => Ok(list.iter().map(|a| *a as u64).collect()),
            }
        };
        let src = addresses(src, "sources")?;
        let dst = addresses(dst, "destinations")?;
        let sizes = sizes.to_vec();
        run_on(stream_of(p.stream, flags), move || {
            obj.copy_batch(&src, &dst, &sizes, ty)
        })
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
        let obj = object(handle)?;
        if addr == 0 {
            return Err(Error::InvalidParam("addr is 0".into()));
        }
        obj.register(addr, size)
    })
}

/// Undoes `smem_bm_register_user_mem`.
#[no_mangle]
pub extern "C" fn smem_bm_unregister_user_mem(handle: SmemBm, addr: u64) -> i32 {
    guarded("smem_bm_unregister_user_mem", || {
        let obj = object(handle)?;
        if addr == 0 {
            return Err(Error::InvalidParam("addr is 0".into()));
        }
        obj.unregister(addr)
    })
}

/// The rank whose part holds `gva`; `UINT32_MAX` when none does.
#[no_mangle]
pub extern "C" fn smem_bm_get_rank_id_by_gva(handle: SmemBm, gva: *mut c_void) -> u32 {
    guarded_value("smem_bm_get_rank_id_by_gva", u32::MAX, || {
        object(handle)?.rank_of_gva(gva as u64)
    })
}

/// Calls `cb(handle, rank, event, context)` as ranks join and leave a dynamicWorldSize object;
/// `cb` NULL removes the handler.
///
/// # Safety
/// `cb` is null or a function of the documented signature that may run on a library thread
/// until the handler is replaced or the object destroyed; `context` stays valid as long.
#[no_mangle]
pub unsafe extern "C" fn smem_bm_set_group_event_handler(
    handle: SmemBm,
    cb: GroupEventCb,
    context: *mut c_void,
) -> i32 {
    guarded("smem_bm_set_group_event_handler", || {
        let obj = object(handle)?;
        // Kept as numbers: they are handed back to the caller, never followed here.
        let (handle_value, context_value) = (handle as usize, context as usize);
        let gate = Arc::new(Gate::new());
        let handler = cb.map(|f| -> GroupEventHandler {
            let gate = gate.clone();
            Arc::new(move |rank, joined| {
                let event = if joined {
                    SMEM_GROUP_EVENT_JOIN
                } else {
                    SMEM_GROUP_EVENT_LEAVE
                };
                gate.run(|| {
                    // SAFETY: the caller registered `f` and `context` for this object and
                    // keeps them valid until the handler is replaced or the object destroyed;
                    // the gate is closed then, so no call follows.
                    unsafe {
                        f(
                            handle_value as SmemBm,
                            rank,
                            event,
                            context_value as *mut c_void,
                        )
                    }
                })
            })
        });
        let installed = cb.is_some();
        obj.set_group_event_handler(handler)?;
        drop(obj);
        // The handler replaced: once its gate is closed, it is not running and runs no more.
        EVENT_GATES.replace(handle, installed.then_some(gate));
        Ok(())
    })
}
