//! Same host, other process: cross-memory attach (`process_vm_writev` / `process_vm_readv`).
//!
//! The kernel copies straight between the two address spaces, one copy, no peer involvement.
//! That is also the catch: the receiving process cannot veto a CMA write. Its protection is the
//! initiator's check of every remote range against the region table the peer PUBLISHED, which
//! is why [`CmaTransport`] refuses [`CheckedOps`] whose remote side was not checked. The kernel
//! itself only guarantees that addresses are mapped in the target (EFAULT otherwise).
//!
//! The kernel allows CMA where ptrace would be allowed (same uid and no privilege change, and
//! Yama's `ptrace_scope` permitting); where it refuses, [`probe`] says so and the engine falls
//! back to tcp.

use std::time::Instant;

use super::{expired, run_split, sane, CheckedOps, Op, Transport};
use crate::error::{Error, Result};

/// Most iovecs the kernel takes per call (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Bytes per system call at most: a call cannot be interrupted, so this bounds how far past
/// the deadline a transfer can run (64 MiB is ~10 ms at memory speed).
const CALL_MAX: u64 = 64 << 20;

/// CMA to one process.
#[derive(Debug, Clone, Copy)]
pub struct CmaTransport {
    pid: libc::pid_t,
}

impl CmaTransport {
    /// A transport to process `pid` on this host (this process's own pid works too). Nothing
    /// is checked here; use [`probe`] before relying on it.
    pub fn new(pid: u32) -> Result<Self> {
        match libc::pid_t::try_from(pid) {
            Ok(p) if p > 0 => Ok(CmaTransport { pid: p }),
            _ => Err(Error::InvalidParam(format!(
                "cma: {pid} is not a process id"
            ))),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    fn run(&self, ops: &CheckedOps, deadline: Instant, to_remote: bool) -> Result<()> {
        if !ops.remote_checked() {
            return Err(Error::InvalidParam(
                "cma: the remote side of the ops was not checked against the peer's published \
                 region table, and the peer cannot refuse a CMA copy itself"
                    .into(),
            ));
        }
        if ops.total_bytes() == 0 {
            return Ok(());
        }
        expired(deadline, "cma transfer")?;
        for op in ops.ops() {
            sane(op)?;
        }
        let pid = self.pid;
        run_split(ops.ops(), ops.total_bytes(), move |part| {
            transfer(pid, part, to_remote, deadline)
        })
    }
}

impl Transport for CmaTransport {
    fn name(&self) -> &'static str {
        "cma"
    }

    fn write(&self, ops: &CheckedOps, deadline: Instant) -> Result<()> {
        self.run(ops, deadline, true)
    }

    fn read(&self, ops: &CheckedOps, deadline: Instant) -> Result<()> {
        self.run(ops, deadline, false)
    }
}

/// Checks that CMA to `pid` works by reading one byte at `addr`, an address the peer
/// published as registered. A zero-length call would not do: the kernel returns before its
/// permission check when there is nothing to copy.
///
/// Errors: `Refused` (the kernel's ptrace check, with the Yama setting in the message),
/// `PeerGone` (no such process), `OutOfBounds` (addr not mapped there), `Unsupported`.
pub fn probe(pid: u32, addr: u64) -> Result<()> {
    let t = CmaTransport::new(pid)?;
    let mut byte = 0u8;
    let local = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 1,
    };
    loop {
        // SAFETY: the local iovec covers `byte`, alive for the call; the remote address is
        // only dereferenced by the kernel in the target process, which reports EFAULT when it
        // is not mapped.
        let rc = unsafe { libc::process_vm_readv(t.pid, &local, 1, &remote, 1, 0) };
        if rc == 1 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if rc < 0 && e.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if rc < 0 {
            return Err(map_errno("process_vm_readv", t.pid, addr, e));
        }
        return Err(Error::OutOfBounds(format!(
            "cma probe of pid {pid}: no byte readable at {addr:#x}"
        )));
    }
}

/// One thread's share of a transfer: iovec batches until every byte moved.
fn transfer(pid: libc::pid_t, ops: &[Op], to_remote: bool, deadline: Instant) -> Result<()> {
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let cap = ops.len().min(IOV_MAX);
    let mut liov = vec![empty; cap];
    let mut riov = vec![empty; cap];
    let call = if to_remote {
        "process_vm_writev"
    } else {
        "process_vm_readv"
    };
    // Cursor: op index and bytes of it already moved.
    let (mut i, mut off) = (0usize, 0u64);
    while i < ops.len() {
        expired(deadline, "cma transfer")?;
        let (mut n, mut bytes) = (0usize, 0u64);
        let (mut j, mut joff) = (i, off);
        while j < ops.len() && n < cap && bytes < CALL_MAX {
            let op = &ops[j];
            let take = (op.len - joff).min(CALL_MAX - bytes);
            if take > 0 {
                liov[n] = libc::iovec {
                    iov_base: (op.local + joff) as *mut libc::c_void,
                    iov_len: take as usize,
                };
                riov[n] = libc::iovec {
                    iov_base: (op.remote + joff) as *mut libc::c_void,
                    iov_len: take as usize,
                };
                n += 1;
                bytes += take;
            }
            if joff + take == op.len {
                j += 1;
                joff = 0;
            } else {
                joff += take;
            }
        }
        if n == 0 {
            break;
        }
        // SAFETY: the local iovecs cover ranges of this process that CheckedOps placed in
        // registered (mapped, read-write) memory; the remote ones are only touched by the
        // kernel inside the target, which fails with EFAULT rather than faulting. Both arrays
        // hold `n` initialized entries.
        let rc = unsafe {
            if to_remote {
                libc::process_vm_writev(pid, liov.as_ptr(), n as _, riov.as_ptr(), n as _, 0)
            } else {
                libc::process_vm_readv(pid, liov.as_ptr(), n as _, riov.as_ptr(), n as _, 0)
            }
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(map_errno(call, pid, riov[0].iov_base as u64, e));
        }
        if rc == 0 {
            // A partial transfer stops where an address faulted; repeating it would spin.
            return Err(Error::OutOfBounds(format!(
                "{call} to pid {pid} moved nothing at remote {:#x} (not mapped in the peer)",
                riov[0].iov_base as u64
            )));
        }
        // A partial transfer resumes where it stopped.
        advance(|k| ops[k].len, ops.len(), &mut i, &mut off, rc as u64);
    }
    Ok(())
}

/// Moves an iovec cursor (entry `i`, `off` bytes of it done) past `moved` bytes of entries
/// whose lengths `len_of` gives, and past any entries left empty.
pub(crate) fn advance(
    len_of: impl Fn(usize) -> u64,
    count: usize,
    i: &mut usize,
    off: &mut u64,
    mut moved: u64,
) {
    while moved > 0 && *i < count {
        let left = len_of(*i) - *off;
        if moved >= left {
            moved -= left;
            *i += 1;
            *off = 0;
        } else {
            *off += moved;
            moved = 0;
        }
    }
    while *i < count && len_of(*i) == *off {
        *i += 1;
        *off = 0;
    }
}

fn ptrace_scope() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        Ok(v) => format!("/proc/sys/kernel/yama/ptrace_scope is {}", v.trim()),
        Err(_) => "no Yama ptrace_scope on this kernel".into(),
    }
}

fn map_errno(call: &str, pid: libc::pid_t, remote: u64, e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EPERM) => Error::Refused(format!(
            "{call} to pid {pid} refused by the kernel (EPERM): CMA needs ptrace access to the \
             peer — the same uid without privilege changes, and Yama permitting it ({}; 0 \
             allows same-uid access, 1 only to descendants) or CAP_SYS_PTRACE; a seccomp \
             filter (containers) can also deny it. Use the tcp path (MF_TRANSPORT=tcp)",
            ptrace_scope()
        )),
        Some(libc::ESRCH) => Error::PeerGone(format!("{call}: process {pid} no longer exists")),
        Some(libc::EFAULT) => Error::OutOfBounds(format!(
            "{call} to pid {pid}: an address near remote {remote:#x} is not mapped in one of \
             the two processes (EFAULT)"
        )),
        Some(libc::ENOSYS) => Error::Unsupported(format!(
            "{call}: this kernel has no cross-memory attach (ENOSYS)"
        )),
        Some(libc::ENOMEM) => Error::NoResources(format!(
            "{call} to pid {pid}: the kernel could not allocate for the iovecs (ENOMEM)"
        )),
        _ => Error::io(format!("{call} to pid {pid}"), e),
    }
}
