//! Host buffers for device bytes on their way to or from a host-only path (the tcp transport,
//! a peer's host memory).
//!
//! Page-locked where the backend offers it: a device copy from pageable memory runs through
//! the driver's own bounce buffer at a fraction of the speed (H100: 6-14 GB/s pageable, 52
//! pinned). Page-locking costs far more than a copy, so buffers are kept for reuse, and at
//! most `KEEP` are ever pinned (32 MiB). Where the backend has no pinned memory (the host
//! backend), pinning fails, or all of them are in use, a plain allocation does the job; whole
//! ones are kept for reuse too (up to `KEEP`), since fresh pages cost a fault each on first
//! touch (a new 4 MiB buffer per chunk halved the staged tcp path on the host backend).

use std::sync::{Arc, Mutex};

use super::{Device, Kind};
use crate::log::DEBUG;
use crate::mf_log;

/// Bytes of one staging buffer (one chunk of a pipelined transfer).
pub const STAGE_BYTES: usize = 4 << 20;
/// Pinned buffers at most, process-wide; each is kept for reuse.
const KEEP: usize = 8;

struct Pool {
    /// Pinned buffers not in use, with the backend that pinned them (kept alive by them: the
    /// memory belongs to its context).
    idle: Vec<(Arc<dyn Device>, u64)>,
    /// Pinned buffers in all, idle or in use (or being pinned).
    pinned: usize,
    /// Plain buffers of [`STAGE_BYTES`] not in use.
    plain: Vec<Vec<u8>>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    idle: Vec::new(),
    pinned: 0,
    plain: Vec::new(),
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

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
    /// A buffer of at least `len` bytes (at most [`STAGE_BYTES`]) for copies with memory of
    /// `dev`'s device `device`: pinned when `dev` can pin (a new one in that device's context;
    /// any kept one serves every device).
    pub fn take(dev: &Arc<dyn Device>, device: i32, len: usize) -> StageBuffer {
        // A kept whole buffer, else one as large as asked (a small bounce zeroes no 4 MiB).
        let plain = |kept: Option<Vec<u8>>| StageBuffer {
            memory: Memory::Plain(kept.unwrap_or_else(|| vec![0u8; len.min(STAGE_BYTES)])),
        };
        let mut p = pool();
        if let Some(i) = p.idle.iter().position(|(d, _)| same(d, dev)) {
            let addr = p.idle.swap_remove(i).1;
            let dev = dev.clone();
            return StageBuffer {
                memory: Memory::Pinned { dev, addr },
            };
        }
        // The host backend has no pinned memory; with all pinned buffers in use, pageable
        // memory for this one rather than pinning (and unpinning) more.
        if dev.kind() == Kind::Host || p.pinned >= KEEP {
            let kept = p.plain.pop();
            drop(p);
            return plain(kept);
        }
        p.pinned += 1;
        drop(p);
        match dev.pinned_alloc(device, STAGE_BYTES) {
            Ok(addr) => StageBuffer {
                memory: Memory::Pinned {
                    dev: dev.clone(),
                    addr,
                },
            },
            Err(e) => {
                mf_log!(DEBUG, "staging through pageable memory: {e}");
                let mut p = pool();
                p.pinned -= 1;
                let kept = p.plain.pop();
                drop(p);
                plain(kept)
            }
        }
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
        match &mut self.memory {
            Memory::Pinned { dev, addr } => pool().idle.push((dev.clone(), *addr)),
            Memory::Plain(v) if v.len() == STAGE_BYTES => {
                let mut p = pool();
                if p.plain.len() < KEEP {
                    p.plain.push(std::mem::take(v));
                }
            }
            Memory::Plain(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_backend_stages_through_plain_memory() {
        let host = super::super::registry().host();
        let mut b = StageBuffer::take(&host, 0, STAGE_BYTES);
        assert!(!b.pinned());
        let s = b.slice_mut(usize::MAX);
        assert_eq!(s.len(), STAGE_BYTES);
        s[STAGE_BYTES - 1] = 7;
        assert_eq!(b.slice_mut(STAGE_BYTES)[STAGE_BYTES - 1], 7);
        assert_ne!(b.addr(), 0);
        // A whole plain buffer is kept for the next taker.
        let at = b.addr();
        drop(b);
        let mut again = StageBuffer::take(&host, 0, STAGE_BYTES);
        assert_eq!(again.addr(), at, "the kept buffer is handed out again");
        assert_eq!(again.slice_mut(STAGE_BYTES)[STAGE_BYTES - 1], 7);
        // Unpinned buffers are as large as asked when none is kept (a small bounce zeroes no
        // 4 MiB), or a kept whole one.
        let mut small = StageBuffer::take(&host, 0, 4096);
        assert!([4096, STAGE_BYTES].contains(&small.slice_mut(usize::MAX).len()));
        drop(again);
        assert_eq!(
            StageBuffer::take(&host, 0, usize::MAX)
                .slice_mut(usize::MAX)
                .len(),
            STAGE_BYTES
        );
    }
}
