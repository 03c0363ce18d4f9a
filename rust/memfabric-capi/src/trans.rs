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

use crate::common::SmemTlsConfig;
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
    /// Accepted, unused: the interface is the one of the uniqueId's IP.
    pub nic: [c_char; 64],
    /// Must be off: data connections prove the job's secret instead of using TLS (README,
    /// "Data-plane authentication").
    pub hcom_tls_config: SmemTlsConfig,
}

/// Most descriptors in one transfer call: beyond it a count is taken for a caller's mistake
/// rather than an array of that many entries.
const MAX_BATCH: u32 = 1 << 24;

static INITIALIZED: AtomicBool = AtomicBool::new(false);
static ENGINES: Table<TransferEngine> = Table::new("transfer");

fn engine(handle: SmemTrans) -> Result<Arc<TransferEngine>> {
    ENGINES.get(handle)
}

/// Fills `config` with the defaults: no role (set one), 120 s, no device, SDMA, no NIC, TLS
/// off.
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
                nic: [0; 64],
                hcom_tls_config: SmemTlsConfig::DISABLED,
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
        let slots = std::mem::take(&mut *PEER_DOWN.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, slot) in slots {
            slot.stopped.store(true, Ordering::Release);
            slot.replace(None);
        }
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
    if c.hcom_tls_config.tls_enable {
        return Err(Error::Unsupported(
            "config.hcomTlsConfig.tlsEnable: TLS on the data path is not supported; its \
             connections prove the job's secret from the config store instead (README, \
             \"Data-plane authentication\")"
                .into(),
        ));
    }
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
        // C callers start a store with smem_create_config_store.
        store_server_role: None,
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
        stop_peer_watch(handle);
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

/// `smem_trans_peer_down_callback_t`.
pub type PeerDownCallback =
    Option<unsafe extern "C" fn(peer_unique_id: *const c_char, user_data: *mut c_void)>;

/// How often a watcher asks the store whether the peers it watches are still there (for up
/// to [`PEERS_PER_TICK`] peers; more peers stretch the interval, so that the store's load
/// stays flat as jobs grow).
const PEER_WATCH_EVERY: Duration = Duration::from_millis(300);
const PEERS_PER_TICK: usize = 64;

/// A callback and its user data. The pointer is the caller's, only handed back to it.
#[derive(Clone, Copy)]
struct PeerDown {
    callback: unsafe extern "C" fn(*const c_char, *mut c_void),
    user_data: *mut c_void,
}
// SAFETY: the library only passes `user_data` back to the caller's callback.
unsafe impl Send for PeerDown {}
// SAFETY: as above.
unsafe impl Sync for PeerDown {}

/// One registered callback behind its gate: replaced or removed, it is closed, and once
/// closing returns it runs no more.
struct PeerWatch {
    callback: PeerDown,
    gate: crate::gate::Gate,
}

/// The callback of one engine handle, read by its watcher thread every tick.
#[derive(Default)]
struct WatchSlot {
    current: std::sync::Mutex<Option<Arc<PeerWatch>>>,
    /// Set when the engine is destroyed: the watcher ends.
    stopped: AtomicBool,
}

impl WatchSlot {
    fn replace(&self, new: Option<Arc<PeerWatch>>) {
        let old = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(|p| p.into_inner()),
            new,
        );
        if let Some(old) = old {
            old.gate.close();
        }
    }
}

/// The slot of each engine handle that has had a callback.
static PEER_DOWN: std::sync::Mutex<Vec<(usize, Arc<WatchSlot>)>> =
    std::sync::Mutex::new(Vec::new());

/// Ends the watch of an engine that is being destroyed: its callback is not running and will
/// not run once this returns.
fn stop_peer_watch(handle: SmemTrans) {
    let slot = {
        let mut all = PEER_DOWN.lock().unwrap_or_else(|p| p.into_inner());
        let at = all.iter().position(|(h, _)| *h == handle as usize);
        at.map(|i| all.remove(i).1)
    };
    if let Some(slot) = slot {
        slot.stopped.store(true, Ordering::Release);
        slot.replace(None);
    }
}

/// Calls `callback(peerUniqueId, userData)` once for each peer this object has reached (by a
/// transfer) that stops or dies: its record leaves the config store when its process ends or
/// its store session closes, and a watcher thread checks every 300 ms (longer beyond 64
/// peers). A peer that comes back and goes again is reported again. A new callback replaces
/// the old; NULL removes it. The callback runs on that thread; once this call (or the
/// object's destroy) returns, a replaced callback is not running and runs no more.
#[no_mangle]
pub extern "C" fn smem_trans_set_peer_down_callback(
    handle: SmemTrans,
    callback: PeerDownCallback,
    user_data: *mut c_void,
) -> i32 {
    guarded("smem_trans_set_peer_down_callback", || {
        let e = engine(handle)?;
        let wanted = callback.map(|callback| {
            Arc::new(PeerWatch {
                callback: PeerDown {
                    callback,
                    user_data,
                },
                gate: crate::gate::Gate::new(),
            })
        });
        let (slot, start) = {
            let mut all = PEER_DOWN.lock().unwrap_or_else(|p| p.into_inner());
            match all.iter().find(|(h, _)| *h == handle as usize) {
                Some((_, slot)) => (slot.clone(), false),
                None if wanted.is_none() => return Ok(()),
                None => {
                    let slot = Arc::new(WatchSlot::default());
                    all.push((handle as usize, slot.clone()));
                    (slot, true)
                }
            }
        };
        // Outside the table's lock: closing the old callback may wait for it to return.
        slot.replace(wanted);
        if start {
            let weak = Arc::downgrade(&e);
            drop(e);
            std::thread::Builder::new()
                .name("mf-peer-watch".into())
                .spawn(move || watch_peers(weak, slot))
                .map_err(|e| Error::io("peer watcher thread", e))?;
        }
        Ok(())
    })
}

/// Until the engine is gone: every tick, the peers it knows join the watched set; a watched
/// peer no longer published is reported once, and again only after it was seen published.
fn watch_peers(engine: std::sync::Weak<TransferEngine>, slot: Arc<WatchSlot>) {
    let mut watched: std::collections::BTreeSet<String> = Default::default();
    let mut reported: std::collections::BTreeSet<String> = Default::default();
    loop {
        let ticks = 1 + watched.len() / PEERS_PER_TICK;
        std::thread::sleep(PEER_WATCH_EVERY * ticks as u32);
        if slot.stopped.load(Ordering::Acquire) {
            return;
        }
        // The engine is held only to read its peers: the store call below runs without it, so
        // a destroy never waits for a store that does not answer.
        let store = {
            let Some(e) = engine.upgrade() else {
                return;
            };
            watched.extend(e.known_peers());
            e.store().clone()
        };
        let current = slot
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(current) = current else {
            continue;
        };
        if watched.is_empty() {
            continue;
        }
        let sessions: Vec<String> = watched.iter().cloned().collect();
        let published = match TransferEngine::published_in(&store, &sessions) {
            Ok(p) => p,
            // The store itself is unreachable: that says nothing about the peers.
            Err(err) => {
                memfabric::log::debug(&format!("peer watch: store unreachable: {err}"));
                continue;
            }
        };
        drop(store);
        for (session, alive) in sessions.iter().zip(published) {
            if alive {
                reported.remove(session);
                continue;
            }
            if !reported.insert(session.clone()) {
                continue;
            }
            let Ok(id) = std::ffi::CString::new(session.as_str()) else {
                continue;
            };
            let PeerDown {
                callback,
                user_data,
            } = current.callback;
            current.gate.run(|| {
                // SAFETY: the caller's callback with its user data; the id lives for the call.
                unsafe { callback(id.as_ptr(), user_data) }
            });
        }
    }
}

/// `smem_trans_quant_copy_param_t`.
#[repr(C)]
#[derive(Debug)]
pub struct SmemTransQuantCopyParam {
    pub remote_unique_id: *const c_char,
    pub local_addrs: *mut *mut c_void,
    pub remote_addrs: *mut *mut c_void,
    pub data_sizes: *mut usize,
    pub scale: *mut *mut f32,
    pub offset: *mut *mut f32,
    pub batch_size: u32,
    pub unit_num: u32,
    pub stream: *mut c_void,
    pub input_type: u32,
    pub flags: u32,
}

/// Writes float16/bfloat16 blocks as int8 with scales: the quantizing copy runs as a kernel
/// of an Ascend device, so here it is `MF_UNSUPPORTED` (after the arguments are checked).
///
/// # Safety
/// `params` is null or points to a `smem_trans_quant_copy_param_t`.
#[no_mangle]
pub unsafe extern "C" fn smem_trans_batch_quant_write(
    handle: SmemTrans,
    params: *const SmemTransQuantCopyParam,
) -> i32 {
    guarded("smem_trans_batch_quant_write", || {
        engine(handle)?;
        let p = crate::non_null(params, "params")?;
        // SAFETY: the caller's contract on the id.
        unsafe { c_str(p.remote_unique_id, "params->remoteUniqueId") }?;
        Err(Error::Unsupported(
            "quantizing writes (float16/bfloat16 to int8) run as an Ascend device kernel, which \
             this library does not have; quantize before a plain batch write"
                .into(),
        ))
    })
}
