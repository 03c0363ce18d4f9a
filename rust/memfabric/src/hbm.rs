//! The device-memory (HBM) part of a Big Memory object.
//!
//! Every rank allocates `local_hbm_size` bytes on its device. The ranks agree on a second
//! global address window, as for DRAM, but nothing is mapped into it: device memory cannot be
//! placed at a negotiated host address without the driver's virtual-memory API, so an HBM
//! GVA is a name, `base + rank * stride + offset`, that every process translates:
//! - own part: the allocation itself;
//! - same-host ranks: their allocation, mapped here once through its IPC handle;
//! - other hosts: the rank's allocation address, reached through the object's Transfer
//!   Engine (the allocation is registered with it; the data server stages it).
//!
//! `gva_to_va` gives the device pointer of a part mapped here, which kernels may use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::staging::{StageBuffer, STAGE_BYTES};
use crate::device::{self, Device, IpcHandle};
use crate::error::{Error, Result};
use crate::fabric::{Reach, SymmetricMemory};
use crate::mem::gva::{self, Gva};
use crate::trans::Direction;
use crate::transport::Op;

/// Where one rank's HBM part is.
enum Part {
    /// A device pointer valid in this process (own allocation, or mapped through IPC).
    Here { ptr: u64, opened: bool },
    /// Another host: the rank's allocation address, through the engine session.
    Remote { session: String, ptr: u64 },
}

/// What one side of a copy resolves to.
enum Side {
    /// Memory of this process known to be valid (HBM parts, mapped DRAM parts, checked
    /// device buffers, registered host memory).
    Here(u64),
    /// A caller's host address nothing has vouched for yet.
    Unchecked(u64),
    Remote {
        session: String,
        addr: u64,
    },
}

/// Copies from caller host memory up to this size bounce through an internal buffer (a
/// page-locked staging buffer, so that the device copy needs no bounce of the driver's own),
/// with the caller's side moved by the kernel (a bad address is an error, not a crash):
/// cheaper than reading the process's mappings; larger ones check the mappings and copy
/// directly.
/// (Measured on an H100 host: 4 KiB H2G 8 us bounced against 23 us with the maps check. On an
/// H200 with page-locked staging, 1 MiB H2G bounced ran at 0.55-0.69 of cudaMemcpy against
/// 0.63-0.93 direct.)
const BOUNCE_FROM_MAX: u64 = 256 << 10;
/// The same for copies into caller host memory. Measured on an H200 with page-locked staging,
/// two runs each, ratio to cudaMemcpy: 64 KiB G2H 0.82-0.84 bounced against 0.39-0.40 with the
/// maps check (p50 24 us against 49-51), 256 KiB 0.88-0.90 against 0.59-0.60, 1 MiB even.
const BOUNCE_TO_MAX: u64 = 256 << 10;
// Both bounce through one staging buffer.
const _: () = assert!(BOUNCE_FROM_MAX <= STAGE_BYTES as u64);
const _: () = assert!(BOUNCE_TO_MAX <= STAGE_BYTES as u64);

pub struct HbmPart {
    dev: Arc<dyn Device>,
    /// The device this rank's part is on (bounce buffers are made in its context).
    device: i32,
    size: u64,
    own: u64,
    window: Gva,
    parts: Vec<Part>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

impl Side {
    /// Checks a caller's host range against the process's mappings.
    fn checked(self, len: u64) -> Result<Side> {
        match self {
            Side::Unchecked(a) => {
                crate::mem::regions::check_mapped_rw(a, len).map_err(|e| match e {
                    Error::InvalidParam(m) => Error::OutOfBounds(m),
                    e => e,
                })?;
                Ok(Side::Here(a))
            }
            other => Ok(other),
        }
    }
}

impl HbmPart {
    /// Allocates this rank's part on `device`, agrees on the window and maps same-host parts.
    /// Collective: every rank of `mem` calls it with the same `size`.
    pub fn create(
        mem: &SymmetricMemory,
        device: i32,
        size: u64,
        timeout: Duration,
    ) -> Result<HbmPart> {
        let dev = device::select().map_err(|e| match e {
            Error::Unsupported(why) => Error::Unsupported(format!(
                "local_hbm_size {size}: no device memory here ({why})"
            )),
            e => e,
        })?;
        let deadline = Instant::now() + timeout;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let own = dev.alloc(device, size as usize).map_err(|e| match e {
            Error::MallocFailed(m) => Error::MallocFailed(format!("local_hbm_size {size}: {m}")),
            e => e,
        })?;
        let window = match gva::negotiate(mem.group(), size, left()) {
            Ok(w) => w,
            Err(e) => {
                let _ = dev.free(own);
                return Err(e);
            }
        };
        // From here on, dropping `part` on an error frees what was made.
        let mut part = HbmPart {
            dev: dev.clone(),
            device,
            size,
            own,
            window,
            parts: Vec::new(),
        };
        // Without an IPC handle same-host ranks cannot map the part; say so there, not here.
        let handle = dev
            .ipc_export(own)
            .map(|h| hex(&h.bytes))
            .unwrap_or_default();
        let me = format!("{own:x};{device};{handle}");
        let records = mem.group().all_gather(me.as_bytes(), left())?;
        if let Some(e) = mem.engine() {
            e.register(own, size)?;
        }
        for (r, raw) in records.iter().enumerate() {
            let r = r as u32;
            let text = String::from_utf8_lossy(raw);
            let f: Vec<&str> = text.split(';').collect();
            let (Some(ptr), Some(ord), Some(h)) = (
                f.first().and_then(|p| u64::from_str_radix(p, 16).ok()),
                f.get(1).and_then(|d| d.parse::<i32>().ok()),
                f.get(2).and_then(|h| unhex(h)),
            ) else {
                return Err(Error::Protocol(format!(
                    "rank {r}'s HBM record {text:?} is malformed"
                )));
            };
            let p = match mem.reach(r)? {
                Reach::Own => Part::Here { ptr, opened: false },
                Reach::Mapped => {
                    if h.is_empty() {
                        return Err(Error::Unsupported(format!(
                            "rank {r} is on this host but its device memory cannot be exported"
                        )));
                    }
                    let handle = IpcHandle {
                        kind: dev.kind(),
                        device: ord,
                        bytes: h,
                    };
                    let mapped = dev.ipc_open(&handle, device)?;
                    Part::Here {
                        ptr: mapped,
                        opened: true,
                    }
                }
                Reach::Remote(session) => Part::Remote { session, ptr },
            };
            part.parts.push(p);
        }
        mem.group().barrier(left())?;
        Ok(part)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The HBM GVA of rank `r`'s part.
    pub fn part(&self, r: u32) -> u64 {
        self.window.part(r)
    }

    /// Whether `addr` is in the HBM window.
    pub fn contains(&self, addr: u64) -> bool {
        self.window.rank_of(addr).is_some()
    }

    /// The rank whose HBM part holds `[gva, gva+len)`, and the offset in it.
    pub fn locate(&self, gva: u64, len: u64) -> Result<(u32, u64)> {
        let r = self.window.rank_of(gva).ok_or_else(|| {
            Error::OutOfBounds(format!("{gva:#x} is outside the HBM address window"))
        })?;
        let off = gva - self.window.part(r);
        if len == 0 || off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::OutOfBounds(format!(
                "[{gva:#x}, +{len}) leaves rank {r}'s {} bytes of HBM",
                self.size
            )));
        }
        Ok((r, off))
    }

    /// The device pointer of `gva` in this process (own and same-host parts).
    pub fn va(&self, gva: u64) -> Result<u64> {
        let (r, off) = self.locate(gva, 1)?;
        match &self.parts[r as usize] {
            Part::Here { ptr, .. } => Ok(ptr + off),
            Part::Remote { .. } => Err(Error::Unsupported(format!(
                "rank {r}'s HBM is on another host: it has no address in this process"
            ))),
        }
    }

    fn side(&self, mem: &SymmetricMemory, addr: u64, len: u64) -> Result<Side> {
        if self.contains(addr) {
            let (r, off) = self.locate(addr, len)?;
            return Ok(match &self.parts[r as usize] {
                Part::Here { ptr, .. } => Side::Here(ptr + off),
                Part::Remote { session, ptr } => Side::Remote {
                    session: session.clone(),
                    addr: ptr + off,
                },
            });
        }
        if let Ok(r) = mem.locate(addr, len) {
            return Ok(match mem.reach(r)? {
                Reach::Own | Reach::Mapped => Side::Here(addr),
                Reach::Remote(session) => Side::Remote { session, addr },
            });
        }
        // Memory of this process: device memory must lie in one allocation; host memory is
        // checked by the copy (see `BOUNCE_FROM_MAX`) unless it was registered with the object
        // or is page-locked by the driver.
        match self.dev.allocation_of(addr) {
            Some((base, size)) => {
                if addr.checked_add(len).is_none_or(|e| e > base + size as u64) {
                    return Err(Error::OutOfBounds(format!(
                        "[{addr:#x}, +{len}) runs past its device allocation [{base:#x}, +{size})"
                    )));
                }
                Ok(Side::Here(addr))
            }
            None if mem.is_registered(addr, len) => Ok(Side::Here(addr)),
            // Page-locked memory the driver knows (torch's pinned tensors): in range, it is
            // mapped, and copies from it need neither a bounce nor a look at the mappings.
            None if self.dev.pinned_range_of(addr).is_some_and(|(start, size)| {
                addr.checked_add(len)
                    .is_some_and(|end| end <= start + size as u64)
            }) =>
            {
                Ok(Side::Here(addr))
            }
            None => Ok(Side::Unchecked(addr)),
        }
    }

    /// Copies `len` bytes from `src` to `dst` where at least one of them is an HBM GVA; the
    /// other may be a DRAM GVA or memory of this process (host or device).
    pub fn copy(&self, mem: &SymmetricMemory, src: u64, dst: u64, len: u64) -> Result<()> {
        let s = self.side(mem, src, len)?;
        let d = self.side(mem, dst, len)?;
        let engine = || {
            mem.engine()
                .ok_or_else(|| Error::NotInit("no network engine for remote ranks".into()))
        };
        let deadline = Instant::now() + mem.timeout();
        let (s, d) = match (s, d) {
            // Caller host memory with an HBM part: small copies bounce (kernel-checked).
            (Side::Unchecked(h), Side::Here(dv)) if len <= BOUNCE_FROM_MAX => {
                let mut bounce = StageBuffer::take(&self.dev, self.device, len as usize);
                let b = bounce.addr();
                crate::fabric::copy_in_process(h, b, len, deadline)?;
                // SAFETY: `bounce` holds at least `len` bytes; `dv` was checked by `side`.
                return unsafe { self.dev.copy_between(dv, b, len as usize, None) };
            }
            (Side::Here(sv), Side::Unchecked(h)) if len <= BOUNCE_TO_MAX => {
                let mut bounce = StageBuffer::take(&self.dev, self.device, len as usize);
                let b = bounce.addr();
                // SAFETY: as above, in the other direction.
                unsafe { self.dev.copy_between(b, sv, len as usize, None)? };
                return crate::fabric::copy_in_process(b, h, len, deadline);
            }
            (s, d) => (s.checked(len)?, d.checked(len)?),
        };
        match (s, d) {
            (Side::Unchecked(_), _) | (_, Side::Unchecked(_)) => {
                Err(Error::Failed("an unchecked side after checking".into()))
            }
            (Side::Here(s), Side::Here(d)) => {
                if self.dev.device_of(s).is_none() && self.dev.device_of(d).is_none() {
                    return crate::fabric::copy_in_process(s, d, len, deadline);
                }
                // SAFETY: both ranges were checked above: HBM parts against their size,
                // DRAM GVAs against the mapped parts, caller memory against its device
                // allocation or the process's mappings.
                unsafe { self.dev.copy_between(d, s, len as usize, None) }
            }
            (Side::Here(local), Side::Remote { session, addr }) => engine()?.transfer_batch(
                &session,
                Direction::Write,
                vec![Op::new(local, addr, len)],
            ),
            (Side::Remote { session, addr }, Side::Here(local)) => {
                engine()?.transfer_batch(&session, Direction::Read, vec![Op::new(local, addr, len)])
            }
            (Side::Remote { .. }, Side::Remote { .. }) => Err(Error::Unsupported(
                "a copy between two ranks on other hosts: one side must be here".into(),
            )),
        }
    }

    /// Unregisters the own part from the engine, unmaps peers' parts, frees the own part.
    pub fn release(&mut self, mem: &SymmetricMemory) {
        if let Some(e) = mem.engine() {
            let _ = e.unregister(self.own);
        }
        self.unmap_and_free();
    }

    /// Unmaps same-host parts and frees the own part; later calls do nothing.
    fn unmap_and_free(&mut self) {
        for p in self.parts.drain(..) {
            if let Part::Here { ptr, opened: true } = p {
                let _ = self.dev.ipc_close(ptr);
            }
        }
        if self.own != 0 {
            let _ = self.dev.free(self.own);
            self.own = 0;
        }
    }
}

impl Drop for HbmPart {
    fn drop(&mut self) {
        self.unmap_and_free();
    }
}
