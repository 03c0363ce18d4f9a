//! memfabric: a memory fabric for distributed AI serving.
//!
//! Ranks on one or many hosts pool their memory and move bytes between each other's memory
//! with one call. The crate is layered; each layer only uses the ones above it:
//!
//! 1. [`error`] and [`log`]: one error type with stable codes; level-filtered logging.
//! 2. [`store`]: the config store (server, client, groups, TLS) that coordinates ranks.
//! 3. `mem`: registered regions and segments; `transport`: data paths (local, cma, tcp).
//! 4. The products: Big Memory, Share Memory, the Transfer Engine, and the offload pool with
//!    its copy operators ([`offload`]).
//!
//! Nothing here knows about Python; the `memfabric-py` crate converts at the boundary.

pub mod blocks;
pub mod bm;
pub mod device;
pub mod error;
pub mod fabric;
pub mod hbm;
pub mod log;
pub mod mem;
pub mod net;
pub mod offload;
pub mod runtime;
pub mod shm;
pub mod store;
pub mod stream;
pub mod trans;
pub mod transport;
pub mod wait;

pub use error::{Error, Result};
