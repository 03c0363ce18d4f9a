//! The `tls_info` string (`ca=..;cert=..;key=..;key_password=..`) users hand to
//! set_conf_store_tls. Parsing only; loading the named files is not reached from here.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memfabric::error::Error;
use memfabric::store::tls::{parse_tls_info, TlsInfo};

const SEPARATORS: [char; 3] = [';', ',', '\n'];

/// A canonical `tls_info` string for `i`.
fn format(i: &TlsInfo) -> String {
    let mut s = format!("ca={};cert={};key={}", i.ca, i.cert, i.key);
    if let Some(p) = &i.key_password {
        s.push_str(";key_password=");
        s.push_str(p);
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse_tls_info(s) {
        Ok(i) => {
            assert!(!i.ca.is_empty() && !i.cert.is_empty());
            for v in [&i.ca, &i.cert, &i.key]
                .into_iter()
                .chain(i.key_password.as_ref())
            {
                assert!(!v.contains(SEPARATORS), "{v:?}");
                assert_eq!(v.trim(), v.as_str());
            }
            let again = format(&i);
            assert_eq!(parse_tls_info(&again).ok().as_ref(), Some(&i), "{again:?}");
        }
        Err(e) => assert!(matches!(e, Error::InvalidParam(_)), "{e}"),
    }
});
