//! Big Memory: a global address space over every rank's contributed DRAM, with copies in every
//! direction (the seed's `memfabric_hybrid.bm`), on the same [`SymmetricMemory`] as Share
//! Memory.
//!
//! Ascend names: "L"/local and "H"/host buffers are memory of this process (device or host
//! memory); "G" and "GH" are GVAs. With `local_hbm_size > 0` (a device backend is needed;
//! otherwise `Unsupported` says what [`crate::device`] looked for) every rank also
//! contributes device memory, named by a second window of GVAs (see [`crate::hbm`]); a copy
//! goes by the addresses it is given: any side in the HBM window is device memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fabric::{copy_in_process, Reach, Runtime, RuntimeSpec, SymmetricMemory};
use crate::shm::secs;

pub const MAX_RANKS: u32 = 1024;
pub const MAX_OBJECT_ID: u32 = 63;
/// DRAM contributed (and not reported) by an object created with only HBM: the group and
/// the network engine live on the DRAM object.
const HBM_ONLY_DRAM: u64 = 4096;

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

    /// The number of ranks (`None` with start_store_only).
    pub fn world(&self) -> Option<u32> {
        self.core.group().map(|g| g.world())
    }

    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    /// Moves this process to the config store now at `store_url` (upstream's
    /// `update_store_url`, for a store restarted at a new address): this rank's records and
    /// those of its objects' engines are published there, and later operations use it. A store
    /// this process hosts keeps running.
    pub fn update_store_url(&self, store_url: &str) -> Result<()> {
        self.core.move_store(store_url)
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
            match crate::device::registry().accelerator() {
                Ok(_) => {}
                Err(Error::Unsupported(why)) => {
                    return Err(Error::Unsupported(format!(
                        "local_hbm_size {hbm}: no device memory here ({why})"
                    )))
                }
                Err(Error::InvalidParam(why)) => {
                    return Err(Error::InvalidParam(format!("local_hbm_size {hbm}: {why}")))
                }
                Err(e) => return Err(e),
            }
            if self.cfg.dynamic_world_size {
                return Err(Error::Unsupported(format!(
                    "local_hbm_size {hbm} with dynamic_world_size: device parts need a fixed set \
                     of ranks"
                )));
            }
        }
        if dram == 0 && hbm == 0 {
            return Err(Error::InvalidParam(
                "local_dram_size and local_hbm_size are both 0: nothing to contribute".into(),
            ));
        }
        let timeout = Duration::from_secs(self.cfg.create_timeout as u64);
        // The DRAM object also carries the group; with only HBM asked for it is one page.
        let mem = self.core.create_object(
            id,
            group.world(),
            group.rank(),
            dram.max(HBM_ONLY_DRAM),
            timeout,
        )?;
        let hbm = if hbm > 0 {
            match crate::hbm::HbmPart::create(&mem, self.device_id.max(0), hbm, timeout) {
                Ok(p) => Some(p),
                Err(e) => {
                    let _ = mem.group().leave();
                    self.core.release(id);
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(BigMemory {
            id,
            hbm,
            dram,
            mem,
            runtime: self.clone(),
        })
    }
}

/// One Big Memory object.
pub struct BigMemory {
    id: u32,
    /// Declared before `mem`: the device part is released while the DRAM part's engine and
    /// group still exist.
    hbm: Option<crate::hbm::HbmPart>,
    /// DRAM bytes asked for (0 for an HBM-only object).
    dram: u64,
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
    /// DRAM bytes this rank contributed.
    pub fn local_mem_size(&self) -> u64 {
        self.dram
    }

    /// HBM bytes this rank contributed (0 without a device part).
    pub fn local_hbm_size(&self) -> u64 {
        self.hbm.as_ref().map_or(0, |h| h.size())
    }

    /// The GVA of `rank`'s part.
    pub fn peer_rank_ptr(&self, rank: u32) -> Result<u64> {
        self.mem.part(rank)
    }

    /// The HBM GVA of `rank`'s device part (`None` without one).
    pub fn peer_rank_hbm_ptr(&self, rank: u32) -> Result<Option<u64>> {
        self.mem.part(rank)?;
        Ok(self.hbm.as_ref().map(|h| h.part(rank)))
    }

    pub fn rank_of_gva(&self, gva: u64) -> Result<u32> {
        if let Some(h) = self.hbm.as_ref().filter(|h| h.contains(gva)) {
            return h.locate(gva, 1).map(|(r, _)| r);
        }
        self.mem.locate(gva, 1)
    }

    /// The address of `gva` usable here: plain loads and stores for DRAM parts mapped here,
    /// a device pointer (for kernels and device copies) for HBM parts of this host.
    pub fn gva_to_va(&self, gva: u64) -> Result<u64> {
        if let Some(h) = self.hbm.as_ref().filter(|h| h.contains(gva)) {
            return h.va(gva);
        }
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
        if let Some(h) = self
            .hbm
            .as_ref()
            .filter(|h| h.contains(src) || h.contains(dst))
        {
            if let Some((src_g, dst_g)) = ty.sides() {
                let is_g = |a: u64| h.contains(a) || self.is_gva(a);
                if (src_g && !is_g(src)) || (dst_g && !is_g(dst)) {
                    return Err(Error::InvalidParam(format!(
                        "{ty:?}: {src:#x} -> {dst:#x} does not match the copy type (which side \
                         is a global address)"
                    )));
                }
            }
            return h.copy(&self.mem, src, dst, len);
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
        if let Some(h) = self.hbm.as_mut() {
            h.release(&self.mem);
        }
        let _ = self.mem.group().leave();
        self.runtime.core.release(self.id);
    }
}
