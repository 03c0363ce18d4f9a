//! Share Memory: symmetric memory that every rank of an object reads and writes through one
//! global virtual address (the seed's `memfabric_hybrid.shm`).
//!
//! `initialize` connects this process to the config store (starting it here when the store's
//! address is free on this host and `start_store` is set) and joins the process group;
//! `create` builds an object on [`SymmetricMemory`] with the seed's limits.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::fabric::{ObjectSpec, SymmetricMemory};
use crate::store::{ClientOptions, Group, StoreClient, StoreServer};

pub const MAX_RANKS: u32 = 1024;
pub const MAX_OBJECT_ID: u32 = 63;
pub const MIN_SIZE: u64 = 2 << 20;
pub const MAX_SIZE: u64 = 4 << 30;

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
    store: Arc<StoreClient>,
    store_url: String,
    group: Group,
    cfg: ShmConfig,
    device_id: i32,
    ids: Mutex<HashSet<u32>>,
    _server: Option<StoreServer>,
}

fn secs(what: &str, v: u32) -> Result<Duration> {
    if v == 0 {
        return Err(Error::InvalidParam(format!(
            "{what} must be at least 1 second"
        )));
    }
    Ok(Duration::from_secs(v as u64))
}

/// Starts a store at `url` when the address is ours and free; `None` when it is served
/// elsewhere (another process or host).
pub fn start_store_if_ours(url: &str) -> Result<Option<StoreServer>> {
    let addr = crate::store::url::parse_store_url(url, false)?;
    let tls = crate::store::tls::current()?.map(|m| m.server.clone());
    match StoreServer::start(addr, tls) {
        Ok(s) => Ok(Some(s)),
        Err(Error::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
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
        // Rank 0 hosts the store (when its address is free on this host): one well-known
        // process, so the others know whose exit takes the store away.
        let server = if cfg.start_store && rank == 0 {
            start_store_if_ours(store_url)?
        } else {
            None
        };
        let store = Arc::new(StoreClient::connect(
            store_url,
            ClientOptions {
                timeout: init,
                ..Default::default()
            },
        )?);
        let group = Group::join(store.clone(), "mf-shm", world, Some(rank), init)?;
        Ok(ShmRuntime {
            store,
            store_url: store_url.to_string(),
            group,
            cfg,
            device_id,
            ids: Mutex::new(HashSet::new()),
            _server: server,
        })
    }

    pub fn rank(&self) -> u32 {
        self.group.rank()
    }
    pub fn world(&self) -> u32 {
        self.group.world()
    }
    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    fn ids(&self) -> MutexGuard<'_, HashSet<u32>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
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
        if !self.ids().insert(id) {
            return Err(Error::Duplicated(format!(
                "share memory object {id} already exists in this process"
            )));
        }
        let timeout = Duration::from_secs(self.cfg.create_timeout as u64);
        let ip = self
            .store
            .local_ip()
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let spec = ObjectSpec {
            name: format!("mf-shm-obj{id}"),
            world: rank_size,
            rank: rank_id,
            local_size: local_mem_size,
        };
        match SymmetricMemory::create(self.store.clone(), &self.store_url, &spec, ip, timeout) {
            Ok(mem) => Ok(ShareMemory {
                id,
                mem,
                runtime: self.clone(),
            }),
            Err(e) => {
                self.ids().remove(&id);
                Err(e)
            }
        }
    }
}

impl Drop for ShmRuntime {
    fn drop(&mut self) {
        if self._server.is_some() {
            // The store lives in this process: keep it until the other ranks have left.
            self.group.wait_others_left(Duration::from_secs(
                self.cfg.operation_timeout.min(30) as u64
            ));
        }
        let _ = self.group.leave();
    }
}

/// One Share Memory object.
pub struct ShareMemory {
    id: u32,
    mem: SymmetricMemory,
    runtime: Arc<ShmRuntime>,
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

    fn op_timeout(&self) -> Duration {
        Duration::from_secs(self.runtime.cfg.operation_timeout as u64)
    }

    pub fn barrier(&self) -> Result<()> {
        self.mem.group().barrier(self.op_timeout())
    }

    /// Gathers equal-length `data` from every rank: `len * rank_size` bytes in rank order.
    pub fn all_gather(&self, data: &[u8]) -> Result<Vec<u8>> {
        let pieces = self.mem.group().all_gather(data, self.op_timeout())?;
        if let Some((r, p)) = pieces
            .iter()
            .enumerate()
            .find(|(_, p)| p.len() != data.len())
        {
            return Err(Error::InvalidParam(format!(
                "all_gather needs the same length from every rank: this rank gave {} bytes, rank {r} gave {}",
                data.len(),
                p.len()
            )));
        }
        Ok(pieces.concat())
    }

    fn context_key(&self) -> String {
        format!("mf-shm-obj{}/context", self.id)
    }

    /// Attaches user context to the object; every rank reads it with [`context`](Self::context).
    pub fn set_context(&self, context: &[u8]) -> Result<()> {
        self.runtime.store.set(&self.context_key(), context)
    }

    /// The context last set by any rank (empty when none).
    pub fn context(&self) -> Result<Vec<u8>> {
        Ok(self
            .runtime
            .store
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

impl Drop for ShareMemory {
    fn drop(&mut self) {
        let _ = self.mem.group().leave();
        self.runtime.ids().remove(&self.id);
    }
}
