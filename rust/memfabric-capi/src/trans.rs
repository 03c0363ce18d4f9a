//! `smem_trans.h`: the Transfer Engine. A handle is a number in [`ENGINES`], so a handle the
//! library never gave out, or one already destroyed, is refused instead of dereferenced.

use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memfabric::device::{stream_order, StreamHandle};
use memfabric::trans::{Direction, EngineConfig, Role, TransferEngine, DEFAULT_TRANSFER_TIMEOUT};
use memfabric::transport::Op;
use memfabric::{Error, Result};

use crate::handles::Table;
use crate::{c_str, guarded, guarded_value};

/// An engine handle as C sees it.
pub type SmemTrans = *mut c_void;

/// `smem_trans_role_t`.
pub const SMEM_TRANS_NONE: u32 = 0;
pub const SMEM_TRANS_SENDER: u32 = 1;
pub const SMEM_TRANS_RECEIVER: u32 = 2;
pub const SMEM_TRANS_BOTH: u32 = 3;

/// `smem_trans_config_t` (the layout of `smem_trans_def.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemTransConfig {
    /// `smem_trans_role_t`.
    pub role: u32,
    /// Seconds for store calls (connect, publish, lookups); default 120.
    pub init_timeout: u32,
    /// The device; `UINT32_MAX` (the default) means none chosen (device 0).
    pub device_id: u32,
    /// Reserved.
    pub flags: u32,
    /// `smem_bm_data_op_type` bits; 0 is taken as SDMA.
    pub data_op_type: u32,
    /// Start the config store at the store URL when nobody serves it yet.
    pub start_config_server: bool,
}

/// Most descriptors in one transfer call: beyond it a count is taken for a caller's mistake
/// rather than an array of that many entries.
const MAX_BATCH: u32 = 1 << 24;

static INITIALIZED: AtomicBool = AtomicBool::new(false);
static ENGINES: Table<TransferEngine> = Table::new("transfer");

fn engine(handle: SmemTrans) -> Result<Arc<TransferEngine>> {
    ENGINES.get(handle)
}

/// Fills `config` with the defaults: no role (set one), 120 s, no device, SDMA, no store.
///
/// # Safety
/// `config` is null or points to a writable `smem_trans_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_config_init(config: *mut SmemTransConfig) -> i32 {
    guarded("smem_trans_config_init", || {
        if config.is_null() {
            return Err(Error::InvalidParam("config is NULL".into()));
        }
        // SAFETY: not null and writable by the caller's contract; `write` because the struct
        // is usually uninitialized (its bool may hold any byte), so no reference to it is made.
        unsafe {
            config.write(SmemTransConfig {
                role: SMEM_TRANS_NONE,
                init_timeout: 120,
                device_id: u32::MAX,
                flags: 0,
                data_op_type: 1,
                start_config_server: false,
            })
        };
        Ok(())
    })
}

/// Prepares the process for transfer objects (call once, before `smem_trans_create`).
///
/// # Safety
/// `config` is null or points to a `smem_trans_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_init(config_ptr: *const SmemTransConfig) -> i32 {
    guarded("smem_trans_init", || {
        // The rest of the config is checked by smem_trans_create, which takes it again.
        crate::non_null(config_ptr, "config")?;
        memfabric::runtime::runtime()?;
        INITIALIZED.store(true, Ordering::Release);
        Ok(())
    })
}

/// Longest a destroy waits for calls that still use the object on other threads.
const RELEASE_WAIT: Duration = Duration::from_secs(DEFAULT_TRANSFER_TIMEOUT.as_secs() + 5);

/// Destroys every transfer object still alive and ends the initialization.
#[no_mangle]
pub extern "C" fn smem_trans_uninit(flags: u32) {
    let _ = flags;
    guarded("smem_trans_uninit", || {
        ENGINES.destroy_all(RELEASE_WAIT, || INITIALIZED.store(false, Ordering::Release))
    });
}

fn engine_config(c: &SmemTransConfig, store_url: &str, session: &str) -> Result<EngineConfig> {
    let role =
        match c.role {
            SMEM_TRANS_SENDER => Role::Prefill,
            SMEM_TRANS_RECEIVER | SMEM_TRANS_BOTH => Role::Decode,
            SMEM_TRANS_NONE => return Err(Error::InvalidParam(
                "config.role is SMEM_TRANS_NONE: set SMEM_TRANS_SENDER, SMEM_TRANS_RECEIVER or \
                 SMEM_TRANS_BOTH"
                    .into(),
            )),
            other => {
                return Err(Error::InvalidParam(format!(
                    "config.role {other} is not a smem_trans_role_t"
                )))
            }
        };
    if c.init_timeout == 0 {
        return Err(Error::InvalidParam("config.initTimeout is 0".into()));
    }
    let device_id = match c.device_id {
        u32::MAX => 0,
        d => i32::try_from(d)
            .map_err(|_| Error::InvalidParam(format!("config.deviceId {d} is out of range")))?,
    };
    if c.data_op_type != 0 && ![1, 2, 4, 8, 16, 32, 64, 128].contains(&c.data_op_type) {
        return Err(Error::InvalidParam(format!(
            "config.dataOpType {} is not one smem_bm_data_op_type",
            c.data_op_type
        )));
    }
    Ok(EngineConfig {
        store_url: store_url.to_string(),
        session_id: session.to_string(),
        role,
        device_id,
        store_server_role: c.start_config_server.then_some(role),
        transfer_timeout: DEFAULT_TRANSFER_TIMEOUT,
        store_timeout: Duration::from_secs(u64::from(c.init_timeout)),
        reserved_listener: None,
    })
}

/// Creates a transfer object reachable by peers as `uniqueId` (`ip:port`; `ip` or `ip:0` picks
/// the port) through the config store at `storeUrl`. NULL on error.
///
/// # Safety
/// `store_url` and `unique_id` are null or NUL-terminated strings; `config` is null or points
/// to a `smem_trans_config_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_create(
    store_url: *const c_char,
    unique_id: *const c_char,
    config_ptr: *const SmemTransConfig,
) -> SmemTrans {
    guarded_value("smem_trans_create", std::ptr::null_mut(), || {
        if !INITIALIZED.load(Ordering::Acquire) {
            return Err(Error::NotInit(
                "smem_trans_create before smem_trans_init".into(),
            ));
        }
        // SAFETY: the caller's contract on both strings.
        let url = unsafe { c_str(store_url, "storeUrl") }?;
        // SAFETY: as above.
        let session = unsafe { c_str(unique_id, "uniqueId") }?;
        let cfg = engine_config(crate::non_null(config_ptr, "config")?, url, session)?;
        let engine = TransferEngine::start(cfg)?;
        // Checked under the table's lock: an uninit that ran while the engine started would
        // otherwise leave it alive behind a valid handle.
        ENGINES.insert(engine, || {
            if INITIALIZED.load(Ordering::Acquire) {
                Ok(())
            } else {
                Err(Error::NotInit(
                    "smem_trans_uninit ran while this object was being created".into(),
                ))
            }
        })
    })
}

/// Destroys a transfer object: when it returns, its data server is stopped and its records
/// have left the store, so the memory it registered may be freed. It waits for calls still
/// using the object on other threads (up to the transfer timeout). An unknown handle is
/// reported through the last error.
#[no_mangle]
pub extern "C" fn smem_trans_destroy(handle: SmemTrans, flags: u32) {
    let _ = flags;
    guarded("smem_trans_destroy", || {
        ENGINES.destroy(handle, RELEASE_WAIT)
    });
}

/// Registers `[address, address + capacity)` for transfers.
#[no_mangle]
pub extern "C" fn smem_trans_register_mem(
    handle: SmemTrans,
    address: *mut c_void,
    capacity: usize,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_trans_register_mem", || {
        engine(handle)?.register(address as u64, capacity as u64)
    })
}

/// Registers `count` regions at once.
///
/// # Safety
/// `addresses` and `capacities` are null or arrays of at least `count` entries.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_batch_register_mem(
    handle: SmemTrans,
    addresses: *const *mut c_void,
    capacities: *const usize,
    count: u32,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_trans_batch_register_mem", || {
        let e = engine(handle)?;
        // SAFETY: the caller's contract: `count` entries in each array.
        let addrs = unsafe { array(addresses, count, "addresses") }?;
        // SAFETY: as above.
        let caps = unsafe { array(capacities, count, "capacities") }?;
        let list: Vec<(u64, u64)> = addrs
            .iter()
            .zip(caps)
            .map(|(a, c)| (*a as u64, *c as u64))
            .collect();
        e.register_batch(&list)
    })
}

/// Unregisters the region that starts at `address`.
#[no_mangle]
pub extern "C" fn smem_trans_deregister_mem(handle: SmemTrans, address: *mut c_void) -> i32 {
    guarded("smem_trans_deregister_mem", || {
        engine(handle)?.unregister(address as u64)
    })
}

/// `count` entries at `p` (null refused, 0 entries refused).
///
/// # Safety
/// `p` is null or points to at least `count` readable entries.
pub(crate) unsafe fn array<'a, T>(p: *const T, count: u32, name: &str) -> Result<&'a [T]> {
    if p.is_null() {
        return Err(Error::InvalidParam(format!("{name} is NULL")));
    }
    if count == 0 {
        return Err(Error::InvalidParam("batch size is 0".into()));
    }
    if count > MAX_BATCH {
        return Err(Error::InvalidParam(format!(
            "batch size {count} is above {MAX_BATCH}"
        )));
    }
    // SAFETY: not null; `count` readable entries by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, count as usize) })
}

/// One transfer of `ops` to or from `dest`: now (`stream` NULL) or in order with the work on
/// a device stream.
fn transfer(
    handle: SmemTrans,
    dest: *const c_char,
    dir: Direction,
    ops: Vec<Op>,
    stream: *mut c_void,
) -> Result<()> {
    let e = engine(handle)?;
    // SAFETY: the public functions' contract: `dest` is null or a NUL-terminated string.
    let dest = unsafe { c_str(dest, "remoteUniqueId") }?.to_string();
    if stream.is_null() {
        return e.transfer_batch(&dest, dir, ops);
    }
    let dev = memfabric::device::select().map_err(|why| {
        Error::Unsupported(format!(
            "stream {stream:p} given, but {why}; pass NULL to transfer now"
        ))
    })?;
    e.prepare_peer(&dest)?;
    stream_order::submit(
        &dev,
        StreamHandle(stream as u64),
        Box::new(move || e.transfer_batch(&dest, dir, ops)),
        DEFAULT_TRANSFER_TIMEOUT,
    )
}

fn single(local: *const c_void, remote: *const c_void, size: usize) -> Vec<Op> {
    vec![Op::new(local as u64, remote as u64, size as u64)]
}

/// # Safety
/// Each array is null or holds at least `n` entries.
unsafe fn ops_of(
    local: *const *const c_void,
    remote: *const *const c_void,
    sizes: *const usize,
    n: u32,
) -> Result<Vec<Op>> {
    // SAFETY: the caller's contract on the three arrays.
    let (l, r, s) = unsafe {
        (
            array(local, n, "localAddrs")?,
            array(remote, n, "remoteAddrs")?,
            array(sizes, n, "dataSizes")?,
        )
    };
    Ok(l.iter()
        .zip(r)
        .zip(s)
        .map(|((l, r), s)| Op::new(*l as u64, *r as u64, *s as u64))
        .collect())
}

/// Writes `dataSize` bytes at `localAddr` to `remoteAddr` of `remoteUniqueId`.
///
/// # Safety
/// `remote_unique_id` is null or a NUL-terminated string. (Addresses are checked against the
/// registered regions of both sides, never trusted.)
#[no_mangle]
pub unsafe extern "C" fn smem_trans_write(
    handle: SmemTrans,
    local_addr: *const c_void,
    remote_unique_id: *const c_char,
    remote_addr: *mut c_void,
    data_size: usize,
    flags: u32,
) -> i32 {
    // SAFETY: the same contract; a NULL stream runs the transfer now.
    unsafe {
        smem_trans_write_submit(
            handle,
            local_addr,
            remote_unique_id,
            remote_addr,
            data_size,
            std::ptr::null_mut(),
            flags,
        )
    }
}

/// Reads `dataSize` bytes at `remoteAddr` of `remoteUniqueId` into `localAddr`.
///
/// # Safety
/// As `smem_trans_write`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_read(
    handle: SmemTrans,
    local_addr: *mut c_void,
    remote_unique_id: *const c_char,
    remote_addr: *const c_void,
    data_size: usize,
    flags: u32,
) -> i32 {
    // SAFETY: the same contract; a NULL stream runs the transfer now.
    unsafe {
        smem_trans_read_submit(
            handle,
            local_addr,
            remote_unique_id,
            remote_addr,
            data_size,
            std::ptr::null_mut(),
            flags,
        )
    }
}

/// Writes `batchSize` blocks in one call.
///
/// # Safety
/// As `smem_trans_write`; the three arrays are null or hold `batchSize` entries.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_batch_write(
    handle: SmemTrans,
    local_addrs: *const *const c_void,
    remote_unique_id: *const c_char,
    remote_addrs: *const *mut c_void,
    data_sizes: *const usize,
    batch_size: u32,
    flags: u32,
) -> i32 {
    // SAFETY: the same contract; a NULL stream runs the transfer now.
    unsafe {
        smem_trans_batch_write_submit(
            handle,
            local_addrs,
            remote_unique_id,
            remote_addrs,
            data_sizes,
            batch_size,
            std::ptr::null_mut(),
            flags,
        )
    }
}

/// Reads `batchSize` blocks in one call.
///
/// # Safety
/// As `smem_trans_batch_write`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_batch_read(
    handle: SmemTrans,
    local_addrs: *const *mut c_void,
    remote_unique_id: *const c_char,
    remote_addrs: *const *const c_void,
    data_sizes: *const usize,
    batch_size: u32,
    flags: u32,
) -> i32 {
    // SAFETY: the same contract; a NULL stream runs the transfer now.
    unsafe {
        smem_trans_batch_read_submit(
            handle,
            local_addrs,
            remote_unique_id,
            remote_addrs,
            data_sizes,
            batch_size,
            std::ptr::null_mut(),
            flags,
        )
    }
}

/// `smem_trans_write` in order with the work on device `stream` (NULL: now). A stream needs
/// a device backend (CUDA); without one it is `MF_UNSUPPORTED`, saying why.
///
/// # Safety
/// As `smem_trans_write`; `stream` is null or a stream of the device backend.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_write_submit(
    handle: SmemTrans,
    local_addr: *const c_void,
    remote_unique_id: *const c_char,
    remote_addr: *mut c_void,
    data_size: usize,
    stream: *mut c_void,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_trans_write_submit", || {
        let ops = single(local_addr, remote_addr, data_size);
        transfer(handle, remote_unique_id, Direction::Write, ops, stream)
    })
}

/// `smem_trans_read` on a stream (see `smem_trans_write_submit`).
///
/// # Safety
/// As `smem_trans_write_submit`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_read_submit(
    handle: SmemTrans,
    local_addr: *mut c_void,
    remote_unique_id: *const c_char,
    remote_addr: *const c_void,
    data_size: usize,
    stream: *mut c_void,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_trans_read_submit", || {
        let ops = single(local_addr, remote_addr, data_size);
        transfer(handle, remote_unique_id, Direction::Read, ops, stream)
    })
}

/// `smem_trans_batch_write` on a stream (see `smem_trans_write_submit`).
///
/// # Safety
/// As `smem_trans_batch_write`; `stream` as in `smem_trans_write_submit`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_batch_write_submit(
    handle: SmemTrans,
    local_addrs: *const *const c_void,
    remote_unique_id: *const c_char,
    remote_addrs: *const *mut c_void,
    data_sizes: *const usize,
    batch_size: u32,
    stream: *mut c_void,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_trans_batch_write_submit", || {
        // SAFETY: the caller's contract on the arrays.
        let ops = unsafe { ops_of(local_addrs, remote_addrs.cast(), data_sizes, batch_size) }?;
        transfer(handle, remote_unique_id, Direction::Write, ops, stream)
    })
}

/// `smem_trans_batch_read` on a stream (see `smem_trans_write_submit`).
///
/// # Safety
/// As `smem_trans_batch_read`; `stream` as in `smem_trans_write_submit`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_batch_read_submit(
    handle: SmemTrans,
    local_addrs: *const *mut c_void,
    remote_unique_id: *const c_char,
    remote_addrs: *const *const c_void,
    data_sizes: *const usize,
    batch_size: u32,
    stream: *mut c_void,
    flags: u32,
) -> i32 {
    let _ = flags;
    guarded("smem_trans_batch_read_submit", || {
        // SAFETY: the caller's contract on the arrays.
        let ops = unsafe { ops_of(local_addrs.cast(), remote_addrs, data_sizes, batch_size) }?;
        transfer(handle, remote_unique_id, Direction::Read, ops, stream)
    })
}
