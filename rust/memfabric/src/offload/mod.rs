//! Offload (upstream 1.3's `memfabric_hybrid.offload`): a pool of host memory the device can
//! address, and four copy operators that run over descriptor arrays.
//!
//! Upstream launches the operators as Ascend AIV kernels on the NPU's current stream; here
//! they are host loops with the kernels' semantics ([`ops`]), run synchronously, with every
//! address placed before anything moves ([`access`]): inside the pool (bounds-checked), in an
//! accelerator's device memory (moved by its backend), or any other host memory (moved by the
//! kernel, so a bad address is an error code and never a crash).
//!
//! One pool per process, as upstream: [`initialize`] builds it (LOCAL: in this process;
//! SHARED: one slot per rank of a group, every same-host rank's slot mapped in every process
//! at the same address), [`uninitialize`] releases it once the calls using it have returned.

mod access;
mod ops;
mod pool;

use std::sync::{Arc, Mutex, RwLock};

pub use access::{Residence, Span};
pub use pool::Pool;

use crate::error::{Error, Result};

/// `OFFLOAD_FLAG_GIANT_PAGE`: LOCAL pools only. Upstream allocates the pool as a segment with
/// a device mapping of its own; here it advises the pool for huge pages.
pub const FLAG_GIANT_PAGE: u32 = 1;
/// Pool sizes are rounded up to this (upstream: "aligned up to GB").
pub const POOL_ALIGN: u64 = 1 << 30;
/// Largest row of an entry table (upstream's `OFFLOAD_ENTRY_GATHER_MAX_ENTRY_BYTES`).
pub const MAX_ENTRY_BYTES: u32 = 64 * 1024;
/// Longest store URL (upstream's config holds it in 64 bytes with the NUL).
pub const STORE_URL_MAX: usize = 63;
/// The store of a SHARED pool when the config names none (upstream's variable).
pub const STORE_URL_ENV: &str = "ASCEND_MF_STORE_URL";

/// The pool's scene.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scene {
    /// One pool in this process.
    Local = 0,
    /// One slot per rank of a group, shared by the group's processes.
    Shared = 1,
}

impl Scene {
    /// The scene of upstream's value (0 LOCAL, 1 SHARED).
    pub fn from_value(v: u32) -> Result<Scene> {
        match v {
            0 => Ok(Scene::Local),
            1 => Ok(Scene::Shared),
            _ => Err(Error::InvalidParam(format!(
                "scene {v}: 0 (LOCAL) or 1 (SHARED)"
            ))),
        }
    }
}

/// Upstream's `offload_config_t`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffloadConfig {
    pub device_id: u32,
    /// Bytes of address space per slot (rounded up to 1 GiB); the same on every rank.
    pub reserve_size: u64,
    /// Bytes this rank backs in its slot (rounded up to 1 GiB); LOCAL: equal to reserve_size.
    pub alloc_size: u64,
    /// SHARED: ranks in the group.
    pub world_size: u32,
    /// SHARED: this rank (0 hosts the config store).
    pub rank_id: u32,
    pub scene: Scene,
    /// SHARED: the config store; "" for `$ASCEND_MF_STORE_URL`, else loopback port
    /// 8500 + device_id / local_world_size.
    pub store_url: String,
    pub flags: u32,
    /// SHARED: ranks on this host (0: all of them).
    pub local_world_size: u32,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            device_id: 0,
            reserve_size: 0,
            alloc_size: 0,
            world_size: 0,
            rank_id: 0,
            scene: Scene::Local,
            store_url: String::new(),
            flags: 0,
            local_world_size: 0,
        }
    }
}

/// The process's pool. Calls clone the `Arc` and release the lock, so `uninitialize` never
/// waits for a copy, and the memory outlives every copy still using it.
static STATE: RwLock<Option<Arc<Pool>>> = RwLock::new(None);
/// Serializes initialize and uninitialize (a SHARED initialize waits for the group, and other
/// calls must not wait behind it).
static LIFECYCLE: Mutex<()> = Mutex::new(());

fn current() -> Option<Arc<Pool>> {
    STATE.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn pool() -> Result<Arc<Pool>> {
    current().ok_or_else(|| {
        Error::NotInit("offload is not initialized: call offload.initialize(config) first".into())
    })
}

/// Builds the pool. Called again with the same config it does nothing, as upstream (which
/// returns success); with another config it is `RepeatInvoke`.
pub fn initialize(cfg: &OffloadConfig) -> Result<()> {
    let _g = pool::lock(&LIFECYCLE);
    if let Some(p) = current() {
        if p.config() == cfg {
            crate::log::warn(
                "offload: initialize called again with the same config; the pool is kept",
            );
            return Ok(());
        }
        return Err(Error::RepeatInvoke(format!(
            "offload is initialized already (scene {:?}, reserve_size {}); call uninitialize \
             before initializing with another config",
            p.config().scene,
            p.config().reserve_size
        )));
    }
    let p = Pool::create(cfg)?;
    *STATE.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(p));
    Ok(())
}

/// Releases the pool (safe to call when not initialized). Pointers from `malloc` must not be
/// used afterwards.
pub fn uninitialize() {
    let _g = pool::lock(&LIFECYCLE);
    let p = STATE.write().unwrap_or_else(|p| p.into_inner()).take();
    drop(p);
}

/// `size` bytes of this rank's span of the pool (16-byte aligned). `flags` is reserved (upstream
/// ignores it too).
pub fn malloc(size: u64, flags: u64) -> Result<u64> {
    let _ = flags;
    pool()?.malloc(size)
}

/// Returns memory from [`malloc`]. `flags` is reserved.
pub fn free(ptr: u64, flags: u64) -> Result<()> {
    let _ = flags;
    pool()?.free(ptr)
}

/// The device's address of pool address `ptr` (this rank's span, interior addresses too): the
/// same number where the device addresses host memory at its host address (no accelerator, the
/// host backend, CUDA's unified addressing of the page-locked LOCAL pool); `Unsupported` where
/// the backend gives the pool no device address.
pub fn get_dva(ptr: u64) -> Result<u64> {
    pool()?.dva(ptr)
}

/// Registers the pool's single row grid for [`entry_gather`]: rows of `entry_bytes` from every
/// slot's start, `rows_per_slot` of them (global row id = slot * rows_per_slot + row).
pub fn register_entry_table(entry_bytes: u32, rows_per_slot: u32) -> Result<()> {
    pool()?.register_entry_table(entry_bytes, rows_per_slot)
}

/// The device that runs a call (upstream's `deviceId`): only checked to be reachable, since the
/// copies here find each address's own device.
fn check_device(device: &Residence) -> Result<()> {
    device.check("deviceId")
}

/// `sparse_copy(srcPtrs, dstPtrs, lenPtrs, sizePtr)`: see [`ops::plan_sparse`].
pub fn sparse_copy(
    src: &Span,
    dst: &Span,
    lens: &Span,
    size: &Span,
    device: &Residence,
) -> Result<()> {
    check_device(device)?;
    let p = pool()?;
    ops::sparse_copy(&p, src, dst, lens, size)
}

/// `group_pack_copy(srcPtrs, dstPtrs, lenPtrs, numLocalExpertPtr, groupList,
/// packedGroupList)`: see [`ops::plan_group_pack`].
pub fn group_pack_copy(
    src: &Span,
    dst: &Span,
    lens: &Span,
    num: &Span,
    groups: &Span,
    packed: &Span,
    device: &Residence,
) -> Result<()> {
    check_device(device)?;
    let p = pool()?;
    ops::group_pack_copy(&p, src, dst, lens, num, groups, packed)
}

/// `kv_exchange_copy(metaPtr)`: see [`ops::walk_kv`].
pub fn kv_exchange_copy(meta: &Span, device: &Residence) -> Result<()> {
    check_device(device)?;
    let p = pool()?;
    ops::kv_exchange_copy(&p, meta)
}

/// `entry_gather(dst, ids, count)`: see [`ops::plan_gather`].
pub fn entry_gather(dst: &Span, ids: &Span, count: &Span, device: &Residence) -> Result<()> {
    check_device(device)?;
    let p = pool()?;
    ops::entry_gather(&p, dst, ids, count)
}

/// What the pool looks like (beyond upstream's API: for tools and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    pub scene: Scene,
    pub rank: u32,
    pub slots: u32,
    /// Slot 0's start (the pool's base in every rank).
    pub base: u64,
    pub slot_stride: u64,
    /// This rank's slot start and the bytes it backs there.
    pub local_base: u64,
    pub local_size: u64,
    /// Bytes each slot backs.
    pub backed: Vec<u64>,
    pub bytes_in_use: u64,
    /// Why `get_dva` fails, when it does.
    pub dva_unsupported: Option<String>,
    /// The registered row grid: (entry_bytes, rows_per_slot).
    pub entry_table: Option<(u32, u32)>,
}

/// The current pool's layout.
pub fn pool_info() -> Result<PoolInfo> {
    let p = pool()?;
    let (local_base, local_size) = p.own();
    Ok(PoolInfo {
        scene: p.scene(),
        rank: p.rank(),
        slots: p.slots(),
        base: p.base(),
        slot_stride: p.stride(),
        local_base,
        local_size,
        backed: (0..p.slots()).map(|s| p.backed(s)).collect(),
        bytes_in_use: p.bytes_in_use(),
        dva_unsupported: p.dva_reason().map(str::to_string),
        entry_table: p.table().map(|t| (t.entry_bytes, t.rows_per_slot)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(gib: u64) -> OffloadConfig {
        OffloadConfig {
            reserve_size: gib << 30,
            alloc_size: gib << 30,
            ..Default::default()
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn span_of<T>(v: &[T]) -> Span {
        Span::host(v.as_ptr() as u64, Some(std::mem::size_of_val(v) as u64))
    }

    #[test]
    fn local_pool_hands_out_memory_and_checks_its_bounds() {
        let p = Pool::create(&local(1)).unwrap();
        let (base, len) = p.own();
        assert_eq!(len, 1 << 30);
        let a = p.malloc(1000).unwrap();
        let b = p.malloc(24).unwrap();
        assert_eq!((a, b), (base, base + 1008));
        assert_eq!(
            p.dva(b + 3).unwrap(),
            b + 3,
            "no accelerator: the DVA is the address"
        );
        assert!(p.dva(base + len).is_err());
        assert!(p.free(base + len).is_err());
        p.free(a).unwrap();
        assert!(p.free(a).is_err());
        assert_eq!(p.locate(base + len - 8, 8).unwrap(), pool::Within::Backed);
        assert!(p.locate(base + len - 8, 9).is_err());
        assert!(p.locate(base - 8, 16).is_err());
        assert_eq!(p.locate(base - 8, 8).unwrap(), pool::Within::Outside);
    }

    #[test]
    fn configs_outside_the_domain_are_refused() {
        let bad = [
            OffloadConfig {
                alloc_size: 2 << 30,
                ..local(1)
            },
            OffloadConfig {
                reserve_size: 0,
                alloc_size: 0,
                ..local(1)
            },
            OffloadConfig {
                flags: 2,
                ..local(1)
            },
            OffloadConfig {
                scene: Scene::Shared,
                world_size: 0,
                ..local(1)
            },
            OffloadConfig {
                scene: Scene::Shared,
                world_size: 2,
                rank_id: 2,
                ..local(1)
            },
            OffloadConfig {
                scene: Scene::Shared,
                world_size: 4,
                local_world_size: 3,
                ..local(1)
            },
            OffloadConfig {
                scene: Scene::Shared,
                world_size: 2,
                alloc_size: 2 << 30,
                ..local(1)
            },
            OffloadConfig {
                scene: Scene::Shared,
                world_size: 1,
                flags: FLAG_GIANT_PAGE,
                ..local(1)
            },
        ];
        for cfg in bad {
            let e = Pool::create(&cfg).unwrap_err();
            assert_eq!(e.code(), -2000, "{cfg:?}: {e}");
        }
        let multi = OffloadConfig {
            scene: Scene::Shared,
            world_size: 4,
            local_world_size: 2,
            ..local(1)
        };
        assert_eq!(Pool::create(&multi).unwrap_err().code(), -3006);
        assert!(Scene::from_value(2).is_err());
    }

    #[test]
    fn sparse_copy_moves_between_the_pool_and_host_memory() {
        let p = Pool::create(&local(1)).unwrap();
        let host = pattern(3000, 7);
        let pool_buf = p.malloc(3000).unwrap();
        let mut back = vec![0u8; 3000];
        // H2D: three pieces into the pool; D2H: the pool back out in another order.
        let srcs = [
            host.as_ptr() as u64,
            host.as_ptr() as u64 + 1000,
            host.as_ptr() as u64 + 2500,
        ];
        let dsts = [pool_buf, pool_buf + 1000, pool_buf + 2500];
        let lens = [1000u32, 1500, 500];
        let n = [3u32];
        ops::sparse_copy(
            &p,
            &span_of(&srcs),
            &span_of(&dsts),
            &span_of(&lens),
            &span_of(&n),
        )
        .unwrap();
        let srcs2 = [pool_buf + 2000, pool_buf];
        let dsts2 = [back.as_mut_ptr() as u64 + 2000, back.as_mut_ptr() as u64];
        let lens2 = [1000u32, 2000];
        let n2 = [2u32];
        ops::sparse_copy(
            &p,
            &span_of(&srcs2),
            &span_of(&dsts2),
            &span_of(&lens2),
            &span_of(&n2),
        )
        .unwrap();
        assert_eq!(back, host);

        // A count larger than the arrays, a pool range past the span, a bad host address.
        let n9 = [9u32];
        let e = ops::sparse_copy(
            &p,
            &span_of(&srcs),
            &span_of(&dsts),
            &span_of(&lens),
            &span_of(&n9),
        )
        .unwrap_err();
        assert_eq!(e.code(), -3002, "{e}");
        let (base, len) = p.own();
        let past = [base + len - 10];
        let e = ops::sparse_copy(
            &p,
            &span_of(&srcs[..1]),
            &span_of(&past),
            &span_of(&[20u32]),
            &span_of(&[1u32]),
        )
        .unwrap_err();
        assert_eq!(e.code(), -3002, "{e}");
        assert!(e.to_string().contains("entry 0, destination"), "{e}");
        let wild = [0x10u64];
        let e = ops::sparse_copy(
            &p,
            &span_of(&wild),
            &span_of(&dsts[..1]),
            &span_of(&[20u32]),
            &span_of(&[1u32]),
        )
        .unwrap_err();
        assert_eq!(e.code(), -3002, "{e}");
        // A descriptor array at a bad address (bare address, no size known).
        let e = ops::sparse_copy(
            &p,
            &Span::host(0x10, None),
            &span_of(&dsts),
            &span_of(&lens),
            &span_of(&n),
        )
        .unwrap_err();
        assert_eq!(e.code(), -3002, "{e}");
    }

    #[test]
    fn entry_gather_reads_the_registered_grid() {
        let p = Pool::create(&local(1)).unwrap();
        let (base, _) = p.own();
        let dst = vec![0u8; 4 * 96];
        let ids = [5u64, 0, 5, 9];
        assert_eq!(
            ops::entry_gather(&p, &span_of(&dst), &span_of(&ids), &span_of(&[4u32]))
                .unwrap_err()
                .code(),
            -2008
        );
        p.register_entry_table(96, 10).unwrap();
        assert_eq!(p.register_entry_table(96, 10).unwrap_err().code(), -2005);
        let rows = pattern(960, 3);
        // SAFETY: the pool's first 960 bytes are mapped read-write and unused.
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), base as *mut u8, 960) };
        ops::entry_gather(&p, &span_of(&dst), &span_of(&ids), &span_of(&[4u32])).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(dst[i * 96..i * 96 + 96], rows[id * 96..id * 96 + 96]);
        }
        // One slot of 10 rows: id 10 is slot 1, which a LOCAL pool does not have.
        let e = ops::entry_gather(&p, &span_of(&dst), &span_of(&[10u64]), &span_of(&[1u32]))
            .unwrap_err();
        assert_eq!(e.code(), -3002);
        // dst too small for the count.
        let e = ops::entry_gather(
            &p,
            &span_of(&dst[..95]),
            &span_of(&[1u64]),
            &span_of(&[1u32]),
        )
        .unwrap_err();
        assert_eq!(e.code(), -3002);
        let big = [u32::MAX];
        let e = ops::entry_gather(&p, &span_of(&dst), &span_of(&ids), &span_of(&big)).unwrap_err();
        assert_eq!(e.code(), -3002, "{e}");
    }

    #[test]
    fn the_process_pool_initializes_once() {
        // The only test of the process-wide state.
        uninitialize();
        assert_eq!(malloc(16, 0).unwrap_err().code(), -2008);
        initialize(&local(1)).unwrap();
        initialize(&local(1)).unwrap();
        assert_eq!(initialize(&local(2)).unwrap_err().code(), -2005);
        let a = malloc(64, 0).unwrap();
        assert_eq!(get_dva(a).unwrap(), a);
        let info = pool_info().unwrap();
        assert_eq!(
            (info.slots, info.local_base, info.local_size),
            (1, a, 1 << 30)
        );
        assert_eq!(info.bytes_in_use, 64);
        free(a, 0).unwrap();
        uninitialize();
        uninitialize();
        assert_eq!(get_dva(a).unwrap_err().code(), -2008);
    }
}
