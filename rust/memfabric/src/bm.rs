//! Big Memory: a global address space over every rank's contributed DRAM, with copies in every
//! direction (the seed's `memfabric_hybrid.bm`), on the same [`SymmetricMemory`] as Share
//! Memory.
//!
//! Ascend names: "L"/local and "H"/host buffers are both memory of this process on a host
//! without a device; "G" and "GH" are GVAs (the DRAM parts, the only parts that exist here).
//! Device (HBM) contributions are refused with `Unsupported`; the message says what
//! [`crate::device`] looked for (or that a backend exists but is not used by BM yet).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fabric::{copy_in_process, Reach, Runtime, RuntimeSpec, SymmetricMemory};
use crate::shm::secs;

pub const MAX_RANKS: u32 = 1024;
pub const MAX_OBJECT_ID: u32 = 63;

/// The seed's BmConfig (timeouts in seconds, [1, u32::MAX]).
#[derive(Clone, Debug)]
pub struct BmConfig {
    pub init_timeout: u32,
    pub create_timeout: u32,
    pub operation_timeout: u32,
    pub start_store: bool,
    pub start_store_only: bool,
    pub dynamic_world_size: bool,
    pub unified_address_space: bool,
    pub auto_ranking: bool,
    pub rank_id: u32,
    pub flags: u32,
}

impl Default for BmConfig {
    fn default() -> Self {
        BmConfig {
            init_timeout: 120,
            create_timeout: 120,
            operation_timeout: 120,
            start_store: true,
            start_store_only: false,
            dynamic_world_size: false,
            unified_address_space: true,
            auto_ranking: false,
            rank_id: 0,
            flags: 0,
        }
    }
}

/// Copy directions (values of the 1.3 enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyType {
    L2G,
    G2L,
    G2H,
    H2G,
    L2GH,
    GH2L,
    GH2H,
    H2GH,
    G2G,
    Auto,
}

impl CopyType {
    pub fn from_value(v: i64) -> Result<CopyType> {
        use CopyType::*;
        Ok(match v {
            0 => L2G,
            1 => G2L,
            2 => G2H,
            3 => H2G,
            4 => L2GH,
            5 => GH2L,
            6 => GH2H,
            7 => H2GH,
            8 => G2G,
            9 => Auto,
            _ => {
                return Err(Error::InvalidParam(format!(
                    "copy type {v} is not a BmCopyType (0..9)"
                )))
            }
        })
    }

    /// (source is a GVA, destination is a GVA)
    fn sides(self) -> Option<(bool, bool)> {
        use CopyType::*;
        match self {
            L2G | H2G | L2GH | H2GH => Some((false, true)),
            G2L | G2H | GH2L | GH2H => Some((true, false)),
            G2G => Some((true, true)),
            Auto => None,
        }
    }
}

/// A process's membership in the BM runtime.
pub struct BmRuntime {
    core: Runtime,
    cfg: BmConfig,
    device_id: i32,
}

impl BmRuntime {
    pub fn initialize(
        store_url: &str,
        world: u32,
        device_id: i32,
        cfg: BmConfig,
    ) -> Result<BmRuntime> {
        if world == 0 || world > MAX_RANKS {
            return Err(Error::InvalidParam(format!(
                "world_size {world} is outside [1, {MAX_RANKS}]"
            )));
        }
        if !cfg.auto_ranking && cfg.rank_id >= world {
            return Err(Error::InvalidParam(format!(
                "rank_id {} is outside [0, {world}) (set auto_ranking to let the store assign ranks)",
                cfg.rank_id
            )));
        }
        let init = secs("init_timeout", cfg.init_timeout)?;
        secs("create_timeout", cfg.create_timeout)?;
        secs("operation_timeout", cfg.operation_timeout)?;
        // With explicit ranks rank 0 hosts the store; with auto-ranking, the first process on
        // the store's host to bind its address does.
        let host_store =
            cfg.start_store && (cfg.auto_ranking || cfg.rank_id == 0 || cfg.start_store_only);
        let rank = (!cfg.auto_ranking).then_some(cfg.rank_id);
        let core = Runtime::start(RuntimeSpec {
            store_url,
            host_store,
            group: (!cfg.start_store_only).then_some(("mf-bm", world, rank)),
            timeout: init,
            linger: Duration::from_secs(cfg.operation_timeout.min(30) as u64),
            object_prefix: "mf-bm-obj",
            dynamic: cfg.dynamic_world_size,
        })?;
        if cfg.start_store_only && !core.hosts_store() {
            return Err(Error::NotStarted(format!(
                "start_store_only: cannot serve {store_url} from this host"
            )));
        }
        Ok(BmRuntime {
            core,
            cfg,
            device_id,
        })
    }

    /// This process's rank (`None` with start_store_only).
    pub fn rank(&self) -> Option<u32> {
        self.core.group().map(|g| g.rank())
    }

    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    /// Creates object `id`: every rank contributes `dram` bytes (and `hbm` bytes of device
    /// memory, which needs a device backend).
    pub fn create(self: &Arc<Self>, id: u32, dram: u64, hbm: u64) -> Result<BigMemory> {
        let group = self.core.group().ok_or_else(|| {
            Error::NotInit(
                "this process only hosts the store (start_store_only); it has no rank".into(),
            )
        })?;
        if id > MAX_OBJECT_ID {
            return Err(Error::InvalidParam(format!(
                "object id {id} is outside [0, {MAX_OBJECT_ID}]"
            )));
        }
        if hbm > 0 {
            let reg = crate::device::registry();
            return Err(Error::Unsupported(match reg.missing_reason() {
                Some(why) => format!("local_hbm_size {hbm}: no device memory here ({why})"),
                None => format!(
                    "local_hbm_size {hbm}: a device backend is present, but Big Memory does not \
                     place contributions in device memory yet"
                ),
            }));
        }
        if dram == 0 {
            return Err(Error::InvalidParam(
                "local_dram_size must be positive".into(),
            ));
        }
        let timeout = Duration::from_secs(self.cfg.create_timeout as u64);
        let mem = self
            .core
            .create_object(id, group.world(), group.rank(), dram, timeout)?;
        Ok(BigMemory {
            id,
            mem,
            runtime: self.clone(),
        })
    }
}

/// One Big Memory object.
pub struct BigMemory {
    id: u32,
    mem: SymmetricMemory,
    runtime: Arc<BmRuntime>,
}

impl BigMemory {
    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn memory(&self) -> &SymmetricMemory {
        &self.mem
    }
    pub fn local_mem_size(&self) -> u64 {
        self.mem.local_size()
    }

    /// The GVA of `rank`'s part.
    pub fn peer_rank_ptr(&self, rank: u32) -> Result<u64> {
        self.mem.part(rank)
    }

    pub fn rank_of_gva(&self, gva: u64) -> Result<u32> {
        self.mem.locate(gva, 1)
    }

    /// The address of `gva` usable by plain loads and stores here (parts mapped here only).
    pub fn gva_to_va(&self, gva: u64) -> Result<u64> {
        let r = self.mem.locate(gva, 1)?;
        match self.mem.reach(r)? {
            Reach::Own | Reach::Mapped => Ok(gva),
            Reach::Remote(_) => Err(Error::Unsupported(format!(
                "rank {r}'s part is on another host: it has no address in this process"
            ))),
        }
    }

    /// Registers memory of this process that network copies (to ranks on other hosts) may use.
    pub fn register(&self, addr: u64, len: u64) -> Result<()> {
        self.mem.register_local(addr, len)
    }

    pub fn unregister(&self, addr: u64) -> Result<()> {
        self.mem.unregister_local(addr)
    }

    /// Ranks that are members now.
    pub fn members(&self) -> Vec<u32> {
        self.mem.members()
    }

    /// Calls `handler(rank, joined)` as ranks join and leave (dynamic_world_size objects).
    pub fn set_group_event_handler(
        &self,
        handler: Option<crate::fabric::GroupEventHandler>,
    ) -> Result<()> {
        self.mem.set_event_handler(handler)
    }

    /// A barrier over the object's ranks.
    pub fn wait(&self) -> Result<()> {
        if self.mem.is_dynamic() {
            return Err(Error::Unsupported(
                "wait() needs a fixed set of ranks; this object has dynamic_world_size".into(),
            ));
        }
        self.mem.group().barrier(Duration::from_secs(
            self.runtime.cfg.operation_timeout as u64,
        ))
    }

    fn is_gva(&self, addr: u64) -> bool {
        addr >= self.mem.base()
            && addr < self.mem.base() + self.mem.stride() * self.mem.world() as u64
    }

    /// Copies `len` bytes from `src` to `dst` in direction `ty`.
    pub fn copy(&self, src: u64, dst: u64, len: u64, ty: CopyType) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidParam("size 0".into()));
        }
        let (src_g, dst_g) = match ty.sides() {
            Some(s) => s,
            None => (self.is_gva(src), self.is_gva(dst)),
        };
        let deadline =
            Instant::now() + Duration::from_secs(self.runtime.cfg.operation_timeout as u64);
        match (src_g, dst_g) {
            (false, false) => Err(Error::InvalidParam(format!(
                "neither {src:#x} nor {dst:#x} is a global address ({ty:?})"
            ))),
            (false, true) => self.mem.copy_with_gva(dst, src, len, true),
            (true, false) => self.mem.copy_with_gva(src, dst, len, false),
            (true, true) => {
                let rs = self.mem.locate(src, len)?;
                let rd = self.mem.locate(dst, len)?;
                let local = |r: u32| matches!(self.mem.reach(r), Ok(Reach::Own | Reach::Mapped));
                match (local(rs), local(rd)) {
                    (true, true) => copy_in_process(src, dst, len, deadline),
                    // Own part is registered with the engine, so it can be a network source.
                    (true, false) if rs == self.mem.rank() => self.mem.copy_with_gva(dst, src, len, true),
                    (false, true) if rd == self.mem.rank() => self.mem.copy_with_gva(src, dst, len, false),
                    _ => Err(Error::Unsupported(format!(
                        "G2G between rank {rs} and rank {rd}: one side must be this rank's part or both mapped here"
                    ))),
                }
            }
        }
    }

    /// Copies a batch; stops at the first failure, naming its index.
    pub fn copy_batch(&self, src: &[u64], dst: &[u64], sizes: &[u64], ty: CopyType) -> Result<()> {
        if src.len() != dst.len() || src.len() != sizes.len() {
            return Err(Error::InvalidParam(format!(
                "batch lists differ in length: {} sources, {} destinations, {} sizes",
                src.len(),
                dst.len(),
                sizes.len()
            )));
        }
        for i in 0..src.len() {
            self.copy(src[i], dst[i], sizes[i], ty)
                .map_err(|e| match e {
                    Error::OutOfBounds(m) => Error::OutOfBounds(format!("copy {i}: {m}")),
                    Error::InvalidParam(m) => Error::InvalidParam(format!("copy {i}: {m}")),
                    e => e,
                })?;
        }
        Ok(())
    }
}

impl Drop for BigMemory {
    fn drop(&mut self) {
        let _ = self.mem.group().leave();
        self.runtime.core.release(self.id);
    }
}
