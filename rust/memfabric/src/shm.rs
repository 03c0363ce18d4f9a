//! Share Memory: symmetric memory that every rank of an object reads and writes through one
//! global virtual address (the seed's `memfabric_hybrid.shm`).
//!
//! `initialize` connects this process to the config store (starting it here when the store's
//! address is free on this host and `start_store` is set) and joins the process group;
//! `create` builds an object on [`SymmetricMemory`] with the seed's limits. Sub-groups, the
//! values ranks hold and the global exit of an object are in [`control`].

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::fabric::{ops, Runtime, RuntimeSpec, SymmetricMemory};
use crate::store::within;

pub mod control;

use control::{ExitHandler, GlobalExit, PendingExit, SubGroups, ValueAllocator};

pub const MAX_RANKS: u32 = 1024;
pub const MAX_OBJECT_ID: u32 = 63;
pub const MIN_SIZE: u64 = 2 << 20;
pub const MAX_SIZE: u64 = 4 << 30;

/// The data operations ([`ops`] bits) this library can do on a Share Memory object: load and
/// store through the GVA, same-host copies, and network copies to ranks on other hosts.
pub fn supported_data_operations() -> u32 {
    ops::LOAD_STORE | ops::SAME_HOST_COPY | ops::NETWORK
}

/// The seed's ShmConfig (timeouts in seconds, [1, u32::MAX]).
#[derive(Clone, Debug)]
pub struct ShmConfig {
    pub init_timeout: u32,
    pub create_timeout: u32,
    pub operation_timeout: u32,
    pub start_store: bool,
    pub flags: u32,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            init_timeout: 120,
            create_timeout: 120,
            operation_timeout: 120,
            start_store: true,
            flags: 0,
        }
    }
}

/// A process's membership in the SHM runtime.
pub struct ShmRuntime {
    core: Runtime,
    cfg: ShmConfig,
    device_id: i32,
}

/// A timeout of the seed's configs: seconds in [1, u32::MAX].
pub(crate) fn secs(what: &str, v: u32) -> Result<Duration> {
    if v == 0 {
        return Err(Error::InvalidParam(format!(
            "{what} must be at least 1 second"
        )));
    }
    Ok(Duration::from_secs(v as u64))
}

impl ShmRuntime {
    pub fn initialize(
        store_url: &str,
        world: u32,
        rank: u32,
        device_id: i32,
        cfg: ShmConfig,
    ) -> Result<ShmRuntime> {
        if world == 0 || world > MAX_RANKS {
            return Err(Error::InvalidParam(format!(
                "world_size {world} is outside [1, {MAX_RANKS}]"
            )));
        }
        if rank >= world {
            return Err(Error::InvalidParam(format!(
                "rank_id {rank} is outside [0, {world})"
            )));
        }
        let init = secs("init_timeout", cfg.init_timeout)?;
        secs("create_timeout", cfg.create_timeout)?;
        secs("operation_timeout", cfg.operation_timeout)?;
        let core = Runtime::start(RuntimeSpec {
            store_url,
            // Rank 0 hosts the store (when its address is free on this host): one well-known
            // process, so the others know whose exit takes the store away.
            host_store: cfg.start_store && rank == 0,
            group: Some(("mf-shm", world, Some(rank))),
            timeout: init,
            linger: Duration::from_secs(cfg.operation_timeout.min(30) as u64),
            object_prefix: "mf-shm-obj",
            dynamic: false,
        })?;
        Ok(ShmRuntime {
            core,
            cfg,
            device_id,
        })
    }

    pub fn rank(&self) -> u32 {
        self.core.group().map(|g| g.rank()).unwrap_or(0)
    }
    pub fn world(&self) -> u32 {
        self.core.group().map(|g| g.world()).unwrap_or(0)
    }
    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    /// Creates object `id` of `rank_size` ranks, this one being `rank_id`, each contributing
    /// `local_mem_size` bytes ([2 MiB, 4 GiB], a multiple of 2 MiB).
    pub fn create(
        self: &Arc<Self>,
        id: u32,
        rank_size: u32,
        rank_id: u32,
        local_mem_size: u64,
    ) -> Result<ShareMemory> {
        if id > MAX_OBJECT_ID {
            return Err(Error::InvalidParam(format!(
                "object id {id} is outside [0, {MAX_OBJECT_ID}]"
            )));
        }
        if rank_size == 0 || rank_size > MAX_RANKS {
            return Err(Error::InvalidParam(format!(
                "rank_size {rank_size} is outside [1, {MAX_RANKS}]"
            )));
        }
        if rank_id >= rank_size {
            return Err(Error::InvalidParam(format!(
                "rank_id {rank_id} is outside [0, {rank_size})"
            )));
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&local_mem_size)
            || !local_mem_size.is_multiple_of(MIN_SIZE)
        {
            return Err(Error::InvalidParam(format!(
                "local_mem_size {local_mem_size} must be a multiple of 2 MiB in [2 MiB, 4 GiB]"
            )));
        }
        let timeout = Duration::from_secs(self.cfg.create_timeout as u64);
        let mem = self
            .core
            .create_object(id, rank_size, rank_id, local_mem_size, timeout)?;
        let store = self.core.store();
        let prefix = mem.group().prefix().to_string();
        Ok(ShareMemory {
            id,
            subgroups: SubGroups::new(store.clone(), &prefix, rank_size),
            values: ValueAllocator::new(store.clone(), &prefix, rank_id),
            exit: GlobalExit::new(store.clone(), &prefix, rank_id),
            mem,
            runtime: self.clone(),
        })
    }
}

/// One Share Memory object.
pub struct ShareMemory {
    id: u32,
    mem: SymmetricMemory,
    runtime: Arc<ShmRuntime>,
    subgroups: SubGroups,
    values: ValueAllocator,
    exit: GlobalExit,
}

impl ShareMemory {
    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn gva(&self) -> u64 {
        self.mem.base()
    }
    pub fn local_rank(&self) -> u32 {
        self.mem.rank()
    }
    pub fn rank_size(&self) -> u32 {
        self.mem.world()
    }
    pub fn local_mem_size(&self) -> u64 {
        self.mem.local_size()
    }
    pub fn memory(&self) -> &SymmetricMemory {
        &self.mem
    }
    /// The distance between ranks' parts: rank `i`'s part is at `gva + i * symmetric_size`.
    pub fn symmetric_size(&self) -> u64 {
        self.mem.stride()
    }

    fn op_timeout(&self) -> Duration {
        Duration::from_secs(self.runtime.cfg.operation_timeout as u64)
    }

    pub fn barrier(&self) -> Result<()> {
        self.mem.group().barrier(self.op_timeout())
    }

    /// Gathers equal-length `data` from every rank: `len * rank_size` bytes in rank order.
    pub fn all_gather(&self, data: &[u8]) -> Result<Vec<u8>> {
        let pieces = self.mem.group().all_gather(data, self.op_timeout())?;
        same_lengths(data.len(), pieces)
    }

    /// Waits until the `rank_size` ranks that call this with `key` meet (this one being
    /// `rank_id` among them); no setup needed. A key names one sub-group: the same ranks,
    /// each with the same `rank_id`, every time.
    pub fn subgroup_barrier(&self, key: &str, rank_size: u32, rank_id: u32) -> Result<()> {
        self.subgroups
            .barrier(key, rank_size, rank_id, self.op_timeout())
    }

    /// Gathers equal-length `data` from the ranks of sub-group `key` (see
    /// [`subgroup_barrier`](Self::subgroup_barrier)): `len * rank_size` bytes in sub-group
    /// rank order.
    pub fn subgroup_all_gather(
        &self,
        key: &str,
        rank_size: u32,
        rank_id: u32,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let pieces = self
            .subgroups
            .all_gather(key, rank_size, rank_id, data, self.op_timeout())?;
        same_lengths(data.len(), pieces)
    }

    /// A value in `[0, limit)` (`limit` at most [`control::VALUE_LIMIT`]) that no other rank
    /// of the object holds, held by this rank until [`atomic_release_value`]
    /// (Self::atomic_release_value) or the object's destruction.
    pub fn atomic_alloc_value(&self, limit: u32) -> Result<u32> {
        self.values.alloc(limit, self.op_timeout())
    }

    /// Gives back a value this rank holds.
    pub fn atomic_release_value(&self, value: u32) -> Result<()> {
        self.values.release(value, self.op_timeout())
    }

    /// Runs `handler(status)` on a thread of the library when any rank calls
    /// [`global_exit`](Self::global_exit) (at once if one did already); one per object.
    pub fn register_exit(&self, handler: ExitHandler) -> Result<()> {
        self.exit.register(handler, self.op_timeout())
    }

    /// Makes every rank's registered exit function run with `status`. Wait on the result for
    /// this rank's own function (it runs on the library's thread, as everywhere else).
    pub fn global_exit(&self, status: i32) -> Result<PendingExit> {
        self.exit.publish(status, self.op_timeout())
    }

    fn context_key(&self) -> String {
        format!("{}context", self.mem.group().prefix())
    }

    /// Attaches user context to the object; every rank reads it with [`context`](Self::context).
    pub fn set_context(&self, context: &[u8]) -> Result<()> {
        self.runtime.core.store().set(&self.context_key(), context)
    }

    /// The context last set by any rank (empty when none).
    pub fn context(&self) -> Result<Vec<u8>> {
        Ok(self
            .runtime
            .core
            .store()
            .get(&self.context_key())?
            .unwrap_or_default())
    }

    pub fn topology_can_reach(&self, remote_rank: u32) -> Result<u32> {
        self.mem.can_reach(remote_rank)
    }

    pub fn query_support_data_operation(&self) -> u32 {
        self.mem.supported_ops()
    }
}

/// `pieces` joined, when each is `len` bytes long.
fn same_lengths(len: usize, pieces: Vec<Vec<u8>>) -> Result<Vec<u8>> {
    if let Some((r, p)) = pieces.iter().enumerate().find(|(_, p)| p.len() != len) {
        return Err(Error::InvalidParam(format!(
            "all_gather needs the same length from every rank: this rank gave {len} bytes, rank {r} gave {}",
            p.len()
        )));
    }
    Ok(pieces.concat())
}

impl Drop for ShareMemory {
    fn drop(&mut self) {
        self.exit.stop();
        self.subgroups.leave_all();
        self.values.release_all();
        let group = self.mem.group();
        let _ = group.leave();
        // The last rank out removes what the ranks shared (the others may still read it).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        if within(deadline, || group.live_members()).is_ok_and(|n| n == 0) {
            control::forget_object(self.runtime.core.store(), group.prefix());
        }
        self.runtime.core.release(self.id);
    }
}
