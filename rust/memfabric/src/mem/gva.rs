//! Global virtual address space: one range reserved at the same address in every rank.
//!
//! A range of `world * stride` bytes is reserved PROT_NONE; rank r's part is
//! `[base + r*stride, base + (r+1)*stride)`. Each rank backs its own part with a memfd segment
//! and maps the segments of same-host peers into their parts, so a GVA there is a plain
//! pointer. Parts of ranks on other hosts stay reserved and unmapped: touching them is a
//! fault, copies to them go over the network path.
//!
//! The base is agreed through the group: rank 0 proposes an address (one the kernel found free
//! in its own process), every rank tries to reserve it with MAP_FIXED_NOREPLACE, and if any
//! rank cannot, rank 0 proposes another. Nobody maps over anything: NOREPLACE fails instead.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::store::Group;

/// Parts are aligned to this (huge-page size, the seed's SHM granularity).
pub const ALIGN: u64 = 2 << 20;
const ROUNDS: usize = 16;

/// A memfd-backed segment: this rank's contribution, shareable with same-host peers through
/// `/proc/<pid>/fd/<fd>`.
pub struct Segment {
    fd: OwnedFd,
    len: u64,
}

impl Segment {
    pub fn create(len: u64, name: &str) -> Result<Segment> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| Error::InvalidParam("segment name has a NUL".into()))?;
        // SAFETY: valid NUL-terminated name; returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io(
                "memfd_create for a segment",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(Error::MallocFailed(format!(
                "cannot size a {len}-byte segment: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Segment { fd, len })
    }

    /// Opens a same-host peer's segment.
    pub fn open_peer(pid: u32, fd: i32, len: u64) -> Result<Segment> {
        let (file, meta, path) = super::open_peer_fd(pid, fd, "peer segment")?;
        let size = meta.len();
        if size < len {
            return Err(Error::Protocol(format!(
                "peer segment {path} has {size} bytes, {len} expected"
            )));
        }
        Ok(Segment {
            fd: file.into(),
            len,
        })
    }

    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A reserved GVA range. Unmapped (reservation and slots alike) on drop.
pub struct Gva {
    base: u64,
    stride: u64,
    parts: u32,
}

impl Gva {
    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn stride(&self) -> u64 {
        self.stride
    }
    pub fn parts(&self) -> u32 {
        self.parts
    }
    pub fn len(&self) -> u64 {
        self.stride * self.parts as u64
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rank whose part holds `addr`, if inside the range.
    pub fn rank_of(&self, addr: u64) -> Option<u32> {
        if addr < self.base || addr >= self.base + self.len() {
            return None;
        }
        Some(((addr - self.base) / self.stride) as u32)
    }

    /// The start of rank `r`'s part.
    pub fn part(&self, r: u32) -> u64 {
        self.base + r as u64 * self.stride
    }

    /// Maps `seg` over rank `r`'s part (shared, read-write).
    pub fn map_part(&self, r: u32, seg: &Segment) -> Result<()> {
        if r >= self.parts || seg.len() > self.stride {
            return Err(Error::InvalidParam(format!(
                "segment of {} bytes does not fit part {r}",
                seg.len()
            )));
        }
        let len = seg.len().div_ceil(page()) * page();
        // SAFETY: the target range lies inside our own PROT_NONE reservation, which nothing
        // else uses; MAP_FIXED replaces exactly those reserved pages with the segment.
        let p = unsafe {
            libc::mmap(
                self.part(r) as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                seg.fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::MallocFailed(format!(
                "cannot map the segment of rank {r} at {:#x}: {}",
                self.part(r),
                std::io::Error::last_os_error()
            )));
        }
        // Huge pages where the kernel offers them for shared memory (shmem_enabled=advise or
        // always): parts are 2 MiB aligned, so big copies take fewer TLB misses. A refusal
        // only means 4 KiB pages.
        // SAFETY: advice on the mapping we just made; it changes no contents.
        unsafe { libc::madvise(p, len as usize, libc::MADV_HUGEPAGE) };
        Ok(())
    }

    /// Returns rank `r`'s part to the unmapped reservation.
    pub fn unmap_part(&self, r: u32) {
        if r < self.parts {
            let _ = reserve_at(self.part(r), self.stride, true);
        }
    }
}

impl Drop for Gva {
    fn drop(&mut self) {
        // SAFETY: the whole range is ours (reservation and the segments mapped into it).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len() as usize) };
    }
}

fn page() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Reserves `len` bytes PROT_NONE at exactly `addr` (`replace`: over our own mapping), or
/// anywhere when `addr` is 0. Returns the address.
fn reserve_at(addr: u64, len: u64, replace: bool) -> Result<u64> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if addr != 0 {
        flags |= if replace {
            libc::MAP_FIXED
        } else {
            libc::MAP_FIXED_NOREPLACE
        };
    }
    // SAFETY: an anonymous PROT_NONE mapping; with MAP_FIXED_NOREPLACE the kernel refuses to
    // touch existing mappings, and MAP_FIXED is only used over our own reservation.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_NONE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::NoResources(format!(
            "cannot reserve {len} bytes of address space at {addr:#x}: {}",
            std::io::Error::last_os_error()
        )));
    }
    if addr != 0 && p as u64 != addr {
        // Old kernels ignore MAP_FIXED_NOREPLACE and treat the address as a hint.
        // SAFETY: unmapping what this call just mapped.
        unsafe { libc::munmap(p, len as usize) };
        return Err(Error::NoResources(format!(
            "address {addr:#x} is not free here"
        )));
    }
    Ok(p as u64)
}

/// Reserves `len` bytes PROT_NONE at an [`ALIGN`]ed address the kernel picks. The range is
/// kept from the start: probing and releasing first would let another thread of this process
/// (an allocator growing) take it before it is reserved again.
fn reserve_aligned(len: u64) -> Result<u64> {
    let slack = reserve_at(0, len + ALIGN, false)?;
    let aligned = slack.div_ceil(ALIGN) * ALIGN;
    let (head, tail) = (aligned - slack, slack + ALIGN - aligned);
    // SAFETY: unmapping the parts of our own fresh reservation outside [aligned, +len).
    unsafe {
        if head > 0 {
            libc::munmap(slack as *mut libc::c_void, head as usize);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail as usize);
        }
    }
    Ok(aligned)
}

/// Reservations of this process that are released when dropped.
#[derive(Default)]
struct Held(Vec<(u64, u64)>);

impl Drop for Held {
    fn drop(&mut self) {
        for &(base, len) in &self.0 {
            // SAFETY: each entry is a reservation this process made and nobody else uses.
            unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
        }
    }
}

/// Agrees on a base through `group` and reserves `parts * stride` bytes there in this rank.
/// `tag` keeps concurrent negotiations (different objects) apart.
pub fn negotiate(group: &Group, stride: u64, timeout: Duration) -> Result<Gva> {
    let stride = stride.div_ceil(ALIGN) * ALIGN;
    let parts = group.world();
    let len = stride
        .checked_mul(parts as u64)
        .ok_or_else(|| Error::InvalidParam("global address space too large".into()))?;
    // Rank 0's proposals stay reserved until the end (released on failure, the agreed one
    // kept), so that the kernel offers a different range each round.
    let mut proposed = Held::default();
    for _ in 0..ROUNDS {
        // Rank 0 proposes a range it has reserved already.
        let own = if group.rank() == 0 {
            let b = reserve_aligned(len)?;
            proposed.0.push((b, len));
            Some(b)
        } else {
            None
        };
        let proposal = own.map(|b| b.to_be_bytes().to_vec()).unwrap_or_default();
        let proposals = group.all_gather(&proposal, timeout)?;
        let base_bytes: [u8; 8] = proposals[0]
            .as_slice()
            .try_into()
            .map_err(|_| Error::Protocol("rank 0's GVA proposal is malformed".into()))?;
        let base = u64::from_be_bytes(base_bytes);
        let mine = match own {
            Some(b) => Ok(b),
            None => reserve_at(base, len, false),
        };
        let ok = [mine.is_ok() as u8];
        let votes = group.all_gather(&ok, timeout)?;
        if votes.iter().all(|v| v.first() == Some(&1)) {
            if own.is_some() {
                proposed.0.pop();
            }
            return Ok(Gva {
                base,
                stride,
                parts,
            });
        }
        if let (None, Ok(b)) = (own, mine) {
            // SAFETY: releasing the reservation this rank made this round.
            unsafe { libc::munmap(b as *mut libc::c_void, len as usize) };
        }
    }
    Err(Error::NoResources(format!(
        "no address range of {len} bytes is free in every rank after {ROUNDS} proposals"
    )))
}

/// Agrees on a base without a collective, for objects whose members come and go: the first
/// member stores its proposal under `key`; everyone (first included) reserves at the stored
/// base. A member that cannot take that range fails with `NoResources` (the others are using
/// it already, so the range cannot move).
pub fn claim(
    client: &crate::store::StoreClient,
    key: &str,
    stride: u64,
    parts: u32,
) -> Result<Gva> {
    let stride = stride.div_ceil(ALIGN) * ALIGN;
    let len = stride
        .checked_mul(parts as u64)
        .ok_or_else(|| Error::InvalidParam("global address space too large".into()))?;
    let mut probe = Held(vec![(reserve_aligned(len)?, len)]);
    let proposal = probe.0[0].0.to_string();
    let agreed = client.compare_set(key, b"", proposal.as_bytes())?;
    let base: u64 = std::str::from_utf8(&agreed)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("GVA record {key:?} is malformed")))?;
    if base == probe.0[0].0 {
        // Ours was taken: already reserved.
        probe.0.clear();
        return Ok(Gva {
            base,
            stride,
            parts,
        });
    }
    drop(probe);
    reserve_at(base, len, false).map_err(|e| {
        Error::NoResources(format!(
            "the object's address range {base:#x} (+{len:#x}) is not free in this process: {e}"
        ))
    })?;
    Ok(Gva {
        base,
        stride,
        parts,
    })
}
