//! The cross-host path: each engine runs a data server; initiators hold a few pooled
//! connections to each peer's server and pipeline sliced requests over them.
//!
//! # Wire protocol (all integers little-endian)
//!
//! Connection start, both ways: `"MFTD"`, version (1), status (0 ok, 1 version refused), two
//! zero bytes. Then [`authenticate`] (a no-op today).
//!
//! Request, 32 bytes: version u8, op u8 (1 WRITE, 2 READ), 6 zero bytes, req_id u64,
//! addr u64, len u64; a WRITE is followed by its `len` payload bytes. `len` is at most
//! [`MAX_REQUEST`]; anything larger, an unknown op or version, or non-zero padding is a
//! protocol error that closes that connection (and only it).
//!
//! Response, 24 bytes: version u8, status u8 (0 OK, 1 OUT_OF_BOUNDS, 2 INVALID), 2 zero bytes,
//! msg_len u32 (at most 1024), req_id u64, data_len u64; followed by the message (errors) and
//! then `data_len` bytes (an OK READ). Responses come in request order on each connection.
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

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{CheckedOps, Op, Transport};
use crate::error::{Error, Result};
use crate::log::{DEBUG, INFO, WARN};
use crate::mem::regions::RegionTable;
use crate::mf_log;

const MAGIC: [u8; 4] = *b"MFTD";
/// Version of the data protocol; both ends must speak the same one.
pub const PROTOCOL_VERSION: u8 = 1;
const HELLO_LEN: usize = 8;
const HELLO_OK: u8 = 0;
const HELLO_BAD_VERSION: u8 = 1;
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
/// A client must complete the handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

fn hello(status: u8) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = PROTOCOL_VERSION;
    h[5] = status;
    h
}

/// Hook for authenticating a data connection, run by the initiator right after the hello
/// exchange (the server runs [`authenticate_server`] at the same point). Today the data port
/// trusts its network, like upstream's; a token or TLS step slots in here without changing
/// the framing after it.
pub fn authenticate(_stream: &mut std::net::TcpStream) -> Result<()> {
    Ok(())
}

/// Server side of [`authenticate`].
async fn authenticate_server(_stream: &TcpStream) -> Result<()> {
    Ok(())
}

fn sendmsg_nosignal(fd: RawFd, iov: &[libc::iovec]) -> std::io::Result<usize> {
    // SAFETY: zeroed is a valid msghdr (null name and control, no iovecs); the fields we set
    // point at `iov`, which outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` describes `iov.len()` valid iovecs; each points at memory the caller
    // vouches is readable for its length (see the callers). MSG_NOSIGNAL: a vanished peer
    // must give EPIPE, not kill the process with SIGPIPE.
    let rc = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as usize)
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
/// registered memory. Runs on the shared runtime; dropping it stops accepting and closes
/// every connection (in-flight requests on them fail at their initiators).
pub struct TcpDataServer {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl TcpDataServer {
    /// Binds `bind` (port 0 picks one) and starts serving `regions`.
    pub fn start(bind: SocketAddr, regions: Arc<RegionTable>) -> Result<Self> {
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
        rt.spawn(accept_loop(listener, regions, rx));
        mf_log!(INFO, "data server listening on {addr}");
        Ok(TcpDataServer { addr, shutdown: tx })
    }

    /// Serves `regions` on a listener bound earlier (a port reserved before the engine
    /// existed, see `get_rpc_port`).
    pub fn adopt(listener: std::net::TcpListener, regions: Arc<RegionTable>) -> Result<Self> {
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
        rt.spawn(accept_loop(listener, regions, rx));
        mf_log!(INFO, "data server listening on {addr} (reserved port)");
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
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, peer)) =
        crate::net::accept(&listener, &mut shutdown, "data server").await
    {
        let regions = regions.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = serve_conn(&stream, &regions) => r,
                _ = shutdown.changed() => Ok(()),
            };
            match result {
                Ok(()) => mf_log!(DEBUG, "data connection from {peer} closed"),
                Err(e) => mf_log!(WARN, "data server dropped the connection from {peer}: {e}"),
            }
        });
    }
}

async fn server_hello(stream: &TcpStream) -> Result<()> {
    let mut h = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        stream
            .readable()
            .await
            .map_err(|e| Error::io("data server handshake", e))?;
        match stream.try_read(&mut h[got..]) {
            Ok(0) => return Err(Error::Protocol("closed during the handshake".into())),
            Ok(n) => got += n,
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(Error::io("data server handshake", e)),
        }
    }
    if h[..4] != MAGIC {
        return Err(Error::Protocol(
            "not a memfabric data client (bad magic)".into(),
        ));
    }
    let ok = h[4] == PROTOCOL_VERSION;
    let reply = hello(if ok { HELLO_OK } else { HELLO_BAD_VERSION });
    write_all(stream, &reply).await?;
    if !ok {
        return Err(Error::Protocol(format!(
            "client speaks data protocol {} (this server {PROTOCOL_VERSION})",
            h[4]
        )));
    }
    Ok(())
}

fn retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        stream
            .writable()
            .await
            .map_err(|e| Error::io("data server write", e))?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(Error::io("data server write", e)),
        }
    }
    Ok(())
}

/// One connection: requests are answered in order. Responses are queued and leave together
/// in one `sendmsg` when input runs dry or enough piled up.
async fn serve_conn(stream: &TcpStream, regions: &RegionTable) -> Result<()> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, server_hello(stream))
        .await
        .map_err(|_| Error::Timeout("data client did not complete the handshake".into()))??;
    authenticate_server(stream).await?;
    let fd = stream.as_raw_fd();
    let mut rbuf = vec![0u8; STAGING];
    let (mut rs, mut re) = (0usize, 0usize);
    let mut out = Out::default();
    // A client that never lets input run dry would otherwise keep this worker to itself.
    let mut budget = 64u32;
    loop {
        while re - rs >= REQ_HDR {
            let h = parse_req(&rbuf[rs..rs + REQ_HDR])?;
            rs += REQ_HDR;
            let verdict = regions.check(h.addr, h.len);
            if h.op == OP_READ {
                out.read_reply(h.req_id, &verdict, h.addr, h.len);
            } else {
                // parse_req bounded len by MAX_REQUEST.
                let len = h.len as usize;
                let avail = len.min(re - rs);
                let rest = len - avail;
                if verdict.is_ok() && avail > 0 {
                    // SAFETY: the region table holds `[addr, addr + len)` inside one
                    // registration of this process; registration verified the range mapped
                    // read-write and the owner keeps it so until it unregisters. The source is
                    // our own staging buffer, which cannot overlap registered memory handed
                    // to us by the owner.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            rbuf.as_ptr().add(rs),
                            h.addr as *mut u8,
                            avail,
                        )
                    };
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
                        let dest = h.addr + avail as u64;
                        re = recv_payload(stream, fd, dest, rest, &mut rbuf[..tail], &mut out)
                            .await?;
                    } else {
                        out.flush(stream).await?;
                        discard(stream, &mut rbuf, rest).await?;
                    }
                }
                out.write_ack(h.req_id, &verdict, h.len);
            }
            if out.full() {
                out.flush(stream).await?;
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
                wait_readable(stream, &mut out).await?;
            }
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(Error::io("data server read", e)),
        }
    }
}

/// Input ran dry: sends the acknowledgements queued so far (the initiator may be waiting for
/// them before it sends more), then waits for more input.
async fn wait_readable(stream: &TcpStream, out: &mut Out) -> Result<()> {
    out.flush(stream).await?;
    stream
        .readable()
        .await
        .map_err(|e| Error::io("data server read", e))
}

/// Receives the `len` remaining payload bytes straight into registered memory at `addr`, and
/// in the same system calls whatever follows into `tail`; returns how much landed in `tail`.
async fn recv_payload(
    stream: &TcpStream,
    fd: RawFd,
    addr: u64,
    len: usize,
    tail: &mut [u8],
    out: &mut Out,
) -> Result<usize> {
    let mut done = 0usize;
    loop {
        let r = stream.try_io(Interest::READABLE, || {
            // SAFETY: the caller checked `[addr, addr + len)` against the region table (see
            // serve_conn), so `[addr + done, addr + len)` is registered memory; `tail` is our
            // own buffer. The kernel reports EFAULT rather than faulting if the owner broke
            // its contract and unmapped the region.
            unsafe {
                recv2(
                    fd,
                    addr + done as u64,
                    len - done,
                    tail.as_mut_ptr(),
                    tail.len(),
                )
            }
        });
        match r {
            Ok(0) => {
                return Err(Error::Protocol(format!(
                    "connection closed with {} payload bytes missing",
                    len - done
                )))
            }
            Ok(n) if done + n >= len => return Ok(done + n - len),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(stream, out).await?;
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
        if let Some(Seg::Own { start: s, len: l }) = self.segs.last_mut() {
            if *s + *l == start {
                *l += len;
                return;
            }
        }
        self.segs.push(Seg::Own { start, len });
    }

    fn status(&mut self, req_id: u64, verdict: &Result<()>) {
        match verdict {
            Ok(()) => self.own(|b| encode_resp(b, ST_OK, "", req_id, 0)),
            Err(e) => {
                let st = match e {
                    Error::OutOfBounds(_) => ST_OUT_OF_BOUNDS,
                    _ => ST_INVALID,
                };
                let msg = e.to_string();
                self.own(|b| encode_resp(b, st, &msg, req_id, 0));
            }
        }
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

    fn full(&self) -> bool {
        self.segs.len() >= 2 * IOV_BATCH || self.data >= ACK_EVERY || self.bytes.len() >= 64 << 10
    }

    fn send_some(&self, fd: RawFd) -> std::io::Result<usize> {
        let mut iov = [EMPTY_IOV; IOV_BATCH];
        let mut n = 0;
        for (k, seg) in self.segs[self.pos..].iter().enumerate() {
            if n == IOV_BATCH {
                break;
            }
            let skip = if k == 0 { self.off } else { 0 };
            let (base, len) = match *seg {
                Seg::Own { start, len } => (self.bytes[start..].as_ptr() as u64, len),
                Seg::Mem { addr, len } => (addr, len),
            };
            iov[n] = libc::iovec {
                iov_base: (base + skip as u64) as *mut libc::c_void,
                iov_len: len - skip,
            };
            n += 1;
        }
        // Mem segments were checked against the region table when queued (read_reply); Own
        // ones point into `self.bytes`, not modified while this runs.
        sendmsg_nosignal(fd, &iov[..n])
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

    async fn flush(&mut self, stream: &TcpStream) -> Result<()> {
        let fd = stream.as_raw_fd();
        while self.pos < self.segs.len() {
            stream
                .writable()
                .await
                .map_err(|e| Error::io("data server write", e))?;
            match stream.try_io(Interest::WRITABLE, || self.send_some(fd)) {
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
/// (each call takes its connections out of the pool and returns the clean ones).
pub struct TcpTransport {
    peer: SocketAddr,
    max_conns: usize,
    idle: Mutex<Vec<Conn>>,
}

impl TcpTransport {
    /// A transport to the data server at `peer`, with [`DEFAULT_CONNECTIONS`] connections.
    /// Nothing is connected until the first transfer.
    pub fn new(peer: SocketAddr) -> Self {
        Self::with_connections(peer, DEFAULT_CONNECTIONS)
    }

    /// As [`new`](Self::new) with `n` connections (1..=16) per call at most.
    pub fn with_connections(peer: SocketAddr, n: usize) -> Self {
        TcpTransport {
            peer,
            max_conns: n.clamp(1, MAX_CONNECTIONS),
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
            if c.clean() && pool.len() < self.max_conns {
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
                let Some(c) = pool.pop() else { break };
                // The server never speaks first: a readable idle connection was closed by it
                // (restart, shutdown); drop it rather than fail the call on it.
                if c.alive() {
                    got.push(c);
                }
            }
        }
        while got.len() < want {
            match connect(self.peer, deadline) {
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

fn connect(peer: SocketAddr, deadline: Instant) -> Result<Conn> {
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
    let mut s: std::net::TcpStream = sock.into();
    let left = time_left(deadline, "handshake with", peer)?;
    s.set_write_timeout(Some(left))
        .and_then(|_| s.set_read_timeout(Some(left)))
        .map_err(|e| Error::io("data connection timeouts", e))?;
    s.write_all(&hello(HELLO_OK))
        .map_err(|e| sock_err(peer, "sending the handshake", e))?;
    let mut reply = [0u8; HELLO_LEN];
    s.read_exact(&mut reply)
        .map_err(|e| sock_err(peer, "waiting for the handshake", e))?;
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
    authenticate(&mut s)?;
    s.set_nonblocking(true)
        .map_err(|e| Error::io("data connection nonblocking", e))?;
    let fd = s.as_raw_fd();
    Ok(Conn {
        sock: s,
        fd,
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
    fn clean(&self) -> bool {
        self.q.is_empty() && self.rx_data.is_none() && self.rs == self.re
    }

    fn alive(&self) -> bool {
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

    /// Sends what the socket takes now, straight from the headers and the caller's buffers.
    fn send(&mut self, op: u8, peer: SocketAddr) -> Result<()> {
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
            let sent = match sendmsg_nosignal(self.fd, &iov[..n]) {
                Ok(k) => k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(sock_err(peer, "sending requests", e)),
            };
            let mut left = sent;
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
        Ok(())
    }

    /// Receives what has arrived and applies the responses.
    fn recv(&mut self, op: u8, peer: SocketAddr, done: &mut u64) -> Result<()> {
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
            if c.sent < c.q.len() {
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
                let out = if c.sent < c.q.len() { libc::POLLOUT } else { 0 };
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
