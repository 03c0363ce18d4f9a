//! Reaching the memory the offload operators name by raw address, without trusting it.
//!
//! The operators get addresses from the caller's descriptor arrays (and the descriptor arrays
//! themselves by address), so every range is placed before anything moves:
//! - inside the offload pool: checked against the slot's backed span, then copied directly
//!   (the pool is this library's own mapping);
//! - device memory of an accelerator backend (CUDA, Ascend): checked against the driver's
//!   allocation and moved with the backend's copies;
//! - anything else is host memory of this process that nothing vouches for: it is moved by
//!   the kernel (`process_vm_readv` on this very process), which checks both sides and fails
//!   with EFAULT where a page is not mapped readable (source) or writable (destination). So a
//!   bad pointer or size gives an error code, never a fault.
//!
//! Every move of a call is placed first, so a refused range means nothing was copied; only a
//! fault the kernel finds mid-call (an unmapped page inside host memory nothing vouched for)
//! leaves the moves before it applied.

use std::sync::Arc;

use super::pool::{range, Pool, Within};
use crate::device::{self, Device, Kind};
use crate::error::{Error, Result};

/// Most iovecs one `process_vm_readv` takes (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Device copies from or to host memory nothing vouches for bounce through a buffer of this
/// size, which the kernel fills or drains.
const BOUNCE: u64 = 4 << 20;

/// Caller memory named by address: a descriptor array, a destination window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub addr: u64,
    /// Its size in bytes when known (a tensor's `nbytes`); `None` for a bare address.
    pub len: Option<u64>,
    /// Where the caller says it lives.
    pub residence: Residence,
}

impl Span {
    /// Host memory of `len` bytes (when known) at `addr`.
    pub fn host(addr: u64, len: Option<u64>) -> Span {
        Span {
            addr,
            len,
            residence: Residence::Host,
        }
    }
}

/// Where a framework says memory lives: host, or a device type by its name there ("cuda",
/// "npu", "mps"...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Residence {
    Host,
    Device(String),
}

impl Residence {
    /// Refuses memory of a device no backend of this process reaches, saying why.
    pub fn check(&self, what: &str) -> Result<()> {
        let (kind, name) = match self {
            Residence::Host => return Ok(()),
            Residence::Device(t) if t == "cpu" => return Ok(()),
            Residence::Device(t) if t == "cuda" => (Kind::Cuda, "CUDA"),
            Residence::Device(t) if t == "npu" => (Kind::Ascend, "Ascend (npu)"),
            Residence::Device(t) => {
                return Err(Error::Unsupported(format!(
                    "{what}: {t} memory is out of this library's reach (it moves host, CUDA and \
                     Ascend memory)"
                )))
            }
        };
        match device::registry().get(kind) {
            Ok(_) => Ok(()),
            Err(why) => Err(Error::Unsupported(format!(
                "{what}: {name} memory needs the {} backend, which is not available here: {why}",
                kind.name()
            ))),
        }
    }
}

/// Where one side of a move lives.
#[derive(Clone)]
enum Place {
    /// The offload pool, or a buffer of this library: copied directly.
    Own,
    /// Device memory of an accelerator backend.
    Device(Arc<dyn Device>),
    /// Host memory nothing vouches for: moved by the kernel.
    Host,
}

/// One contiguous copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Move {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
}

struct Placed {
    /// Index in the caller's plan (for messages).
    index: usize,
    m: Move,
    dst: Place,
    src: Place,
}

/// The memory one operator call may touch.
pub(crate) struct Access<'a> {
    pool: &'a Pool,
}

impl<'a> Access<'a> {
    pub(crate) fn new(pool: &'a Pool) -> Access<'a> {
        Access { pool }
    }

    /// Places `[addr, addr + len)` (len > 0).
    fn place(&self, addr: u64, len: u64) -> Result<Place> {
        if addr == 0 {
            return Err(Error::InvalidParam(format!("null address for {len} bytes")));
        }
        if addr.checked_add(len).is_none() || len > isize::MAX as u64 {
            return Err(Error::InvalidParam(format!(
                "{len} bytes at {addr:#x} run past the end of the address space"
            )));
        }
        if self.pool.locate(addr, len)? == Within::Backed {
            return Ok(Place::Own);
        }
        if let Some((dev, _)) = device::memory_of(addr) {
            // Memory of the host backend (MF_DEVICE_BACKEND=host) is host memory of this
            // process: the kernel moves it like any other.
            if dev.kind() == Kind::Host {
                return Ok(Place::Host);
            }
            let Some((base, alen)) = dev.allocation_of(addr) else {
                return Err(Error::OutOfBounds(format!(
                    "{} is {} device memory, but the driver names no allocation holding it",
                    range(addr, len),
                    dev.kind().name()
                )));
            };
            if addr + len > base + alen as u64 {
                return Err(Error::OutOfBounds(format!(
                    "{} runs past the end of its {} allocation {}",
                    range(addr, len),
                    dev.kind().name(),
                    range(base, alen as u64)
                )));
            }
            return Ok(Place::Device(dev));
        }
        Ok(Place::Host)
    }

    /// Places `m` (both sides) without moving it; `label` names it in errors.
    pub(crate) fn check(&self, m: &Move, label: &dyn Fn() -> String) -> Result<()> {
        if m.len == 0 {
            return Ok(());
        }
        self.place(m.src, m.len)
            .map_err(|e| within(e, &format!("{}, source", label())))?;
        self.place(m.dst, m.len)
            .map_err(|e| within(e, &format!("{}, destination", label())))?;
        Ok(())
    }

    /// Places and runs `moves` in order; `label(i)` names move `i` in errors. Zero-length
    /// moves are skipped; nothing is copied when any move is refused.
    pub(crate) fn run(&self, moves: &[Move], label: &dyn Fn(usize) -> String) -> Result<()> {
        let mut placed = Vec::with_capacity(moves.len());
        for (i, m) in moves.iter().enumerate() {
            if m.len == 0 {
                continue;
            }
            let src = self
                .place(m.src, m.len)
                .map_err(|e| within(e, &format!("{}, source", label(i))))?;
            let dst = self
                .place(m.dst, m.len)
                .map_err(|e| within(e, &format!("{}, destination", label(i))))?;
            placed.push(Placed {
                index: i,
                m: *m,
                dst,
                src,
            });
        }
        execute(&placed, label)
    }

    /// Reads `count` elements of `size` bytes from the caller's array `span` (named `what`).
    pub(crate) fn read(&self, span: &Span, count: u64, size: u64, what: &str) -> Result<Vec<u8>> {
        self.read_strided(span, count, size, size, what)
    }

    /// Reads `count` elements of `size` bytes, `stride` bytes apart, from the caller's array.
    pub(crate) fn read_strided(
        &self,
        span: &Span,
        count: u64,
        size: u64,
        stride: u64,
        what: &str,
    ) -> Result<Vec<u8>> {
        span.residence.check(what)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let extent = (count - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(size))
            .ok_or_else(|| {
                Error::InvalidParam(format!(
                    "{what}: {count} elements overflow the address space"
                ))
            })?;
        if let Some(have) = span.len {
            if extent > have {
                return Err(Error::OutOfBounds(format!(
                    "{what} holds {have} bytes; the call reads {extent} ({count} element(s) of \
                     {size} bytes{})",
                    if stride != size {
                        format!(", {stride} bytes apart")
                    } else {
                        String::new()
                    }
                )));
            }
        }
        let total = count * size;
        let mut out = buffer(total, what)?;
        let base = span.addr;
        let dst = out.as_mut_ptr() as u64;
        let whole = self.place(base, extent).map_err(|e| within(e, what))?;
        if stride == size || !matches!(whole, Place::Host) {
            // One contiguous read: into `out` directly, or (strided device or pool memory)
            // the whole extent, then picked.
            let mut all = if stride == size {
                std::mem::take(&mut out)
            } else {
                buffer(extent, what)?
            };
            let m = Move {
                dst: all.as_mut_ptr() as u64,
                src: base,
                len: extent,
            };
            execute(
                &[Placed {
                    index: 0,
                    m,
                    dst: Place::Own,
                    src: whole,
                }],
                &|_| what.to_string(),
            )?;
            if stride == size {
                return Ok(all);
            }
            out = buffer(total, what)?;
            for i in 0..count as usize {
                let from = i * stride as usize;
                out[i * size as usize..(i + 1) * size as usize]
                    .copy_from_slice(&all[from..from + size as usize]);
            }
            return Ok(out);
        }
        // Host memory, strided: only the elements, moved by the kernel in batches.
        let placed: Vec<Placed> = (0..count)
            .map(|i| Placed {
                index: i as usize,
                m: Move {
                    dst: dst + i * size,
                    src: base + i * stride,
                    len: size,
                },
                dst: Place::Own,
                src: Place::Host,
            })
            .collect();
        execute(&placed, &|i| format!("{what}[{i}]"))?;
        Ok(out)
    }

    /// Checks that `bytes` written to the caller's `span` fit it (when its size is known) and
    /// that memory of its kind can be reached. The write itself is one of the moves given to
    /// [`run`](Self::run), placed with the others, so a bad target refuses the whole call.
    pub(crate) fn check_write(&self, span: &Span, bytes: u64, what: &str) -> Result<()> {
        span.residence.check(what)?;
        if let Some(have) = span.len {
            if bytes > have {
                return Err(Error::OutOfBounds(format!(
                    "{what} holds {have} bytes; the call writes {bytes}"
                )));
            }
        }
        Ok(())
    }
}

/// A zeroed buffer of `len` bytes, or an error (never an abort) when it cannot be had.
fn buffer(len: u64, what: &str) -> Result<Vec<u8>> {
    let n =
        usize::try_from(len).map_err(|_| Error::InvalidParam(format!("{what}: {len} bytes")))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::MallocFailed(format!("{what}: no memory for a {len}-byte buffer")))?;
    v.resize(n, 0);
    Ok(v)
}

/// Adds where an error happened to its message.
fn within(e: Error, at: &str) -> Error {
    match e {
        Error::OutOfBounds(m) => Error::OutOfBounds(format!("{at}: {m}")),
        Error::InvalidParam(m) => Error::InvalidParam(format!("{at}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{at}: {m}")),
        Error::MallocFailed(m) => Error::MallocFailed(format!("{at}: {m}")),
        other => other,
    }
}

/// Runs placed moves in order; runs of kernel moves go in batches.
fn execute(placed: &[Placed], label: &dyn Fn(usize) -> String) -> Result<()> {
    let mut batch: Vec<&Placed> = Vec::new();
    for p in placed {
        match (&p.dst, &p.src) {
            (Place::Own, Place::Own) => {
                kernel_moves(&batch, label)?;
                batch.clear();
                // SAFETY: both ranges were placed inside memory this library owns and keeps
                // mapped read-write for the call (the pool, which the caller's `Arc` keeps
                // alive, or a buffer of this call); `copy` allows them to overlap.
                unsafe {
                    std::ptr::copy(p.m.src as *const u8, p.m.dst as *mut u8, p.m.len as usize)
                };
            }
            (Place::Device(_), _) | (_, Place::Device(_)) => {
                kernel_moves(&batch, label)?;
                batch.clear();
                device_move(p).map_err(|e| within(e, &label(p.index)))?;
            }
            _ => batch.push(p),
        }
    }
    kernel_moves(&batch, label)
}

/// A move with a device side.
fn device_move(p: &Placed) -> Result<()> {
    let Move { dst, src, len } = p.m;
    match (&p.dst, &p.src) {
        (Place::Device(d), Place::Device(s)) => {
            if d.kind() != s.kind() {
                return Err(Error::Unsupported(format!(
                    "a copy from {} to {} device memory",
                    s.kind().name(),
                    d.kind().name()
                )));
            }
            // SAFETY: both sides were placed inside one live allocation of this backend.
            unsafe { d.copy_between(dst, src, len as usize, None) }
        }
        (Place::Device(d), Place::Own) | (Place::Own, Place::Device(d)) => {
            // SAFETY: the device side lies in a live allocation of `d`; the host side in
            // memory this library keeps mapped read-write for the call.
            unsafe { d.copy_between(dst, src, len as usize, None) }
        }
        (Place::Device(d), Place::Host) => {
            // Host side unvouched: the kernel fills a buffer, the device copies from it.
            let mut buf = buffer(len.min(BOUNCE), "bounce buffer")?;
            let mut off = 0;
            while off < len {
                let n = (len - off).min(BOUNCE);
                kernel_copy(&[Move {
                    dst: buf.as_mut_ptr() as u64,
                    src: src + off,
                    len: n,
                }])
                .map_err(|(_, e)| e)?;
                // SAFETY: the destination lies in a live allocation of `d`; the source is our
                // buffer of at least `n` bytes.
                unsafe { d.copy_between(dst + off, buf.as_ptr() as u64, n as usize, None)? };
                off += n;
            }
            Ok(())
        }
        (Place::Host, Place::Device(s)) => {
            let mut buf = buffer(len.min(BOUNCE), "bounce buffer")?;
            let mut off = 0;
            while off < len {
                let n = (len - off).min(BOUNCE);
                // SAFETY: the source lies in a live allocation of `s`; the destination is our
                // buffer of at least `n` bytes.
                unsafe { s.copy_between(buf.as_mut_ptr() as u64, src + off, n as usize, None)? };
                kernel_copy(&[Move {
                    dst: dst + off,
                    src: buf.as_ptr() as u64,
                    len: n,
                }])
                .map_err(|(_, e)| e)?;
                off += n;
            }
            Ok(())
        }
        _ => Err(Error::Failed(
            "device_move of a move with no device side".into(),
        )),
    }
}

fn kernel_moves(batch: &[&Placed], label: &dyn Fn(usize) -> String) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let moves: Vec<Move> = batch.iter().map(|p| p.m).collect();
    kernel_copy(&moves).map_err(|(i, e)| within(e, &label(batch[i].index)))
}

/// Copies each move through the kernel: `process_vm_readv` on this process, whose local side
/// is the destination and remote side the source. Both are checked by the kernel; on a fault
/// the error names the move (its index in `moves`) where the copy stopped.
pub(crate) fn kernel_copy(moves: &[Move]) -> std::result::Result<(), (usize, Error)> {
    let pid = std::process::id() as libc::pid_t;
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut liov = vec![empty; moves.len().min(IOV_MAX)];
    let mut riov = liov.clone();
    // Cursor: the move and the bytes of it already copied.
    let (mut i, mut done) = (0usize, 0u64);
    // After an EFAULT for a batch, the next call takes one move: the kernel refuses a whole
    // call for one bad iovec before copying anything, so the culprit is found alone.
    let mut single = false;
    while i < moves.len() {
        let mut n = 0usize;
        let mut j = i;
        let mut off = done;
        let cap = if single { 1 } else { liov.len() };
        while j < moves.len() && n < cap {
            let m = moves[j];
            if m.len > off {
                liov[n] = libc::iovec {
                    iov_base: (m.dst + off) as *mut libc::c_void,
                    iov_len: (m.len - off) as usize,
                };
                riov[n] = libc::iovec {
                    iov_base: (m.src + off) as *mut libc::c_void,
                    iov_len: (m.len - off) as usize,
                };
                n += 1;
            }
            j += 1;
            off = 0;
        }
        if n == 0 {
            break;
        }
        // SAFETY: both iovec arrays hold `n` initialized entries. The kernel copies from the
        // remote ranges (this process's sources) into the local ones (its destinations) and
        // checks every page of both: an address that is not mapped readable or writable is
        // EFAULT or a short count, never a fault in this process.
        let rc =
            unsafe { libc::process_vm_readv(pid, liov.as_ptr(), n as _, riov.as_ptr(), n as _, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EFAULT) if n > 1 => {
                    single = true;
                    continue;
                }
                Some(libc::EFAULT) => return Err((i, fault(&moves[i]))),
                Some(libc::EPERM) | Some(libc::ENOSYS) => {
                    return Err((
                        i,
                        Error::Unsupported(format!(
                            "process_vm_readv on this process is refused ({e}); the offload \
                             copies move host memory through it so that a bad address is an \
                             error rather than a crash"
                        )),
                    ))
                }
                _ => return Err((i, Error::io("process_vm_readv", e))),
            }
        }
        if rc == 0 {
            return Err((i, fault(&moves[i])));
        }
        single = false;
        // A short count resumes where it stopped.
        crate::transport::cma::advance(|k| moves[k].len, moves.len(), &mut i, &mut done, rc as u64);
    }
    Ok(())
}

fn fault(m: &Move) -> Error {
    Error::OutOfBounds(format!(
        "copying {} bytes from {:#x} to {:#x}: part of the source is not readable or of the \
         destination not writable in this process",
        m.len, m.src, m.dst
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_copy_moves_bytes_and_refuses_bad_addresses() {
        let src: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut dst = vec![0u8; 10_000];
        let moves: Vec<Move> = (0..100u64)
            .map(|k| Move {
                dst: dst.as_mut_ptr() as u64 + k * 100,
                src: src.as_ptr() as u64 + (99 - k) * 100,
                len: 100,
            })
            .collect();
        kernel_copy(&moves).unwrap();
        for k in 0..100 {
            assert_eq!(
                dst[k * 100..k * 100 + 100],
                src[(99 - k) * 100..(99 - k) * 100 + 100]
            );
        }
        // A bad source in the middle: the moves before it are applied, the error names it.
        let mut dst2 = vec![0u8; 300];
        let bad = [
            Move {
                dst: dst2.as_mut_ptr() as u64,
                src: src.as_ptr() as u64,
                len: 100,
            },
            Move {
                dst: dst2.as_mut_ptr() as u64 + 100,
                src: 8,
                len: 100,
            },
            Move {
                dst: dst2.as_mut_ptr() as u64 + 200,
                src: src.as_ptr() as u64,
                len: 100,
            },
        ];
        let (i, e) = kernel_copy(&bad).unwrap_err();
        assert_eq!(i, 1);
        assert_eq!(e.code(), -3002, "{e}");
        assert_eq!(dst2[..100], src[..100]);
        // A read-only destination is refused too.
        let ro = b"read only data".as_ptr() as u64;
        let (i, _) = kernel_copy(&[Move {
            dst: ro,
            src: src.as_ptr() as u64,
            len: 4,
        }])
        .unwrap_err();
        assert_eq!(i, 0);
        // A kernel address in a later iovec fails the whole batch up front; the culprit is
        // still the one named.
        let mut dst3 = vec![0u8; 64];
        let (i, _) = kernel_copy(&[
            Move {
                dst: dst3.as_mut_ptr() as u64,
                src: src.as_ptr() as u64,
                len: 32,
            },
            Move {
                dst: 0xffff_8000_0000_0000,
                src: src.as_ptr() as u64,
                len: 32,
            },
        ])
        .unwrap_err();
        assert_eq!(i, 1);
        assert_eq!(dst3[..32], src[..32]);
    }
}
