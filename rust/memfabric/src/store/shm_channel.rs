//! Shared-memory request channels between the store and the clients on its host.
//!
//! Over a socket every call costs each side a send, a receive and a scheduler wake-up; on a
//! small VM that is most of a call. A client that keeps calling through the local socket (see
//! [`super::local_socket`]) asks for a channel: a sealed memfd the server creates and sends
//! with its answer, beside the doorbell page every channel shares. The client writes a request
//! frame into the channel and rings the doorbell; one server thread serves all channels,
//! polling while requests keep coming and sleeping on a futex once they stop; the client waits
//! for the answer the same way. No system call is made while both sides are busy.
//!
//! The socket stays open and remains the session: when it closes, the channel is released with
//! the session's ephemeral keys. Whatever waits or belongs to the session (waits, ephemeral
//! sets) and frames larger than a channel's area still go through the socket.
//!
//! The server trusts nothing in a mapping: lengths are bounded, a frame is copied out before it
//! is decoded, and the memfds are sealed so a client cannot shrink them under the server.
//! `MF_STORE_NO_SHM_CHANNEL=1` keeps a client on the socket.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::proto::{split_frame, Request, Response};
use crate::error::{Error, Result};
use crate::log::DEBUG;
use crate::mf_log;

/// Environment variable that keeps clients on the socket.
pub const DISABLE_ENV: &str = "MF_STORE_NO_SHM_CHANNEL";

/// Bytes of a request or an answer a channel carries; larger frames take the socket.
pub const AREA: usize = 64 << 10;
/// Channels one server serves at most; later clients stay on the socket.
pub const MAX_CHANNELS: usize = 4096;
/// Calls a connection makes over the socket before it asks for a channel: short-lived clients
/// (a rank that only rendezvous) never pay for one.
pub const CALLS_BEFORE_CHANNEL: u32 = 16;

const CONTROL: usize = 4096;
const CHANNEL_BYTES: usize = CONTROL + 2 * AREA;
const DOORBELL_BYTES: usize = 4096;

/// How long the server thread keeps polling after its last request before it sleeps.
const SERVER_POLL: Duration = Duration::from_micros(50);
/// Longest futex sleep of either side: the server checks whether it should stop, a client
/// whether the store closed its socket.
const SLEEP_SLICE: Duration = Duration::from_millis(20);

const ANSWERED: u32 = 0;
/// Not served here (a kind that needs the session, or an answer larger than the area): the
/// request had no effect; send it over the socket.
const USE_SOCKET: u32 = 1;
/// The request was malformed; the client drops the connection.
const REFUSED: u32 = 2;

/// Whether [`DISABLE_ENV`] is set (read once per process).
pub fn disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        std::env::var(DISABLE_ENV).is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0")
    })
}

/// Requests worth sending through a channel: those that do not touch the session's own keys
/// and do not wait for members. A get that waits is answered there when its keys exist; the
/// server sends it to the socket otherwise.
pub fn served_by_channel(req: &Request) -> bool {
    match req {
        Request::Set { ephemeral, .. } | Request::MultiSet { ephemeral, .. } => !ephemeral,
        Request::Wait { .. } | Request::OpenChannel => false,
        _ => true,
    }
}

/// The control block at the start of a channel. Request and answer words sit on separate
/// cache lines: each is written by one side only.
#[repr(C)]
struct Control {
    /// Bumped by the client once the request is in place.
    request_seq: AtomicU32,
    request_len: AtomicU32,
    _client_line: [u32; 14],
    /// Set by the server to the request's number once the answer is in place; the client
    /// sleeps on it.
    answer_seq: AtomicU32,
    answer_len: AtomicU32,
    answer_status: AtomicU32,
    /// The client sleeps on `answer_seq` and wants a wake-up.
    client_sleeping: AtomicU32,
}

/// The page every channel of a server shares.
#[repr(C)]
struct Doorbell {
    /// The server thread sleeps on `bell`: a client that rings must wake it.
    server_sleeping: AtomicU32,
    bell: AtomicU32,
    _line: [u32; 14],
    /// One bit per channel with a request in it.
    pending: [AtomicU64; MAX_CHANNELS / 64],
}

const _: () = assert!(std::mem::size_of::<Control>() <= CONTROL);
const _: () = assert!(std::mem::size_of::<Doorbell>() <= DOORBELL_BYTES);

/// A shared mapping of a memfd.
struct SharedRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain shared memory; all shared state in it is accessed through
// atomics, and the byte areas are copied under the request/answer protocol below.
unsafe impl Send for SharedRegion {}
// SAFETY: as above.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// A new sealed memfd of `len` bytes, mapped: peers can neither shrink nor grow it.
    fn create(name: &CStr, len: usize) -> Result<(SharedRegion, OwnedFd)> {
        let sys = |what: &str| Error::io(format!("{what} for a store channel"), last_error());
        // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(sys("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate and fcntl on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(sys("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(sys("sealing"));
        }
        Ok((SharedRegion::map(&fd, len)?, fd))
    }

    /// Maps `len` bytes of `fd`, which must be at least that long and unable to shrink.
    fn map(fd: &OwnedFd, len: usize) -> Result<SharedRegion> {
        // SAFETY: F_GET_SEALS and fstat only read the descriptor's state.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(Error::Protocol(
                "store channel memory is not sealed against shrinking".into(),
            ));
        }
        // SAFETY: as above; `st` is a plain struct filled by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 || (st.st_size as usize) < len {
            return Err(Error::Protocol(format!(
                "store channel memory is smaller than {len} bytes"
            )));
        }
        // The memfd cannot shrink below `len` (checked above), so the mapping stays backed.
        let p = crate::mem::map_shared(fd.as_raw_fd(), len, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(|e| Error::io("mmap of a store channel", e))?;
        let ptr = NonNull::new(p.cast()).ok_or_else(|| Error::Protocol("mmap gave null".into()))?;
        Ok(SharedRegion { ptr, len })
    }

    fn control(&self) -> &Control {
        // SAFETY: mappings are page-aligned and at least CONTROL bytes; every field of
        // Control is an atomic, valid for any bit pattern (zero-filled at creation).
        unsafe { &*(self.ptr.as_ptr() as *const Control) }
    }

    fn doorbell(&self) -> &Doorbell {
        // SAFETY: as for `control`, with DOORBELL_BYTES.
        unsafe { &*(self.ptr.as_ptr() as *const Doorbell) }
    }

    /// Copies `len` bytes at `offset` out of the region.
    fn read(&self, offset: usize, len: usize, out: &mut Vec<u8>) {
        assert!(offset + len <= self.len);
        out.clear();
        out.reserve(len);
        // SAFETY: the range is inside the mapping (asserted) and `out` has room for `len`
        // bytes. The peer may write meanwhile; we only ever decode the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), len);
            out.set_len(len);
        }
    }

    /// Copies `data` into the region at `offset`.
    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the range is inside the mapping (asserted).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Sleeps while `word` holds `expected`, at most `limit` (woken early by [`futex_wake`]).
fn futex_wait(word: &AtomicU32, expected: u32, limit: Duration) {
    let ts = libc::timespec {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_nsec: limit.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 (shared between processes, so not the
    // private variant) with a relative timeout; it only reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32; wakes at most one sleeper.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
}

// ---- server side -----------------------------------------------------------------------------

/// Answers one request (the store's state machine); `None`: the request needs the session and
/// was not carried out.
pub type Handler = dyn Fn(Request) -> Option<Response> + Send + Sync;

struct ServerChannel {
    region: SharedRegion,
    /// The last request number answered (only the hub thread touches it).
    served: AtomicU32,
}

#[derive(Default)]
struct Slots {
    channels: Vec<Option<Arc<ServerChannel>>>,
    free: Vec<usize>,
}

/// A server's channels and the thread that serves them.
pub struct Hub {
    doorbell: SharedRegion,
    doorbell_fd: OwnedFd,
    slots: Mutex<Slots>,
    stop: AtomicBool,
}

/// A session's channel; dropping it frees the slot.
pub struct ChannelLease {
    hub: Arc<Hub>,
    slot: usize,
}

impl Drop for ChannelLease {
    fn drop(&mut self) {
        let mut slots = self.hub.lock_slots();
        if let Some(c) = slots.channels.get_mut(self.slot) {
            *c = None;
            slots.free.push(self.slot);
        }
    }
}

/// What a session sends a client that asked for a channel.
pub struct Grant {
    pub lease: ChannelLease,
    pub slot: u32,
    pub channel_fd: OwnedFd,
    pub doorbell_fd: OwnedFd,
}

impl Hub {
    /// Starts the serving thread. It holds `handler` only; it ends on [`Hub::stop`] or once
    /// the hub is dropped.
    pub fn start(handler: Box<Handler>) -> Result<Arc<Hub>> {
        let (doorbell, doorbell_fd) =
            SharedRegion::create(c"memfabric-store-doorbell", DOORBELL_BYTES)?;
        let hub = Arc::new(Hub {
            doorbell,
            doorbell_fd,
            slots: Mutex::new(Slots::default()),
            stop: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&hub);
        std::thread::Builder::new()
            .name("mf-store-shm".into())
            .spawn(move || serve(weak, handler))
            .map_err(|e| Error::io("store channel thread", e))?;
        Ok(hub)
    }

    /// Stops the serving thread (channels still open answer nothing more; their clients see
    /// their sockets close as the server goes away).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.doorbell.doorbell().bell.fetch_add(1, Ordering::SeqCst);
        futex_wake(&self.doorbell.doorbell().bell);
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new channel for one session.
    pub fn open(self: &Arc<Self>) -> Result<Grant> {
        let (region, channel_fd) = SharedRegion::create(c"memfabric-store-channel", CHANNEL_BYTES)?;
        let doorbell_fd = self
            .doorbell_fd
            .try_clone()
            .map_err(|e| Error::io("store doorbell descriptor", e))?;
        let channel = Arc::new(ServerChannel {
            region,
            served: AtomicU32::new(0),
        });
        let mut slots = self.lock_slots();
        let slot = match slots.free.pop() {
            Some(s) => s,
            None if slots.channels.len() < MAX_CHANNELS => {
                slots.channels.push(None);
                slots.channels.len() - 1
            }
            None => {
                return Err(Error::NoResources(format!(
                    "all {MAX_CHANNELS} store channels are in use"
                )))
            }
        };
        slots.channels[slot] = Some(channel);
        Ok(Grant {
            lease: ChannelLease {
                hub: self.clone(),
                slot,
            },
            slot: slot as u32,
            channel_fd,
            doorbell_fd,
        })
    }

    fn channel(&self, slot: usize) -> Option<Arc<ServerChannel>> {
        self.lock_slots().channels.get(slot).cloned().flatten()
    }

    /// Serves every channel whose bit is set; returns whether any was.
    fn serve_pending(&self, handler: &Handler, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
        let mut any = false;
        for (word_index, word) in self.doorbell.doorbell().pending.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                any = true;
                if let Some(ch) = self.channel(word_index * 64 + bit) {
                    answer(&ch, handler, buf, out);
                }
            }
        }
        any
    }

    fn any_pending(&self) -> bool {
        self.doorbell
            .doorbell()
            .pending
            .iter()
            .any(|w| w.load(Ordering::SeqCst) != 0)
    }
}

fn serve(hub: Weak<Hub>, handler: Box<Handler>) {
    let mut buf = Vec::with_capacity(AREA);
    let mut out = Vec::with_capacity(AREA);
    let mut idle_since = Instant::now();
    loop {
        let Some(hub) = hub.upgrade() else { return };
        if hub.stop.load(Ordering::SeqCst) {
            return;
        }
        if hub.serve_pending(&*handler, &mut buf, &mut out) {
            idle_since = Instant::now();
            continue;
        }
        let idle = idle_since.elapsed();
        if idle < SERVER_POLL {
            super::server::pause(idle);
            continue;
        }
        // Sleep until a client rings. A client sets its bit, then reads `server_sleeping`;
        // this side sets `server_sleeping`, then reads the bits: one of the two sees the other.
        let bell = &hub.doorbell.doorbell();
        bell.server_sleeping.store(1, Ordering::SeqCst);
        let rung = bell.bell.load(Ordering::SeqCst);
        if !hub.any_pending() {
            futex_wait(&bell.bell, rung, SLEEP_SLICE * 5);
        }
        bell.server_sleeping.store(0, Ordering::SeqCst);
        idle_since = Instant::now();
    }
}

/// Answers the request in `ch`, if there is a new one.
fn answer(ch: &ServerChannel, handler: &Handler, buf: &mut Vec<u8>, out: &mut Vec<u8>) {
    let control = ch.region.control();
    let seq = control.request_seq.load(Ordering::Acquire);
    if seq == ch.served.load(Ordering::Relaxed) {
        return;
    }
    let len = control.request_len.load(Ordering::Relaxed) as usize;
    out.clear();
    let status = if len > AREA {
        REFUSED
    } else {
        ch.region.read(CONTROL, len, buf);
        match split_frame(buf) {
            Ok(Some((kind, body, used))) if used == len => match Request::decode(kind, body) {
                Ok(req) => {
                    // A panic must not take the thread that serves every channel with it.
                    let answer =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(req)))
                            .unwrap_or_else(|_| {
                                Some(Response::BadRequest(
                                    "the store failed on this request".into(),
                                ))
                            });
                    match answer {
                        Some(a) => {
                            a.encode(out);
                            if let Response::Value(v) = a {
                                super::proto::recycle(v);
                            }
                            if out.len() <= AREA {
                                ANSWERED
                            } else {
                                // Only reads answer this much; the socket carries it instead.
                                USE_SOCKET
                            }
                        }
                        None => USE_SOCKET,
                    }
                }
                Err(_) => REFUSED,
            },
            _ => REFUSED,
        }
    };
    if status == ANSWERED {
        ch.region.write(CONTROL + AREA, out);
    } else if status == REFUSED {
        mf_log!(
            DEBUG,
            "config store: a malformed request in a shared-memory channel"
        );
    }
    control
        .answer_len
        .store(out.len() as u32, Ordering::Relaxed);
    control.answer_status.store(status, Ordering::Relaxed);
    ch.served.store(seq, Ordering::Relaxed);
    control.answer_seq.store(seq, Ordering::SeqCst);
    if control.client_sleeping.swap(0, Ordering::SeqCst) != 0 {
        futex_wake(&control.answer_seq);
    }
}

/// Sends `frame` with the two descriptors attached (SCM_RIGHTS) on the Unix socket `fd`, without
/// blocking; returns the bytes sent (the caller writes the rest the usual way).
pub fn send_with_fds(fd: RawFd, frame: &[u8], fds: [RawFd; 2]) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<[RawFd; 2]>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is a plain struct; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one cmsg of CMSG_LEN(8) bytes (sized by CMSG_SPACE).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<[RawFd; 2]>() as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), 2);
    }
    // SAFETY: `msg` is fully initialised above.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(last_error());
    }
    Ok(n as usize)
}

// ---- client side -----------------------------------------------------------------------------

/// A client's end of a channel.
pub struct ClientChannel {
    channel: SharedRegion,
    doorbell: SharedRegion,
    slot: usize,
    seq: u32,
}

/// The answer of [`ClientChannel::call`].
pub enum Outcome {
    /// The answer frame is in the caller's buffer.
    Answered,
    /// The request had no effect; send it over the socket.
    UseSocket,
}

impl ClientChannel {
    /// Opens a channel over the local socket `sock` (whose read timeout bounds the wait).
    /// `Ok(None)`: the server offers none (another version, or all channels in use).
    pub fn request(sock: &std::os::unix::net::UnixStream) -> Result<Option<ClientChannel>> {
        use std::io::Write;
        let mut frame = Vec::new();
        Request::OpenChannel.encode(&mut frame)?;
        (&*sock)
            .write_all(&frame)
            .map_err(|e| Error::io("send to store", e))?;
        let mut buf = vec![0u8; 256];
        let mut filled = 0;
        let mut fds: Vec<OwnedFd> = Vec::new();
        let resp = loop {
            if let Some((kind, body, used)) = split_frame(&buf[..filled])? {
                if used != filled {
                    return Err(Error::Protocol(
                        "unexpected bytes after a channel grant".into(),
                    ));
                }
                break Response::decode(kind, body)?;
            }
            if filled == buf.len() {
                return Err(Error::Protocol("channel grant too long".into()));
            }
            let n = recv_with_fds(sock.as_raw_fd(), &mut buf[filled..], &mut fds)?;
            if n == 0 {
                return Err(Error::io(
                    "receive from store",
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            filled += n;
        };
        match resp {
            Response::Channel { slot } => {
                let [channel_fd, doorbell_fd]: [OwnedFd; 2] = fds
                    .try_into()
                    .map_err(|_| Error::Protocol("channel grant without its memory".into()))?;
                let slot = slot as usize;
                if slot >= MAX_CHANNELS {
                    return Err(Error::Protocol(format!("channel slot {slot} out of range")));
                }
                Ok(Some(ClientChannel {
                    channel: SharedRegion::map(&channel_fd, CHANNEL_BYTES)?,
                    doorbell: SharedRegion::map(&doorbell_fd, DOORBELL_BYTES)?,
                    slot,
                    seq: 0,
                }))
            }
            Response::BadRequest(why) => {
                mf_log!(DEBUG, "config store offers no shared-memory channel: {why}");
                Ok(None)
            }
            r => Err(Error::Protocol(format!(
                "unexpected answer to a channel request: {r:?}"
            ))),
        }
    }

    /// Sends `frame` and puts the answer frame into `answer`. Waits polling for up to
    /// `spin`, then sleeping, until `deadline`; `store_alive` is asked between sleeps.
    pub fn call(
        &mut self,
        frame: &[u8],
        answer: &mut Vec<u8>,
        spin: Duration,
        deadline: Instant,
        mut store_alive: impl FnMut() -> bool,
    ) -> Result<Outcome> {
        if frame.len() > AREA {
            return Ok(Outcome::UseSocket);
        }
        let control = self.channel.control();
        let bell = self.doorbell.doorbell();
        self.channel.write(CONTROL, frame);
        control
            .request_len
            .store(frame.len() as u32, Ordering::Relaxed);
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        control.request_seq.store(seq, Ordering::Release);
        bell.pending[self.slot / 64].fetch_or(1 << (self.slot % 64), Ordering::SeqCst);
        if bell.server_sleeping.load(Ordering::SeqCst) != 0 {
            bell.bell.fetch_add(1, Ordering::SeqCst);
            futex_wake(&bell.bell);
        }
        let start = Instant::now();
        loop {
            if control.answer_seq.load(Ordering::Acquire) == seq {
                break;
            }
            let waited = start.elapsed();
            if waited < spin {
                super::server::pause(waited);
                continue;
            }
            // Sleep. This side sets `client_sleeping`, then reads `answer_seq`; the server
            // sets `answer_seq`, then reads `client_sleeping`: one of the two sees the other.
            control.client_sleeping.store(1, Ordering::SeqCst);
            let current = control.answer_seq.load(Ordering::SeqCst);
            if current == seq {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(
                    "no answer from the store through its shared-memory channel".into(),
                ));
            }
            futex_wait(
                &control.answer_seq,
                current,
                (deadline - now).min(SLEEP_SLICE),
            );
            if control.answer_seq.load(Ordering::Acquire) != seq && !store_alive() {
                return Err(Error::io(
                    "receive from store",
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
        match control.answer_status.load(Ordering::Relaxed) {
            ANSWERED => {
                let len = control.answer_len.load(Ordering::Relaxed) as usize;
                if len > AREA {
                    return Err(Error::Protocol(format!(
                        "store channel answer of {len} bytes exceeds the channel"
                    )));
                }
                self.channel.read(CONTROL + AREA, len, answer);
                Ok(Outcome::Answered)
            }
            USE_SOCKET => Ok(Outcome::UseSocket),
            _ => Err(Error::Protocol(
                "the store refused a request in its shared-memory channel".into(),
            )),
        }
    }
}

/// One `recvmsg` that keeps any descriptors passed with the bytes.
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: msghdr is a plain struct; its pointers outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: `msg` describes valid buffers; MSG_CMSG_CLOEXEC marks received fds close-on-exec.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(Error::io("receive from store", last_error()));
    }
    // SAFETY: walking the control messages the kernel wrote into `cbuf`, within
    // msg_controllen; each SCM_RIGHTS payload is an array of fds now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Error::Protocol(
            "store sent more descriptors than expected".into(),
        ));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(req: &Request) -> Vec<u8> {
        let mut f = Vec::new();
        req.encode(&mut f).unwrap();
        f
    }

    fn add_frame(delta: i64) -> Vec<u8> {
        frame(&Request::Add {
            key: "n".into(),
            delta,
        })
    }

    fn decode(answer: &[u8]) -> Response {
        let (kind, body, used) = split_frame(answer).unwrap().unwrap();
        assert_eq!(used, answer.len());
        Response::decode(kind, body).unwrap()
    }

    /// A hub whose handler counts with `Add` and answers `Get` with a value of `len` bytes
    /// where the key is a number, and a client attached to one of its channels directly.
    fn hub_and_client() -> (Arc<Hub>, ChannelLease, ClientChannel) {
        let counter = std::sync::atomic::AtomicI64::new(0);
        let hub = Hub::start(Box::new(move |req| match req {
            Request::Add { delta, .. } => Some(Response::Int(
                counter.fetch_add(delta, Ordering::SeqCst) + delta,
            )),
            Request::Get { wait_ms, .. } if wait_ms > 0 => None,
            Request::Get { key, .. } => Some(Response::Value(vec![7; key.parse().unwrap_or(0)])),
            Request::Ping => panic!("a handler bug"),
            _ => Some(Response::Ok),
        }))
        .unwrap();
        let grant = hub.open().unwrap();
        let client = ClientChannel {
            channel: SharedRegion::map(&grant.channel_fd, CHANNEL_BYTES).unwrap(),
            doorbell: SharedRegion::map(&grant.doorbell_fd, DOORBELL_BYTES).unwrap(),
            slot: grant.slot as usize,
            seq: 0,
        };
        (hub, grant.lease, client)
    }

    fn call(c: &mut ClientChannel, frame: &[u8], answer: &mut Vec<u8>) -> Result<Outcome> {
        let deadline = Instant::now() + Duration::from_secs(5);
        c.call(frame, answer, Duration::from_micros(20), deadline, || true)
    }

    #[test]
    fn answers_requests_and_sends_the_rest_to_the_socket() {
        let (hub, _lease, mut c) = hub_and_client();
        let mut answer = Vec::new();
        for i in 1..=1000 {
            let add = add_frame(1);
            assert!(matches!(
                call(&mut c, &add, &mut answer).unwrap(),
                Outcome::Answered
            ));
            assert_eq!(decode(&answer), Response::Int(i));
        }
        // An answer larger than the area, a request that needs the session, and a request
        // larger than the area: nothing done here, the socket carries them.
        let big = frame(&Request::Get {
            key: (AREA + 1).to_string(),
            wait_ms: 0,
        });
        assert!(matches!(
            call(&mut c, &big, &mut answer).unwrap(),
            Outcome::UseSocket
        ));
        let waiting = frame(&Request::Get {
            key: "1".into(),
            wait_ms: 10,
        });
        assert!(matches!(
            call(&mut c, &waiting, &mut answer).unwrap(),
            Outcome::UseSocket
        ));
        let huge = frame(&Request::Set {
            key: "k".into(),
            value: vec![0; AREA],
            ephemeral: false,
        });
        assert!(matches!(
            call(&mut c, &huge, &mut answer).unwrap(),
            Outcome::UseSocket
        ));
        // A handler that panics answers an error; the hub goes on serving.
        assert!(matches!(
            call(&mut c, &frame(&Request::Ping), &mut answer).unwrap(),
            Outcome::Answered
        ));
        assert!(matches!(decode(&answer), Response::BadRequest(_)));
        // After the server fell asleep, a request wakes it.
        std::thread::sleep(SERVER_POLL * 20);
        let add = add_frame(5);
        call(&mut c, &add, &mut answer).unwrap();
        assert_eq!(decode(&answer), Response::Int(1005));
        hub.stop();
    }

    #[test]
    fn malformed_requests_are_refused() {
        let (hub, _lease, mut c) = hub_and_client();
        let mut answer = Vec::new();
        for garbage in [
            vec![0u8; 3],
            vec![0, 0, 0, 2, 1, 99],
            vec![0xff; 64],
            vec![0, 0, 0, 9, 1, 4, 0, 0, 0, 200, 1, 2, 3],
        ] {
            let err = call(&mut c, &garbage, &mut answer).err().unwrap();
            assert!(matches!(err, Error::Protocol(_)), "{err}");
        }
        // A forged length past the area, written straight into the control block.
        let control = c.channel.control();
        control
            .request_len
            .store(AREA as u32 + 1, Ordering::Relaxed);
        c.seq = c.seq.wrapping_add(1);
        control.request_seq.store(c.seq, Ordering::Release);
        c.doorbell.doorbell().pending[c.slot / 64].fetch_or(1 << (c.slot % 64), Ordering::SeqCst);
        futex_wake(&c.doorbell.doorbell().bell);
        let deadline = Instant::now() + Duration::from_secs(5);
        while control.answer_seq.load(Ordering::Acquire) != c.seq {
            assert!(Instant::now() < deadline, "no answer to a forged length");
            std::thread::yield_now();
        }
        assert_eq!(control.answer_status.load(Ordering::Relaxed), REFUSED);
        // The channel still works for a well-formed request.
        let add = add_frame(2);
        call(&mut c, &add, &mut answer).unwrap();
        assert_eq!(decode(&answer), Response::Int(2));
        hub.stop();
    }

    #[test]
    fn slots_are_reused_and_memory_must_be_sealed() {
        let (hub, lease, _c) = hub_and_client();
        let slot = lease.slot;
        drop(lease);
        let again = hub.open().unwrap();
        assert_eq!(again.slot as usize, slot);
        // An unsealed memfd (a client's own, say) is not mapped.
        // SAFETY: memfd_create with a valid name; the fd is owned right away.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our memfd.
        assert_eq!(
            unsafe { libc::ftruncate(fd.as_raw_fd(), CHANNEL_BYTES as i64) },
            0
        );
        assert!(SharedRegion::map(&fd, CHANNEL_BYTES).is_err());
        // A sealed one that is too small is not mapped either.
        let (_r, small) = SharedRegion::create(c"small", 4096).unwrap();
        assert!(SharedRegion::map(&small, CHANNEL_BYTES).is_err());
        hub.stop();
    }

    #[test]
    fn a_client_gives_up_by_its_deadline_or_when_the_store_is_gone() {
        let (hub, _lease, mut c) = hub_and_client();
        hub.stop();
        std::thread::sleep(Duration::from_millis(50));
        let add = add_frame(1);
        let mut answer = Vec::new();
        let t = Instant::now();
        let deadline = t + Duration::from_millis(200);
        let err = c
            .call(&add, &mut answer, Duration::ZERO, deadline, || true)
            .err()
            .unwrap();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
        let t = Instant::now();
        let deadline = t + Duration::from_secs(30);
        let err = c
            .call(&add, &mut answer, Duration::ZERO, deadline, || false)
            .err()
            .unwrap();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
