//! Store URLs: `tcp://ip:port` with an IPv4 address or a bracketed IPv6 one (`tcp://[::1]:5000`).

use std::net::{IpAddr, SocketAddr};

use crate::error::{Error, Result};

/// Parses a store URL into a socket address. `allow_port_zero` is for servers that let the
/// kernel pick a port (tests); the public API refuses port 0 as upstream does.
pub fn parse_store_url(url: &str, allow_port_zero: bool) -> Result<SocketAddr> {
    let bad = |why: &str| {
        Error::InvalidParam(format!(
            "store url {url:?} is invalid: {why} (expected tcp://ip:port or tcp://[ipv6]:port)"
        ))
    };
    let rest = url
        .trim()
        .strip_prefix("tcp://")
        .ok_or_else(|| bad("missing tcp:// scheme"))?;
    let addr = parse_host_port(rest).map_err(|why| bad(&why))?;
    if addr.port() == 0 && !allow_port_zero {
        return Err(bad("port 0"));
    }
    Ok(addr)
}

/// Parses `ip:port` or `[v6]:port` (no host names: a fabric address is an address).
pub fn parse_host_port(s: &str) -> std::result::Result<SocketAddr, String> {
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let (h, p) = inner
            .split_once("]:")
            .ok_or("an IPv6 address needs the form [addr]:port")?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or("missing :port")?;
        if h.contains(':') {
            return Err("an IPv6 address must be in brackets".into());
        }
        (h, p)
    };
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address"))?;
    if p_invalid(port) {
        return Err(format!("{port:?} is not a port number"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number (0..65535)"))?;
    Ok(SocketAddr::new(ip, port))
}

fn p_invalid(p: &str) -> bool {
    p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())
}

/// Formats an address back into a store URL.
pub fn format_store_url(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6() {
        assert_eq!(
            parse_store_url("tcp://127.0.0.1:8570", false)
                .unwrap()
                .port(),
            8570
        );
        let a = parse_store_url("tcp://[::1]:9000", false).unwrap();
        assert!(a.is_ipv6());
        assert_eq!(format_store_url(a), "tcp://[::1]:9000");
    }

    #[test]
    fn rejects_malformed() {
        for u in [
            "",
            "127.0.0.1:1",
            "http://127.0.0.1:1",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:",
            "tcp://127.0.0.1:70000",
            "tcp://127.0.0.1:-1",
            "tcp://127.0.0.1:+1",
            "tcp://localhost:1",
            "tcp://::1:5",
            "tcp://[::1]5",
            "tcp://127.0.0.1:0",
        ] {
            let e = parse_store_url(u, false).unwrap_err();
            assert_eq!(e.code(), -2000, "{u}");
            assert!(e.to_string().contains("store url"), "{e}");
        }
        assert!(parse_store_url("tcp://127.0.0.1:0", true).is_ok());
    }
}
