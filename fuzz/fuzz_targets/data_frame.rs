//! The tcp data plane's header decoders: requests come from any peer that can reach a data
//! server, responses from whatever answers at a peer's data address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memfabric::error::Error;
use memfabric::transport::tcp::{
    parse_req, parse_resp, MAX_REQUEST, PROTOCOL_VERSION, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN,
};

fn le64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

fuzz_target!(|data: &[u8]| {
    let h = data;
    match parse_req(h) {
        Ok(r) => {
            assert!(h.len() >= REQUEST_HEADER_LEN);
            assert_eq!(h[0], PROTOCOL_VERSION);
            assert!(h[2..8].iter().all(|&b| b == 0));
            assert!(r.op == 1 || r.op == 2);
            assert!(r.len <= MAX_REQUEST);
            assert_eq!(
                (r.req_id, r.addr, r.len),
                (le64(&h[8..]), le64(&h[16..]), le64(&h[24..]))
            );
        }
        Err(e) => assert!(matches!(e, Error::Protocol(_)), "{e}"),
    }
    match parse_resp(h) {
        Ok(r) => {
            assert!(h.len() >= RESPONSE_HEADER_LEN);
            assert_eq!(h[0], PROTOCOL_VERSION);
            assert_eq!((h[2], h[3]), (0, 0));
            assert_eq!(r.status, h[1]);
            assert!(r.msg_len <= 1024);
            assert_eq!(
                r.msg_len as u32,
                u32::from_le_bytes([h[4], h[5], h[6], h[7]])
            );
            assert_eq!((r.req_id, r.data_len), (le64(&h[8..]), le64(&h[16..])));
        }
        Err(e) => assert!(matches!(e, Error::Protocol(_)), "{e}"),
    }
});
