//! The config store: the control plane every product coordinates through.
//!
//! - [`proto`]: the wire format (frames, requests, responses);
//! - [`server`]: the tokio server (embedded in a rank or run by `mf-store`);
//! - [`shm_channel`]: shared-memory request channels for clients on the store's host;
//! - [`backend`]: [`StoreClient`], one client type over the embedded server and etcd;
//! - [`client`]: the embedded server's blocking client with deadlines and reconnects;
//! - `etcd`: the store on an etcd cluster (cargo feature `etcd`);
//! - [`group`]: ranks, rendezvous, barrier and all_gather on top of a client;
//! - [`tls`]: mutual-TLS settings; [`url`]: `tcp://` and `etcd://` URL parsing.

pub mod backend;
pub mod client;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod group;
pub mod local_socket;
pub mod proto;
pub mod server;
pub mod shm_channel;
pub mod tls;
pub mod url;

pub use backend::{StoreBackend, StoreClient};
pub use client::{keep_alive, within, ClientOptions, EmbeddedClient};
pub use group::Group;
pub use server::StoreServer;

/// A server on a free loopback port and plaintext clients of it, for the unit tests of the
/// layers built on the store.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{ClientOptions, StoreClient, StoreServer};

    pub fn server() -> StoreServer {
        StoreServer::start("127.0.0.1:0".parse().unwrap(), None).expect("server starts")
    }

    pub fn client(s: &StoreServer) -> Arc<StoreClient> {
        Arc::new(
            StoreClient::connect(
                &s.url(),
                ClientOptions {
                    timeout: Duration::from_secs(5),
                    force_plaintext: true,
                    ..Default::default()
                },
            )
            .expect("client connects"),
        )
    }
}
