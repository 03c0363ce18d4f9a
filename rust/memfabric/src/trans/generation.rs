//! A registration generation counter that same-host peers read without a round trip.
//!
//! Same-host paths (cma) copy into a peer without asking it, so the initiator must know the
//! peer's registered regions. It caches the table the peer published in the store; the peer
//! bumps this counter every time it unregisters memory, after publishing the new table. The
//! initiator reads the counter (one load from a shared page) before each transfer and refetches
//! the table when it moved, so a cached table never outlives an unregistration that finished
//! before the transfer started.
//!
//! The counter lives on a memfd page; a peer maps it read-only through `/proc/<pid>/fd/<fd>`,
//! which needs the same permission as CMA itself.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

const PAGE: usize = 4096;

/// The owner's side: a writable shared page holding the counter.
pub struct GenerationPage {
    fd: OwnedFd,
    map: *mut libc::c_void,
}

// SAFETY: the mapping is only accessed through the AtomicU64 at its start; atomics are safe to
// share between threads, and the mapping lives as long as the struct.
unsafe impl Send for GenerationPage {}
// SAFETY: as above.
unsafe impl Sync for GenerationPage {}

impl GenerationPage {
    pub fn create() -> Result<Self> {
        let name = c"memfabric-te-generation";
        // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it returns a new fd.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io(
                "memfd_create for the registration generation",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), PAGE as libc::off_t) } != 0 {
            return Err(Error::io(
                "ftruncate of the generation page",
                std::io::Error::last_os_error(),
            ));
        }
        let map = map_shared(fd.as_raw_fd(), libc::PROT_READ | libc::PROT_WRITE)?;
        Ok(GenerationPage { fd, map })
    }

    /// The fd number peers open as `/proc/<pid>/fd/<n>`.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn counter(&self) -> &AtomicU64 {
        // SAFETY: the mapping is PAGE bytes, page-aligned (so aligned for u64), zero-filled by
        // the kernel, and lives as long as self.
        unsafe { &*(self.map as *const AtomicU64) }
    }

    pub fn get(&self) -> u64 {
        self.counter().load(Ordering::Acquire)
    }

    /// Announces that regions were removed (after the new table is published).
    pub fn bump(&self) {
        self.counter().fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for GenerationPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping we created, exactly once.
        unsafe { libc::munmap(self.map, PAGE) };
    }
}

/// A peer's counter, mapped read-only.
pub struct GenerationView {
    map: *mut libc::c_void,
}

// SAFETY: read-only atomic loads from a mapping owned by this struct.
unsafe impl Send for GenerationView {}
// SAFETY: as above.
unsafe impl Sync for GenerationView {}

impl GenerationView {
    /// Maps the counter of process `pid` published as fd `fd`.
    pub fn open(pid: u32, fd: i32) -> Result<Self> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::PeerGone(format!("{path} does not exist: the peer process is gone"))
            }
            std::io::ErrorKind::PermissionDenied => {
                Error::Refused(format!("cannot open {path}: {e}"))
            }
            _ => Error::io(format!("open {path}"), e),
        })?;
        let map = map_shared(file.as_raw_fd(), libc::PROT_READ)?;
        Ok(GenerationView { map })
    }

    pub fn get(&self) -> u64 {
        // SAFETY: see GenerationPage::counter; this mapping is PAGE bytes and read-only.
        unsafe { &*(self.map as *const AtomicU64) }.load(Ordering::Acquire)
    }
}

impl Drop for GenerationView {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping we created, exactly once.
        unsafe { libc::munmap(self.map, PAGE) };
    }
}

fn map_shared(fd: i32, prot: i32) -> Result<*mut libc::c_void> {
    crate::mem::map_shared(fd, PAGE, prot).map_err(|e| Error::io("mmap of the generation page", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_sees_bumps() {
        let page = GenerationPage::create().unwrap();
        let view = GenerationView::open(std::process::id(), page.fd()).unwrap();
        assert_eq!(view.get(), 0);
        page.bump();
        page.bump();
        assert_eq!(view.get(), 2);
        assert_eq!(page.get(), 2);
        assert!(matches!(
            GenerationView::open(std::process::id(), 987_654),
            Err(Error::PeerGone(_))
        ));
    }
}
