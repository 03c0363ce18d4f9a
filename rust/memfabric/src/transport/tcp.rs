//! The cross-host path: each engine runs a data server; initiators hold a few pooled
//! connections to each peer's server and pipeline sliced requests over them.
//!
//! # Wire protocol (all integers little-endian)
//!
//! With TLS on (`set_conf_store_tls`), everything below runs inside mutual TLS with the
//! store's certificates: the server demands a client certificate from the job's CA and the
//! client verifies the server's for the IP it dialled. Without TLS it runs on plain TCP.
//!
//! Connection start (version 2):
//! 1. client: `"MFTD"`, version, status 0, two zero bytes, then its 32-byte nonce `cn`;
//! 2. server: `"MFTD"`, version, status (0 ok, 1 version refused: nothing follows and the
//!    server closes), two zero bytes, then its 32-byte nonce `sn`;
//! 3. client: `HMAC-SHA256(secret, "memfabric data client" | sn | cn)`;
//! 4. server: status u8, 0 admitted, then `HMAC-SHA256(secret, "memfabric data server" | sn | cn)`;
//!    or 1 refused, and it closes.
//!
//! `secret` is the job secret from the config store (see [`super::auth`]). The server reads no
//! request before step 3 verified, and the client sends none before step 4 did; the whole
//! handshake (TLS included) must finish within the server's handshake deadline (10 s) or the
//! connection is dropped. A refused client gets `Refused` naming the server.
//!
//! Request, 32 bytes: version u8, op u8 (1 WRITE, 2 READ), 6 zero bytes, req_id u64,
//! addr u64, len u64; a WRITE is followed by its `len` payload bytes. `len` is at most
//! [`MAX_REQUEST`]; anything larger, an unknown op or version, or non-zero padding is a
//! protocol error that closes that connection (and only it).
//!
//! Response, 24 bytes: version u8, status u8 (0 OK, 1 OUT_OF_BOUNDS, 2 INVALID), 2 zero bytes,
//! msg_len u32 (at most 1024), req_id u64, data_len u64; followed by the message (errors) and
//! then `data_len` bytes (an OK READ). Responses come in request order on each connection.
//! Version 1 had the same frames and no nonces or proofs; the two refuse each other at the hello.
//!
//! The server checks `[addr, addr + len)` against its [`RegionTable`] before touching memory.
//! A WRITE is acknowledged only after its bytes are in the server's memory; a refused WRITE's
//! payload is read and dropped, so the connection stays usable.
//!
//! # Slicing and pipelining
//!
//! The initiator cuts transfers into 1 MiB slices: large enough that the 56 bytes of header
//! and acknowledgement per slice are noise (< 0.01 %), small enough that a 64 MiB transfer is
//! 64 slices spread over the connections, and that several fit in one 4 MiB socket buffer.
//! Each connection keeps up to 8 MiB (and 256 requests) in flight; one thread drives all of
//! them with `poll`, sending with `sendmsg` straight from the caller's buffer (many requests
//! per call, no copy in user space).
//!
//! Receiving, on both sides, uses one staging buffer per connection (allocated when it opens)
//! for headers and small payloads, many per system call. A payload not yet staged is received
//! in place with one `recvmsg` whose second iovec takes what follows; after a payload of
//! 8 KiB or more that second iovec is just one header long, so that in a stream of large
//! requests every payload lands in place and the only copies are the kernel's two.
//!
//! With TLS the same frames travel as TLS records. The initiator keeps its design (one thread,
//! `poll`, the same windows) and hands plaintext to rustls, which encrypts it into its send
//! buffer; received records are decrypted into the staging buffer, or straight into the
//! destination of READ data. The server reads and writes through tokio-rustls one request at a
//! time, payloads decrypted into and encrypted from registered memory, and sends its queued
//! acknowledgements whenever it is about to wait for input.

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::auth::{random_bytes, DataAuth, NONCE_LEN, PROOF_LEN};
use super::{CheckedOps, Op, Transport};
use crate::device::staging::{StageBuffer, STAGE_BYTES};
use crate::error::{Error, Result};
use crate::log::{DEBUG, INFO, WARN};
use crate::mem::regions::RegionTable;
use crate::mf_log;

const MAGIC: [u8; 4] = *b"MFTD";
/// Version of the data protocol; both ends must speak the same one.
pub const PROTOCOL_VERSION: u8 = 2;
/// Bytes in a hello, before the nonce.
pub const HELLO_LEN: usize = 8;
const HELLO_OK: u8 = 0;
const HELLO_BAD_VERSION: u8 = 1;
/// The server's verdict on a client's proof: admitted (its own proof follows) or refused.
pub const AUTH_OK: u8 = 0;
pub const AUTH_REFUSED: u8 = 1;
const REQ_HDR: usize = 32;
const RESP_HDR: usize = 24;
/// Bytes in a request header.
pub const REQUEST_HEADER_LEN: usize = REQ_HDR;
/// Bytes in a response header.
pub const RESPONSE_HEADER_LEN: usize = RESP_HDR;
const OP_WRITE: u8 = 1;
const OP_READ: u8 = 2;
const ST_OK: u8 = 0;
const ST_OUT_OF_BOUNDS: u8 = 1;
const ST_INVALID: u8 = 2;
const MAX_MSG: usize = 1024;

/// Largest request the server accepts; bounds what one peer-supplied length can make it do.
pub const MAX_REQUEST: u64 = 64 << 20;
/// Slice size the initiator cuts transfers into (see the module docs for why).
pub const SLICE: u64 = 1 << 20;
/// Connections per peer by default.
pub const DEFAULT_CONNECTIONS: usize = 4;
const MAX_CONNECTIONS: usize = 16;
/// Per-connection staging buffer (both sides). Holds many small messages per system call.
const STAGING: usize = 128 << 10;
/// Socket buffers: a 25 Gb/s link with 1 ms RTT needs ~3 MiB in flight per flow.
const SOCK_BUF: usize = 4 << 20;
const WINDOW_BYTES: u64 = 8 << 20;
const WINDOW_REQS: usize = 256;
/// Payloads at least this large are received in place with only the next message's header
/// taken along, so that the next payload lands in place too; smaller ones are staged many
/// per system call and copied out (a copy of a few KiB is cheaper than a system call).
const DIRECT_MIN: u64 = 8 << 10;
/// Acknowledged-but-unsent write bytes that make the server send its acknowledgements now
/// rather than when its input runs dry: keeps the initiator's window moving.
const ACK_EVERY: u64 = 1 << 20;
/// iovecs per sendmsg. Well under IOV_MAX; 128 small requests per call is plenty.
const IOV_BATCH: usize = 128;
/// Encrypted bytes rustls may hold for one initiator connection before the socket takes them:
/// enough for a few records per system call, small beside the 8 MiB window.
const TLS_SEND_BUFFER: usize = 512 << 10;
/// Socket reads under TLS, on both sides: rustls asks for 4 KiB at a time, and a system call
/// per 4 KiB costs more than the copy out of a buffer this size.
const TLS_READ_BUFFER: usize = 256 << 10;
/// The TLS server receives payloads in pieces of this size, sending its acknowledgements in
/// between when it would otherwise wait.
const TLS_CHUNK: usize = 256 << 10;
/// First bytes of a TLS record (handshake, alert): what a TLS peer sends where a hello belongs.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const TLS_ALERT_RECORD: u8 = 0x15;

// ---------------------------------------------------------------------------------------------
// Frames

/// A decoded request header.
#[derive(Debug)]
pub struct ReqHeader {
    pub op: u8,
    pub req_id: u64,
    pub addr: u64,
    pub len: u64,
}

fn encode_req(op: u8, req_id: u64, addr: u64, len: u64) -> [u8; REQ_HDR] {
    let mut h = [0u8; REQ_HDR];
    h[0] = PROTOCOL_VERSION;
    h[1] = op;
    h[8..16].copy_from_slice(&req_id.to_le_bytes());
    h[16..24].copy_from_slice(&addr.to_le_bytes());
    h[24..32].copy_from_slice(&len.to_le_bytes());
    h
}

fn le64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// Decodes a request header (its first [`REQUEST_HEADER_LEN`] bytes); anything else a peer
/// could send is a protocol error, never a panic.
pub fn parse_req(h: &[u8]) -> Result<ReqHeader> {
    if h.len() < REQ_HDR {
        return Err(Error::Protocol(format!(
            "request header of {} bytes (needs {REQ_HDR})",
            h.len()
        )));
    }
    if h[0] != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "request with version {} (this server speaks {PROTOCOL_VERSION})",
            h[0]
        )));
    }
    if h[2..8].iter().any(|&b| b != 0) {
        return Err(Error::Protocol("request with non-zero padding".into()));
    }
    let r = ReqHeader {
        op: h[1],
        req_id: le64(&h[8..]),
        addr: le64(&h[16..]),
        len: le64(&h[24..]),
    };
    if r.op != OP_WRITE && r.op != OP_READ {
        return Err(Error::Protocol(format!("unknown request op {}", r.op)));
    }
    if r.len > MAX_REQUEST {
        return Err(Error::Protocol(format!(
            "request of {} bytes (at most {MAX_REQUEST})",
            r.len
        )));
    }
    Ok(r)
}

/// A decoded response header.
#[derive(Debug)]
pub struct RespHeader {
    pub status: u8,
    pub msg_len: usize,
    pub req_id: u64,
    pub data_len: u64,
}

fn encode_resp(out: &mut Vec<u8>, status: u8, msg: &str, req_id: u64, data_len: u64) {
    // Cut on a char boundary so that the peer can show it as text.
    let mut cut = msg.len().min(MAX_MSG);
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &msg.as_bytes()[..cut];
    out.push(PROTOCOL_VERSION);
    out.push(status);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(&req_id.to_le_bytes());
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(msg);
}

/// Decodes a response header (its first [`RESPONSE_HEADER_LEN`] bytes).
pub fn parse_resp(h: &[u8]) -> Result<RespHeader> {
    if h.len() < RESP_HDR {
        return Err(Error::Protocol(format!(
            "response header of {} bytes (needs {RESP_HDR})",
            h.len()
        )));
    }
    if h[0] != PROTOCOL_VERSION || h[2] != 0 || h[3] != 0 {
        return Err(Error::Protocol(
            "malformed response header from the data server".into(),
        ));
    }
    let msg_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if msg_len > MAX_MSG {
        return Err(Error::Protocol(format!(
            "response message of {msg_len} bytes (at most {MAX_MSG})"
        )));
    }
    Ok(RespHeader {
        status: h[1],
        msg_len,
        req_id: le64(&h[8..]),
        data_len: le64(&h[16..]),
    })
}

/// The 8-byte hello (without the nonce that follows it).
pub fn hello(status: u8) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = PROTOCOL_VERSION;
    h[5] = status;
    h
}

/// Client side of the connection start (see the module docs), on a plain socket or inside TLS:
/// hello and nonces, then the proofs, client first. Returns once the server proved the job
/// secret too; any other outcome is an error and the connection must be dropped.
pub fn client_handshake<S: Read + Write>(
    s: &mut S,
    auth: &DataAuth,
    peer: SocketAddr,
) -> Result<()> {
    let cn = random_bytes::<NONCE_LEN>()?;
    let mut first = [0u8; HELLO_LEN + NONCE_LEN];
    first[..HELLO_LEN].copy_from_slice(&hello(HELLO_OK));
    first[HELLO_LEN..].copy_from_slice(&cn);
    s.write_all(&first)
        .and_then(|_| s.flush())
        .map_err(|e| handshake_err(peer, "sending the hello", e))?;
    // The first byte alone: a TLS server answers a plaintext hello with a 7-byte alert.
    let mut reply = [0u8; HELLO_LEN];
    s.read_exact(&mut reply[..1])
        .map_err(|e| handshake_err(peer, "waiting for the hello", e))?;
    if reply[0] == TLS_ALERT_RECORD || reply[0] == TLS_HANDSHAKE_RECORD {
        return Err(Error::Tls(format!(
            "the data server at {peer} speaks TLS and this process does not: call \
             set_conf_store_tls as its job does"
        )));
    }
    s.read_exact(&mut reply[1..])
        .map_err(|e| handshake_err(peer, "waiting for the hello", e))?;
    if reply[..4] != MAGIC {
        return Err(Error::Protocol(format!(
            "{peer} is not a memfabric data server (bad handshake)"
        )));
    }
    if reply[4] != PROTOCOL_VERSION || reply[5] != HELLO_OK {
        return Err(Error::Refused(format!(
            "data server {peer} speaks protocol {} and refused ours ({PROTOCOL_VERSION})",
            reply[4]
        )));
    }
    let mut sn = [0u8; NONCE_LEN];
    s.read_exact(&mut sn)
        .map_err(|e| handshake_err(peer, "waiting for the server's nonce", e))?;
    s.write_all(&auth.client_proof(&sn, &cn))
        .and_then(|_| s.flush())
        .map_err(|e| handshake_err(peer, "sending this engine's proof", e))?;
    let mut verdict = [0u8; 1];
    s.read_exact(&mut verdict)
        .map_err(|e| handshake_err(peer, "waiting for admission", e))?;
    if verdict[0] != AUTH_OK {
        return Err(Error::Refused(format!(
            "the data server at {peer} refused this engine: not admitted by the same config \
             store (its job secret differs; both ends must initialize against one store)"
        )));
    }
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof)
        .map_err(|e| handshake_err(peer, "waiting for the server's proof", e))?;
    if !auth.verify_server(&sn, &cn, &proof) {
        return Err(Error::Refused(format!(
            "the data server at {peer} could not prove admission by this engine's config \
             store (another job's engine listens there); nothing was sent to it"
        )));
    }
    Ok(())
}

/// Server side of [`client_handshake`]. Reads nothing past the client's proof unless it
/// verified; a refused client is told so and the connection is closed by the caller.
async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    auth: &DataAuth,
) -> Result<()> {
    let io = |what: &'static str| {
        move |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Error::Protocol(format!("the client closed the connection while {what}"))
            }
            _ => tls_or_io(&format!("data server handshake, {what}"), e),
        }
    };
    let mut h = [0u8; HELLO_LEN];
    s.read_exact(&mut h)
        .await
        .map_err(io("sending its hello"))?;
    if h[..4] != MAGIC {
        if h[0] == TLS_HANDSHAKE_RECORD && auth.tls().is_none() {
            return Err(Error::Tls(
                "a TLS client connected; TLS is off in this process (set_conf_store_tls)".into(),
            ));
        }
        return Err(Error::Protocol(
            "not a memfabric data client (bad magic)".into(),
        ));
    }
    if h[4] != PROTOCOL_VERSION {
        // Best effort: the client learns why before the connection closes.
        let _ = s.write_all(&hello(HELLO_BAD_VERSION)).await;
        let _ = s.flush().await;
        return Err(Error::Protocol(format!(
            "client speaks data protocol {} (this server {PROTOCOL_VERSION})",
            h[4]
        )));
    }
    let mut cn = [0u8; NONCE_LEN];
    s.read_exact(&mut cn)
        .await
        .map_err(io("sending its nonce"))?;
    let sn = random_bytes::<NONCE_LEN>()?;
    let mut reply = [0u8; HELLO_LEN + NONCE_LEN];
    reply[..HELLO_LEN].copy_from_slice(&hello(HELLO_OK));
    reply[HELLO_LEN..].copy_from_slice(&sn);
    s.write_all(&reply)
        .await
        .map_err(io("receiving our hello"))?;
    s.flush().await.map_err(io("receiving our hello"))?;
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof)
        .await
        .map_err(io("sending its proof"))?;
    if !auth.verify_client(&sn, &cn, &proof) {
        let _ = s.write_all(&[AUTH_REFUSED]).await;
        let _ = s.flush().await;
        return Err(Error::Refused(
            "refused a data client that did not prove admission by this job's config store \
             (wrong or no data-plane secret)"
                .into(),
        ));
    }
    let mut admitted = [0u8; 1 + PROOF_LEN];
    admitted[0] = AUTH_OK;
    admitted[1..].copy_from_slice(&auth.server_proof(&sn, &cn));
    s.write_all(&admitted)
        .await
        .map_err(io("receiving our proof"))?;
    s.flush().await.map_err(io("receiving our proof"))?;
    Ok(())
}

/// The rustls error inside an I/O error, if there is one.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

fn tls_or_io(what: &str, e: std::io::Error) -> Error {
    match rustls_error(&e) {
        Some(t) => Error::Tls(format!("{what}: {t}")),
        None => Error::io(what, e),
    }
}

fn handshake_err(peer: SocketAddr, what: &str, e: std::io::Error) -> Error {
    match rustls_error(&e) {
        Some(t) => Error::Tls(format!(
            "TLS with the data server at {peer} failed while {what}: {t} (both ends need \
             certificates from the job's CA, with their IP addresses as SANs)"
        )),
        None => sock_err(peer, what, e),
    }
}

fn sendmsg_nosignal(fd: RawFd, iov: &[libc::iovec], flags: libc::c_int) -> std::io::Result<usize> {
    // SAFETY: zeroed is a valid msghdr (null name and control, no iovecs); the fields we set
    // point at `iov`, which outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` describes `iov.len()` valid iovecs; each points at memory the caller
    // vouches is readable for its length (see the callers). MSG_NOSIGNAL: a vanished peer
    // must give EPIPE, not kill the process with SIGPIPE.
    let rc = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | flags) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Writes to a socket with `sendmsg(MSG_NOSIGNAL)`: std's vectored write (which rustls uses)
/// is `writev`, which raises SIGPIPE when the peer has gone.
struct NoSigPipe {
    fd: RawFd,
    flags: libc::c_int,
}

impl Write for NoSigPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let mut iov = [EMPTY_IOV; IOV_BATCH];
        let n = bufs.len().min(IOV_BATCH);
        for (v, b) in iov.iter_mut().zip(bufs) {
            *v = libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            };
        }
        // The iovecs point into `bufs`, borrowed for the call.
        sendmsg_nosignal(self.fd, &iov[..n], self.flags)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A blocking socket whose every read and write ends by `deadline`: each system call gets
/// the time left as its timeout, so a peer that trickles bytes cannot stretch the handshake.
struct Deadlined<'a> {
    sock: &'a std::net::TcpStream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.sock).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.sock.set_write_timeout(Some(self.left()?))?;
        NoSigPipe {
            fd: self.sock.as_raw_fd(),
            flags: 0,
        }
        .write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One `recvmsg` into two buffers: the rest of a payload, then whatever follows it.
///
/// # Safety
/// `[a, a + a_len)` and `[b, b + b_len)` must be writable memory of this process.
unsafe fn recv2(
    fd: RawFd,
    a: u64,
    a_len: usize,
    b: *mut u8,
    b_len: usize,
) -> std::io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: a_len,
        },
        libc::iovec {
            iov_base: b.cast(),
            iov_len: b_len,
        },
    ];
    // SAFETY: zeroed is a valid msghdr; the iovecs are valid per this function's contract.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 2;
    // SAFETY: as above; the kernel writes at most a_len + b_len bytes into the two iovecs.
    let rc = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

// ---------------------------------------------------------------------------------------------
// Server

/// The data server of one engine: serves peers' reads and writes of this process's
/// registered memory to clients that prove `auth` (see the module docs). Runs on the shared
/// runtime; dropping it stops accepting and closes every connection (in-flight requests on
/// them fail at their initiators).
pub struct TcpDataServer {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl TcpDataServer {
    /// Binds `bind` (port 0 picks one) and starts serving `regions`.
    pub fn start(bind: SocketAddr, regions: Arc<RegionTable>, auth: Arc<DataAuth>) -> Result<Self> {
        let rt = crate::runtime::runtime()?;
        crate::runtime::raise_fd_limit();
        let std_listener = crate::net::bind_listener(bind, "data server", Some(SOCK_BUF))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| Error::io("data server listener address", e))?;
        let _enter = rt.enter();
        let listener = TcpListener::from_std(std_listener)
            .map_err(|e| Error::io("data server listener", e))?;
        let (tx, rx) = watch::channel(false);
        let tls = if auth.tls().is_some() { " (TLS)" } else { "" };
        rt.spawn(accept_loop(listener, regions, auth, rx));
        mf_log!(INFO, "data server listening on {addr}{tls}");
        Ok(TcpDataServer { addr, shutdown: tx })
    }

    /// Serves `regions` on a listener bound earlier (a port reserved before the engine
    /// existed, see `get_rpc_port`).
    pub fn adopt(
        listener: std::net::TcpListener,
        regions: Arc<RegionTable>,
        auth: Arc<DataAuth>,
    ) -> Result<Self> {
        let rt = crate::runtime::runtime()?;
        crate::runtime::raise_fd_limit();
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("data server listener", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("data server listener address", e))?;
        let _enter = rt.enter();
        let listener =
            TcpListener::from_std(listener).map_err(|e| Error::io("data server listener", e))?;
        let (tx, rx) = watch::channel(false);
        let tls = if auth.tls().is_some() { ", TLS" } else { "" };
        rt.spawn(accept_loop(listener, regions, auth, rx));
        mf_log!(INFO, "data server listening on {addr} (reserved port{tls})");
        Ok(TcpDataServer { addr, shutdown: tx })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpDataServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        mf_log!(INFO, "data server on {} stopped", self.addr);
    }
}

async fn accept_loop(
    listener: TcpListener,
    regions: Arc<RegionTable>,
    auth: Arc<DataAuth>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, peer)) =
        crate::net::accept(&listener, &mut shutdown, "data server").await
    {
        let regions = regions.clone();
        let auth = auth.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = serve(stream, &regions, &auth) => r,
                _ = shutdown.changed() => Ok(()),
            };
            match result {
                Ok(()) => mf_log!(DEBUG, "data connection from {peer} closed"),
                Err(e) => mf_log!(WARN, "data server dropped the connection from {peer}: {e}"),
            }
        });
    }
}

/// One connection: the handshake within its deadline, then requests until the client leaves.
async fn serve(mut stream: TcpStream, regions: &RegionTable, auth: &DataAuth) -> Result<()> {
    let limit = auth.handshake_timeout();
    let late = || {
        Error::Timeout(format!(
            "data client did not complete the handshake within {limit:?}"
        ))
    };
    match auth.tls() {
        None => {
            tokio::time::timeout(limit, server_handshake(&mut stream, auth))
                .await
                .map_err(|_| late())??;
            serve_conn(&stream, regions).await
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
            let start = async {
                // rustls reads 4 KiB at a time; the buffer turns that into one system call per
                // 256 KiB.
                let buffered = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream);
                let mut s = acceptor
                    .accept(buffered)
                    .await
                    .map_err(|e| tls_or_io("TLS handshake with a data client", e))?;
                server_handshake(&mut s, auth).await?;
                Ok::<_, Error>(s)
            };
            let s = tokio::time::timeout(limit, start)
                .await
                .map_err(|_| late())??;
            serve_tls_conn(s, regions).await
        }
    }
}

fn retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

/// One connection: requests are answered in order. Responses are queued and leave together
/// in one `sendmsg` when input runs dry or enough piled up.
async fn serve_conn(stream: &TcpStream, regions: &RegionTable) -> Result<()> {
    let mut rbuf = vec![0u8; STAGING];
    let (mut rs, mut re) = (0usize, 0usize);
    let mut out = Out::default();
    // A client that never lets input run dry would otherwise keep this worker to itself.
    let mut budget = 64u32;
    loop {
        while re - rs >= REQ_HDR {
            let h = parse_req(&rbuf[rs..rs + REQ_HDR])?;
            rs += REQ_HDR;
            let (verdict, on_device) = check_request(regions, h.addr, h.len);
            if h.op == OP_READ && on_device {
                out.read_reply_device(regions, h.req_id, h.addr, h.len as usize);
            } else if h.op == OP_READ {
                out.read_reply(h.req_id, &verdict, h.addr, h.len);
            } else if on_device {
                // Device memory cannot be a recv target: stage through host memory.
                let len = h.len as usize;
                let avail = len.min(re - rs);
                let mut applied = device_write(regions, h.addr, &rbuf[rs..rs + avail]);
                rs += avail;
                let mut off = avail;
                if off < len {
                    rs = 0;
                    re = 0;
                    // Pinned where the device can: its copy then runs at full speed.
                    let (dev, device) = crate::device::memory_of(h.addr)
                        .unwrap_or_else(|| (crate::device::registry().host(), 0));
                    let mut stage = StageBuffer::take(&dev, device, (len - off).min(STAGE_BYTES));
                    while off < len {
                        let n = (len - off).min(STAGE_BYTES);
                        let at = stage.addr();
                        let to_stage = Dest::Ours(at);
                        // Our own buffer: never refused.
                        recv_payload(stream, regions, to_stage, n, &mut [], &mut out)
                            .await?
                            .1?;
                        if applied.is_ok() {
                            let to = h.addr + off as u64;
                            applied = device_write(regions, to, stage.slice_mut(n));
                        }
                        off += n;
                    }
                }
                out.write_ack(h.req_id, &applied, h.len);
            } else {
                // parse_req bounded len by MAX_REQUEST.
                let len = h.len as usize;
                let avail = len.min(re - rs);
                let rest = len - avail;
                let mut verdict = verdict;
                if verdict.is_ok() && avail > 0 {
                    let from = &rbuf[rs..rs + avail];
                    verdict = regions.while_registered(h.addr, avail as u64, || {
                        // SAFETY: `[addr, addr + avail)` lies inside one registration of this
                        // process, which stays registered while this runs; registration
                        // verified the range mapped read-write and the owner keeps it so
                        // until it unregisters. The source is our own staging buffer, which
                        // cannot overlap registered memory handed to us by the owner.
                        unsafe {
                            std::ptr::copy_nonoverlapping(from.as_ptr(), h.addr as *mut u8, avail)
                        }
                    });
                }
                rs += avail;
                if rest > 0 {
                    // Everything staged belonged to this payload; the rest is in the socket.
                    rs = 0;
                    re = 0;
                    if verdict.is_ok() {
                        // After a large payload the next is likely large too: take only its
                        // header along so that its payload can land in place as well.
                        let tail = if h.len >= DIRECT_MIN {
                            REQ_HDR
                        } else {
                            STAGING
                        };
                        let dest = Dest::Registered(h.addr + avail as u64);
                        let tail = &mut rbuf[..tail];
                        let (got, landed) =
                            recv_payload(stream, regions, dest, rest, tail, &mut out).await?;
                        re = got;
                        verdict = landed;
                    } else {
                        out.flush(stream, regions).await?;
                        discard(stream, &mut rbuf, rest).await?;
                    }
                }
                out.write_ack(h.req_id, &verdict, h.len);
            }
            if out.full() {
                out.flush(stream, regions).await?;
            }
        }
        if rs > 0 {
            rbuf.copy_within(rs..re, 0);
            re -= rs;
            rs = 0;
        }
        match stream.try_read(&mut rbuf[re..]) {
            Ok(0) if re > 0 => {
                return Err(Error::Protocol(format!(
                    "connection closed inside a request header ({re} bytes pending)"
                )))
            }
            Ok(0) => return Ok(()),
            Ok(n) => {
                re += n;
                budget -= 1;
                if budget == 0 {
                    budget = 64;
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(stream, regions, &mut out).await?;
            }
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(Error::io("data server read", e)),
        }
    }
}

/// The region check of a request, and whether its range is device memory.
fn check_request(regions: &RegionTable, addr: u64, len: u64) -> (Result<()>, bool) {
    if !regions.has_device() {
        return (regions.check(addr, len), false);
    }
    match regions.check_kind(addr, len) {
        Ok(dev) => (Ok(()), dev.is_some()),
        Err(e) => (Err(e), false),
    }
}

fn device_backend(addr: u64) -> Result<std::sync::Arc<dyn crate::device::Device>> {
    crate::device::memory_of(addr)
        .map(|(d, _)| d)
        .ok_or_else(|| {
            Error::Failed(format!(
                "{addr:#x} was registered as device memory but is not device memory now \
                 (freed while registered?)"
            ))
        })
}

/// Copies `len` bytes of registered device memory at `addr` into a new host buffer.
fn device_read(regions: &RegionTable, addr: u64, len: usize) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len);
    device_read_into(
        regions,
        addr,
        data.spare_capacity_mut().as_mut_ptr() as u64,
        len,
    )?;
    // SAFETY: the device copy initialized the first `len` bytes of the capacity.
    unsafe { data.set_len(len) };
    Ok(data)
}

/// Copies `len` bytes of registered device memory at `addr` to host memory at `dst`, while
/// the region stays registered.
fn device_read_into(regions: &RegionTable, addr: u64, dst: u64, len: usize) -> Result<()> {
    // The backend is looked up inside the barrier: an unregister (and free) that wins the race
    // makes this a refusal of unregistered memory, not a "freed while registered" failure.
    regions.while_registered(addr, len as u64, || {
        let dev = device_backend(addr)?;
        // SAFETY: `[addr, addr + len)` lies in a device region registered while this runs;
        // the caller passes `dst` with room for `len` bytes that nothing else uses.
        crate::device::cuda::with_private_stream_copies(|| unsafe {
            dev.copy_between(dst, addr, len, None)
        })
    })?
}

/// Copies `data` into registered device memory at `addr`, while the region stays registered.
fn device_write(regions: &RegionTable, addr: u64, data: &[u8]) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    regions.while_registered(addr, data.len() as u64, || {
        let dev = device_backend(addr)?;
        // SAFETY: as for `device_read_into`.
        crate::device::cuda::with_private_stream_copies(|| unsafe {
            dev.copy_between(addr, data.as_ptr() as u64, data.len(), None)
        })
    })?
}

/// Input ran dry: sends the acknowledgements queued so far (the initiator may be waiting for
/// them before it sends more), then waits for more input.
async fn wait_readable(stream: &TcpStream, regions: &RegionTable, out: &mut Out) -> Result<()> {
    out.flush(stream, regions).await?;
    stream
        .readable()
        .await
        .map_err(|e| Error::io("data server read", e))
}

/// Where a payload goes.
#[derive(Clone, Copy)]
enum Dest {
    /// Registered memory: each system call runs while the rest of the range is registered.
    Registered(u64),
    /// A buffer of the server's own.
    Ours(u64),
}

/// Receives the `len` remaining payload bytes straight into `dest`, and in the same system
/// calls whatever follows into `tail`. Returns how much landed in `tail`, and whether the
/// payload landed: when its registered destination is unregistered part way, the rest of the
/// payload is read and dropped (keeping the stream in step) and the refusal returned.
async fn recv_payload(
    stream: &TcpStream,
    regions: &RegionTable,
    dest: Dest,
    len: usize,
    tail: &mut [u8],
    out: &mut Out,
) -> Result<(usize, Result<()>)> {
    let fd = stream.as_raw_fd();
    let mut done = 0usize;
    loop {
        let mut refused = None;
        let r = stream.try_io(Interest::READABLE, || {
            // SAFETY: `[at, at + len - done)` is either registered memory, registered while
            // the call runs (checked just before, under the table's lock), or our own buffer
            // of `len` bytes; `tail` is our own buffer.
            let mut recv = |at: u64| unsafe {
                recv2(
                    fd,
                    at + done as u64,
                    len - done,
                    tail.as_mut_ptr(),
                    tail.len(),
                )
            };
            match dest {
                Dest::Ours(at) => recv(at),
                Dest::Registered(at) => {
                    let rest = (len - done) as u64;
                    match regions.while_registered(at + done as u64, rest, || recv(at)) {
                        Ok(r) => r,
                        Err(e) => {
                            refused = Some(e);
                            Ok(0)
                        }
                    }
                }
            }
        });
        if let Some(e) = refused {
            out.flush(stream, regions).await?;
            let mut scratch = vec![0u8; (len - done).min(STAGING)];
            discard(stream, &mut scratch, len - done).await?;
            return Ok((0, Err(e)));
        }
        match r {
            Ok(0) => {
                return Err(Error::Protocol(format!(
                    "connection closed with {} payload bytes missing",
                    len - done
                )))
            }
            Ok(n) if done + n >= len => return Ok((done + n - len, Ok(()))),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(stream, regions, out).await?;
            }
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(Error::io("data server receiving a payload", e)),
        }
    }
}

/// Reads and drops `len` payload bytes of a refused write, keeping the stream in step.
async fn discard(stream: &TcpStream, scratch: &mut [u8], mut len: usize) -> Result<()> {
    while len > 0 {
        stream
            .readable()
            .await
            .map_err(|e| Error::io("data server read", e))?;
        let want = len.min(scratch.len());
        match stream.try_read(&mut scratch[..want]) {
            Ok(0) => {
                return Err(Error::Protocol(
                    "connection closed inside a refused payload".into(),
                ))
            }
            Ok(n) => len -= n,
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(Error::io("data server read", e)),
        }
    }
    Ok(())
}

/// One TLS connection, after the handshake: requests are answered in order, one at a time.
/// rustls decrypts payloads straight into registered memory and encrypts READ data straight
/// from it. Acknowledgements queue in `out` and leave whenever the next read may have to wait
/// for the socket.
async fn serve_tls_conn<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    regions: &RegionTable,
) -> Result<()> {
    let mut rd = tokio::io::BufReader::with_capacity(STAGING, stream);
    let mut scratch = vec![0u8; TLS_CHUNK];
    let mut out: Vec<u8> = Vec::new();
    let mut hdr = [0u8; REQ_HDR];
    let rd_err = |e: std::io::Error| tls_or_io("data server read", e);
    loop {
        if rd.buffer().len() < REQ_HDR {
            flush_tls(&mut rd, &mut out).await?;
            if rd.fill_buf().await.map_err(rd_err)?.is_empty() {
                return Ok(());
            }
        }
        rd.read_exact(&mut hdr).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Error::Protocol("connection closed inside a request header".into())
            }
            _ => rd_err(e),
        })?;
        let h = parse_req(&hdr)?;
        let (verdict, on_device) = check_request(regions, h.addr, h.len);
        // parse_req bounded len by MAX_REQUEST.
        let len = h.len as usize;
        if h.op == OP_READ && on_device {
            match device_read(regions, h.addr, len) {
                Ok(data) => {
                    encode_resp(&mut out, ST_OK, "", h.req_id, h.len);
                    write_tls(&mut rd, &out).await?;
                    out.clear();
                    write_tls(&mut rd, &data).await?;
                }
                Err(e) => status_frame(&mut out, h.req_id, &Err(e)),
            }
        } else if on_device {
            let mut applied = Ok(());
            let mut off = 0usize;
            while off < len {
                let n = (len - off).min(TLS_CHUNK);
                if rd.buffer().len() < n {
                    flush_tls(&mut rd, &mut out).await?;
                }
                rd.read_exact(&mut scratch[..n])
                    .await
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => Error::Protocol(format!(
                            "connection closed with {} payload bytes missing",
                            len - off
                        )),
                        _ => rd_err(e),
                    })?;
                if applied.is_ok() {
                    applied = device_write(regions, h.addr + off as u64, &scratch[..n]);
                }
                off += n;
            }
            status_frame(&mut out, h.req_id, &applied);
        } else if h.op == OP_READ {
            if verdict.is_err() {
                status_frame(&mut out, h.req_id, &verdict);
                continue;
            }
            encode_resp(&mut out, ST_OK, "", h.req_id, h.len);
            write_tls(&mut rd, &out).await?;
            out.clear();
            // In pieces copied out while the region is registered: rustls reads its input
            // across waits, when the owner may have unregistered and unmapped it. A piece that
            // can no longer be copied ends the connection (its header promised the bytes).
            let mut off = 0usize;
            while off < len {
                let n = (len - off).min(TLS_CHUNK);
                let at = h.addr + off as u64;
                let piece = &mut scratch[..n];
                regions
                    .while_registered(at, n as u64, || {
                        // SAFETY: `[at, at + n)` lies in a registration of this process,
                        // mapped readable while it stays registered; `piece` is our own.
                        unsafe {
                            std::ptr::copy_nonoverlapping(at as *const u8, piece.as_mut_ptr(), n)
                        }
                    })
                    .map_err(|e| {
                        Error::Failed(format!(
                            "the source of a READ was unregistered before it was sent: {e}"
                        ))
                    })?;
                write_tls(&mut rd, piece).await?;
                off += n;
            }
        } else {
            // Decrypted data is taken from the reader's buffer and copied into the region
            // while it is registered, piece by piece (never across a wait).
            let mut verdict = verdict;
            let mut off = 0usize;
            while off < len {
                if rd.buffer().is_empty() {
                    flush_tls(&mut rd, &mut out).await?;
                    if rd.fill_buf().await.map_err(rd_err)?.is_empty() {
                        return Err(Error::Protocol(format!(
                            "connection closed with {} payload bytes missing",
                            len - off
                        )));
                    }
                }
                let got = rd.buffer();
                let n = got.len().min(len - off);
                if verdict.is_ok() {
                    let at = h.addr + off as u64;
                    let from = &got[..n];
                    verdict = regions.while_registered(at, n as u64, || {
                        // SAFETY: `[at, at + n)` lies in a registration of this process,
                        // mapped read-write while it stays registered; `from` is the reader's
                        // buffer, which cannot overlap memory the owner registered.
                        unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), at as *mut u8, n) }
                    });
                }
                rd.consume(n);
                off += n;
            }
            status_frame(&mut out, h.req_id, &verdict);
        }
        if out.len() >= 64 << 10 {
            flush_tls(&mut rd, &mut out).await?;
        }
    }
}

async fn write_tls<S: AsyncWrite + Unpin>(s: &mut S, buf: &[u8]) -> Result<()> {
    s.write_all(buf)
        .await
        .map_err(|e| tls_or_io("data server sending responses", e))
}

/// Sends the queued responses and whatever rustls still holds.
async fn flush_tls<S: AsyncWrite + Unpin>(s: &mut S, out: &mut Vec<u8>) -> Result<()> {
    if !out.is_empty() {
        write_tls(s, out).await?;
        out.clear();
    }
    s.flush()
        .await
        .map_err(|e| tls_or_io("data server sending responses", e))
}

/// The response of a request that carries no data: OK, or the reason it was refused.
fn status_frame(out: &mut Vec<u8>, req_id: u64, verdict: &Result<()>) {
    match verdict {
        Ok(()) => encode_resp(out, ST_OK, "", req_id, 0),
        Err(e) => {
            let st = match e {
                Error::OutOfBounds(_) => ST_OUT_OF_BOUNDS,
                _ => ST_INVALID,
            };
            encode_resp(out, st, &e.to_string(), req_id, 0);
        }
    }
}

/// Responses waiting to be sent: headers and messages in `bytes`, READ data as references to
/// registered memory, sent in order with vectored writes.
#[derive(Default)]
struct Out {
    bytes: Vec<u8>,
    segs: Vec<Seg>,
    /// Send position: segment index and offset inside it.
    pos: usize,
    off: usize,
    /// READ bytes queued plus WRITE bytes acknowledged since the last flush.
    data: u64,
}

#[derive(Clone, Copy)]
enum Seg {
    Own { start: usize, len: usize },
    Mem { addr: u64, len: usize },
}

impl Out {
    fn own(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        f(&mut self.bytes);
        let len = self.bytes.len() - start;
        if len == 0 {
            return;
        }
        if let Some(Seg::Own { start: s, len: l }) = self.segs.last_mut() {
            if *s + *l == start {
                *l += len;
                return;
            }
        }
        self.segs.push(Seg::Own { start, len });
    }

    fn status(&mut self, req_id: u64, verdict: &Result<()>) {
        self.own(|b| status_frame(b, req_id, verdict));
    }

    fn write_ack(&mut self, req_id: u64, verdict: &Result<()>, len: u64) {
        self.status(req_id, verdict);
        self.data += len;
    }

    fn read_reply(&mut self, req_id: u64, verdict: &Result<()>, addr: u64, len: u64) {
        if verdict.is_err() {
            return self.status(req_id, verdict);
        }
        self.own(|b| encode_resp(b, ST_OK, "", req_id, len));
        if len > 0 {
            self.segs.push(Seg::Mem {
                addr,
                len: len as usize,
            });
            self.data += len;
        }
    }

    /// A READ reply of `len` bytes of device memory at `addr`, copied from the device straight
    /// into the queue (no buffer of its own and no second host copy); an error status instead
    /// when the copy fails.
    fn read_reply_device(&mut self, regions: &RegionTable, req_id: u64, addr: u64, len: usize) {
        let mut copied = Ok(());
        self.own(|b| {
            let start = b.len();
            encode_resp(b, ST_OK, "", req_id, len as u64);
            let at = b.len();
            b.reserve(len);
            let to = b.spare_capacity_mut().as_mut_ptr() as u64;
            copied = device_read_into(regions, addr, to, len);
            match copied {
                // SAFETY: the device copy initialized `len` bytes from `at`, inside the
                // capacity reserved above.
                Ok(()) => unsafe { b.set_len(at + len) },
                Err(_) => b.truncate(start),
            }
        });
        match copied {
            Ok(()) => self.data += len as u64,
            Err(e) => self.status(req_id, &Err(e)),
        }
    }

    fn full(&self) -> bool {
        self.segs.len() >= 2 * IOV_BATCH || self.data >= ACK_EVERY || self.bytes.len() >= 64 << 10
    }

    fn send_some(&self, fd: RawFd, regions: &RegionTable) -> std::io::Result<usize> {
        let mut iov = [EMPTY_IOV; IOV_BATCH];
        let mut mem = [(0u64, 0u64); IOV_BATCH];
        let (mut n, mut m) = (0, 0);
        for (k, seg) in self.segs[self.pos..].iter().enumerate() {
            if n == IOV_BATCH {
                break;
            }
            let skip = if k == 0 { self.off } else { 0 };
            let (base, len) = match *seg {
                Seg::Own { start, len } => (self.bytes[start..].as_ptr() as u64, len),
                Seg::Mem { addr, len } => {
                    mem[m] = (addr + skip as u64, (len - skip) as u64);
                    m += 1;
                    (addr, len)
                }
            };
            iov[n] = libc::iovec {
                iov_base: (base + skip as u64) as *mut libc::c_void,
                iov_len: len - skip,
            };
            n += 1;
        }
        // Mem segments are registered memory, still registered while the kernel reads them
        // (an owner that unregistered it may have reused it: its bytes must not leave); Own
        // ones point into `self.bytes`, not modified while this runs.
        regions
            .while_all_registered(mem[..m].iter().copied(), || {
                sendmsg_nosignal(fd, &iov[..n], libc::MSG_DONTWAIT)
            })
            .unwrap_or_else(|e| {
                Err(std::io::Error::other(format!(
                    "the source of a READ was unregistered before it was sent: {e}"
                )))
            })
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.pos < self.segs.len() {
            let len = match self.segs[self.pos] {
                Seg::Own { len, .. } | Seg::Mem { len, .. } => len,
            };
            let left = len - self.off;
            if n >= left {
                n -= left;
                self.pos += 1;
                self.off = 0;
            } else {
                self.off += n;
                n = 0;
            }
        }
    }

    async fn flush(&mut self, stream: &TcpStream, regions: &RegionTable) -> Result<()> {
        let fd = stream.as_raw_fd();
        while self.pos < self.segs.len() {
            stream
                .writable()
                .await
                .map_err(|e| Error::io("data server write", e))?;
            match stream.try_io(Interest::WRITABLE, || self.send_some(fd, regions)) {
                Ok(n) => self.advance(n),
                Err(e) if retry(&e) => continue,
                Err(e) => return Err(Error::io("data server sending responses", e)),
            }
        }
        self.bytes.clear();
        self.segs.clear();
        self.pos = 0;
        self.off = 0;
        self.data = 0;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// The initiator's side of the tcp path to one peer's data server: a small pool of
/// connections, opened lazily, reused across calls, used concurrently by concurrent calls
/// (each call takes its connections out of the pool and returns the clean ones). Every
/// connection proves `auth` to the server, and the server to it, before it carries a request.
pub struct TcpTransport {
    peer: SocketAddr,
    max_conns: usize,
    auth: Arc<DataAuth>,
    idle: Mutex<Vec<Conn>>,
}

impl TcpTransport {
    /// A transport to the data server at `peer`, with [`DEFAULT_CONNECTIONS`] connections.
    /// Nothing is connected until the first transfer.
    pub fn new(peer: SocketAddr, auth: Arc<DataAuth>) -> Self {
        Self::with_connections(peer, DEFAULT_CONNECTIONS, auth)
    }

    /// As [`new`](Self::new) with `n` connections (1..=16) per call at most.
    pub fn with_connections(peer: SocketAddr, n: usize, auth: Arc<DataAuth>) -> Self {
        TcpTransport {
            peer,
            max_conns: n.clamp(1, MAX_CONNECTIONS),
            auth,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The peer's data server address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn pool(&self) -> MutexGuard<'_, Vec<Conn>> {
        // Holding the lock never spans a panic-prone step that leaves the Vec invalid.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, op: u8, ops: &CheckedOps, deadline: Instant) -> Result<()> {
        let total = ops.total_bytes();
        if total == 0 {
            return Ok(());
        }
        let what = if op == OP_WRITE { "write" } else { "read" };
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "tcp {what} to {}: the deadline passed before it started",
                self.peer
            )));
        }
        // One connection per MiB up to the pool size: a small transfer is one round trip on
        // one connection; large ones spread over all.
        let slices = ops.ops().len() as u64 + total / SLICE;
        let want = ((total / SLICE).max(1).min(slices) as usize).min(self.max_conns);
        let mut conns = self.take(want, deadline)?;
        let r = drive(&mut conns, op, ops.ops(), total, deadline, self.peer);
        let mut pool = self.pool();
        for c in conns {
            if !c.clean() {
                c.abort();
            } else if pool.len() < self.max_conns {
                pool.push(c);
            }
        }
        r
    }

    fn take(&self, want: usize, deadline: Instant) -> Result<Vec<Conn>> {
        let mut got = Vec::with_capacity(want);
        {
            let mut pool = self.pool();
            while got.len() < want {
                let Some(mut c) = pool.pop() else { break };
                // The server never speaks first: a readable idle connection was closed by it
                // (restart, shutdown); drop it rather than fail the call on it.
                if c.alive() {
                    got.push(c);
                }
            }
        }
        while got.len() < want {
            match connect(self.peer, deadline, &self.auth) {
                Ok(c) => got.push(c),
                Err(e) if got.is_empty() => return Err(e),
                Err(e) => {
                    mf_log!(DEBUG, "extra data connection to {} failed: {e}", self.peer);
                    break;
                }
            }
        }
        Ok(got)
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn write(&self, ops: &CheckedOps, deadline: Instant) -> Result<()> {
        self.run(OP_WRITE, ops, deadline)
    }

    fn read(&self, ops: &CheckedOps, deadline: Instant) -> Result<()> {
        self.run(OP_READ, ops, deadline)
    }
}

fn time_left(deadline: Instant, what: &str, peer: SocketAddr) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout(format!(
            "{what} data server {peer}: the deadline passed"
        )));
    }
    Ok(left)
}

fn sock_err(peer: SocketAddr, what: &str, e: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected => {
            Error::PeerGone(format!(
                "data server {peer} closed the connection while {what} ({e})"
            ))
        }
        WouldBlock | TimedOut => Error::Timeout(format!(
            "data server {peer}: {what} did not finish within the deadline"
        )),
        _ => Error::io(format!("data server {peer}: {what}"), e),
    }
}

fn connect(peer: SocketAddr, deadline: Instant, auth: &DataAuth) -> Result<Conn> {
    use socket2::{Domain, Protocol, Socket, Type};
    let left = time_left(deadline, "connecting to", peer)?;
    let sock = Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| Error::io(format!("socket for data server {peer}"), e))?;
    let _ = sock.set_tcp_nodelay(true);
    // Before connect, so the window scale is negotiated for the large buffers.
    let _ = sock.set_send_buffer_size(SOCK_BUF);
    let _ = sock.set_recv_buffer_size(SOCK_BUF);
    let _ = sock.set_tcp_keepalive(&crate::net::keepalive());
    sock.connect_timeout(&peer.into(), left).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Error::PeerGone(format!(
                "no data server listening at {peer} (connection refused)"
            ))
        } else {
            sock_err(peer, "connecting", e)
        }
    })?;
    let s: std::net::TcpStream = sock.into();
    time_left(deadline, "handshake with", peer)?;
    let mut io = Deadlined { sock: &s, deadline };
    let tls = match auth.tls() {
        None => {
            client_handshake(&mut io, auth, peer)?;
            None
        }
        Some(t) => {
            let name = rustls::pki_types::ServerName::IpAddress(peer.ip().into());
            let mut c = rustls::ClientConnection::new(t.client.clone(), name)
                .map_err(|e| Error::Tls(format!("TLS client for data server {peer}: {e}")))?;
            c.set_buffer_limit(Some(TLS_SEND_BUFFER));
            let r = client_handshake(&mut rustls::Stream::new(&mut c, &mut io), auth, peer);
            match r {
                Err(Error::PeerGone(m)) if c.is_handshaking() => {
                    return Err(Error::Tls(format!(
                        "the data server at {peer} closed the connection during the TLS \
                         handshake: TLS may be off there, or it refused this engine's \
                         certificate ({m})"
                    )))
                }
                r => r?,
            }
            Some(Box::new(c))
        }
    };
    s.set_nonblocking(true)
        .map_err(|e| Error::io("data connection nonblocking", e))?;
    let fd = s.as_raw_fd();
    Ok(Conn {
        sock: s,
        fd,
        tls_in: SockBuf::new(if tls.is_some() { TLS_READ_BUFFER } else { 0 }),
        tls,
        rbuf: vec![0u8; STAGING].into_boxed_slice(),
        rs: 0,
        re: 0,
        q: VecDeque::with_capacity(WINDOW_REQS),
        sent: 0,
        inflight: 0,
        rx_data: None,
        next_id: 1,
    })
}

/// A request on its way: `wire` counts the bytes of header and payload already sent.
struct Pending {
    hdr: [u8; REQ_HDR],
    req_id: u64,
    local: u64,
    len: u64,
    wire: u64,
}

struct Conn {
    sock: std::net::TcpStream,
    fd: RawFd,
    /// The TLS session, when TLS is on: frames go through it instead of straight to `fd`.
    tls: Option<Box<rustls::ClientConnection>>,
    /// TLS records received from the socket and not yet handed to rustls.
    tls_in: SockBuf,
    rbuf: Box<[u8]>,
    rs: usize,
    re: usize,
    /// Requests of the current call in order; `q[..sent]` are fully on the wire.
    q: VecDeque<Pending>,
    sent: usize,
    inflight: u64,
    /// READ data for `q.front()` still to arrive: (destination, bytes left).
    rx_data: Option<(u64, u64)>,
    next_id: u64,
}

impl Conn {
    /// Closes a connection the call gave up on, discarding what its send queue still holds:
    /// a plain close would let the kernel deliver those bytes once the path is back, and the
    /// peer would apply a write its caller was told had failed, over whatever came after it.
    fn abort(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads size_of::<linger>() bytes from a local that lives for the
        // call; fd belongs to `self.sock`, still open here.
        let rc = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            mf_log!(
                WARN,
                "could not make an abandoned data connection close abortively: {}",
                std::io::Error::last_os_error()
            );
        }
        drop(self);
    }

    fn clean(&self) -> bool {
        self.q.is_empty() && self.rx_data.is_none() && self.rs == self.re
    }

    fn alive(&mut self) -> bool {
        if let Some(tls) = self.tls.as_mut() {
            return tls_idle_alive(tls, &mut self.tls_in.reader(&self.sock));
        }
        let mut b = 0u8;
        // SAFETY: one byte into a local; MSG_PEEK leaves the stream untouched.
        let rc = unsafe {
            libc::recv(
                self.fd,
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        rc < 0 && retry(&std::io::Error::last_os_error())
    }

    fn has_room(&self) -> bool {
        self.q.len() < WINDOW_REQS && self.inflight < WINDOW_BYTES
    }

    fn push(&mut self, op: u8, local: u64, remote: u64, len: u64) {
        let req_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.q.push_back(Pending {
            hdr: encode_req(op, req_id, remote, len),
            req_id,
            local,
            len,
            wire: 0,
        });
        self.inflight += len;
    }

    /// Whether there is something to send: requests not yet on the wire, or TLS records.
    fn wants_send(&self) -> bool {
        self.sent < self.q.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Counts `n` more bytes of the queue (headers and WRITE payloads, in order) as sent.
    fn advance_sent(&mut self, op: u8, mut left: u64) {
        while left > 0 && self.sent < self.q.len() {
            let p = &mut self.q[self.sent];
            let size = REQ_HDR as u64 + if op == OP_WRITE { p.len } else { 0 };
            let take = left.min(size - p.wire);
            p.wire += take;
            left -= take;
            if p.wire == size {
                self.sent += 1;
            }
        }
    }

    /// Sends what the socket takes now, straight from the headers and the caller's buffers.
    fn send(&mut self, op: u8, peer: SocketAddr) -> Result<()> {
        if self.tls.is_some() {
            return self.send_tls(op, peer);
        }
        while self.sent < self.q.len() {
            let mut iov = [EMPTY_IOV; IOV_BATCH];
            let mut n = 0;
            for p in self.q.range(self.sent..) {
                if n + 2 > IOV_BATCH {
                    break;
                }
                let w = p.wire as usize;
                if w < REQ_HDR {
                    iov[n] = libc::iovec {
                        iov_base: p.hdr[w..].as_ptr() as *mut libc::c_void,
                        iov_len: REQ_HDR - w,
                    };
                    n += 1;
                }
                if op == OP_WRITE {
                    let done = p.wire.saturating_sub(REQ_HDR as u64);
                    if done < p.len {
                        iov[n] = libc::iovec {
                            iov_base: (p.local + done) as *mut libc::c_void,
                            iov_len: (p.len - done) as usize,
                        };
                        n += 1;
                    }
                }
            }
            // Payload iovecs point into local ranges that CheckedOps placed in registered
            // memory; header iovecs into `self.q`, untouched until the call returns.
            let sent = match sendmsg_nosignal(self.fd, &iov[..n], libc::MSG_DONTWAIT) {
                Ok(k) => k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(sock_err(peer, "sending requests", e)),
            };
            self.advance_sent(op, sent);
        }
        Ok(())
    }

    /// TLS: hands rustls what it takes of the queue (it encrypts at once, up to its buffer
    /// limit), then writes its records while the socket takes them.
    fn send_tls(&mut self, op: u8, peer: SocketAddr) -> Result<()> {
        loop {
            while self.sent < self.q.len() {
                let Some(tls) = self.tls.as_mut() else {
                    return Ok(());
                };
                let mut parts: Vec<IoSlice<'_>> = Vec::with_capacity(8);
                for p in self.q.range(self.sent..) {
                    if parts.len() + 2 > IOV_BATCH {
                        break;
                    }
                    let w = p.wire as usize;
                    if w < REQ_HDR {
                        parts.push(IoSlice::new(&p.hdr[w..]));
                    }
                    if op == OP_WRITE {
                        let done = p.wire.saturating_sub(REQ_HDR as u64);
                        if done < p.len {
                            // SAFETY: the local range of a WRITE op, which CheckedOps placed
                            // in registered memory that stays readable for the call.
                            let payload = unsafe {
                                std::slice::from_raw_parts(
                                    (p.local + done) as *const u8,
                                    (p.len - done) as usize,
                                )
                            };
                            parts.push(IoSlice::new(payload));
                        }
                    }
                }
                let n = tls
                    .writer()
                    .write_vectored(&parts)
                    .map_err(|e| handshake_err(peer, "encrypting requests", e))?;
                drop(parts);
                if n == 0 {
                    break;
                }
                self.advance_sent(op, n as u64);
            }
            let Some(tls) = self.tls.as_mut() else {
                return Ok(());
            };
            if !tls.wants_write() {
                return Ok(());
            }
            let mut sock = NoSigPipe {
                fd: self.fd,
                flags: libc::MSG_DONTWAIT,
            };
            while tls.wants_write() {
                match tls.write_tls(&mut sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(sock_err(peer, "sending requests", e)),
                }
            }
            if self.sent == self.q.len() {
                return Ok(());
            }
        }
    }

    /// Receives what has arrived and applies the responses.
    fn recv(&mut self, op: u8, peer: SocketAddr, done: &mut u64) -> Result<()> {
        if self.tls.is_some() {
            return self.recv_tls(op, peer, done);
        }
        loop {
            if let Some((addr, left)) = self.rx_data.filter(|_| self.rs == self.re) {
                // Nothing staged: the rest of this READ's data goes straight to its
                // destination. After a large one only the next header is taken along, so that
                // the next payload can land in place too.
                self.rs = 0;
                self.re = 0;
                let big = self.q.front().is_some_and(|p| p.len >= DIRECT_MIN);
                let tail = if big { RESP_HDR } else { self.rbuf.len() };
                // SAFETY: the destination is the rest of the local range of a READ op, which
                // CheckedOps placed in registered memory; the tail is our staging buffer.
                let r =
                    unsafe { recv2(self.fd, addr, left as usize, self.rbuf.as_mut_ptr(), tail) };
                match r {
                    Ok(0) => return Err(eof(peer)),
                    Ok(n) if n as u64 >= left => {
                        self.re = n - left as usize;
                        self.rx_data = None;
                        self.complete(done);
                        self.process(op, peer, done)?;
                    }
                    Ok(n) => self.rx_data = Some((addr + n as u64, left - n as u64)),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(sock_err(peer, "receiving data", e)),
                }
                continue;
            }
            if self.rs > 0 {
                self.rbuf.copy_within(self.rs..self.re, 0);
                self.re -= self.rs;
                self.rs = 0;
            }
            match (&self.sock).read(&mut self.rbuf[self.re..]) {
                Ok(0) => return Err(eof(peer)),
                Ok(n) => {
                    self.re += n;
                    self.process(op, peer, done)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(sock_err(peer, "receiving responses", e)),
            }
        }
    }

    /// TLS: decrypts what arrived into the staging buffer and applies it. Plaintext rustls
    /// holds is drained before the socket is read again, so nothing waits inside rustls while
    /// `poll` waits on the socket.
    fn recv_tls(&mut self, op: u8, peer: SocketAddr, done: &mut u64) -> Result<()> {
        loop {
            loop {
                if self.rs > 0 {
                    self.rbuf.copy_within(self.rs..self.re, 0);
                    self.re -= self.rs;
                    self.rs = 0;
                }
                // `process` leaves at most one partial response header and message staged.
                debug_assert!(self.re + RESP_HDR + MAX_MSG < self.rbuf.len());
                let Some(tls) = self.tls.as_mut() else {
                    return Ok(());
                };
                if let Some((addr, left)) = self.rx_data.filter(|_| self.rs == self.re) {
                    // Nothing staged: this READ's data goes from rustls to its destination.
                    // SAFETY: the rest of the local range of a READ op, which CheckedOps placed
                    // in registered memory, writable for the call; nothing else refers to it.
                    let dest =
                        unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, left as usize) };
                    match tls.reader().read(dest) {
                        Ok(0) => return Err(eof(peer)),
                        Ok(n) if n as u64 == left => {
                            self.rx_data = None;
                            self.complete(done);
                        }
                        Ok(n) => self.rx_data = Some((addr + n as u64, left - n as u64)),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            return Err(eof(peer))
                        }
                        Err(e) => return Err(handshake_err(peer, "receiving data", e)),
                    }
                    continue;
                }
                match tls.reader().read(&mut self.rbuf[self.re..]) {
                    Ok(0) => return Err(eof(peer)),
                    Ok(n) => {
                        self.re += n;
                        self.process(op, peer, done)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(eof(peer))
                    }
                    Err(e) => return Err(handshake_err(peer, "receiving responses", e)),
                }
            }
            let Some(tls) = self.tls.as_mut() else {
                return Ok(());
            };
            match tls.read_tls(&mut self.tls_in.reader(&self.sock)) {
                Ok(0) => return Err(eof(peer)),
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // Tell the server why, if the socket still takes it.
                        let _ = tls.write_tls(&mut NoSigPipe {
                            fd: self.fd,
                            flags: libc::MSG_DONTWAIT,
                        });
                        return Err(Error::Tls(format!("data server {peer}: {e}")));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(sock_err(peer, "receiving responses", e)),
            }
        }
    }

    fn process(&mut self, op: u8, peer: SocketAddr, done: &mut u64) -> Result<()> {
        loop {
            if let Some((addr, left)) = self.rx_data {
                let avail = (self.re - self.rs) as u64;
                if avail == 0 {
                    return Ok(());
                }
                let take = left.min(avail);
                // SAFETY: destination as in `recv`: inside a checked local range, and `take`
                // does not exceed what is left of it. The source is our staging buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.rbuf.as_ptr().add(self.rs),
                        addr as *mut u8,
                        take as usize,
                    )
                };
                self.rs += take as usize;
                if take == left {
                    self.rx_data = None;
                    self.complete(done);
                } else {
                    self.rx_data = Some((addr + take, left - take));
                }
                continue;
            }
            if self.re - self.rs < RESP_HDR {
                return Ok(());
            }
            let h = parse_resp(&self.rbuf[self.rs..self.rs + RESP_HDR])?;
            if self.re - self.rs < RESP_HDR + h.msg_len {
                return Ok(());
            }
            let front = match self.q.front() {
                Some(f) if self.sent > 0 && f.req_id == h.req_id => f,
                _ => {
                    return Err(Error::Protocol(format!(
                        "data server {peer} answered request {} out of turn",
                        h.req_id
                    )))
                }
            };
            let msg_at = self.rs + RESP_HDR;
            let msg = String::from_utf8_lossy(&self.rbuf[msg_at..msg_at + h.msg_len]);
            match h.status {
                ST_OK => {
                    let expect = if op == OP_READ { front.len } else { 0 };
                    if h.data_len != expect {
                        return Err(Error::Protocol(format!(
                            "data server {peer} sent {} bytes for a {expect}-byte request",
                            h.data_len
                        )));
                    }
                    let local = front.local;
                    self.rs = msg_at + h.msg_len;
                    if expect == 0 {
                        self.complete(done);
                    } else {
                        self.rx_data = Some((local, expect));
                    }
                }
                ST_OUT_OF_BOUNDS => {
                    return Err(Error::OutOfBounds(format!("data server {peer}: {msg}")))
                }
                ST_INVALID => {
                    return Err(Error::InvalidParam(format!("data server {peer}: {msg}")))
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "data server {peer} answered with unknown status {other}"
                    )))
                }
            }
        }
    }

    fn complete(&mut self, done: &mut u64) {
        if let Some(p) = self.q.pop_front() {
            self.sent -= 1;
            self.inflight -= p.len;
            *done += p.len;
        }
    }
}

/// Bytes read from a socket in large pieces and handed out in the small ones rustls asks for.
/// Whoever reads through it must read until `WouldBlock` before waiting in `poll`: bytes
/// left here would not wake it.
struct SockBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl SockBuf {
    fn new(cap: usize) -> Self {
        SockBuf {
            buf: vec![0u8; cap].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn reader<'a>(&'a mut self, sock: &'a std::net::TcpStream) -> SockBufReader<'a> {
        SockBufReader { b: self, sock }
    }
}

struct SockBufReader<'a> {
    b: &'a mut SockBuf,
    sock: &'a std::net::TcpStream,
}

impl Read for SockBufReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let b = &mut *self.b;
        if b.start == b.end {
            if out.len() >= b.buf.len() {
                return (&mut &*self.sock).read(out);
            }
            let got = (&mut &*self.sock).read(&mut b.buf)?;
            b.start = 0;
            b.end = got;
        }
        let n = out.len().min(b.end - b.start);
        out[..n].copy_from_slice(&b.buf[b.start..b.start + n]);
        b.start += n;
        Ok(n)
    }
}

/// Whether an idle pooled TLS connection may be used: whatever arrived on it is TLS
/// housekeeping (a key update), not data, and it is not closed. Never blocks.
fn tls_idle_alive(tls: &mut rustls::ClientConnection, sock: &mut impl Read) -> bool {
    loop {
        match tls.read_tls(sock) {
            Ok(0) => return false,
            Ok(_) => match tls.process_new_packets() {
                Ok(st) if st.plaintext_bytes_to_read() == 0 && !st.peer_has_closed() => {}
                _ => return false,
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn eof(peer: SocketAddr) -> Error {
    Error::PeerGone(format!(
        "data server {peer} closed the connection mid-transfer"
    ))
}

/// Yields the slices of `ops` in order.
struct Slices<'a> {
    ops: &'a [Op],
    i: usize,
    off: u64,
}

impl Slices<'_> {
    fn skip_empty(&mut self) {
        while self.i < self.ops.len() && self.ops[self.i].len == self.off {
            self.i += 1;
            self.off = 0;
        }
    }

    fn next(&mut self) -> Option<(u64, u64, u64)> {
        self.skip_empty();
        let op = self.ops.get(self.i)?;
        let take = (op.len - self.off).min(SLICE);
        let s = (op.local + self.off, op.remote + self.off, take);
        self.off += take;
        self.skip_empty();
        Some(s)
    }

    fn is_done(&self) -> bool {
        self.i >= self.ops.len()
    }
}

/// Runs one call over `conns` on this thread: hand out slices to connections with room, send
/// what the sockets take, wait in `poll` for acknowledgements and data, until all is done, an
/// error arrives, or the deadline passes.
fn drive(
    conns: &mut [Conn],
    op: u8,
    ops: &[Op],
    total: u64,
    deadline: Instant,
    peer: SocketAddr,
) -> Result<()> {
    let mut slices = Slices { ops, i: 0, off: 0 };
    slices.skip_empty();
    let mut done = 0u64;
    loop {
        'hand_out: loop {
            let mut gave = false;
            for c in conns.iter_mut() {
                if !c.has_room() {
                    continue;
                }
                let Some((l, r, n)) = slices.next() else {
                    break 'hand_out;
                };
                c.push(op, l, r, n);
                gave = true;
            }
            if !gave {
                break;
            }
        }
        for c in conns.iter_mut() {
            if c.wants_send() {
                c.send(op, peer)?;
            }
        }
        if slices.is_done() && conns.iter().all(|c| c.q.is_empty()) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let what = if op == OP_WRITE { "write" } else { "read" };
            return Err(Error::Timeout(format!(
                "tcp {what} to {peer}: {done} of {total} bytes done when the deadline passed"
            )));
        }
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut fds = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; MAX_CONNECTIONS];
        for (k, c) in conns.iter().enumerate() {
            if !c.q.is_empty() {
                let out = if c.wants_send() { libc::POLLOUT } else { 0 };
                fds[k] = libc::pollfd {
                    fd: c.fd,
                    events: libc::POLLIN | out,
                    revents: 0,
                };
            }
        }
        // SAFETY: `fds` holds `conns.len()` (<= MAX_CONNECTIONS) initialized entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), conns.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("poll on data connections", e));
        }
        for (k, c) in conns.iter_mut().enumerate() {
            let ev = fds[k].revents;
            if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                c.recv(op, peer, &mut done)?;
            }
            if ev & libc::POLLOUT != 0 {
                c.send(op, peer)?;
            }
        }
    }
}
