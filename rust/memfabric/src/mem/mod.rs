//! Memory the fabric may touch on behalf of peers.
//!
//! [`gva`]: segments and the global virtual address range shared by the ranks of an object.
//! [`regions`]: the table of registered (addr, len) ranges of one engine. Every copy a peer asks
//! for is checked against it before any byte moves; it is also published in the store so that
//! same-host initiators (which copy with CMA, where the target cannot veto) check against it.

pub mod gva;
pub mod regions;

pub use regions::{decode_list, encode_list, RegionTable};

use crate::error::{Error, Result};

/// Opens, read-write, the file that same-host process `pid` holds as fd `fd` (memory it
/// shares: a segment, an exported allocation, its generation page), through
/// `/proc/<pid>/fd/<fd>`, which needs the same permission as CMA. `what` names the file in
/// errors: `PeerGone` when the process or its fd is gone, `Refused` without permission.
pub(crate) fn open_peer_fd(
    pid: u32,
    fd: i32,
    what: &str,
) -> Result<(std::fs::File, std::fs::Metadata, String)> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::PeerGone(format!(
                "{what} {path} is gone: the process exited or closed it"
            )),
            std::io::ErrorKind::PermissionDenied => {
                Error::Refused(format!("cannot open {what} {path}: {e}"))
            }
            _ => Error::io(format!("open {what} {path}"), e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {what} {path}"), e))?;
    Ok((file, meta, path))
}

/// Maps `len` bytes of `fd` shared (`prot`: PROT_READ and/or PROT_WRITE) at an address the
/// kernel picks; the caller unmaps it.
pub(crate) fn map_shared(
    fd: std::os::fd::RawFd,
    len: usize,
    prot: i32,
) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: a fresh shared mapping of an fd the caller holds; the kernel picks the address,
    // so no existing mapping is touched.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p)
}
