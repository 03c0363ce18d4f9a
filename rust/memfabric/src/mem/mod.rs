//! Memory the fabric may touch on behalf of peers.
//!
//! [`gva`]: segments and the global virtual address range shared by the ranks of an object.
//! [`regions`]: the table of registered (addr, len) ranges of one engine. Every copy a peer asks
//! for is checked against it before any byte moves; it is also published in the store so that
//! same-host initiators (which copy with CMA, where the target cannot veto) check against it.

pub mod gva;
pub mod regions;

pub use regions::{decode_list, encode_list, RegionTable};
