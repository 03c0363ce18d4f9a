//! Store URLs: `tcp://ip:port` with an IPv4 address or a bracketed IPv6 one (`tcp://[::1]:5000`)
//! names an embedded store server; `etcd://ip:port[,ip:port...][/prefix]` names an etcd cluster
//! (its members' client addresses) and the key prefix the store lives under there.

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

/// The scheme that selects the etcd backend.
pub const ETCD_SCHEME: &str = "etcd://";

/// Whether `url` names an etcd cluster rather than an embedded store server.
pub fn is_etcd_url(url: &str) -> bool {
    url.trim_start().starts_with(ETCD_SCHEME)
}

/// A parsed `etcd://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// Client addresses of the cluster's members, in the order given.
    pub endpoints: Vec<SocketAddr>,
    /// Key prefix without leading or trailing `/` (empty: keys are stored as given).
    pub prefix: String,
}

impl EtcdUrl {
    /// What every key of this store is prefixed with in etcd: `prefix/`, or nothing.
    pub fn key_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(ETCD_SCHEME)?;
        for (i, e) in self.endpoints.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{e}")?;
        }
        write!(f, "/{}", self.prefix)
    }
}

/// Most members an etcd URL may name (etcd clusters have 3, 5 or 7).
const MAX_ETCD_ENDPOINTS: usize = 64;

/// Parses `etcd://ip:port[,ip:port...][/prefix]`. Addresses as in `tcp://` URLs (no host
/// names, IPv6 in brackets, no port 0); the prefix may hold `/` but no empty segment, `..`,
/// control characters or white space, so that it names one place in etcd's key space.
pub fn parse_etcd_url(url: &str) -> Result<EtcdUrl> {
    let bad = |why: &str| {
        Error::InvalidParam(format!(
            "store url {url:?} is invalid: {why} (expected etcd://ip:port[,ip:port...][/prefix])"
        ))
    };
    let rest = url
        .trim()
        .strip_prefix(ETCD_SCHEME)
        .ok_or_else(|| bad("missing etcd:// scheme"))?;
    let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let mut endpoints = Vec::new();
    for h in hosts.split(',') {
        // Before parsing another member, not after the loop: the duplicate check is quadratic,
        // so a URL with a huge member list must stop costing at the limit.
        if endpoints.len() == MAX_ETCD_ENDPOINTS {
            return Err(bad(&format!("more than {MAX_ETCD_ENDPOINTS} members")));
        }
        if h.is_empty() {
            return Err(bad("empty member address"));
        }
        let addr = parse_host_port(h).map_err(|why| bad(&why))?;
        if addr.port() == 0 {
            return Err(bad("port 0"));
        }
        if endpoints.contains(&addr) {
            return Err(bad(&format!("member {addr} named twice")));
        }
        endpoints.push(addr);
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("the prefix holds white space or control characters"));
    }
    if !prefix.is_empty() && prefix.split('/').any(|seg| seg.is_empty() || seg == "..") {
        return Err(bad("the prefix has an empty or '..' segment"));
    }
    Ok(EtcdUrl {
        endpoints,
        prefix: prefix.to_string(),
    })
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

    #[test]
    fn parses_etcd_urls() {
        let u = parse_etcd_url("etcd://127.0.0.1:2379,[::1]:2380/jobs/42/").unwrap();
        assert_eq!(u.endpoints.len(), 2);
        assert!(u.endpoints[1].is_ipv6());
        assert_eq!(u.prefix, "jobs/42");
        assert_eq!(u.key_prefix(), "jobs/42/");
        assert_eq!(u.to_string(), "etcd://127.0.0.1:2379,[::1]:2380/jobs/42");
        assert_eq!(parse_etcd_url(&u.to_string()).unwrap(), u);
        let bare = parse_etcd_url("etcd://10.0.0.1:2379").unwrap();
        assert_eq!(
            (bare.prefix.as_str(), bare.key_prefix()),
            ("", String::new())
        );
        assert!(is_etcd_url(" etcd://x") && !is_etcd_url("tcp://1.2.3.4:5"));
    }

    #[test]
    fn rejects_malformed_etcd_urls() {
        for u in [
            "etcd://",
            "etcd:///p",
            "etcd://127.0.0.1:2379,",
            "etcd://127.0.0.1:2379,,127.0.0.2:2379",
            "etcd://127.0.0.1",
            "etcd://127.0.0.1:0",
            "etcd://localhost:2379",
            "etcd://127.0.0.1:2379,127.0.0.1:2379",
            "etcd://127.0.0.1:2379/a//b",
            "etcd://127.0.0.1:2379/../x",
            "etcd://127.0.0.1:2379/a b",
            "etcd://127.0.0.1:2379/a\nb",
            "tcp://127.0.0.1:2379",
        ] {
            let e = parse_etcd_url(u).unwrap_err();
            assert_eq!(e.code(), -2000, "{u}");
        }
    }

    #[test]
    fn etcd_member_list_stops_at_the_limit() {
        let members: Vec<String> = (0..65).map(|i| format!("10.0.0.{i}:2379")).collect();
        assert!(parse_etcd_url(&format!("etcd://{}", members[..64].join(","))).is_ok());
        let e = parse_etcd_url(&format!("etcd://{}", members.join(","))).unwrap_err();
        assert!(e.to_string().contains("more than 64 members"), "{e}");
        // Parsing ends at the 65th member: what follows is never looked at, so that a long
        // list costs nothing more (its duplicate check is quadratic).
        let tail = ",x".repeat(500_000);
        let e = parse_etcd_url(&format!("etcd://{}{tail}", members.join(","))).unwrap_err();
        assert!(e.to_string().contains("more than 64 members"), "{e}");
    }
}
