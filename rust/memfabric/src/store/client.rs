//! Blocking config store client.
//!
//! One TCP (or TLS) connection, used by one call at a time: the calling thread writes the
//! request and reads the answer itself, so a call costs one round trip and no thread hop.
//! Every call has a deadline. A lost connection is re-established with jittered backoff;
//! calls that are safe to repeat are repeated, the others report [`Error::Reconnected`].
//! Ephemeral keys this client set are published again after a reconnect, so a store that
//! restarts learns who is still alive.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::proto::{split_frame, Request, Response};
use crate::error::{Error, Result};
use crate::log::{INFO, WARN};
use crate::mf_log;

/// Extra time the client waits past a server-side wait deadline for the answer to arrive.
const WAIT_GRACE: Duration = Duration::from_secs(5);

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
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
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
}

struct Inner {
    conn: Option<Conn>,
    outbuf: Vec<u8>,
    /// Ephemeral keys set through this client, re-published after a reconnect.
    ephemeral: HashMap<String, Vec<u8>>,
    ever_connected: bool,
}

/// A connection to a config store. Cheap to share between threads (`Arc`); calls serialize.
pub struct StoreClient {
    addr: SocketAddr,
    url: String,
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

impl StoreClient {
    /// Connects to `url` (`tcp://ip:port`), retrying until `opts.timeout` passes.
    pub fn connect(url: &str, opts: ClientOptions) -> Result<StoreClient> {
        let addr = super::url::parse_store_url(url, false)?;
        let tls = match (&opts.tls, opts.force_plaintext) {
            (_, true) => None,
            (Some(t), _) => Some(t.clone()),
            (None, false) => super::tls::current()?.map(|m| m.client.clone()),
        };
        let client = StoreClient {
            addr,
            url: super::url::format_store_url(addr),
            opts,
            tls,
            inner: Mutex::new(Inner {
                conn: None,
                outbuf: Vec::new(),
                ephemeral: HashMap::new(),
                ever_connected: false,
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
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.opts.timeout
    }

    /// This side's address of the connection: the interface through which the store (and so,
    /// presumably, the other ranks) is reached.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        let inner = self.lock();
        inner
            .conn
            .as_ref()
            .and_then(|c| c.stream.tcp().local_addr().ok())
            .map(|a| a.ip())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
        })?;
        self.lock().ephemeral.insert(key.into(), value.into());
        Ok(())
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
                self.url
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
            Response::NotFound(k) => {
                Err(Error::NotExist(format!("key {k:?} in store {}", self.url)))
            }
            Response::Timeout => Err(Error::Timeout(format!(
                "keys did not all appear in store {} within {:?}",
                self.url,
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
        })?;
        if ephemeral {
            let mut inner = self.lock();
            for (k, v) in entries {
                inner.ephemeral.insert(k.clone(), v.clone());
            }
        }
        Ok(())
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
                self.url
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
    fn call(&self, req: Request, server_wait: Option<Duration>) -> Result<Response> {
        let limit = self
            .opts
            .timeout
            .max(server_wait.map(|w| w + WAIT_GRACE).unwrap_or_default());
        self.call_within(req, limit)
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
        let started = Instant::now();
        let deadline = started + limit;
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.outbuf.clear();
        req.encode(&mut inner.outbuf)?;
        let retry_safe = is_idempotent(&req);
        loop {
            self.ensure_connected(inner, deadline)?;
            let conn = inner
                .conn
                .as_mut()
                .ok_or_else(|| Error::NotConnected(self.url.clone()))?;
            match exchange(conn, &inner.outbuf, deadline) {
                Ok(resp) => {
                    if let Response::BadRequest(msg) = resp {
                        return Err(Error::InvalidParam(format!(
                            "store {} refused the request: {msg}",
                            self.url
                        )));
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
                                self.url,
                                deadline - started
                            ))
                        } else {
                            e
                        });
                    }
                    mf_log!(
                        WARN,
                        "connection to store {} lost ({e}); reconnecting",
                        self.url
                    );
                    if !retry_safe {
                        // The request may or may not have been applied; reconnect for the next
                        // call, but let the caller decide about this one.
                        let _ = self.ensure_connected(inner, deadline);
                        return Err(Error::Reconnected(format!(
                            "store {} connection broke during the call ({e})",
                            self.url
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
            match self.open(deadline) {
                Ok(mut conn) => {
                    if inner.ever_connected {
                        mf_log!(
                            INFO,
                            "reconnected to store {} after {attempt} attempt(s)",
                            self.url
                        );
                        if !inner.ephemeral.is_empty() {
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
                            exchange(&mut conn, &buf, deadline)?;
                        }
                    }
                    inner.ever_connected = true;
                    inner.conn = Some(conn);
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
                    self.url
                )));
            }
            let sleep = jitter(backoff).min(deadline - now);
            std::thread::sleep(sleep);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    fn open(&self, deadline: Instant) -> Result<Conn> {
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let tcp = TcpStream::connect_timeout(&self.addr, remaining.min(Duration::from_secs(5)))
            .map_err(|e| Error::io(format!("connect to store {}", self.url), e))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
                let conn = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| Error::Tls(format!("client setup for {}: {e}", self.url)))?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                s.sock.set_read_timeout(Some(remaining)).ok();
                s.sock.set_write_timeout(Some(remaining)).ok();
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock).map_err(|e| {
                        Error::Tls(format!("handshake with store {} failed: {e}", self.url))
                    })?;
                }
                Stream::Tls(Box::new(s))
            }
        };
        Ok(Conn {
            stream,
            inbuf: vec![0; 8192],
            filled: 0,
            timeout_set: None,
            spin: Spin::default(),
        })
    }
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
            (false, Stream::Plain(tcp)) if conn.spin.budget() > Duration::ZERO => {
                spun = true;
                spin_recv(tcp, &mut conn.inbuf[conn.filled..], conn.spin.budget())?
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
fn spin_recv(tcp: &TcpStream, buf: &mut [u8], budget: Duration) -> Result<Option<usize>> {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
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
        if start.elapsed() >= budget {
            return Ok(None);
        }
        // Yield rather than spin: on a small machine the thread we wait for may share our core.
        std::thread::yield_now();
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
    let tcp = conn.stream.tcp();
    tcp.set_read_timeout(Some(remaining))
        .map_err(|e| Error::io("store socket", e))?;
    tcp.set_write_timeout(Some(remaining))
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
