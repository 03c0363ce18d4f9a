//! The config store: the control plane every product coordinates through.
//!
//! - [`proto`]: the wire format (frames, requests, responses);
//! - [`server`]: the tokio server (embedded in a rank or run by `mf-store`);
//! - [`client`]: the blocking client with deadlines and reconnects;
//! - [`group`]: ranks, rendezvous, barrier and all_gather on top of a client;
//! - [`tls`]: mutual-TLS settings; [`url`]: `tcp://ip:port` parsing.

pub mod client;
pub mod group;
pub mod proto;
pub mod server;
pub mod tls;
pub mod url;

pub use client::{keep_alive, within, ClientOptions, StoreClient};
pub use group::Group;
pub use server::StoreServer;
