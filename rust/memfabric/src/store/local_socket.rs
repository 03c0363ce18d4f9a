//! The same-host shortcut of the config store: a Unix socket in the abstract namespace beside
//! every plaintext TCP listener.
//!
//! A client whose store is on its own host reaches it through the Unix socket instead of TCP
//! loopback: the same frames and sessions, about a third less time per round trip (TCP runs
//! its whole stack twice per message on loopback). The socket is named after the listener's
//! address, `memfabric-store/<ip>:<port>`, so it is found exactly where a TCP connect would
//! land: a server bound to that address, or to the wildcard address when `<ip>` is an
//! address of this host. Abstract names belong to a network namespace, so a client in
//! another namespace (another host, for tests) never sees them and uses TCP.
//!
//! Not with TLS: a TLS store is reached over TCP only, so its certificates keep deciding who
//! gets in. `MF_STORE_NO_LOCAL_SOCKET=1` turns the shortcut off on both sides.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};

/// Environment variable that turns the shortcut off.
pub const DISABLE_ENV: &str = "MF_STORE_NO_LOCAL_SOCKET";

fn disabled() -> bool {
    std::env::var(DISABLE_ENV).is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0")
}

/// The abstract name of the listener at `addr`.
pub fn name_of(addr: SocketAddr) -> String {
    format!("memfabric-store/{addr}")
}

/// Binds the local socket of the TCP listener at `addr`; `None` when turned off or when the
/// name is taken (another server bound the same address in this namespace first).
pub fn bind(addr: SocketAddr) -> Option<UnixListener> {
    if disabled() {
        return None;
    }
    let name = UnixAddr::from_abstract_name(name_of(addr).as_bytes()).ok()?;
    let l = UnixListener::bind_addr(&name).ok()?;
    // SAFETY: listen on a socket we own; calling it again only changes the backlog.
    unsafe { libc::listen(l.as_raw_fd(), crate::net::LISTEN_BACKLOG) };
    l.set_nonblocking(true).ok()?;
    Some(l)
}

/// Whether `ip` is an address of this host (in this network namespace).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Connects to the store that a TCP connection to `addr` would reach, when it is on this
/// host and has a local socket; `None` otherwise (the caller uses TCP).
pub fn connect(addr: SocketAddr) -> Option<UnixStream> {
    if disabled() {
        return None;
    }
    let mut names = vec![addr];
    if is_local(addr.ip()) {
        let any = match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        names.push(SocketAddr::new(any, addr.port()));
        if addr.is_ipv4() {
            // A dual-stack server bound to [::] takes IPv4 connections too.
            names.push(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                addr.port(),
            ));
        }
    } else {
        return None;
    }
    names.into_iter().find_map(|a| connect_now(&name_of(a)))
}

/// Connects to the abstract name without waiting: a full backlog (a server that does not
/// accept) answers at once, and the caller goes on to TCP, whose connect has a deadline.
fn connect_now(name: &str) -> Option<UnixStream> {
    let bytes = name.as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid (AF_UNSPEC, empty path).
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() + 1 > sa.sun_path.len() {
        return None;
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // sun_path[0] stays 0: the abstract namespace; the name follows, not NUL-terminated.
    for (d, &b) in sa.sun_path[1..].iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + bytes.len();
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new socket owned by nobody else; OwnedFd closes it on every path.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sa` is an initialised sockaddr_un and `len` covers exactly its used part.
    let rc = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return None;
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false).ok()?;
    Some(stream)
}
