//! The offload pool: host memory the device can address, in slots of one uniform stride.
//!
//! LOCAL: one slot in this process, `reserve_size` (rounded up to 1 GiB) mapped read-write and
//! committed. SHARED: `world_size` slots at one global virtual address in every rank of the
//! group (the same mechanism as Share Memory, [`crate::mem::gva`]): rank r's slot starts at
//! `base + r * stride` (stride: `reserve_size` rounded up), backed by that rank's memfd segment
//! of `alloc_size` (rounded up) bytes, mapped in every process of the host; the rest of each
//! slot stays reserved and unmapped. `malloc` hands out blocks of this rank's own backed span.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{OffloadConfig, Scene, FLAG_GIANT_PAGE, MAX_ENTRY_BYTES, POOL_ALIGN, STORE_URL_MAX};
use crate::device::{self, Device, HostRegistration, Kind};
use crate::error::{Error, Result};
use crate::fabric::{Runtime, RuntimeSpec};
use crate::mem::gva::{self, Gva, Segment};
use crate::transport::host_id;

/// Blocks are handed out on this alignment (upstream's pool promises 16 bytes).
const BLOCK_ALIGN: u64 = 16;
/// How long a SHARED initialize waits for the other ranks (upstream's default wait).
const SHARED_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the rank hosting the store waits at uninitialize for the others to leave.
const SHARED_LINGER: Duration = Duration::from_secs(30);
/// Upstream's derived store address: loopback, port 8500 + device_id / local_world_size.
const DERIVED_PORT_BASE: u64 = 8500;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Best-fit allocator over `[0, size)` of one span, with neighbours merged on free.
#[derive(Debug)]
pub(crate) struct Allocator {
    size: u64,
    /// Free blocks by offset -> length, and the same blocks by (length, offset) for best fit.
    free_by_offset: BTreeMap<u64, u64>,
    free_by_size: BTreeSet<(u64, u64)>,
    /// Blocks handed out: offset -> length.
    used: BTreeMap<u64, u64>,
}

impl Allocator {
    pub(crate) fn new(size: u64) -> Allocator {
        let mut a = Allocator {
            size,
            free_by_offset: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            used: BTreeMap::new(),
        };
        if size > 0 {
            a.insert_free(0, size);
        }
        a
    }

    fn insert_free(&mut self, off: u64, len: u64) {
        self.free_by_offset.insert(off, len);
        self.free_by_size.insert((len, off));
    }

    fn remove_free(&mut self, off: u64, len: u64) {
        self.free_by_offset.remove(&off);
        self.free_by_size.remove(&(len, off));
    }

    /// The offset of a new block of at least `size` bytes.
    pub(crate) fn alloc(&mut self, size: u64) -> Result<u64> {
        if size == 0 {
            return Err(Error::InvalidParam("malloc of 0 bytes".into()));
        }
        let want = size
            .checked_next_multiple_of(BLOCK_ALIGN)
            .filter(|&w| w <= self.size)
            .ok_or_else(|| {
                Error::MallocFailed(format!(
                    "malloc of {size} bytes: the pool's span is {} bytes",
                    self.size
                ))
            })?;
        // The smallest free block that fits (lowest offset among equals).
        let Some(&(len, off)) = self.free_by_size.range((want, 0)..).next() else {
            let largest = self.free_by_size.iter().next_back().map_or(0, |b| b.0);
            return Err(Error::MallocFailed(format!(
                "malloc of {size} bytes: no free block that large in the pool (largest free \
                 block {largest} bytes of {})",
                self.size
            )));
        };
        self.remove_free(off, len);
        if len > want {
            self.insert_free(off + want, len - want);
        }
        self.used.insert(off, want);
        Ok(off)
    }

    /// Returns the block at `off` (which `alloc` returned) to the free space.
    pub(crate) fn free(&mut self, off: u64) -> Result<()> {
        let Some(block) = self.used.remove(&off) else {
            return Err(Error::InvalidParam(format!(
                "offset {off:#x} of the pool is not the start of a block in use (never \
                 returned by malloc, or freed already)"
            )));
        };
        let (mut start, mut len) = (off, block);
        if let Some((&p_off, &p_len)) = self.free_by_offset.range(..off).next_back() {
            if p_off + p_len == off {
                self.remove_free(p_off, p_len);
                start = p_off;
                len += p_len;
            }
        }
        let next = off + block;
        if let Some(&n_len) = self.free_by_offset.get(&next) {
            self.remove_free(next, n_len);
            len += n_len;
        }
        self.insert_free(start, len);
        Ok(())
    }

    /// Bytes handed out (rounded blocks).
    pub(crate) fn in_use(&self) -> u64 {
        self.used.values().sum()
    }
}

/// The registered row grid of `entry_gather`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryTable {
    pub entry_bytes: u32,
    pub rows_per_slot: u32,
}

/// What holds the pool's memory; released on drop.
enum Backing {
    /// An anonymous private mapping of this process.
    Mapped { addr: u64, len: u64 },
    /// Page-locked memory of a device backend (CUDA: `cuMemHostAlloc`).
    Pinned {
        dev: Arc<dyn Device>,
        device: i32,
        addr: u64,
    },
    /// SHARED: the group's address range (own and same-host peers' segments mapped in it),
    /// this rank's segment, and the runtime holding the group (and, on rank 0, the store).
    /// Field order is drop order: unregister from the device, unmap, close, then leave the
    /// group.
    Shared {
        _registration: Option<HostRegistration>,
        _gva: Gva,
        _own: Segment,
        _runtime: Box<Runtime>,
    },
}

impl Backing {
    /// Where the memory starts (for SHARED: slot 0).
    fn addr(&self) -> u64 {
        match self {
            Backing::Mapped { addr, .. } | Backing::Pinned { addr, .. } => *addr,
            Backing::Shared { _gva, .. } => _gva.base(),
        }
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        match self {
            Backing::Mapped { addr, len } => {
                // SAFETY: the pool's own mapping, made in `map_local`; the pool (and so every
                // copy that could touch it) is gone when its backing drops.
                unsafe { libc::munmap(*addr as *mut libc::c_void, *len as usize) };
            }
            Backing::Pinned { dev, device, addr } => {
                // SAFETY: memory from this backend's `pinned_alloc` for `device`, freed once,
                // after the pool that handed out pointers into it is gone.
                if let Err(e) = unsafe { dev.pinned_free(*device, *addr) } {
                    crate::log::warn(&format!("offload: freeing the pinned pool: {e}"));
                }
            }
            Backing::Shared { .. } => {}
        }
    }
}

/// The pool of one initialize.
pub struct Pool {
    config: OffloadConfig,
    scene: Scene,
    rank: u32,
    /// Slot 0's start: the pool's base address (every rank's, in SHARED).
    base: u64,
    stride: u64,
    /// Bytes backed at the start of each slot (0: not mapped in this process).
    backed: Vec<u64>,
    alloc: Mutex<Allocator>,
    table: Mutex<Option<EntryTable>>,
    /// The device's address of this rank's span start, or why there is none.
    dva: std::result::Result<u64, String>,
    _backing: Backing,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("scene", &self.scene)
            .field("rank", &self.rank)
            .field("base", &format_args!("{:#x}", self.base))
            .field("stride", &self.stride)
            .field("backed", &self.backed)
            .finish()
    }
}

/// Where a range falls with respect to the pool.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Within {
    /// Inside the backed span of one slot.
    Backed,
    /// Outside the pool's address range altogether.
    Outside,
}

/// `v` rounded up to the pool granularity.
fn align_pool(what: &str, v: u64) -> Result<u64> {
    v.checked_next_multiple_of(POOL_ALIGN)
        .ok_or_else(|| Error::InvalidParam(format!("{what} {v} is too large")))
}

impl Pool {
    /// Builds the pool `cfg` describes (collective across the group for SHARED).
    pub fn create(cfg: &OffloadConfig) -> Result<Pool> {
        match cfg.scene {
            Scene::Local => Self::local(cfg),
            Scene::Shared => Self::shared(cfg),
        }
    }

    fn local(cfg: &OffloadConfig) -> Result<Pool> {
        if cfg.flags & !FLAG_GIANT_PAGE != 0 {
            return Err(Error::InvalidParam(format!(
                "flags {:#x}: only OFFLOAD_FLAG_GIANT_PAGE (1) is defined",
                cfg.flags
            )));
        }
        let reserve = align_pool("reserve_size", cfg.reserve_size)?;
        let alloc = align_pool("alloc_size", cfg.alloc_size)?;
        if reserve == 0 {
            return Err(Error::InvalidParam(
                "reserve_size 0: the pool needs a size (it is rounded up to 1 GiB)".into(),
            ));
        }
        if reserve != alloc {
            return Err(Error::InvalidParam(format!(
                "LOCAL scene: reserve_size ({}) and alloc_size ({}) must be equal once rounded up \
                 to 1 GiB ({reserve} vs {alloc})",
                cfg.reserve_size, cfg.alloc_size
            )));
        }
        let device = i32::try_from(cfg.device_id).map_err(|_| {
            Error::InvalidParam(format!("device_id {} is not a device", cfg.device_id))
        })?;
        let (backing, dva) = match device::select() {
            // Under CUDA's unified addressing, page-locked host memory from cuMemHostAlloc is
            // reachable from every device at its host address, so that address is the DVA.
            Ok(dev) if dev.kind() == Kind::Cuda => {
                let addr = dev.pinned_alloc(device, reserve as usize).map_err(|e| {
                    Error::MallocFailed(format!(
                        "cannot page-lock a {reserve}-byte offload pool on CUDA device \
                         {device}: {e}"
                    ))
                })?;
                (Backing::Pinned { dev, device, addr }, Ok(()))
            }
            // The host backend plays the device (MF_DEVICE_BACKEND=host): same addresses.
            Ok(dev) if dev.kind() == Kind::Host => (map_local(reserve, cfg.flags)?, Ok(())),
            Ok(dev) => (
                map_local(reserve, cfg.flags)?,
                Err(format!(
                    "the {} backend offers no device address for host memory, so the pool \
                     has no DVA (the offload copies still take its host addresses)",
                    dev.kind().name()
                )),
            ),
            // No accelerator: the host is the device, and runs the copies.
            Err(Error::Unsupported(_)) => (map_local(reserve, cfg.flags)?, Ok(())),
            Err(e) => return Err(e),
        };
        // Where the device reaches the pool, it does at the pool's host address.
        let base = backing.addr();
        let dva = dva.map(|()| base);
        Ok(Pool {
            config: cfg.clone(),
            scene: Scene::Local,
            rank: 0,
            base,
            stride: reserve,
            backed: vec![reserve],
            alloc: Mutex::new(Allocator::new(reserve)),
            table: Mutex::new(None),
            dva,
            _backing: backing,
        })
    }

    fn shared(cfg: &OffloadConfig) -> Result<Pool> {
        let (world, rank) = (cfg.world_size, cfg.rank_id);
        if cfg.flags & FLAG_GIANT_PAGE != 0 {
            return Err(Error::InvalidParam(
                "OFFLOAD_FLAG_GIANT_PAGE is for the LOCAL scene only".into(),
            ));
        }
        if cfg.flags != 0 {
            return Err(Error::InvalidParam(format!(
                "flags {:#x}: no flag is defined for the SHARED scene",
                cfg.flags
            )));
        }
        if world == 0 || world > crate::store::group::MAX_WORLD {
            return Err(Error::InvalidParam(format!(
                "SHARED scene: world_size {world} is outside [1, {}]",
                crate::store::group::MAX_WORLD
            )));
        }
        if rank >= world {
            return Err(Error::InvalidParam(format!(
                "SHARED scene: rank_id {rank} is outside [0, {world})"
            )));
        }
        let local_world = if cfg.local_world_size == 0 {
            world
        } else {
            cfg.local_world_size
        };
        if local_world > world || world % local_world != 0 {
            return Err(Error::InvalidParam(format!(
                "SHARED scene: local_world_size {} must divide world_size {world}",
                cfg.local_world_size
            )));
        }
        if local_world != world {
            return Err(Error::Unsupported(format!(
                "a SHARED pool over several hosts (local_world_size {local_world} of world_size \
                 {world}): the offload copies load and store every slot directly, and this \
                 library maps only the slots of ranks on the same host (ranks on other hosts \
                 are reached over the network path, which the offload copies do not take)"
            )));
        }
        let reserve = align_pool("reserve_size", cfg.reserve_size)?;
        let alloc = align_pool("alloc_size", cfg.alloc_size)?;
        if reserve == 0 || alloc == 0 {
            return Err(Error::InvalidParam(format!(
                "SHARED scene: reserve_size ({}) and alloc_size ({}) must be non-zero",
                cfg.reserve_size, cfg.alloc_size
            )));
        }
        if alloc > reserve {
            return Err(Error::InvalidParam(format!(
                "SHARED scene: alloc_size {} exceeds reserve_size {} (rounded up to 1 GiB: \
                 {alloc} > {reserve}); a rank's memory must fit its slot",
                cfg.alloc_size, cfg.reserve_size
            )));
        }
        let url = resolve_store_url(cfg, local_world)?;
        let deadline = Instant::now() + SHARED_TIMEOUT;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        // Ranks that initialize the same number of times agree on the group's name, so a pool
        // made again on a store that outlived the last one never meets its keys.
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "mf-offload.{}",
            GENERATION.fetch_add(1, Ordering::Relaxed) + 1
        );
        let runtime = Runtime::start(RuntimeSpec {
            store_url: &url,
            // Rank 0 hosts the store (when its address is free on this host), as upstream.
            host_store: rank == 0,
            group: Some((&name, world, Some(rank))),
            timeout: left(),
            linger: SHARED_LINGER,
            object_prefix: "mf-offload-obj",
            dynamic: false,
        })?;
        let group = runtime
            .group()
            .ok_or_else(|| Error::Failed("the offload runtime has no group".into()))?;
        // The layout first, before any address space is negotiated (ranks with different
        // strides would not agree on a range): every rank checks the same gathered records,
        // so all of them reach the same verdict.
        let me = format!("{};{reserve};{alloc};{local_world}", host_id());
        let layouts = group
            .all_gather(me.as_bytes(), left())?
            .iter()
            .enumerate()
            .map(|(r, raw)| Layout::parse(r, raw))
            .collect::<Result<Vec<_>>>()?;
        check_layouts(&layouts)?;
        let own = Segment::create(alloc, "mf-offload")?;
        let space = gva::negotiate(group, reserve, left())?;
        space.map_part(rank, &own)?;
        let me = format!("{};{}", std::process::id(), own.fd());
        let segments = group.all_gather(me.as_bytes(), left())?;
        let mut backed = vec![0u64; world as usize];
        for (r, raw) in segments.iter().enumerate() {
            backed[r] = layouts[r].alloc;
            if r as u32 == rank {
                continue;
            }
            let text = String::from_utf8_lossy(raw);
            let bad = || Error::Protocol(format!("rank {r}'s offload segment record {text:?}"));
            let (pid, fd) = text.split_once(';').ok_or_else(bad)?;
            let (pid, fd) = (
                pid.parse().map_err(|_| bad())?,
                fd.parse().map_err(|_| bad())?,
            );
            let seg = Segment::open_peer(pid, fd, layouts[r].alloc)?;
            space.map_part(r as u32, &seg)?;
        }
        // Every slot is mapped everywhere before anyone uses the pool.
        group.barrier(left())?;
        let own_start = space.base() + u64::from(rank) * space.stride();
        let (registration, dva) = match device::select() {
            Ok(dev) if dev.kind() == Kind::Host => (None, Ok(own_start)),
            // The device reaches this rank's segment once it is registered (page-locked and
            // mapped for the device); the peers register theirs.
            Ok(dev) => match i32::try_from(cfg.device_id) {
                // SAFETY: the own segment stays mapped at `own_start` until the backing drops,
                // and the registration drops first (field order of `Backing::Shared`).
                Ok(device) => match unsafe {
                    HostRegistration::new(dev.clone(), device, own_start, alloc as usize)
                } {
                    Ok(reg) => {
                        let dva = reg.dva();
                        (Some(reg), Ok(dva))
                    }
                    Err(e) => (
                        None,
                        Err(format!(
                            "the {} backend could not register this rank's {alloc}-byte segment \
                             for device {device} ({e}), so the pool has no DVA (the offload \
                             copies still take its host addresses)",
                            dev.kind().name()
                        )),
                    ),
                },
                Err(_) => (
                    None,
                    Err(format!("device_id {} is not a device", cfg.device_id)),
                ),
            },
            Err(Error::Unsupported(_)) => (None, Ok(own_start)),
            Err(e) => return Err(e),
        };
        Ok(Pool {
            config: cfg.clone(),
            scene: Scene::Shared,
            rank,
            base: space.base(),
            stride: space.stride(),
            backed,
            alloc: Mutex::new(Allocator::new(alloc)),
            table: Mutex::new(None),
            dva,
            _backing: Backing::Shared {
                _registration: registration,
                _gva: space,
                _own: own,
                _runtime: Box::new(runtime),
            },
        })
    }

    pub(crate) fn config(&self) -> &OffloadConfig {
        &self.config
    }
    pub(crate) fn scene(&self) -> Scene {
        self.scene
    }
    pub(crate) fn rank(&self) -> u32 {
        self.rank
    }
    pub(crate) fn base(&self) -> u64 {
        self.base
    }
    pub(crate) fn stride(&self) -> u64 {
        self.stride
    }
    pub(crate) fn slots(&self) -> u32 {
        self.backed.len() as u32
    }
    pub(crate) fn backed(&self, slot: u32) -> u64 {
        self.backed.get(slot as usize).copied().unwrap_or(0)
    }
    /// This rank's own slot: its start and backed length.
    pub(crate) fn own(&self) -> (u64, u64) {
        (
            self.base + self.rank as u64 * self.stride,
            self.backed(self.rank),
        )
    }
    pub(crate) fn dva_reason(&self) -> Option<&str> {
        self.dva.as_ref().err().map(|s| s.as_str())
    }
    pub(crate) fn table(&self) -> Option<EntryTable> {
        *lock(&self.table)
    }
    pub(crate) fn bytes_in_use(&self) -> u64 {
        lock(&self.alloc).in_use()
    }

    /// Where `[addr, addr + len)` falls: inside one slot's backed span, or outside the pool.
    /// A range that touches the pool's address range any other way is `OutOfBounds`.
    pub(crate) fn locate(&self, addr: u64, len: u64) -> Result<Within> {
        let total = self.stride * self.slots() as u64;
        let end = addr.saturating_add(len);
        if end <= self.base || addr >= self.base + total {
            return Ok(Within::Outside);
        }
        if addr < self.base {
            return Err(Error::OutOfBounds(format!(
                "{} starts before the offload pool ({:#x}) and runs into it",
                range(addr, len),
                self.base
            )));
        }
        let slot = ((addr - self.base) / self.stride) as u32;
        let start = self.base + slot as u64 * self.stride;
        let backed = self.backed(slot);
        if end <= start + backed {
            return Ok(Within::Backed);
        }
        Err(Error::OutOfBounds(format!(
            "{} runs past the {backed} bytes backed in slot {slot} of the offload pool \
             ({start:#x}..{:#x})",
            range(addr, len),
            start + backed
        )))
    }

    /// A block of `size` bytes of this rank's span.
    pub(crate) fn malloc(&self, size: u64) -> Result<u64> {
        let off = lock(&self.alloc).alloc(size)?;
        Ok(self.own().0 + off)
    }

    /// Returns a block `malloc` gave.
    pub(crate) fn free(&self, ptr: u64) -> Result<()> {
        let (start, len) = self.own();
        if ptr < start || ptr >= start + len {
            return Err(Error::InvalidParam(format!(
                "free of {ptr:#x}: not an address of this rank's offload pool ({start:#x}..{:#x})",
                start + len
            )));
        }
        lock(&self.alloc).free(ptr - start)
    }

    /// The device's address of pool address `ptr` (inside this rank's span).
    pub(crate) fn dva(&self, ptr: u64) -> Result<u64> {
        let (start, len) = self.own();
        if ptr < start || ptr >= start + len {
            return Err(Error::InvalidParam(format!(
                "{ptr:#x} is not an address of this rank's offload pool ({start:#x}..{:#x})",
                start + len
            )));
        }
        match &self.dva {
            Ok(dva_start) => Ok(dva_start + (ptr - start)),
            Err(why) => Err(Error::Unsupported(why.clone())),
        }
    }

    /// Registers the row grid of `entry_gather` (once per pool).
    pub(crate) fn register_entry_table(&self, entry_bytes: u32, rows_per_slot: u32) -> Result<()> {
        let mut t = lock(&self.table);
        if let Some(old) = *t {
            return Err(Error::RepeatInvoke(format!(
                "an entry table is registered already ({} bytes x {} rows per slot); one per \
                 pool, cleared by uninitialize",
                old.entry_bytes, old.rows_per_slot
            )));
        }
        if entry_bytes == 0 || entry_bytes > MAX_ENTRY_BYTES {
            return Err(Error::InvalidParam(format!(
                "entryBytes {entry_bytes} is outside (0, {MAX_ENTRY_BYTES}]"
            )));
        }
        if rows_per_slot == 0 {
            return Err(Error::InvalidParam("rowsPerSlot 0".into()));
        }
        let grid = entry_bytes as u64 * rows_per_slot as u64;
        let (_, own) = self.own();
        if grid > own {
            return Err(Error::InvalidParam(format!(
                "the row grid ({rows_per_slot} rows x {entry_bytes} bytes = {grid} bytes) does \
                 not fit the {own} bytes this rank backs in its slot"
            )));
        }
        *t = Some(EntryTable {
            entry_bytes,
            rows_per_slot,
        });
        Ok(())
    }
}

/// Maps a LOCAL pool: private, anonymous, read-write; counted against the commit limit.
fn map_local(len: u64, flags: u32) -> Result<Backing> {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing existing is
    // touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::MallocFailed(format!(
            "cannot map a {len}-byte offload pool: {}",
            std::io::Error::last_os_error()
        )));
    }
    if flags & FLAG_GIANT_PAGE != 0 {
        // Huge pages where the kernel offers them: a refusal only means small pages.
        // SAFETY: advice on the mapping just made; it changes no contents.
        unsafe { libc::madvise(p, len as usize, libc::MADV_HUGEPAGE) };
    }
    Ok(Backing::Mapped {
        addr: p as u64,
        len,
    })
}

/// The store of a SHARED pool: `store_url`, else `$ASCEND_MF_STORE_URL`, else (one host only)
/// loopback port 8500 + device_id / local_world_size, as upstream resolves it.
fn resolve_store_url(cfg: &OffloadConfig, local_world: u32) -> Result<String> {
    if cfg.store_url.len() > STORE_URL_MAX {
        return Err(Error::InvalidParam(format!(
            "store_url is {} bytes, at most {STORE_URL_MAX}",
            cfg.store_url.len()
        )));
    }
    if !cfg.store_url.is_empty() {
        return Ok(cfg.store_url.clone());
    }
    if let Ok(v) = std::env::var(super::STORE_URL_ENV) {
        if !v.trim().is_empty() {
            return Ok(v.trim().to_string());
        }
    }
    let port = DERIVED_PORT_BASE + cfg.device_id as u64 / local_world as u64;
    if port > u16::MAX as u64 {
        return Err(Error::InvalidParam(format!(
            "no store_url and device_id {} gives port {port}: set store_url",
            cfg.device_id
        )));
    }
    Ok(format!("tcp://127.0.0.1:{port}"))
}

/// The layout a rank of a SHARED pool tells the others.
struct Layout {
    host: String,
    reserve: u64,
    alloc: u64,
    local_world: u32,
}

impl Layout {
    fn parse(rank: usize, raw: &[u8]) -> Result<Layout> {
        let text = String::from_utf8_lossy(raw);
        let f: Vec<&str> = text.split(';').collect();
        let bad = || Error::Protocol(format!("rank {rank}'s offload pool record {text:?}"));
        if f.len() != 4 {
            return Err(bad());
        }
        Ok(Layout {
            host: f[0].to_string(),
            reserve: f[1].parse().map_err(|_| bad())?,
            alloc: f[2].parse().map_err(|_| bad())?,
            local_world: f[3].parse().map_err(|_| bad())?,
        })
    }
}

/// The layout every rank must share: one slot stride, one local world size, one host. Each
/// rank is compared with rank 0, so every rank names the same culprit.
fn check_layouts(all: &[Layout]) -> Result<()> {
    let first = &all[0];
    for (r, l) in all.iter().enumerate() {
        if l.reserve != first.reserve {
            return Err(Error::InvalidParam(format!(
                "SHARED scene: rank {r} has reserve_size {} and rank 0 {} (rounded up to 1 GiB); \
                 every rank must pass the same reserve_size (it is the slot stride)",
                l.reserve, first.reserve
            )));
        }
        if l.local_world != first.local_world {
            return Err(Error::InvalidParam(format!(
                "SHARED scene: rank {r} has local_world_size {} and rank 0 {}",
                l.local_world, first.local_world
            )));
        }
        if l.alloc == 0 || l.alloc > l.reserve {
            return Err(Error::Protocol(format!(
                "rank {r} backs {} bytes of a {}-byte slot",
                l.alloc, l.reserve
            )));
        }
    }
    if let Some((r, l)) = all.iter().enumerate().find(|(_, l)| l.host != first.host) {
        return Err(Error::Unsupported(format!(
            "SHARED scene: rank {r} runs on another host ({}) than rank 0 ({}): the offload \
             copies load and store every slot directly, and only same-host slots can be \
             mapped",
            l.host, first.host
        )));
    }
    Ok(())
}

pub(crate) fn range(addr: u64, len: u64) -> String {
    format!("{addr:#x}..{:#x} ({len} bytes)", addr.saturating_add(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_fits_best_and_merges_on_free() {
        let mut a = Allocator::new(1024);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(1).unwrap();
        let z = a.alloc(200).unwrap();
        assert_eq!((x, y, z), (0, 112, 128));
        assert_eq!(a.in_use(), 112 + 16 + 208);
        a.free(y).unwrap();
        // The 16-byte hole is the best fit for a small block.
        assert_eq!(a.alloc(10).unwrap(), 112);
        a.free(112).unwrap();
        a.free(x).unwrap();
        // x and the hole after it merged: 128 bytes at 0.
        assert_eq!(a.alloc(128).unwrap(), 0);
        a.free(0).unwrap();
        a.free(z).unwrap();
        assert_eq!(a.in_use(), 0);
        assert_eq!(a.free_by_offset.len(), 1, "{:?}", a.free_by_offset);
        assert_eq!(a.alloc(1024).unwrap(), 0);
        assert!(matches!(a.alloc(1), Err(Error::MallocFailed(_))));
    }

    #[test]
    fn allocator_refuses_bad_sizes_and_frees() {
        let mut a = Allocator::new(4096);
        assert!(matches!(a.alloc(0), Err(Error::InvalidParam(_))));
        assert!(matches!(a.alloc(4097), Err(Error::MallocFailed(_))));
        assert!(matches!(a.alloc(u64::MAX), Err(Error::MallocFailed(_))));
        let b = a.alloc(64).unwrap();
        assert!(matches!(a.free(b + 16), Err(Error::InvalidParam(_))));
        a.free(b).unwrap();
        assert!(
            matches!(a.free(b), Err(Error::InvalidParam(_))),
            "double free"
        );
    }

    #[test]
    fn allocator_survives_random_use() {
        // A long random sequence against a simple model: blocks never overlap, stay inside
        // the span, and everything freed merges back into one block.
        let size = 1 << 20;
        let mut a = Allocator::new(size);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5000 {
            if live.is_empty() || next() % 3 != 0 {
                let want = next() % 8192 + 1;
                if let Ok(off) = a.alloc(want) {
                    assert_eq!(off % BLOCK_ALIGN, 0);
                    assert!(off + want <= size);
                    for &(o, l) in &live {
                        assert!(off + want <= o || o + l <= off, "overlap");
                    }
                    live.push((off, want));
                }
            } else {
                let i = (next() % live.len() as u64) as usize;
                let (off, _) = live.swap_remove(i);
                a.free(off).unwrap();
            }
        }
        for (off, _) in live.drain(..) {
            a.free(off).unwrap();
        }
        assert_eq!(
            a.free_by_offset.into_iter().collect::<Vec<_>>(),
            [(0, size)]
        );
    }
}
