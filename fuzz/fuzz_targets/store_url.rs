//! Store URLs (`tcp://`, `etcd://`) and `ip:port` strings: they come from users (environment,
//! configuration) and, for member addresses published in the store, from peers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memfabric::error::Error;
use memfabric::store::url::{
    format_store_url, is_etcd_url, parse_etcd_url, parse_host_port, parse_store_url,
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for allow_port_zero in [false, true] {
        match parse_store_url(s, allow_port_zero) {
            Ok(addr) => {
                assert!(allow_port_zero || addr.port() != 0);
                // What we print for an address must parse back to it.
                let url = format_store_url(addr);
                assert_eq!(
                    parse_store_url(&url, allow_port_zero).ok(),
                    Some(addr),
                    "{url}"
                );
            }
            Err(e) => assert!(matches!(e, Error::InvalidParam(_)), "{e}"),
        }
    }
    match parse_etcd_url(s) {
        Ok(u) => {
            assert!(is_etcd_url(s));
            assert!((1..=64).contains(&u.endpoints.len()));
            for (i, a) in u.endpoints.iter().enumerate() {
                assert!(a.port() != 0 && !u.endpoints[..i].contains(a));
            }
            assert!(!u.prefix.starts_with('/') && !u.prefix.ends_with('/'));
            let again = u.to_string();
            assert_eq!(parse_etcd_url(&again).ok().as_ref(), Some(&u), "{again}");
        }
        Err(e) => assert!(matches!(e, Error::InvalidParam(_)), "{e}"),
    }
    if let Ok(addr) = parse_host_port(s) {
        assert_eq!(parse_host_port(&addr.to_string()), Ok(addr));
        // A host:port that parses is a URL body that parses, to the same address.
        assert_eq!(
            parse_store_url(&format!("tcp://{s}"), true).ok(),
            Some(addr)
        );
    }
});
