//! One client type over two store backends.
//!
//! [`StoreClient`] is what every product holds; the URL picks what is behind it:
//! `tcp://` the embedded store server ([`EmbeddedClient`]), `etcd://` an etcd cluster
//! (`etcd::EtcdClient`, with the `etcd` cargo feature). Both implement
//! [`StoreBackend`] with the same meaning for every operation, so the group layer, the Transfer
//! Engine and BM/SHM run unchanged on either.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::client::{ClientOptions, EmbeddedClient};
use crate::error::{Error, Result};

/// The operations of a config store. Every call has a deadline; see [`EmbeddedClient`] for
/// the meaning of each (the etcd backend keeps it).
pub trait StoreBackend: Send + Sync {
    /// The store's URL, normalized.
    fn url(&self) -> String;
    /// The per-call deadline.
    fn timeout(&self) -> Duration;
    /// The local address through which the store is reached.
    fn local_ip(&self) -> Option<IpAddr>;
    /// How the store is reached now: "shared memory", "local socket", "tcp", "tls" or "etcd"
    /// ("none" while disconnected).
    fn connection(&self) -> &'static str;
    /// When this client last had to restore its session (ephemeral keys) after losing it.
    fn reconnected_at(&self) -> Option<Instant> {
        None
    }
    /// Restores a session the store dropped while the client was idle; whether it did.
    fn revive(&self, _limit: Duration) -> Result<bool> {
        Ok(false)
    }
    /// Whether the session is open now; `None` when that cannot be told without waiting.
    fn connected_now(&self) -> Option<bool> {
        None
    }
    /// Moves the client to the store at `url`; on error nothing changed.
    fn retarget(&self, url: &str) -> Result<()> {
        Err(Error::Unsupported(format!(
            "store {}: moving to {url} is supported for tcp:// stores (an etcd URL lists every \
             member, so a restarted member is found without it)",
            self.url()
        )))
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    fn set_ephemeral(&self, key: &str, value: &[u8]) -> Result<()>;
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn get_wait(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;
    fn add(&self, key: &str, delta: i64) -> Result<i64>;
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>>;
    fn delete(&self, key: &str) -> Result<bool>;
    fn delete_within(&self, key: &str, limit: Duration) -> Result<bool>;
    fn append(&self, key: &str, value: &[u8]) -> Result<u64>;
    fn exists(&self, keys: &[String]) -> Result<Vec<bool>>;
    fn multi_get(&self, keys: &[String], wait: Option<Duration>) -> Result<Vec<Vec<u8>>>;
    fn multi_set(&self, entries: &[(String, Vec<u8>)], ephemeral: bool) -> Result<()>;
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    fn wait(&self, keys: &[String], timeout: Duration, watch: Option<(&str, u64)>) -> Result<()>;
    fn ping(&self) -> Result<Duration>;
}

impl StoreBackend for EmbeddedClient {
    fn url(&self) -> String {
        EmbeddedClient::url(self)
    }
    fn timeout(&self) -> Duration {
        EmbeddedClient::timeout(self)
    }
    fn local_ip(&self) -> Option<IpAddr> {
        EmbeddedClient::local_ip(self)
    }
    fn connection(&self) -> &'static str {
        EmbeddedClient::connection(self)
    }
    fn reconnected_at(&self) -> Option<Instant> {
        EmbeddedClient::reconnected_at(self)
    }
    fn revive(&self, limit: Duration) -> Result<bool> {
        EmbeddedClient::revive(self, limit)
    }
    fn connected_now(&self) -> Option<bool> {
        EmbeddedClient::connected_now(self)
    }
    fn retarget(&self, url: &str) -> Result<()> {
        EmbeddedClient::retarget(self, url)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        EmbeddedClient::set(self, key, value)
    }
    fn set_ephemeral(&self, key: &str, value: &[u8]) -> Result<()> {
        EmbeddedClient::set_ephemeral(self, key, value)
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        EmbeddedClient::get(self, key)
    }
    fn get_wait(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        EmbeddedClient::get_wait(self, key, timeout)
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        EmbeddedClient::add(self, key, delta)
    }
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        EmbeddedClient::compare_set(self, key, expected, desired)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        EmbeddedClient::delete(self, key)
    }
    fn delete_within(&self, key: &str, limit: Duration) -> Result<bool> {
        EmbeddedClient::delete_within(self, key, limit)
    }
    fn append(&self, key: &str, value: &[u8]) -> Result<u64> {
        EmbeddedClient::append(self, key, value)
    }
    fn exists(&self, keys: &[String]) -> Result<Vec<bool>> {
        EmbeddedClient::exists(self, keys)
    }
    fn multi_get(&self, keys: &[String], wait: Option<Duration>) -> Result<Vec<Vec<u8>>> {
        EmbeddedClient::multi_get(self, keys, wait)
    }
    fn multi_set(&self, entries: &[(String, Vec<u8>)], ephemeral: bool) -> Result<()> {
        EmbeddedClient::multi_set(self, entries, ephemeral)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        EmbeddedClient::list(self, prefix)
    }
    fn wait(&self, keys: &[String], timeout: Duration, watch: Option<(&str, u64)>) -> Result<()> {
        EmbeddedClient::wait(self, keys, timeout, watch)
    }
    fn ping(&self) -> Result<Duration> {
        EmbeddedClient::ping(self)
    }
}

/// A config store client: the embedded server's or etcd's, by URL. Cheap to share between
/// threads (`Arc`).
pub struct StoreClient {
    backend: Box<dyn StoreBackend>,
}

impl StoreClient {
    /// Connects to `url`: `tcp://ip:port` (embedded store server) or
    /// `etcd://ip:port[,ip:port...][/prefix]` (an etcd cluster), retrying until
    /// `opts.timeout` passes.
    pub fn connect(url: &str, opts: ClientOptions) -> Result<StoreClient> {
        let backend: Box<dyn StoreBackend> = if super::url::is_etcd_url(url) {
            connect_etcd(url, opts)?
        } else {
            Box::new(EmbeddedClient::connect(url, opts)?)
        };
        Ok(StoreClient { backend })
    }

    /// Wraps another backend (tests, tools).
    pub fn from_backend(backend: Box<dyn StoreBackend>) -> StoreClient {
        StoreClient { backend }
    }

    /// The store's URL.
    pub fn url(&self) -> String {
        self.backend.url()
    }

    /// Moves this client to the store at `url`, of the same kind (`tcp://`): a store that was
    /// restarted at another address. Within the client's timeout it connects there and
    /// publishes this client's ephemeral keys again, as after a reconnect, so the new store
    /// learns who is alive. On error nothing changed and the client keeps its store.
    pub fn retarget(&self, url: &str) -> Result<()> {
        if super::url::is_etcd_url(url) != super::url::is_etcd_url(&self.url()) {
            return Err(Error::InvalidParam(format!(
                "store {} cannot move to {url}: a different kind of store",
                self.url()
            )));
        }
        self.backend.retarget(url)
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.backend.timeout()
    }

    /// This side's address toward the store: the interface through which the store (and so,
    /// presumably, the other ranks) is reached.
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.backend.local_ip()
    }

    /// How the store is reached now: "local socket" (same host, see
    /// [`super::local_socket`]), "shared memory" (that socket with a channel beside it, see
    /// [`super::shm_channel`]), "tcp", "tls" or "etcd"; "none" while disconnected.
    pub fn connection(&self) -> &'static str {
        self.backend.connection()
    }

    /// When this client last restored its session after losing it (a store restart, an
    /// expired etcd lease).
    pub fn reconnected_at(&self) -> Option<Instant> {
        self.backend.reconnected_at()
    }

    /// Restores a session the store dropped while this client was idle, within `limit`;
    /// whether it did. See [`super::client::keep_alive`].
    pub fn revive(&self, limit: Duration) -> Result<bool> {
        self.backend.revive(limit)
    }

    /// Whether the session is open now; `None` when that cannot be told without waiting.
    pub fn connected_now(&self) -> Option<bool> {
        self.backend.connected_now()
    }

    /// Stores `value` under `key` (acknowledged: when this returns, the store has it).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.backend.set(key, value)
    }

    /// Stores a key that lives only as long as this client's session (liveness records).
    pub fn set_ephemeral(&self, key: &str, value: &[u8]) -> Result<()> {
        self.backend.set_ephemeral(key, value)
    }

    /// The value of `key`, or `None` if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.backend.get(key)
    }

    /// The value of `key`, waiting up to `timeout` for it to be set.
    pub fn get_wait(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.backend.get_wait(key, timeout)
    }

    /// Adds `delta` to the counter at `key` (missing: 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.backend.add(key, delta)
    }

    /// Sets `desired` if the value equals `expected` (missing equals empty); returns the value
    /// stored afterwards, so the caller compares it with `desired` to learn whether it won.
    pub fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        self.backend.compare_set(key, expected, desired)
    }

    /// Deletes `key`; returns whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        self.backend.delete(key)
    }

    /// Deletes `key` within `limit` (shorter than the client's timeout): for teardown, where
    /// a store that is already gone must not hold the caller for the whole timeout.
    pub fn delete_within(&self, key: &str, limit: Duration) -> Result<bool> {
        self.backend.delete_within(key, limit)
    }

    /// Appends `value` to `key` (creating it); returns the new length.
    pub fn append(&self, key: &str, value: &[u8]) -> Result<u64> {
        self.backend.append(key, value)
    }

    /// Whether each of `keys` exists.
    pub fn exists(&self, keys: &[String]) -> Result<Vec<bool>> {
        self.backend.exists(keys)
    }

    /// The values of `keys`, in order; with `wait`, waits that long for all to exist.
    pub fn multi_get(&self, keys: &[String], wait: Option<Duration>) -> Result<Vec<Vec<u8>>> {
        self.backend.multi_get(keys, wait)
    }

    /// Stores several keys (in one round trip where the backend allows).
    pub fn multi_set(&self, entries: &[(String, Vec<u8>)], ephemeral: bool) -> Result<()> {
        self.backend.multi_set(entries, ephemeral)
    }

    /// Keys starting with `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.backend.list(prefix)
    }

    /// Waits until all `keys` exist. With `watch = (prefix, min)`, fails with
    /// [`crate::Error::PeerGone`] as soon as fewer than `min` keys under `prefix` remain.
    pub fn wait(
        &self,
        keys: &[String],
        timeout: Duration,
        watch: Option<(&str, u64)>,
    ) -> Result<()> {
        self.backend.wait(keys, timeout, watch)
    }

    /// One round trip; returns its duration.
    pub fn ping(&self) -> Result<Duration> {
        self.backend.ping()
    }
}

#[cfg(feature = "etcd")]
fn connect_etcd(url: &str, opts: ClientOptions) -> Result<Box<dyn StoreBackend>> {
    Ok(Box::new(super::etcd::EtcdClient::connect(url, opts)?))
}

#[cfg(not(feature = "etcd"))]
fn connect_etcd(url: &str, _opts: ClientOptions) -> Result<Box<dyn StoreBackend>> {
    super::url::parse_etcd_url(url)?;
    Err(crate::error::Error::Unsupported(format!(
        "store {url}: this build has no etcd backend (cargo feature `etcd` of memfabric)"
    )))
}
