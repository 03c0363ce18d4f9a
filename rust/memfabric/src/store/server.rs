//! The config store server: an ordered in-memory map served over TCP (optionally TLS).
//!
//! Each connection is one client session, handled by one task that answers its frames in
//! order. Keys set as ephemeral belong to the session and vanish when its connection closes:
//! that is how a dead rank is noticed (the kernel closes a killed process's sockets at once;
//! TCP keepalive catches a vanished host within seconds).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Bound;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::proto::{split_frame, Request, Response, HEADER};
use super::shm_channel::{send_with_fds, ChannelLease, Grant, Hub};
use crate::error::{Error, Result};
use crate::log::{DEBUG, INFO, WARN};
use crate::mf_log;

/// Longest wait a client may ask for (a day); longer asks are clamped.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

struct Entry {
    value: Vec<u8>,
    /// Session that owns the key (0: none, the key outlives its writer).
    owner: u64,
}

#[derive(Default)]
struct State {
    map: BTreeMap<String, Entry>,
    /// Waiters for a key that does not exist yet. Removed when the key is written; waiters hold
    /// their own Arc and register again if they still need to wait.
    key_waiters: HashMap<String, Arc<Notify>>,
}

struct Shared {
    state: Mutex<State>,
    /// Fired whenever a session's ephemeral keys are removed, for `Wait { watch }`.
    sessions_changed: Notify,
    next_session: AtomicU64,
    /// Client connections being served now.
    open_sessions: AtomicU64,
    /// Told the id of each client connection that ended (see [`StoreServer::on_session_end`]).
    session_end: Mutex<Option<SessionEndHook>>,
    /// The shared-memory channels, started by the first client that asks for one.
    channels: Mutex<Channels>,
}

enum Channels {
    NotStarted,
    Running(Arc<Hub>),
    /// The server stopped (or the hub could not start): no new channels.
    Closed(String),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this file; the map is still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_channels(&self) -> MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A channel for one session, starting the hub on first use.
    fn grant_channel(self: &Arc<Self>) -> Result<Grant> {
        let mut channels = self.lock_channels();
        if let Channels::NotStarted = *channels {
            // The hub thread holds the state weakly: the server's end frees it.
            let weak = Arc::downgrade(self);
            let handler = Box::new(move |req: Request| match weak.upgrade() {
                Some(shared) => shared.handle_for_channel(req),
                None => Some(Response::BadRequest("the store is stopping".into())),
            });
            *channels = match Hub::start(handler) {
                Ok(hub) => Channels::Running(hub),
                Err(e) => Channels::Closed(e.to_string()),
            };
        }
        match &*channels {
            Channels::Running(hub) => hub.open(),
            Channels::Closed(why) => Err(Error::NoResources(format!("no store channels: {why}"))),
            Channels::NotStarted => Err(Error::NoResources("no store channels".into())),
        }
    }

    /// Encodes the answer to a get of `key` straight from the map, without copying the value
    /// first, when the key exists; whether it did.
    fn encode_get(&self, key: &str, out: &mut Vec<u8>) -> bool {
        match self.lock().map.get(key) {
            Some(e) => {
                Response::encode_value(&e.value, out);
                true
            }
            None => false,
        }
    }

    /// Answers a request from a shared-memory channel; `None` (nothing done) for what needs
    /// the session (a wait that would have to wait, an ephemeral set, a wait for members) and
    /// for a value larger than the channel.
    fn handle_for_channel(&self, req: Request) -> Option<Response> {
        match req {
            Request::Get { key, wait_ms } => match self.lock().map.get(&key) {
                // Too large for the channel: the socket carries it, without a copy made here.
                Some(e) if e.value.len() > super::shm_channel::AREA => None,
                Some(e) => Some(Response::Value(super::proto::value_copy(&e.value))),
                None if wait_ms > 0 => None,
                None => Some(Response::NotFound(key)),
            },
            Request::MultiGet { keys, wait_ms } if wait_ms > 0 => {
                let st = self.lock();
                keys.iter()
                    .map(|k| st.map.get(k).map(|e| e.value.clone()))
                    .collect::<Option<Vec<_>>>()
                    .map(Response::Values)
            }
            Request::Set { ephemeral, .. } | Request::MultiSet { ephemeral, .. } if ephemeral => {
                None
            }
            Request::Wait { .. } | Request::OpenChannel => None,
            req => Some(self.handle_immediate(req)),
        }
    }

    /// Answers a request that neither waits nor touches a session's own keys; other kinds are
    /// answered BadRequest.
    fn handle_immediate(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response::Ok,
            Request::Set { key, value, .. } => {
                self.lock().put(key, value, 0);
                Response::Ok
            }
            Request::Get { key, .. } => match self.lock().map.get(&key) {
                Some(e) => Response::Value(super::proto::value_copy(&e.value)),
                None => Response::NotFound(key),
            },
            Request::Add { key, delta } => {
                let mut st = self.lock();
                let current = match st.map.get(&key) {
                    None => 0,
                    Some(e) => match std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                    {
                        Some(v) => v,
                        None => {
                            return Response::BadRequest(format!(
                                "value of {key:?} is not an integer counter"
                            ))
                        }
                    },
                };
                let Some(next) = current.checked_add(delta) else {
                    return Response::BadRequest(format!("counter {key:?} would overflow"));
                };
                st.put(key, next.to_string().into_bytes(), 0);
                Response::Int(next)
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let mut st = self.lock();
                let matches = match st.map.get(&key) {
                    Some(e) => e.value == expected,
                    None => expected.is_empty(),
                };
                if matches {
                    st.put(key, desired.clone(), 0);
                    Response::Value(desired)
                } else {
                    // Missing key with a non-empty expectation: answer the expectation's
                    // opposite, as TCPStore does, so the caller sees it did not match.
                    Response::Value(
                        st.map
                            .get(&key)
                            .map(|e| e.value.clone())
                            .unwrap_or_default(),
                    )
                }
            }
            Request::Delete { key } => {
                let existed = self.lock().map.remove(&key).is_some();
                if existed {
                    // A member that leaves deletes its key: watchers must learn of it too.
                    self.sessions_changed.notify_waiters();
                }
                Response::Int(existed as i64)
            }
            Request::Append { key, value } => {
                let mut st = self.lock();
                let len = match st.map.get_mut(&key) {
                    Some(e) => {
                        if e.value.len() + value.len() > super::proto::MAX_FRAME - 64 {
                            return Response::BadRequest(format!(
                                "value of {key:?} would exceed the frame limit"
                            ));
                        }
                        e.value.extend_from_slice(&value);
                        let len = e.value.len();
                        if let Some(n) = st.key_waiters.remove(&key) {
                            n.notify_waiters();
                        }
                        len
                    }
                    None => {
                        let len = value.len();
                        st.put(key, value, 0);
                        len
                    }
                };
                Response::Int(len as i64)
            }
            Request::Exists { keys } => {
                let st = self.lock();
                Response::Bools(keys.iter().map(|k| st.map.contains_key(k)).collect())
            }
            Request::MultiGet { keys, .. } => {
                let st = self.lock();
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    match st.map.get(&k) {
                        Some(e) => out.push(e.value.clone()),
                        None => return Response::NotFound(k),
                    }
                }
                Response::Values(out)
            }
            Request::MultiSet { entries, .. } => {
                let mut st = self.lock();
                for (k, v) in entries {
                    st.put(k, v, 0);
                }
                Response::Ok
            }
            Request::List { prefix } => {
                let st = self.lock();
                let keys = st
                    .map
                    .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                Response::Keys(keys)
            }
            Request::Wait { .. } | Request::OpenChannel => {
                Response::BadRequest("this request needs a session".into())
            }
        }
    }
}

impl State {
    fn put(&mut self, key: String, value: Vec<u8>, owner: u64) {
        if let Some(n) = self.key_waiters.remove(&key) {
            n.notify_waiters();
        }
        if let Some(old) = self.map.insert(key, Entry { value, owner }) {
            super::proto::recycle(old.value);
        }
    }

    fn count_prefix(&self, prefix: &str) -> u64 {
        self.map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .count() as u64
    }

    fn first_missing<'k>(&self, keys: &'k [String]) -> Option<&'k String> {
        keys.iter().find(|k| !self.map.contains_key(k.as_str()))
    }
}

/// A running store server. Dropping it stops the server and closes every connection.
/// Called with the id of a client connection that ended (on a blocking-pool thread, so a slow
/// hook holds up no connection).
pub type SessionEndHook = Arc<dyn Fn(u64) + Send + Sync>;

/// What a server holds now (for status reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerStats {
    /// Client connections being served.
    pub connections: u64,
    /// Keys stored.
    pub keys: u64,
}

pub struct StoreServer {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    shared: Arc<Shared>,
    /// Disconnected once every accept loop has ended, its listener closed with it.
    listeners_closed: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long dropping a server waits for its listeners to close, so that the address can be
/// served again at once.
const LISTENER_CLOSE_WAIT: Duration = Duration::from_secs(2);

impl StoreServer {
    /// Binds `addr` (port 0 picks one) and starts serving on the shared runtime.
    pub fn start(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Result<StoreServer> {
        let rt = crate::runtime::runtime()?;
        crate::runtime::raise_fd_limit();
        let std_listener = crate::net::bind_listener(addr, "config store", None)?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| Error::io("store listener address", e))?;
        let _enter = rt.enter();
        let listener =
            TcpListener::from_std(std_listener).map_err(|e| Error::io("store listener", e))?;
        let (tx, rx) = watch::channel(false);
        // Each accept loop holds a sender until it returns, dropping its listener.
        let (open_tx, listeners_closed) = std::sync::mpsc::channel::<()>();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            sessions_changed: Notify::new(),
            next_session: AtomicU64::new(1),
            open_sessions: AtomicU64::new(0),
            session_end: Mutex::new(None),
            channels: Mutex::new(Channels::NotStarted),
        });
        // The same-host shortcut: plaintext only (see `local_socket`).
        if tls.is_none() {
            if let Some(local) = super::local_socket::bind(addr) {
                match tokio::net::UnixListener::from_std(local) {
                    Ok(l) => {
                        let open = open_tx.clone();
                        let loop_ = accept_local_loop(l, shared.clone(), rx.clone());
                        rt.spawn(async move {
                            loop_.await;
                            drop(open);
                        });
                    }
                    Err(e) => mf_log!(DEBUG, "config store {addr}: no local socket ({e})"),
                }
            }
        }
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let loop_ = accept_loop(listener, shared.clone(), acceptor, rx);
        rt.spawn(async move {
            loop_.await;
            drop(open_tx);
        });
        mf_log!(INFO, "config store listening on {addr}");
        Ok(StoreServer {
            addr,
            shutdown: tx,
            shared,
            listeners_closed: Mutex::new(listeners_closed),
        })
    }

    /// Starts a server at `url` (with the process-wide TLS setting) when that address is on
    /// this host and free; `Ok(None)` when it is served already or belongs to another host,
    /// and for an `etcd://` URL (etcd serves it).
    pub fn start_if_free(url: &str) -> Result<Option<StoreServer>> {
        if super::url::is_etcd_url(url) {
            super::url::parse_etcd_url(url)?;
            return Ok(None);
        }
        let addr = super::url::parse_store_url(url, false)?;
        let tls = super::tls::current()?.map(|m| m.server.clone());
        match StoreServer::start(addr, tls) {
            Ok(s) => Ok(Some(s)),
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                mf_log!(INFO, "config store {url} is served elsewhere; using it");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients use to reach this server.
    pub fn url(&self) -> String {
        super::url::format_store_url(self.addr)
    }

    /// Sets (or with `None` removes) the hook told of each client connection that ends, after
    /// its ephemeral keys are gone.
    pub fn on_session_end(&self, hook: Option<SessionEndHook>) {
        *self
            .shared
            .session_end
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Connections and keys now.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.shared.open_sessions.load(Ordering::Relaxed),
            keys: self.shared.lock().map.len() as u64,
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        let channels = std::mem::replace(
            &mut *self.shared.lock_channels(),
            Channels::Closed("the store stopped".into()),
        );
        if let Channels::Running(hub) = channels {
            hub.stop();
        }
        // Until the listeners are closed the address is still taken: a store started again at
        // it right after this returns would fail to bind.
        let closed = self
            .listeners_closed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _ = closed.recv_timeout(LISTENER_CLOSE_WAIT);
        mf_log!(INFO, "config store on {} stopped", self.addr);
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, peer)) =
        crate::net::accept(&listener, &mut shutdown, "config store").await
    {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let peer = peer.to_string();
            match tls {
                None => run_session(shared, Ok(stream), shutdown, peer).await,
                Some(acc) => {
                    let hs =
                        tokio::time::timeout(Duration::from_secs(10), acc.accept(stream)).await;
                    let stream = match hs {
                        Ok(Ok(tls_stream)) => Ok(tls_stream),
                        Ok(Err(e)) => Err(Error::Tls(format!("handshake with {peer} failed: {e}"))),
                        Err(_) => Err(Error::Tls(format!("handshake with {peer} timed out"))),
                    };
                    run_session(shared, stream, shutdown, peer).await
                }
            }
        });
    }
}

/// Serves same-host clients on the listener's local socket until `shutdown` fires.
async fn accept_local_loop(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off, connections open stay served.
                    mf_log!(WARN, "config store local socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(run_session(
            shared,
            Ok(stream),
            shutdown,
            "the local socket".into(),
        ));
    }
}

/// One client connection from accept to end (`stream` is the error of a failed handshake):
/// serves it, then releases what its session owned.
async fn run_session<S: AsyncRead + AsyncWrite + Unpin + PollNow>(
    shared: Arc<Shared>,
    stream: Result<S>,
    shutdown: watch::Receiver<bool>,
    peer: String,
) {
    let session = shared.next_session.fetch_add(1, Ordering::Relaxed);
    shared.open_sessions.fetch_add(1, Ordering::Relaxed);
    let mut conn = Session {
        shared: shared.clone(),
        id: session,
        owned: HashSet::new(),
        channel: None,
    };
    let result = match stream {
        Ok(s) => conn.serve(s, shutdown).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        mf_log!(WARN, "config store closed the connection from {peer}: {e}");
    } else {
        mf_log!(DEBUG, "config store session {session} from {peer} ended");
    }
    conn.release();
    shared.open_sessions.fetch_sub(1, Ordering::Relaxed);
    let hook = shared
        .session_end
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(hook) = hook {
        tokio::task::spawn_blocking(move || hook(session));
    }
}

/// A non-blocking read attempt, for the brief polling below (TLS streams never poll).
trait PollNow {
    fn read_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize>;

    /// The descriptor of a Unix socket, which can pass a channel's memory to the client.
    fn unix_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl PollNow for tokio::net::TcpStream {
    fn read_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        recv_now(self, buf)
    }
}

impl PollNow for tokio::net::UnixStream {
    fn read_now(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        recv_now(self, buf)
    }

    fn unix_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self))
    }
}

/// Straight to the socket: tokio's try_read answers WouldBlock without asking the kernel until
/// its driver has seen readiness, which is the wake-up this polling avoids. Bytes taken here
/// are simply not there for the next read_buf; tokio copes with that.
fn recv_now(sock: &impl std::os::fd::AsRawFd, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        let spare = buf.spare_capacity_mut();
        // SAFETY: recv writes at most spare.len() bytes into the vector's spare capacity.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the first n bytes of the spare capacity were initialised by recv.
        unsafe { buf.set_len(buf.len() + n as usize) };
        Ok(n as usize)
    }
}

impl<S> PollNow for tokio_rustls::server::TlsStream<S> {
    fn read_now(&self, _buf: &mut Vec<u8>) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

/// Between two polls: a CPU pause for the first microseconds (most answers and next requests
/// come within them, and a yield costs a trip through the scheduler that can hand the core to
/// another thread), then a yield, because on a small machine the thread we wait for may be
/// sharing our core.
pub(crate) fn pause(waited: Duration) {
    if waited < PURE_SPIN {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// How long polling spins without yielding (measured on a 2-core VM: a ping through the
/// server took 9.5 us spinning, 14-18 us yielding between polls).
pub(crate) const PURE_SPIN: Duration = Duration::from_micros(10);

/// Connections polled at once at most, process-wide: polling keeps a runtime worker busy.
static POLLERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Brief polling for the next request of a client that sends them back to back.
///
/// A worker parked in epoll pays a scheduler wake-up for every request (several microseconds
/// on a VM, a large share of a loopback round trip). When a connection's requests arrive
/// within [`SpinState::LIMIT`] of the previous answer, the task polls the socket for that long
/// before parking. One connection at a time may poll, and only while its gaps stay short, so a
/// busy server with many clients (long gaps, no spare core) never polls.
#[derive(Default)]
struct SpinState {
    answered_at: Option<Instant>,
    avg_gap_ns: u64,
    /// [`READS`] when this connection last read a request.
    last_read: u64,
    /// No other connection read a request since this one's previous request.
    alone: bool,
}

/// Request reads of all connections, process-wide: tells a connection whether others are busy.
static READS: AtomicU64 = AtomicU64::new(0);

impl SpinState {
    const LIMIT: Duration = Duration::from_micros(50);

    fn poll_briefly<S: PollNow>(&mut self, stream: &S, buf: &mut Vec<u8>) -> Result<Option<usize>> {
        self.answered_at = Some(Instant::now());
        // Only for a client that has the server to itself: with others active, the core a
        // poller holds is what they wait for (8 clients on 2 cores: 15-25% fewer ops/s).
        if !self.alone || self.avg_gap_ns == 0 || self.avg_gap_ns > Self::LIMIT.as_nanos() as u64 {
            return Ok(None);
        }
        if POLLERS.fetch_add(1, Ordering::AcqRel) >= 1 {
            POLLERS.fetch_sub(1, Ordering::AcqRel);
            return Ok(None);
        }
        let start = std::time::Instant::now();
        let result = loop {
            match stream.read_now(buf) {
                Ok(n) => break Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(Error::io("config store read", e)),
            }
            let waited = start.elapsed();
            if waited >= Self::LIMIT {
                break Ok(None);
            }
            pause(waited);
        };
        POLLERS.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn request_arrived(&mut self) {
        let now = READS.fetch_add(1, Ordering::Relaxed) + 1;
        self.alone = now - self.last_read <= 1;
        self.last_read = now;
        if let Some(t) = self.answered_at.take() {
            let ns = (t.elapsed().as_nanos() as u64).min(1_000_000_000);
            self.avg_gap_ns = if self.avg_gap_ns == 0 {
                ns
            } else {
                (self.avg_gap_ns * 7 + ns) / 8
            };
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    /// Keys this session set as ephemeral (they may since have been overwritten by others).
    owned: HashSet<String>,
    /// This session's shared-memory channel; released with the session.
    channel: Option<ChannelLease>,
}

impl Session {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin + PollNow>(
        &mut self,
        mut stream: S,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut inbuf: Vec<u8> = Vec::with_capacity(16 << 10);
        let mut outbuf: Vec<u8> = Vec::with_capacity(16 << 10);
        let mut spin = SpinState::default();
        loop {
            let mut start = 0;
            while let Some((kind, body, used)) = split_frame(&inbuf[start..])? {
                let req = Request::decode(kind, body)?;
                start += used;
                if let Request::OpenChannel = req {
                    self.grant_channel(&mut stream, &mut outbuf).await?;
                    continue;
                }
                if let Request::Get { key, .. } = &req {
                    if self.shared.encode_get(key, &mut outbuf) {
                        continue;
                    }
                }
                let resp = self.handle(req).await;
                resp.encode(&mut outbuf);
                if let Response::Value(v) = resp {
                    super::proto::recycle(v);
                }
            }
            inbuf.drain(..start);
            if !outbuf.is_empty() {
                stream
                    .write_all(&outbuf)
                    .await
                    .map_err(|e| Error::io("config store write", e))?;
                stream
                    .flush()
                    .await
                    .map_err(|e| Error::io("config store flush", e))?;
                outbuf.clear();
            }
            // Room for the whole of a frame whose header we have (already bounded by MAX_FRAME).
            if inbuf.len() >= 4 {
                let want =
                    u32::from_be_bytes([inbuf[0], inbuf[1], inbuf[2], inbuf[3]]) as usize + 4;
                inbuf.reserve(want.saturating_sub(inbuf.len()));
            } else {
                inbuf.reserve(HEADER.max(4096));
            }
            let n = match spin.poll_briefly(&stream, &mut inbuf)? {
                Some(n) => n,
                None => tokio::select! {
                    r = stream.read_buf(&mut inbuf) => r.map_err(|e| Error::io("config store read", e))?,
                    _ = shutdown.changed() => return Ok(()),
                },
            };
            spin.request_arrived();
            if n == 0 {
                if !inbuf.is_empty() {
                    return Err(Error::Protocol(format!(
                        "connection closed inside a frame ({} bytes pending)",
                        inbuf.len()
                    )));
                }
                return Ok(());
            }
        }
    }

    async fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Set {
                key,
                value,
                ephemeral,
            } => {
                self.set(key, value, ephemeral);
                Response::Ok
            }
            Request::Get { key, wait_ms } if wait_ms > 0 => {
                let keys = [key];
                if let Some(r) = self.wait(&keys, wait_ms, None).await {
                    return r;
                }
                let [key] = keys;
                self.shared.handle_immediate(Request::Get { key, wait_ms })
            }
            Request::Delete { key } => {
                self.owned.remove(&key);
                self.shared.handle_immediate(Request::Delete { key })
            }
            Request::MultiGet { keys, wait_ms } if wait_ms > 0 => {
                if let Some(r) = self.wait(&keys, wait_ms, None).await {
                    return r;
                }
                self.shared
                    .handle_immediate(Request::MultiGet { keys, wait_ms })
            }
            Request::MultiSet { entries, ephemeral } => {
                for (k, v) in entries {
                    self.set(k, v, ephemeral);
                }
                Response::Ok
            }
            Request::Wait {
                keys,
                timeout_ms,
                watch,
            } => {
                let watch = watch.as_ref().map(|(p, n)| (p.as_str(), *n));
                self.wait(&keys, timeout_ms, watch)
                    .await
                    .unwrap_or(Response::Ok)
            }
            Request::OpenChannel => {
                Response::BadRequest("a channel is only offered on the local socket".into())
            }
            req => self.shared.handle_immediate(req),
        }
    }

    /// Answers a channel request: the grant goes out with the channel's and the doorbell's
    /// descriptors attached, after every answer before it.
    async fn grant_channel<S: AsyncWrite + Unpin + PollNow>(
        &mut self,
        stream: &mut S,
        outbuf: &mut Vec<u8>,
    ) -> Result<()> {
        let granted = match (stream.unix_fd(), &self.channel) {
            (None, _) => Err(Error::InvalidParam(
                "a channel is only offered on the local socket".into(),
            )),
            (Some(_), Some(_)) => Err(Error::InvalidParam("this session has a channel".into())),
            (Some(fd), None) => self.shared.grant_channel().map(|g| (fd, g)),
        };
        let (fd, grant) = match granted {
            Ok(g) => g,
            Err(e) => {
                Response::BadRequest(e.to_string()).encode(outbuf);
                return Ok(());
            }
        };
        if !outbuf.is_empty() {
            stream
                .write_all(outbuf)
                .await
                .map_err(|e| Error::io("config store write", e))?;
            outbuf.clear();
        }
        let mut frame = Vec::new();
        Response::Channel { slot: grant.slot }.encode(&mut frame);
        let fds = [grant.channel_fd.as_raw_fd(), grant.doorbell_fd.as_raw_fd()];
        let sent = send_with_fds(fd, &frame, fds)
            .map_err(|e| Error::io("config store channel grant", e))?;
        if sent < frame.len() {
            stream
                .write_all(&frame[sent..])
                .await
                .map_err(|e| Error::io("config store write", e))?;
        }
        self.channel = Some(grant.lease);
        Ok(())
    }

    fn set(&mut self, key: String, value: Vec<u8>, ephemeral: bool) {
        let owner = if ephemeral {
            self.owned.insert(key.clone());
            self.id
        } else {
            self.owned.remove(&key);
            0
        };
        self.shared.lock().put(key, value, owner);
    }

    /// Waits until all `keys` exist. `None`: they do; `Some(resp)`: Timeout or Aborted.
    async fn wait(
        &self,
        keys: &[String],
        timeout_ms: u64,
        watch: Option<(&str, u64)>,
    ) -> Option<Response> {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms).min(MAX_WAIT);
        loop {
            let notify = {
                let mut st = self.shared.lock();
                // Keys first: once they exist the wait succeeded, even if a member has left
                // since (it may simply have finished first).
                let missing = st.first_missing(keys)?.clone();
                if let Some(r) = check_watch(&st, watch) {
                    return Some(r);
                }
                st.key_waiters.entry(missing).or_default().clone()
            };
            let key_set = notify.notified();
            let member_gone = self.shared.sessions_changed.notified();
            tokio::pin!(key_set, member_gone);
            key_set.as_mut().enable();
            member_gone.as_mut().enable();
            // Re-check now that both wake-ups are armed: a write between the first check and
            // arming would otherwise be missed.
            {
                let st = self.shared.lock();
                st.first_missing(keys)?;
                if let Some(r) = check_watch(&st, watch) {
                    return Some(r);
                }
            }
            tokio::select! {
                _ = key_set => {}
                _ = member_gone => {}
                _ = tokio::time::sleep_until(deadline) => return Some(Response::Timeout),
            }
        }
    }

    /// Removes the keys this session still owns and wakes waiters that watch membership.
    fn release(&mut self) {
        self.channel = None;
        if self.owned.is_empty() {
            return;
        }
        let mut removed = 0;
        {
            let mut st = self.shared.lock();
            for k in self.owned.drain() {
                if st.map.get(&k).is_some_and(|e| e.owner == self.id) {
                    st.map.remove(&k);
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            mf_log!(
                DEBUG,
                "config store session {} closed: {removed} ephemeral keys removed",
                self.id
            );
            self.shared.sessions_changed.notify_waiters();
        }
    }
}

fn check_watch(st: &State, watch: Option<(&str, u64)>) -> Option<Response> {
    let (prefix, min) = watch?;
    let alive = st.count_prefix(prefix);
    (alive < min).then(|| {
        Response::Aborted(format!(
            "a member left: {alive} of {min} members under {prefix:?} are alive"
        ))
    })
}
