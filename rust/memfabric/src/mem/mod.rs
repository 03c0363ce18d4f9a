//! Memory the fabric may touch on behalf of peers.
//!
//! [`gva`]: segments and the global virtual address range shared by the ranks of an object.
//! [`regions`]: the table of registered (addr, len) ranges of one engine. Every copy a peer asks
//! for is checked against it before any byte moves; it is also published in the store so that
//! same-host initiators (which copy with CMA, where the target cannot veto) check against it.

pub mod gva;
pub mod regions;

pub use regions::{decode_list, encode_list, RegionTable};

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
