//! Host buffers for device bytes on their way to or from a host-only path (the tcp transport,
//! a peer's host memory).
//!
//! Page-locked where the backend offers it: a device copy from pageable memory runs through
//! the driver's own bounce buffer at a fraction of the speed (H100: 6-14 GB/s pageable, 52
//! pinned). Page-locking costs far more than a copy, so buffers are kept for reuse, up to
//! [`KEEP`] of them. Where the backend has no pinned memory (the host backend) or pinning
//! fails, a plain allocation does the same job.

use std::sync::{Arc, Mutex};

use super::{Device, Kind};
use crate::log::DEBUG;
use crate::mf_log;

/// Bytes of one staging buffer (one chunk of a pipelined transfer).
pub const STAGE_BYTES: usize = 4 << 20;
/// Pinned buffers kept for reuse, process-wide.
const KEEP: usize = 8;

/// Pinned buffers not in use, with the backend that pinned them (kept alive by them: the
/// memory belongs to its context).
static IDLE: Mutex<Vec<(Arc<dyn Device>, u64)>> = Mutex::new(Vec::new());

fn same(a: &Arc<dyn Device>, b: &Arc<dyn Device>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// One staging buffer: [`STAGE_BYTES`] when pinned, else the bytes asked for; pinned ones go
/// back to the pool when dropped.
pub struct StageBuffer {
    memory: Memory,
}

enum Memory {
    Pinned { dev: Arc<dyn Device>, addr: u64 },
    Plain(Vec<u8>),
}

impl StageBuffer {
    /// A buffer of at least `len` bytes (at most [`STAGE_BYTES`]) for copies with `dev`'s
    /// memory: pinned when `dev` can pin.
    pub fn take(dev: &Arc<dyn Device>, len: usize) -> StageBuffer {
        let reused = {
            let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter()
                .position(|(d, _)| same(d, dev))
                .map(|i| idle.swap_remove(i).1)
        };
        let pinned = reused
            .map(Ok)
            .unwrap_or_else(|| dev.pinned_alloc(STAGE_BYTES));
        let memory = match pinned {
            Ok(addr) => Memory::Pinned {
                dev: dev.clone(),
                addr,
            },
            Err(e) => {
                if dev.kind() != Kind::Host {
                    mf_log!(DEBUG, "staging through pageable memory: {e}");
                }
                Memory::Plain(vec![0u8; len.min(STAGE_BYTES)])
            }
        };
        StageBuffer { memory }
    }

    /// The buffer's address (the `len` bytes asked for or more, writable, alive as long as
    /// `self`).
    pub fn addr(&mut self) -> u64 {
        match &mut self.memory {
            Memory::Pinned { addr, .. } => *addr,
            Memory::Plain(v) => v.as_mut_ptr() as u64,
        }
    }

    /// The first `n` bytes (at most the buffer's size).
    pub fn slice_mut(&mut self, n: usize) -> &mut [u8] {
        match &mut self.memory {
            // SAFETY: the pinned allocation is STAGE_BYTES long, exclusively ours while this
            // buffer lives, and the borrow of `self` bounds the slice's life.
            Memory::Pinned { addr, .. } => unsafe {
                std::slice::from_raw_parts_mut(*addr as *mut u8, n.min(STAGE_BYTES))
            },
            Memory::Plain(v) => {
                let n = n.min(v.len());
                &mut v[..n]
            }
        }
    }

    /// Whether the buffer is page-locked.
    pub fn pinned(&self) -> bool {
        matches!(self.memory, Memory::Pinned { .. })
    }
}

impl Drop for StageBuffer {
    fn drop(&mut self) {
        if let Memory::Pinned { dev, addr } = &self.memory {
            let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < KEEP {
                idle.push((dev.clone(), *addr));
                return;
            }
            drop(idle);
            // SAFETY: `addr` came from this backend's pinned_alloc and leaves with this buffer.
            if let Err(e) = unsafe { dev.pinned_free(*addr) } {
                mf_log!(DEBUG, "freeing a staging buffer: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_backend_stages_through_plain_memory() {
        let host = super::super::registry().host();
        let mut b = StageBuffer::take(&host, STAGE_BYTES);
        assert!(!b.pinned());
        let s = b.slice_mut(usize::MAX);
        assert_eq!(s.len(), STAGE_BYTES);
        s[STAGE_BYTES - 1] = 7;
        assert_eq!(b.slice_mut(STAGE_BYTES)[STAGE_BYTES - 1], 7);
        assert_ne!(b.addr(), 0);
        // Unpinned buffers are as large as asked (a small bounce zeroes no 4 MiB).
        let mut small = StageBuffer::take(&host, 4096);
        assert_eq!(small.slice_mut(usize::MAX).len(), 4096);
        assert_eq!(
            StageBuffer::take(&host, usize::MAX)
                .slice_mut(usize::MAX)
                .len(),
            STAGE_BYTES
        );
    }
}
