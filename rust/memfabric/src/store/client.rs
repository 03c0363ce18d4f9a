//! Blocking config store client.
//!
//! One TCP (or TLS) connection, used by one call at a time: the calling thread writes the
//! request and reads the answer itself, so a call costs one round trip and no thread hop.
//! Every call has a deadline. A lost connection is re-established with jittered backoff;
//! calls that are safe to repeat are repeated, the others report [`Error::Reconnected`].
//! Ephemeral keys this client set are published again after a reconnect, so a store that
//! restarts learns who is still alive; [`keep_alive`] makes that happen within a fraction of a
//! second for clients that make no calls of their own (a Transfer Engine that only serves, an
//! idle rank).
//!
//! [`within`] caps the deadline of every call a thread makes inside it, so an operation built
//! of several store calls (a transfer's peer lookup, a barrier) ends by its own deadline.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, TryLockError, Weak};
use std::time::{Duration, Instant};

pub use super::backend::StoreClient;
use super::proto::{split_frame, Request, Response};
use super::shm_channel::{self, ClientChannel, Outcome};
use crate::error::{Error, Result};
use crate::log::{DEBUG, INFO, WARN};
use crate::mf_log;

/// Extra time the client waits past a server-side wait deadline for the answer to arrive.
const WAIT_GRACE: Duration = Duration::from_secs(5);
/// How often [`keep_alive`] looks at the connections of the clients it keeps.
pub const KEEP_EVERY: Duration = Duration::from_millis(250);
/// Longest a keeper's reconnection attempt holds a client (its calls wait meanwhile).
const KEEP_ATTEMPT: Duration = Duration::from_millis(200);

thread_local! {
    /// The deadline set by the innermost [`within`] on this thread.
    static CALL_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with every store call this thread makes (on any client) ending by `deadline` at
/// the latest, whatever the client's own timeout: an operation made of several calls, or of a
/// call and other work, keeps its own deadline. Nested scopes keep the earlier deadline.
pub fn within<T>(deadline: Instant, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CALL_DEADLINE.with(|d| d.set(self.0));
        }
    }
    let prev = CALL_DEADLINE.with(|d| d.get());
    let capped = prev.map_or(deadline, |p| p.min(deadline));
    CALL_DEADLINE.with(|d| d.set(Some(capped)));
    let _restore = Restore(prev);
    f()
}

pub(super) fn scope_deadline() -> Option<Instant> {
    CALL_DEADLINE.with(|d| d.get())
}

/// Clients whose connection [`keep_alive`] watches.
fn kept() -> &'static Mutex<Vec<Weak<StoreClient>>> {
    static KEPT: OnceLock<Mutex<Vec<Weak<StoreClient>>>> = OnceLock::new();
    KEPT.get_or_init(|| Mutex::new(Vec::new()))
}

/// Watches `client`'s connection for as long as the client lives: when the store closes it (a
/// restart), the connection is opened again and the client's ephemeral keys are published
/// again, within about [`KEEP_EVERY`] of the store being back, even if the client's owner makes
/// no call. One thread per process serves every kept client.
pub fn keep_alive(client: &Arc<StoreClient>) {
    static THREAD: OnceLock<()> = OnceLock::new();
    {
        let mut list = kept().lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        if !list
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(client)))
        {
            list.push(Arc::downgrade(client));
        }
    }
    THREAD.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("mf-store-keeper".into())
            .spawn(|| {
                // Clients whose store is unreachable, told to the listener once until back.
                let mut down = std::collections::HashSet::<usize>::new();
                loop {
                    std::thread::sleep(KEEP_EVERY);
                    let live: Vec<Arc<StoreClient>> = {
                        let mut list = kept().lock().unwrap_or_else(|p| p.into_inner());
                        list.retain(|w| w.strong_count() > 0);
                        list.iter().filter_map(Weak::upgrade).collect()
                    };
                    for c in live {
                        let key = Arc::as_ptr(&c) as usize;
                        match c.revive(KEEP_ATTEMPT) {
                            Err(e) => {
                                mf_log!(DEBUG, "store {} still unreachable: {e}", c.url());
                                if down.insert(key) {
                                    tell_listener(&c.url(), Some(&e.to_string()));
                                }
                            }
                            Ok(true) => {
                                // Back within one tick: the connection was lost all the same.
                                if down.insert(key) {
                                    tell_listener(
                                        &c.url(),
                                        Some("the store closed the connection"),
                                    );
                                }
                                down.remove(&key);
                                tell_listener(&c.url(), None);
                            }
                            // Nothing to revive: the connection is open (a call of the
                            // client's owner may have reopened it) or a call is in progress.
                            Ok(false) => {
                                if down.contains(&key) && c.connected_now() == Some(true) {
                                    down.remove(&key);
                                    tell_listener(&c.url(), None);
                                }
                            }
                        }
                    }
                    down.retain(|k| {
                        kept()
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .iter()
                            .any(|w| w.as_ptr() as usize == *k && w.strong_count() > 0)
                    });
                }
            });
        if let Err(e) = spawned {
            mf_log!(
                WARN,
                "cannot start the store keeper thread ({e}): ephemeral keys come back only with \
                 the next call after a store restart"
            );
        }
    });
}

/// Told when a kept connection (see [`keep_alive`]) to the store at `url` is lost
/// (`Some(reason)`) and when it is back (`None`). Runs on the keeper thread.
pub type ConnectionListener = Arc<dyn Fn(&str, Option<&str>) + Send + Sync>;

fn listener() -> &'static Mutex<Option<ConnectionListener>> {
    static LISTENER: Mutex<Option<ConnectionListener>> = Mutex::new(None);
    &LISTENER
}

/// Sets (or with `None` removes) the process's [`ConnectionListener`].
pub fn set_connection_listener(l: Option<ConnectionListener>) {
    *listener().lock().unwrap_or_else(|p| p.into_inner()) = l;
}

/// Hands the event to a thread of its own, so that a slow listener never holds up the
/// keeper, which republishes every kept client's keys. Events keep their order.
fn tell_listener(url: &str, lost: Option<&str>) {
    type Event = (String, Option<String>);
    static EVENTS: OnceLock<Mutex<Option<std::sync::mpsc::Sender<Event>>>> = OnceLock::new();
    let events = EVENTS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Event>();
        let spawned = std::thread::Builder::new()
            .name("mf-store-events".into())
            .spawn(move || {
                for (url, lost) in rx {
                    let l = listener().lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if let Some(l) = l {
                        l(&url, lost.as_deref());
                    }
                }
            });
        match spawned {
            Ok(_) => Mutex::new(Some(tx)),
            Err(e) => {
                mf_log!(
                    WARN,
                    "no thread for store connection events ({e}): none are told"
                );
                Mutex::new(None)
            }
        }
    });
    if let Some(tx) = events.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = tx.send((url.to_string(), lost.map(str::to_string)));
    }
}

/// How a client connects and how long its calls may take.
#[derive(Clone)]
pub struct ClientOptions {
    /// Deadline for each call (and for connecting or reconnecting).
    pub timeout: Duration,
    /// TLS client configuration; `None` uses the process-wide setting (see [`super::tls`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Skip the process-wide TLS setting even when it is on (plaintext probes in tests).
    pub force_plaintext: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(30),
            tls: None,
            force_plaintext: false,
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    /// The same-host shortcut (see [`super::local_socket`]).
    Local(UnixStream),
}

impl Stream {
    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Plain(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.get_ref().as_raw_fd(),
            Stream::Local(s) => s.as_raw_fd(),
        }
    }

    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Stream::Tls(s) => {
                let s = s.get_ref();
                s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t))
            }
            Stream::Local(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
        }
    }

    /// Whether answers may be polled for (plaintext bytes straight from the socket).
    fn pollable(&self) -> bool {
        !matches!(self, Stream::Tls(_))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Local(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Local(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Local(s) => s.flush(),
        }
    }
}

struct Conn {
    stream: Stream,
    /// Received bytes live in `inbuf[..filled]`; the rest is room for the next read.
    inbuf: Vec<u8>,
    filled: usize,
    /// The read/write timeout currently set on the socket.
    timeout_set: Option<Duration>,
    spin: Spin,
    /// The shared-memory channel beside a local socket (see [`shm_channel`]).
    channel: Option<ClientChannel>,
    /// Calls answered over the socket, until a channel is asked for.
    socket_calls: u32,
    channel_asked: bool,
    /// A channel's answer frame.
    answer: Vec<u8>,
}

struct Inner {
    conn: Option<Conn>,
    outbuf: Vec<u8>,
    /// Ephemeral keys set through this client, re-published after a reconnect.
    ephemeral: HashMap<String, Vec<u8>>,
    ever_connected: bool,
    /// When the connection was last opened again after a loss.
    reconnected: Option<Instant>,
}

/// The address a client dials and the URL it names in messages.
struct Target {
    addr: SocketAddr,
    url: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target> {
        let addr = super::url::parse_store_url(url, false)?;
        Ok(Target {
            addr,
            url: super::url::format_store_url(addr),
        })
    }
}

/// A connection to an embedded config store server (the `tcp://` backend of
/// [`StoreClient`]). Cheap to share between threads (`Arc`); calls serialize.
pub struct EmbeddedClient {
    /// Where the store is; replaced as a whole by [`EmbeddedClient::retarget`].
    target: RwLock<Arc<Target>>,
    opts: ClientOptions,
    tls: Option<Arc<rustls::ClientConfig>>,
    inner: Mutex<Inner>,
}

/// Whether a request may be sent again after the connection broke mid-call.
fn is_idempotent(r: &Request) -> bool {
    !matches!(
        r,
        Request::Add { .. } | Request::Append { .. } | Request::CompareSet { .. }
    )
}

impl EmbeddedClient {
    /// Connects to `url` (`tcp://ip:port`), retrying until `opts.timeout` passes.
    pub fn connect(url: &str, opts: ClientOptions) -> Result<EmbeddedClient> {
        let target = Target::parse(url)?;
        let tls = match (&opts.tls, opts.force_plaintext) {
            (_, true) => None,
            (Some(t), _) => Some(t.clone()),
            (None, false) => super::tls::current()?.map(|m| m.client.clone()),
        };
        let client = EmbeddedClient {
            target: RwLock::new(Arc::new(target)),
            opts,
            tls,
            inner: Mutex::new(Inner {
                conn: None,
                outbuf: Vec::new(),
                ephemeral: HashMap::new(),
                ever_connected: false,
                reconnected: None,
            }),
        };
        {
            let deadline = Instant::now() + client.opts.timeout;
            let mut inner = client.lock();
            client.ensure_connected(&mut inner, deadline)?;
        }
        // One round trip proves the other end speaks our protocol (and accepted our TLS
        // identity), so a wrong address fails here rather than at the first real call.
        client.ping().map_err(|e| match e {
            Error::Timeout(m) | Error::Io { context: m, .. } => {
                Error::NotConnected(format!("store {url} does not answer: {m}"))
            }
            e => e,
        })?;
        Ok(client)
    }

    /// The store's URL.
    pub fn url(&self) -> String {
        self.target().url.clone()
    }

    fn target(&self) -> Arc<Target> {
        self.target
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// When this client last reconnected after losing its connection (a store restart).
    pub fn reconnected_at(&self) -> Option<Instant> {
        self.lock().reconnected
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.opts.timeout
    }

    /// How the store is reached now: "shared memory" (a local socket with its channel),
    /// "local socket", "tcp" or "tls" ("none" while disconnected).
    pub fn connection(&self) -> &'static str {
        let inner = self.lock();
        match inner
            .conn
            .as_ref()
            .map(|c| (&c.stream, c.channel.is_some()))
        {
            Some((Stream::Local(_), true)) => "shared memory",
            Some((Stream::Local(_), false)) => "local socket",
            Some((Stream::Plain(_), _)) => "tcp",
            Some((Stream::Tls(_), _)) => "tls",
            None => "none",
        }
    }

    /// This side's address of the connection: the interface through which the store (and so,
    /// presumably, the other ranks) is reached.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        let inner = self.lock();
        match &inner.conn.as_ref()?.stream {
            Stream::Plain(s) => s.local_addr().ok().map(|a| a.ip()),
            Stream::Tls(s) => s.get_ref().local_addr().ok().map(|a| a.ip()),
            // Over the local socket the store is on this host, at the address dialled (a
            // TCP connection to it would have had that local address too).
            Stream::Local(_) => Some(self.target().addr.ip()).filter(|ip| !ip.is_unspecified()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client for one call, waiting at most until `by` for a call on another thread (a
    /// long `wait`, a barrier) to end. Giving up here sends nothing, so the connection, and
    /// with it the process's ephemeral keys, stays.
    fn lock_by(&self, by: Instant) -> Result<MutexGuard<'_, Inner>> {
        let mut pause = Duration::from_micros(20);
        loop {
            match self.inner.try_lock() {
                Ok(g) => return Ok(g),
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
            let now = Instant::now();
            if now >= by {
                return Err(Error::Timeout(format!(
                    "the deadline passed while another call on this client to store {} was in \
                     progress",
                    self.url()
                )));
            }
            std::thread::sleep(pause.min(by - now));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    // ---- operations -------------------------------------------------------------------------

    /// Stores `value` under `key` (acknowledged: when this returns, the store has it).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.expect_ok(Request::Set {
            key: key.into(),
            value: value.into(),
            ephemeral: false,
        })
    }

    /// Stores a key that lives only as long as this client's connection (liveness records).
    pub fn set_ephemeral(&self, key: &str, value: &[u8]) -> Result<()> {
        self.expect_ok(Request::Set {
            key: key.into(),
            value: value.into(),
            ephemeral: true,
        })
    }

    /// The value of `key`, or `None` if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.call(
            Request::Get {
                key: key.into(),
                wait_ms: 0,
            },
            None,
        )? {
            Response::Value(v) => Ok(Some(v)),
            Response::NotFound(_) => Ok(None),
            r => Err(unexpected(r)),
        }
    }

    /// The value of `key`, waiting up to `timeout` for it to be set.
    pub fn get_wait(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        match self.call(
            Request::Get {
                key: key.into(),
                wait_ms: wait_ms(timeout),
            },
            Some(timeout),
        )? {
            Response::Value(v) => Ok(v),
            Response::Timeout | Response::NotFound(_) => Err(Error::Timeout(format!(
                "key {key:?} did not appear in store {} within {timeout:?}",
                self.url()
            ))),
            r => Err(unexpected(r)),
        }
    }

    /// Adds `delta` to the counter at `key` (missing: 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        match self.call(
            Request::Add {
                key: key.into(),
                delta,
            },
            None,
        )? {
            Response::Int(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    /// Sets `desired` if the value equals `expected` (missing equals empty); returns the value
    /// stored afterwards, so the caller compares it with `desired` to learn whether it won.
    pub fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        match self.call(
            Request::CompareSet {
                key: key.into(),
                expected: expected.into(),
                desired: desired.into(),
            },
            None,
        )? {
            Response::Value(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    /// Deletes `key`; returns whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        self.lock().ephemeral.remove(key);
        match self.call(Request::Delete { key: key.into() }, None)? {
            Response::Int(v) => Ok(v != 0),
            r => Err(unexpected(r)),
        }
    }

    /// Appends `value` to `key` (creating it); returns the new length.
    pub fn append(&self, key: &str, value: &[u8]) -> Result<u64> {
        match self.call(
            Request::Append {
                key: key.into(),
                value: value.into(),
            },
            None,
        )? {
            Response::Int(v) => Ok(v as u64),
            r => Err(unexpected(r)),
        }
    }

    /// Whether each of `keys` exists.
    pub fn exists(&self, keys: &[String]) -> Result<Vec<bool>> {
        match self.call(
            Request::Exists {
                keys: keys.to_vec(),
            },
            None,
        )? {
            Response::Bools(b) if b.len() == keys.len() => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    /// The values of `keys`, in order; with `wait`, waits that long for all to exist.
    pub fn multi_get(&self, keys: &[String], wait: Option<Duration>) -> Result<Vec<Vec<u8>>> {
        let wait_ms = wait.map(wait_ms).unwrap_or(0);
        match self.call(
            Request::MultiGet {
                keys: keys.to_vec(),
                wait_ms,
            },
            wait,
        )? {
            Response::Values(v) if v.len() == keys.len() => Ok(v),
            Response::NotFound(k) => Err(Error::NotExist(format!(
                "key {k:?} in store {}",
                self.url()
            ))),
            Response::Timeout => Err(Error::Timeout(format!(
                "keys did not all appear in store {} within {:?}",
                self.url(),
                wait.unwrap_or_default()
            ))),
            r => Err(unexpected(r)),
        }
    }

    /// Stores several keys in one round trip.
    pub fn multi_set(&self, entries: &[(String, Vec<u8>)], ephemeral: bool) -> Result<()> {
        self.expect_ok(Request::MultiSet {
            entries: entries.to_vec(),
            ephemeral,
        })
    }

    /// Keys starting with `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        match self.call(
            Request::List {
                prefix: prefix.into(),
            },
            None,
        )? {
            Response::Keys(k) => Ok(k),
            r => Err(unexpected(r)),
        }
    }

    /// Waits until all `keys` exist. With `watch = (prefix, min)`, fails with
    /// [`Error::PeerGone`] as soon as fewer than `min` keys under `prefix` remain.
    pub fn wait(
        &self,
        keys: &[String],
        timeout: Duration,
        watch: Option<(&str, u64)>,
    ) -> Result<()> {
        let req = Request::Wait {
            keys: keys.to_vec(),
            timeout_ms: wait_ms(timeout),
            watch: watch.map(|(p, n)| (p.to_string(), n)),
        };
        match self.call(req, Some(timeout))? {
            Response::Ok => Ok(()),
            Response::Timeout => Err(Error::Timeout(format!(
                "waiting for {} in store {} for {timeout:?}",
                describe_keys(keys),
                self.url()
            ))),
            Response::Aborted(why) => Err(Error::PeerGone(why)),
            r => Err(unexpected(r)),
        }
    }

    /// One round trip; returns its duration.
    pub fn ping(&self) -> Result<Duration> {
        let t = Instant::now();
        self.expect_ok(Request::Ping)?;
        Ok(t.elapsed())
    }

    // ---- transport --------------------------------------------------------------------------

    fn expect_ok(&self, req: Request) -> Result<()> {
        match self.call(req, None)? {
            Response::Ok => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Sends `req` and reads its answer. `server_wait` is how long the server may hold it.
    /// A call that waits on the server is bounded by its own wait, not the client's timeout:
    /// `get(key, timeout=0.5)` gives up after about half a second when the store is gone.
    fn call(&self, req: Request, server_wait: Option<Duration>) -> Result<Response> {
        match server_wait {
            Some(w) => self.call_within_grace(req, w, WAIT_GRACE),
            None => self.call_within_grace(req, self.opts.timeout, Duration::ZERO),
        }
    }

    /// Deletes `key` within `limit` (shorter than the client's timeout): for teardown, where
    /// a store that is already gone must not hold the caller for the whole timeout.
    pub fn delete_within(&self, key: &str, limit: Duration) -> Result<bool> {
        self.lock().ephemeral.remove(key);
        match self.call_within(Request::Delete { key: key.into() }, limit)? {
            Response::Int(v) => Ok(v != 0),
            r => Err(unexpected(r)),
        }
    }

    fn call_within(&self, req: Request, limit: Duration) -> Result<Response> {
        self.call_within_grace(req, limit, Duration::ZERO)
    }

    /// The call ends by `limit`, or `grace` later once the request was sent: an answer that
    /// the server gives at the end of its wait needs time to arrive, but a store that cannot
    /// be reached is given up on at `limit`.
    fn call_within_grace(
        &self,
        req: Request,
        limit: Duration,
        grace: Duration,
    ) -> Result<Response> {
        let started = Instant::now();
        let cap = |t: Instant| scope_deadline().map_or(t, |d| d.min(t));
        let deadline = cap(started + limit + grace);
        let connect_by = cap(started + limit);
        if started >= connect_by {
            // Before anything is sent: the connection stays, and with it this client's
            // ephemeral keys.
            return Err(Error::Timeout(format!(
                "the deadline passed before the call to store {} started",
                self.url()
            )));
        }
        // Ephemeral keys are recorded (for publishing again after a reconnect or a move) under
        // the same lock as the call that set them: a move in between would miss them.
        let ephemeral: Vec<(String, Vec<u8>)> = match &req {
            Request::Set {
                key,
                value,
                ephemeral: true,
            } => vec![(key.clone(), value.clone())],
            Request::MultiSet {
                entries,
                ephemeral: true,
            } => entries.clone(),
            _ => Vec::new(),
        };
        let mut inner = self.lock_by(connect_by)?;
        let inner = &mut *inner;
        inner.outbuf.clear();
        req.encode(&mut inner.outbuf)?;
        let retry_safe = is_idempotent(&req);
        let channel_ok = shm_channel::served_by_channel(&req);
        loop {
            self.ensure_connected(inner, connect_by)?;
            let conn = inner
                .conn
                .as_mut()
                .ok_or_else(|| Error::NotConnected(self.url()))?;
            match exchange_any(conn, &inner.outbuf, deadline, channel_ok) {
                Ok(resp) => {
                    if conn.wants_channel() {
                        // After the answer: a failure here costs this connection (the next
                        // call reconnects), not this call.
                        if let Err(e) = conn.open_channel(deadline) {
                            mf_log!(WARN, "store {}: no shared-memory channel: {e}", self.url());
                            inner.conn = None;
                        }
                    }
                    if let Response::BadRequest(msg) = resp {
                        return Err(Error::InvalidParam(format!(
                            "store {} refused the request: {msg}",
                            self.url()
                        )));
                    }
                    if matches!(resp, Response::Ok) {
                        inner.ephemeral.extend(ephemeral);
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    inner.conn = None;
                    let timed_out = Instant::now() >= deadline;
                    if timed_out || matches!(e, Error::Protocol(_) | Error::Tls(_)) {
                        return Err(if timed_out {
                            Error::Timeout(format!(
                                "no answer from store {} within {:?}: {e}",
                                self.url(),
                                deadline - started
                            ))
                        } else {
                            e
                        });
                    }
                    mf_log!(
                        WARN,
                        "connection to store {} lost ({e}); reconnecting",
                        self.url()
                    );
                    if !retry_safe {
                        // The request may or may not have been applied; reconnect for the next
                        // call, but let the caller decide about this one.
                        let _ = self.ensure_connected(inner, connect_by);
                        return Err(Error::Reconnected(format!(
                            "store {} connection broke during the call ({e})",
                            self.url()
                        )));
                    }
                }
            }
        }
    }

    fn ensure_connected(&self, inner: &mut Inner, deadline: Instant) -> Result<()> {
        if inner.conn.is_some() {
            return Ok(());
        }
        let mut backoff = Duration::from_millis(5);
        let mut attempt = 0u32;
        let mut last_err;
        loop {
            attempt += 1;
            let again = inner.ever_connected;
            // A store on its way down may still accept and then reset the connection while
            // the ephemeral keys are published again: that attempt failed like any other.
            match self
                .open(deadline)
                .and_then(|conn| self.adopt(inner, conn, deadline))
            {
                Ok(()) => {
                    if again {
                        mf_log!(
                            INFO,
                            "reconnected to store {} after {attempt} attempt(s)",
                            self.url()
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    if !e.is_temporary() && !matches!(e, Error::Io { .. }) {
                        return Err(e);
                    }
                    last_err = e;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::NotConnected(format!(
                    "cannot reach config store {} after {attempt} attempt(s): {last_err}",
                    self.url()
                )));
            }
            let sleep = jitter(backoff).min(deadline - now);
            std::thread::sleep(sleep);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Makes `conn` this client's connection; after a reconnect, first publishes the
    /// client's ephemeral keys on it again.
    fn adopt(&self, inner: &mut Inner, mut conn: Conn, deadline: Instant) -> Result<()> {
        if inner.ever_connected && !inner.ephemeral.is_empty() {
            let entries: Vec<_> = inner
                .ephemeral
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut buf = Vec::new();
            Request::MultiSet {
                entries,
                ephemeral: true,
            }
            .encode(&mut buf)?;
            match exchange(&mut conn, &buf, deadline)? {
                Response::Ok => {}
                other => {
                    return Err(Error::Protocol(format!(
                        "store {} did not take this client's ephemeral keys back: {other:?}",
                        self.url()
                    )))
                }
            }
        }
        if inner.ever_connected {
            inner.reconnected = Some(Instant::now());
        }
        inner.ever_connected = true;
        inner.conn = Some(conn);
        Ok(())
    }

    /// Whether the connection is open now; `None` while a call holds the client.
    pub fn connected_now(&self) -> Option<bool> {
        let open = |inner: &Inner| inner.conn.as_ref().is_some_and(Conn::is_open);
        match self.inner.try_lock() {
            Ok(g) => Some(open(&g)),
            Err(TryLockError::Poisoned(p)) => Some(open(&p.into_inner())),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Reopens a connection the store closed and publishes this client's ephemeral keys again,
    /// with one connection attempt of at most `limit`. Returns whether it reconnected. Does
    /// nothing while a call is in progress (that call reconnects by itself), while the
    /// connection is open, or when the client holds no ephemeral keys. See [`keep_alive`].
    pub fn revive(&self, limit: Duration) -> Result<bool> {
        let mut guard = match self.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        let inner = &mut *guard;
        if inner.ephemeral.is_empty() || inner.conn.as_ref().is_some_and(Conn::is_open) {
            return Ok(false);
        }
        inner.conn = None;
        let deadline = Instant::now() + limit;
        let conn = self.open(deadline)?;
        self.adopt(inner, conn, deadline)?;
        mf_log!(
            INFO,
            "reconnected to store {} and published {} ephemeral key(s) again",
            self.url(),
            inner.ephemeral.len()
        );
        Ok(true)
    }

    /// Moves this client to the store at `url` (a store restarted at another address): connects
    /// there within the client's timeout, checks that it answers, then makes it the client's
    /// store and publishes the client's ephemeral keys there, as after a reconnect. A call in
    /// progress on the client ends first. On any error nothing changed: the client stays with
    /// its current store.
    pub fn retarget(&self, url: &str) -> Result<()> {
        let target = Target::parse(url)?;
        let deadline = Instant::now() + self.opts.timeout;
        let mut conn = self.open_at(&target, deadline).map_err(|e| {
            Error::NotConnected(format!(
                "cannot reach config store {} (still using {}): {e}",
                target.url,
                self.url()
            ))
        })?;
        let mut ping = Vec::new();
        Request::Ping.encode(&mut ping)?;
        match exchange(&mut conn, &ping, deadline) {
            Ok(Response::Ok) => {}
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "{} answered a ping with {other:?}: not a config store (still using {})",
                    target.url,
                    self.url()
                )))
            }
            Err(e) => {
                return Err(Error::NotConnected(format!(
                    "config store {} does not answer (still using {}): {e}",
                    target.url,
                    self.url()
                )))
            }
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        // A call in progress held the lock until now: publishing gets a deadline of its own.
        let deadline = Instant::now() + self.opts.timeout;
        // Published before the switch: a failure leaves the old store in place.
        self.adopt(inner, conn, deadline)?;
        let old = std::mem::replace(
            &mut *self.target.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(target),
        );
        mf_log!(
            INFO,
            "store client moved from {} to {} ({} ephemeral key(s) published there)",
            old.url,
            self.url(),
            inner.ephemeral.len()
        );
        Ok(())
    }

    fn open(&self, deadline: Instant) -> Result<Conn> {
        self.open_at(&self.target(), deadline)
    }

    fn open_at(&self, target: &Target, deadline: Instant) -> Result<Conn> {
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if self.tls.is_none() {
            if let Some(local) = super::local_socket::connect(target.addr) {
                return Ok(Conn::new(Stream::Local(local)));
            }
        }
        let tcp = TcpStream::connect_timeout(&target.addr, remaining.min(Duration::from_secs(5)))
            .map_err(|e| Error::io(format!("connect to store {}", target.url), e))?;
        let _ = tcp.set_nodelay(true);
        // The server drops a session whose keepalive probes go unanswered (a network
        // partition) and deletes its ephemeral keys. This end must learn of it as well, or a
        // client that makes no call never publishes them again: its own probes turn the silent
        // connection into an error that the next call or the keeper sees.
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&crate::net::keepalive());
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::IpAddress(target.addr.ip().into());
                let conn = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| Error::Tls(format!("client setup for {}: {e}", target.url)))?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                s.sock.set_read_timeout(Some(remaining)).ok();
                s.sock.set_write_timeout(Some(remaining)).ok();
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock).map_err(|e| {
                        Error::Tls(format!("handshake with store {} failed: {e}", target.url))
                    })?;
                }
                Stream::Tls(Box::new(s))
            }
        };
        Ok(Conn::new(stream))
    }
}

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            inbuf: vec![0; 8192],
            filled: 0,
            timeout_set: None,
            spin: Spin::default(),
            channel: None,
            socket_calls: 0,
            channel_asked: false,
            answer: Vec::new(),
        }
    }

    /// Whether the store has not closed this connection (never blocks).
    fn is_open(&self) -> bool {
        socket_open(self.stream.fd())
    }

    /// Whether this connection should ask for a shared-memory channel now: a local socket
    /// that has carried enough calls.
    fn wants_channel(&self) -> bool {
        matches!(self.stream, Stream::Local(_))
            && !self.channel_asked
            && self.socket_calls >= shm_channel::CALLS_BEFORE_CHANNEL
            && !shm_channel::disabled()
    }

    /// Asks the store for a channel (once per connection); bounded by `deadline`.
    fn open_channel(&mut self, deadline: Instant) -> Result<()> {
        self.channel_asked = true;
        let Stream::Local(sock) = &self.stream else {
            return Ok(());
        };
        if self.filled != 0 {
            return Err(Error::Protocol("unread bytes from the store".into()));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Error::Timeout(
                "deadline passed before the channel request".into(),
            ));
        }
        sock.set_read_timeout(Some(remaining))
            .and_then(|_| sock.set_write_timeout(Some(remaining)))
            .map_err(|e| Error::io("store socket", e))?;
        self.timeout_set = Some(remaining);
        self.channel = ClientChannel::request(sock)?;
        Ok(())
    }
}

/// Whether the peer has not closed the socket `fd`. The server only ever answers, so between
/// calls anything readable is its end of file (or a TLS alert or ticket, which the next call
/// deals with); never blocks.
fn socket_open(fd: std::os::fd::RawFd) -> bool {
    let mut b = 0u8;
    // SAFETY: one byte into a local; MSG_PEEK leaves the stream as it is.
    let rc = unsafe {
        libc::recv(
            fd,
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if rc >= 0 {
        return rc > 0;
    }
    matches!(
        std::io::Error::last_os_error().kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

/// Sends one request and reads its answer, through the connection's channel when it has one
/// and the request is one a channel serves, else over the socket.
fn exchange_any(
    conn: &mut Conn,
    frame: &[u8],
    deadline: Instant,
    channel_ok: bool,
) -> Result<Response> {
    if channel_ok {
        if let Some(ch) = conn.channel.as_mut() {
            let sent = Instant::now();
            let fd = conn.stream.fd();
            let spin = conn.spin.budget();
            match ch.call(frame, &mut conn.answer, spin, deadline, || socket_open(fd))? {
                Outcome::Answered => {
                    conn.spin.observe(sent.elapsed());
                    return match split_frame(&conn.answer)? {
                        Some((kind, body, used)) if used == conn.answer.len() => {
                            Response::decode(kind, body)
                        }
                        _ => Err(Error::Protocol(
                            "a malformed answer in the store's channel".into(),
                        )),
                    };
                }
                Outcome::UseSocket => {}
            }
        }
    }
    conn.socket_calls = conn.socket_calls.saturating_add(1);
    exchange(conn, frame, deadline)
}

/// Writes one request frame and reads one response frame before `deadline`.
fn exchange(conn: &mut Conn, frame: &[u8], deadline: Instant) -> Result<Response> {
    let remaining = |what: &str| {
        let r = deadline.saturating_duration_since(Instant::now());
        if r.is_zero() {
            Err(Error::Timeout(format!("deadline passed while {what}")))
        } else {
            Ok(r)
        }
    };
    let r = remaining("sending")?;
    set_timeouts(conn, r)?;
    conn.stream
        .write_all(frame)
        .map_err(|e| Error::io("send to store", e))?;
    conn.stream
        .flush()
        .map_err(|e| Error::io("send to store", e))?;
    let sent = Instant::now();
    let mut spun = false;
    let result = loop {
        let data = &conn.inbuf[..conn.filled];
        if data.len() >= 2 && matches!(data[0], 0x15 | 0x16) && data[1] == 0x03 {
            // A TLS record (alert or handshake) where a store frame should be.
            return Err(Error::Tls(
                "the store speaks TLS but this client does not: enable it with set_conf_store_tls"
                    .into(),
            ));
        }
        if let Some((kind, body, used)) = split_frame(data)? {
            let resp = Response::decode(kind, body)?;
            conn.inbuf.copy_within(used..conn.filled, 0);
            conn.filled -= used;
            break resp;
        }
        // Grow to hold the whole frame once its length is known; the buffer only ever grows,
        // so each byte of it is zeroed once per connection, not once per read.
        let want = if data.len() >= 4 {
            u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize + 4
        } else {
            conn.filled + 4096
        };
        set_timeouts(conn, remaining("waiting for the store's answer")?)?;
        if conn.inbuf.len() < want.max(conn.filled + 4096) {
            conn.inbuf.resize(want.max(conn.filled + 4096), 0);
        }
        let n = match (spun, &conn.stream) {
            (false, s) if s.pollable() && conn.spin.budget() > Duration::ZERO => {
                spun = true;
                spin_recv(s.fd(), &mut conn.inbuf[conn.filled..], conn.spin.budget())?
            }
            _ => None,
        };
        let n = match n {
            Some(n) => n,
            None => conn
                .stream
                .read(&mut conn.inbuf[conn.filled..])
                .map_err(|e| Error::io("receive from store", e))?,
        };
        if n == 0 {
            return Err(Error::io(
                "receive from store",
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        conn.filled += n;
    };
    conn.spin.observe(sent.elapsed());
    Ok(result)
}

/// Adaptive spin-then-block for the answer. A thread that blocks in `read` pays a scheduler
/// wake-up (several microseconds on a VM, a large part of a loopback round trip); polling for
/// a short while first saves it when answers come fast. Round trips are tracked with a moving
/// average: when they are slower than the spin limit (a loaded server, many clients sharing
/// the cores) the client stops spinning and simply blocks, so it never burns CPU in vain.
#[derive(Default)]
struct Spin {
    avg_rtt_ns: u64,
}

impl Spin {
    const LIMIT: Duration = Duration::from_micros(60);

    fn budget(&self) -> Duration {
        if self.avg_rtt_ns == 0 || self.avg_rtt_ns > Self::LIMIT.as_nanos() as u64 {
            // Unknown or slow: block. Probe again now and then by decaying the average.
            Duration::ZERO
        } else {
            Self::LIMIT
        }
    }

    fn observe(&mut self, rtt: Duration) {
        let ns = (rtt.as_nanos() as u64).min(10_000_000);
        self.avg_rtt_ns = if self.avg_rtt_ns == 0 {
            ns
        } else {
            (self.avg_rtt_ns * 7 + ns) / 8
        };
    }
}

/// Polls the socket without blocking for up to `budget`; `Ok(None)` when nothing arrived.
fn spin_recv(fd: std::os::fd::RawFd, buf: &mut [u8], budget: Duration) -> Result<Option<usize>> {
    let start = Instant::now();
    loop {
        // SAFETY: `buf` is a valid writable slice for its whole length; recv writes at most
        // that many bytes into it.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {}
            _ => return Err(Error::io("receive from store", err)),
        }
        let waited = start.elapsed();
        if waited >= budget {
            return Ok(None);
        }
        super::server::pause(waited);
    }
}

/// Bounds the socket's blocking reads and writes by `remaining`. Skips the two system calls
/// when the timeout already set is within 5% of it (the common case: back-to-back calls with
/// the same per-call timeout), so a call overshoots its deadline by at most 5%.
fn set_timeouts(conn: &mut Conn, remaining: Duration) -> Result<()> {
    if let Some(cur) = conn.timeout_set {
        let diff = cur.abs_diff(remaining);
        if diff <= remaining / 20 {
            return Ok(());
        }
    }
    conn.stream
        .set_timeouts(Some(remaining))
        .map_err(|e| Error::io("store socket", e))?;
    conn.timeout_set = Some(remaining);
    Ok(())
}

fn wait_ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

fn describe_keys(keys: &[String]) -> String {
    match keys {
        [] => "nothing".into(),
        [k] => format!("key {k:?}"),
        [k, rest @ ..] => format!("key {k:?} and {} more", rest.len()),
    }
}

fn unexpected(r: Response) -> Error {
    match r {
        Response::BadRequest(m) => Error::InvalidParam(m),
        r => Error::Protocol(format!("unexpected answer from store: {r:?}")),
    }
}

/// Full jitter: a random duration in [d/2, d], so that a thousand clients retrying after a
/// store restart do not arrive in lockstep.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let frac = (h.finish() % 1000) as u32;
    d / 2 + d / 2 * frac / 1000
}
