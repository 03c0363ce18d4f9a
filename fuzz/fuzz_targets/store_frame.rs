//! The config store's frame decoder: what a server reads from any client that can connect,
//! and what a client reads from whatever answers at the store's address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memfabric::store::proto::{split_frame, Request, Response, HEADER, MAX_FRAME, VERSION};

/// The frame `kind`/`body` arrived in, rebuilt byte for byte.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER + body.len());
    f.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
    f.push(VERSION);
    f.push(kind);
    f.extend_from_slice(body);
    f
}

/// Decodes one body both ways. The decoders are strict (exact flags, no trailing bytes), so
/// anything they accept must re-encode to the very bytes it came from, and decode again to
/// an equal value.
fn check(kind: u8, body: &[u8]) {
    if let Ok(req) = Request::decode(kind, body) {
        let mut buf = Vec::new();
        req.encode(&mut buf)
            .expect("a decoded request fits in a frame");
        assert_eq!(
            buf,
            frame(kind, body),
            "request re-encodes differently: {req:?}"
        );
        let (k, b, used) = split_frame(&buf)
            .expect("own frame is valid")
            .expect("own frame is whole");
        assert_eq!(used, buf.len());
        assert_eq!(Request::decode(k, b).expect("own frame decodes"), req);
    }
    if let Ok(resp) = Response::decode(kind, body) {
        let mut buf = Vec::new();
        resp.encode(&mut buf);
        assert_eq!(
            buf,
            frame(kind, body),
            "response re-encodes differently: {resp:?}"
        );
        let (k, b, _) = split_frame(&buf)
            .expect("own frame is valid")
            .expect("own frame is whole");
        assert_eq!(Response::decode(k, b).expect("own frame decodes"), resp);
    }
}

fuzz_target!(|data: &[u8]| {
    // As the server and the client do: peel whole frames off the front until the decoder
    // asks for more bytes or refuses the stream.
    let mut rest = data;
    loop {
        match split_frame(rest) {
            Ok(Some((kind, body, used))) => {
                assert!(used >= HEADER && used <= rest.len() && used - 4 <= MAX_FRAME);
                assert_eq!(body.len(), used - HEADER);
                check(kind, body);
                rest = &rest[used..];
            }
            Ok(None) => {
                // "Need more" only ever means a short header or a short body.
                if rest.len() >= 4 {
                    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    assert!(rest.len() < 4 + len);
                }
                break;
            }
            Err(_) => break,
        }
    }
    // Also the body decoders on their own, so that they see deep inputs without the fuzzer
    // first having to discover a consistent length prefix.
    if let Some((&kind, body)) = data.split_first() {
        check(kind, body);
    }
});
