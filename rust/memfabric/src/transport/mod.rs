//! Data paths: how bytes move between this process's memory and a peer's.
//!
//! One trait, [`Transport`], with one implementation per path, chosen per peer pair by
//! [`select`]:
//! - [`local`]: the peer is this process — memcpy (split across threads when large);
//! - [`cma`]: the peer is another process on this host — `process_vm_writev`/`readv`;
//! - [`tcp`]: the peer is elsewhere — the peer's data server, over pooled connections, open
//!   only to engines admitted by the same config store ([`auth`]).
//!
//! Transports move bytes; they do not decide what may be touched. Every descriptor reaches a
//! transport inside [`CheckedOps`], which can only be built by checking the descriptors against
//! region tables (or by an `unsafe` promise that the caller did so another way).

pub mod auth;
pub mod cma;
pub mod local;
pub(crate) mod parallel;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::log::WARN;
use crate::mem::regions::RegionTable;
use crate::mf_log;

/// One descriptor: `len` bytes between this process's `local` address and the peer's `remote`
/// address. Direction is given by the call (`write`: local -> remote; `read`: remote -> local).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

impl Op {
    pub fn new(local: u64, remote: u64, len: u64) -> Self {
        Op { local, remote, len }
    }
}

/// Descriptors whose ranges were checked against region tables, ready for a transport.
///
/// Built by [`CheckedOps::new`], which checks every descriptor's local side against this
/// engine's table and, when the peer's published table is given, its remote side too; then it
/// coalesces neighbours that stay inside one region on every checked side. A transport that
/// copies into the peer without the peer's consent (local, cma) refuses ops whose remote side
/// was not checked here; tcp accepts them because its server checks again.
#[derive(Debug, Clone)]
pub struct CheckedOps {
    ops: Vec<Op>,
    remote_checked: bool,
    total: u64,
}

impl CheckedOps {
    /// Checks `ops` (zero-length ones are dropped) and coalesces adjacent ones.
    ///
    /// Pass the peer's published table as `remote` whenever you have it: it gives an early,
    /// precise error and it is what makes coalescing safe — without it two descriptors that
    /// are adjacent but fall in two separate peer registrations cannot be told apart from one,
    /// so nothing is merged.
    ///
    /// Errors: `OutOfBounds` naming the descriptor index and side.
    pub fn new(
        mut ops: Vec<Op>,
        local: &RegionTable,
        remote: Option<&RegionTable>,
    ) -> Result<Self> {
        let mut lc = local.batch();
        let mut rc = remote.map(|r| r.batch());
        let mut w = 0usize;
        // Regions (by start address) the last kept op lies in, to allow merging.
        let mut last_regions = (0u64, 0u64);
        let mut total = 0u64;
        for i in 0..ops.len() {
            let op = ops[i];
            if op.len == 0 {
                continue;
            }
            let lr = lc
                .region_of(op.local, op.len)
                .map_err(|e| side_err(i, "local buffer", e))?;
            let rr = match rc.as_mut() {
                Some(rc) => rc
                    .region_of(op.remote, op.len)
                    .map_err(|e| side_err(i, "peer memory", e))?,
                None => 0,
            };
            total = total.saturating_add(op.len);
            if w > 0 && rc.is_some() && last_regions == (lr, rr) {
                let last = &mut ops[w - 1];
                if last.local + last.len == op.local && last.remote + last.len == op.remote {
                    // Both sides are inside one region each, so the sum cannot overflow.
                    last.len += op.len;
                    continue;
                }
            }
            ops[w] = op;
            w += 1;
            last_regions = (lr, rr);
        }
        ops.truncate(w);
        Ok(CheckedOps {
            ops,
            remote_checked: remote.is_some(),
            total,
        })
    }

    /// Wraps descriptors checked by other means (for example copies between segments the
    /// fabric itself mapped).
    ///
    /// # Safety
    /// Every op's local range must be memory of this process that stays mapped and writable
    /// (for reads) or readable (for writes) for the duration of the transfer; if
    /// `remote_checked`, every remote range must be memory the peer offered for this access.
    pub unsafe fn assume_checked(ops: Vec<Op>, remote_checked: bool) -> Self {
        let total = ops.iter().fold(0u64, |t, o| t.saturating_add(o.len));
        CheckedOps {
            ops,
            remote_checked,
            total,
        }
    }

    /// The descriptors, after coalescing.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Whether the remote sides were checked against the peer's published table.
    pub fn remote_checked(&self) -> bool {
        self.remote_checked
    }

    /// Sum of the lengths.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }
}

fn side_err(i: usize, side: &str, e: Error) -> Error {
    match e {
        Error::OutOfBounds(m) => Error::OutOfBounds(format!("descriptor {i}, {side}: {m}")),
        other => other,
    }
}

/// A data path to one peer.
///
/// Contract, for every implementation:
/// - **Deadline**: the call returns by `deadline` (plus the cost of one bounded system call or
///   scheduler tick), with `Ok` or an error; `Timeout` when the deadline passed first. A
///   deadline already in the past fails without moving anything.
/// - **All or error**: `Ok` means every byte of every op was applied at the destination (for
///   tcp: the peer acknowledged having copied it into its memory). On any failure the whole
///   call fails with the FIRST error seen; some of the bytes may have been applied.
/// - **Order**: ops may be applied in any order and in parallel; ops whose destinations overlap
///   give an unspecified result.
/// - **Threads**: implementations are `Send + Sync`; concurrent calls on one transport are
///   allowed and independent.
/// - **Safety**: the transport trusts [`CheckedOps`]; paths that write into the peer without
///   the peer's participation require `remote_checked()`.
pub trait Transport: Send + Sync {
    /// Short name for logs and `transport_for`: "local", "cma" or "tcp".
    fn name(&self) -> &'static str;
    /// Copies each op's local range to its remote address.
    fn write(&self, ops: &CheckedOps, deadline: Instant) -> Result<()>;
    /// Copies each op's remote range to its local address.
    fn read(&self, ops: &CheckedOps, deadline: Instant) -> Result<()>;
}

/// Merges runs of descriptors that are contiguous on both sides (in the given order; no
/// sorting, so the caller's order and the O(n) cost are kept) and drops zero-length ones.
///
/// Merged descriptors may span two adjacent registrations that [`CheckedOps::new`] would
/// accept one by one but refuse merged; `CheckedOps::new` coalesces safely by itself, so use
/// this only where one region is known to hold everything.
pub fn coalesce(ops: &mut Vec<Op>) {
    let mut w = 0usize;
    for r in 0..ops.len() {
        let op = ops[r];
        if op.len == 0 {
            continue;
        }
        if w > 0 {
            let last = &mut ops[w - 1];
            if last.local.checked_add(last.len) == Some(op.local)
                && last.remote.checked_add(last.len) == Some(op.remote)
            {
                if let Some(n) = last.len.checked_add(op.len) {
                    last.len = n;
                    continue;
                }
            }
        }
        ops[w] = op;
        w += 1;
    }
    ops.truncate(w);
}

/// Which path reaches a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Local,
    Cma,
    Tcp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Cma => "cma",
            Kind::Tcp => "tcp",
        }
    }
}

/// What an engine publishes about itself so that peers can pick a path to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub pid: u32,
    /// Identity of the kernel, user and pid namespace (see [`host_id`]); empty when unknown,
    /// which rules out the same-host paths.
    pub host_id: String,
    /// Where the peer's tcp data server listens.
    pub data_addr: SocketAddr,
}

impl PeerInfo {
    /// This process, with its data server at `data_addr`.
    pub fn this_process(data_addr: SocketAddr) -> Self {
        PeerInfo {
            pid: std::process::id(),
            host_id: host_id().to_string(),
            data_addr,
        }
    }

    /// Same kernel, same user, same pid namespace: CMA can reach the other by pid.
    pub fn same_host(&self, other: &PeerInfo) -> bool {
        !self.host_id.is_empty() && self.host_id == other.host_id
    }
}

/// "boot_id/uid/pid-namespace" of this process, computed once.
///
/// boot_id names the running kernel; the uid is what the kernel's CMA permission check looks
/// at first; the pid namespace matters because a pid only means something inside its own
/// namespace (two containers on one host share the boot_id, not their pid numbers).
pub fn host_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let boot = match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            Ok(s) => s.trim().to_string(),
            Err(e) => {
                mf_log!(
                    WARN,
                    "cannot read /proc/sys/kernel/random/boot_id ({e}): same-host paths are off"
                );
                return String::new();
            }
        };
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "pid:?".into());
        format!("{boot}/{uid}/{pidns}")
    })
}

/// Picks the path from `local` to `peer`. `force` is the caller's reading of `MF_TRANSPORT`
/// ("tcp" or "cma"); a forced path that cannot work here (cma to another host) or an unknown
/// value is logged and ignored.
pub fn select(local: &PeerInfo, peer: &PeerInfo, force: Option<&str>) -> Kind {
    let same_host = local.same_host(peer);
    match force.map(str::trim).filter(|f| !f.is_empty()) {
        Some(f) if f.eq_ignore_ascii_case("tcp") => return Kind::Tcp,
        Some(f) if f.eq_ignore_ascii_case("cma") => {
            if same_host {
                return Kind::Cma;
            }
            mf_log!(
                WARN,
                "MF_TRANSPORT=cma ignored for peer pid {} at {}: not on this host",
                peer.pid,
                peer.data_addr
            );
        }
        Some(f) => mf_log!(WARN, "MF_TRANSPORT={f:?} ignored: expected tcp or cma"),
        None => {}
    }
    if same_host && local.pid == peer.pid {
        Kind::Local
    } else if same_host {
        Kind::Cma
    } else {
        Kind::Tcp
    }
}

/// Runs `f` over `ops` on this thread and, for large copies, on resident helpers that claim
/// chunks as they get a core (see [`parallel`]). Returns the first error in op order.
pub(crate) fn run_split<F>(ops: &[Op], total: u64, f: F) -> Result<()>
where
    F: Fn(&[Op]) -> Result<()> + Send + Sync + 'static,
{
    parallel::run(ops, total, f)
}

/// Usable cores, read once: `available_parallelism` reads cgroup files on every call, which
/// costs more than a small copy.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Errors shared by local and cma for descriptors that cannot be real memory even though they
/// passed the checks (only possible through `assume_checked`).
pub(crate) fn sane(op: &Op) -> Result<()> {
    if op.local == 0 || op.remote == 0 {
        return Err(Error::InvalidParam(format!("null address in {op:?}")));
    }
    if op.local.checked_add(op.len).is_none()
        || op.remote.checked_add(op.len).is_none()
        || op.len > isize::MAX as u64
    {
        return Err(Error::InvalidParam(format!(
            "{op:?} runs past the end of the address space"
        )));
    }
    Ok(())
}

pub(crate) fn expired(deadline: Instant, what: &str) -> Result<()> {
    if Instant::now() >= deadline {
        return Err(Error::Timeout(format!("{what}: the deadline passed")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_only_contiguous_runs() {
        let mut ops = vec![
            Op::new(100, 1000, 10),
            Op::new(110, 1010, 5),
            Op::new(115, 1020, 5), // remote gap
            Op::new(120, 1025, 0), // dropped
            Op::new(120, 1025, 5),
            Op::new(u64::MAX, 5000, 1),
            Op::new(0, 5001, 1), // "after" u64::MAX only by wrapping: not merged
        ];
        coalesce(&mut ops);
        assert_eq!(
            ops,
            vec![
                Op::new(100, 1000, 15),
                Op::new(115, 1020, 10),
                Op::new(u64::MAX, 5000, 1),
                Op::new(0, 5001, 1),
            ]
        );
    }

    #[test]
    fn checked_ops_merge_inside_regions_only() {
        let a = vec![0u8; 8192];
        let b = vec![0u8; 8192];
        let (la, ra) = (a.as_ptr() as u64, b.as_ptr() as u64);
        let local = RegionTable::new();
        local.register(la, 8192).unwrap();
        let remote = RegionTable::new();
        remote.register(ra, 4096).unwrap();
        remote.register(ra + 4096, 4096).unwrap();
        let ops: Vec<Op> = (0..8)
            .map(|i| Op::new(la + i * 1024, ra + i * 1024, 1024))
            .collect();
        let c = CheckedOps::new(ops.clone(), &local, Some(&remote)).unwrap();
        assert_eq!(
            c.ops(),
            &[Op::new(la, ra, 4096), Op::new(la + 4096, ra + 4096, 4096)]
        );
        assert_eq!(c.total_bytes(), 8192);
        let c = CheckedOps::new(ops, &local, None).unwrap();
        assert_eq!(c.ops().len(), 8);
        assert!(!c.remote_checked());
        let e =
            CheckedOps::new(vec![Op::new(la, ra + 8000, 1000)], &local, Some(&remote)).unwrap_err();
        assert!(matches!(e, Error::OutOfBounds(_)));
        assert!(e.to_string().contains("descriptor 0, peer memory"), "{e}");
    }

    #[test]
    fn select_paths() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let me = PeerInfo::this_process(addr);
        let mut other = me.clone();
        other.pid += 1;
        let mut far = other.clone();
        far.host_id = "another-kernel/0/pid:[1]".into();
        assert_eq!(select(&me, &me, None), Kind::Local);
        assert_eq!(select(&me, &other, None), Kind::Cma);
        assert_eq!(select(&me, &far, None), Kind::Tcp);
        assert_eq!(select(&me, &other, Some("tcp")), Kind::Tcp);
        assert_eq!(select(&me, &me, Some("TCP")), Kind::Tcp);
        assert_eq!(select(&me, &me, Some("cma")), Kind::Cma);
        assert_eq!(select(&me, &far, Some("cma")), Kind::Tcp);
        assert_eq!(select(&me, &other, Some("rdma")), Kind::Cma);
        let mut unknown = me.clone();
        unknown.host_id.clear();
        assert_eq!(select(&unknown, &unknown, None), Kind::Tcp);
    }
}
