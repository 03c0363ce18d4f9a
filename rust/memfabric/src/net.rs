//! Socket set-up shared by the servers (config store, tcp data server) and their clients.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::log::WARN;
use crate::mf_log;

/// Backlog of listening sockets: a thousand ranks connect at once at rendezvous.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Keepalive that notices a host which vanished without closing its sockets in about 5 s.
pub fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(3)
}

/// A non-blocking listener on `addr` (port 0 picks one), SO_REUSEADDR, dual-stack for IPv6.
/// `sock_buf`: buffer sizes set on the listener so accepted sockets inherit them before the
/// window is negotiated. `what` names the server in errors.
pub fn bind_listener(
    addr: SocketAddr,
    what: &str,
    sock_buf: Option<usize>,
) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let ctx = |step: &str| format!("{what}: {step} {addr}");
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| Error::io(ctx("socket for"), e))?;
    sock.set_reuse_address(true)
        .map_err(|e| Error::io(ctx("SO_REUSEADDR on"), e))?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    if let Some(n) = sock_buf {
        let _ = sock.set_recv_buffer_size(n);
        let _ = sock.set_send_buffer_size(n);
    }
    sock.bind(&addr.into())
        .map_err(|e| Error::io(ctx("cannot bind"), e))?;
    sock.listen(LISTEN_BACKLOG)
        .map_err(|e| Error::io(ctx("cannot listen on"), e))?;
    sock.set_nonblocking(true)
        .map_err(|e| Error::io(ctx("nonblocking"), e))?;
    Ok(sock.into())
}

/// The next connection (with TCP_NODELAY and keepalive set), or `None` once `shutdown` fires.
/// Accept errors (out of descriptors and the like) back off instead of spinning; connections
/// already open are not affected.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive());
                return Some((stream, peer));
            }
            Err(e) => {
                mf_log!(WARN, "{what} accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
