//! Store wire format: length-prefixed binary frames.
//!
//! ```text
//! frame := len:u32be  version:u8  kind:u8  body[len - 2]
//! bytes := n:u32be data[n]          str := bytes (UTF-8)
//! ```
//! `len` counts everything after itself and is bounded by [`MAX_FRAME`]. A peer that sends a
//! longer length, an unknown version or kind, or a body that does not parse is answered with
//! nothing: the connection is closed. A short read is not an error; it means "read more".

use std::cell::RefCell;

use crate::error::{Error, Result};

pub const VERSION: u8 = 1;
/// Largest frame either side accepts (header excluded). Big enough for all_gather of 1024
/// ranks x 64 KiB; a multi_set bigger than this must be split by the caller.
pub const MAX_FRAME: usize = 128 << 20;
pub const HEADER: usize = 6;

/// Values at least this large are copied into a reused buffer (see [`value_copy`]).
const REUSE_MIN: usize = 64 << 10;
/// Larger buffers are not kept.
const REUSE_MAX: usize = 64 << 20;

thread_local! {
    /// This thread's spare value buffer: a large value copied into fresh memory faults every
    /// page in (and glibc returns it to the kernel when freed), which made a 1 MiB get cost
    /// 2.5 ms where the copy itself takes a tenth of that.
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A copy of `data`; large ones go into this thread's spare buffer when it fits them (not
/// more than half again as large: the copy may be kept, as a stored value).
pub fn value_copy(data: &[u8]) -> Vec<u8> {
    if data.len() < REUSE_MIN {
        return data.to_vec();
    }
    let spare = SPARE.with(|s| {
        let mut s = s.borrow_mut();
        let fits = s.capacity() >= data.len() && s.capacity() <= data.len() + data.len() / 2;
        fits.then(|| std::mem::take(&mut *s))
    });
    let mut v = spare.unwrap_or_default();
    v.clear();
    v.extend_from_slice(data);
    v
}

/// Hands a value buffer back once its bytes were used, for the next [`value_copy`] on this
/// thread.
pub fn recycle(v: Vec<u8>) {
    if (REUSE_MIN..=REUSE_MAX).contains(&v.capacity()) {
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.capacity() < v.capacity() {
                *spare = v;
            }
        });
    }
}

/// A request from a client. Waits carry their deadline so the server can answer in time.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Ping,
    /// `ephemeral`: the key belongs to this connection and is deleted when it closes.
    Set {
        key: String,
        value: Vec<u8>,
        ephemeral: bool,
    },
    /// `wait_ms` 0: answer NotFound at once; else wait up to that long for the key.
    Get {
        key: String,
        wait_ms: u64,
    },
    /// Atomic add on a decimal counter (missing key counts as 0); answers the new value.
    Add {
        key: String,
        delta: i64,
    },
    /// Sets `desired` if the current value equals `expected` (a missing key equals empty);
    /// answers the value stored afterwards.
    CompareSet {
        key: String,
        expected: Vec<u8>,
        desired: Vec<u8>,
    },
    /// Answers Int(1) if the key existed, Int(0) if not.
    Delete {
        key: String,
    },
    /// Appends to the value (creating it); answers the new length.
    Append {
        key: String,
        value: Vec<u8>,
    },
    Exists {
        keys: Vec<String>,
    },
    MultiGet {
        keys: Vec<String>,
        wait_ms: u64,
    },
    MultiSet {
        entries: Vec<(String, Vec<u8>)>,
        ephemeral: bool,
    },
    /// Keys starting with `prefix`, in order.
    List {
        prefix: String,
    },
    /// Waits until every key exists. With `watch = (prefix, min)`, answers Aborted as soon as
    /// fewer than `min` keys start with `prefix` (a member's session died).
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
        watch: Option<(String, u64)>,
    },
    /// Asks for a shared-memory channel (local socket only; see `shm_channel`). Answered by
    /// `Channel`, with the channel's and the doorbell's memfds attached, or BadRequest.
    OpenChannel,
}

/// The server's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Ok,
    Value(Vec<u8>),
    Values(Vec<Vec<u8>>),
    Int(i64),
    Bools(Vec<bool>),
    Keys(Vec<String>),
    NotFound(String),
    Timeout,
    Aborted(String),
    BadRequest(String),
    /// A granted shared-memory channel: its slot in the doorbell.
    Channel {
        slot: u32,
    },
}

mod kind {
    pub const PING: u8 = 1;
    pub const SET: u8 = 2;
    pub const GET: u8 = 3;
    pub const ADD: u8 = 4;
    pub const CAS: u8 = 5;
    pub const DELETE: u8 = 6;
    pub const APPEND: u8 = 7;
    pub const EXISTS: u8 = 8;
    pub const MULTI_GET: u8 = 9;
    pub const MULTI_SET: u8 = 10;
    pub const LIST: u8 = 11;
    pub const WAIT: u8 = 12;
    pub const OPEN_CHANNEL: u8 = 13;

    pub const R_OK: u8 = 128;
    pub const R_VALUE: u8 = 129;
    pub const R_VALUES: u8 = 130;
    pub const R_INT: u8 = 131;
    pub const R_BOOLS: u8 = 132;
    pub const R_KEYS: u8 = 133;
    pub const R_NOT_FOUND: u8 = 134;
    pub const R_TIMEOUT: u8 = 135;
    pub const R_ABORTED: u8 = 136;
    pub const R_BAD_REQUEST: u8 = 137;
    pub const R_CHANNEL: u8 = 138;
}

/// Appends frame fields to a buffer.
pub struct Encoder<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Encoder<'a> {
    /// Starts a frame of `kind` at the end of `buf`.
    pub fn new(buf: &'a mut Vec<u8>, kind: u8) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0, 0, 0, 0, VERSION, kind]);
        Encoder { buf, start }
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    pub fn strs<S: AsRef<str>>(&mut self, v: &[S]) -> &mut Self {
        self.u32(v.len() as u32);
        for s in v {
            self.bytes(s.as_ref().as_bytes());
        }
        self
    }
    /// Writes the length prefix; fails if the frame is over [`MAX_FRAME`].
    pub fn finish(self) -> Result<()> {
        let len = self.buf.len() - self.start - 4;
        if len > MAX_FRAME {
            self.buf.truncate(self.start);
            return Err(Error::InvalidParam(format!(
                "message of {len} bytes exceeds the store's frame limit of {MAX_FRAME} bytes"
            )));
        }
        self.buf[self.start..self.start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// Reads frame fields from a body, every read bounds-checked.
pub struct Decoder<'a> {
    body: &'a [u8],
}

fn short() -> Error {
    Error::Protocol("frame body ends early".into())
}

impl<'a> Decoder<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Decoder { body }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.body.len() < n {
            return Err(short());
        }
        let (h, t) = self.body.split_at(n);
        self.body = t;
        Ok(h)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| Error::Protocol("key is not UTF-8".into()))
    }
    /// A count followed by that many items; the count is checked against the bytes left so a
    /// forged count cannot make us allocate more than the frame holds.
    pub fn count(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.body.len() {
            return Err(short());
        }
        Ok(n)
    }
    pub fn strings(&mut self) -> Result<Vec<String>> {
        let n = self.count(4)?;
        (0..n).map(|_| self.string()).collect()
    }
    pub fn end(&self) -> Result<()> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(Error::Protocol(format!(
                "{} trailing bytes in frame",
                self.body.len()
            )))
        }
    }
}

/// Splits one frame off the front of `buf`: `Ok(None)` means more bytes are needed;
/// `Ok(Some((kind, body, consumed)))` a whole frame; `Err` a frame that must close the link.
pub fn split_frame(buf: &[u8]) -> Result<Option<(u8, &[u8], usize)>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(Error::Protocol(format!(
            "frame length {len} exceeds the limit of {MAX_FRAME}"
        )));
    }
    if len < 2 {
        return Err(Error::Protocol(format!("frame length {len} is too short")));
    }
    if buf.len() >= 5 && buf[4] != VERSION {
        return Err(Error::Protocol(format!(
            "frame version {} is not supported (this side speaks {VERSION})",
            buf[4]
        )));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((buf[5], &buf[HEADER..4 + len], 4 + len)))
}

impl Request {
    /// Appends this request as one frame to `buf`.
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<()> {
        use kind::*;
        match self {
            Request::Ping => Encoder::new(buf, PING).finish(),
            Request::Set {
                key,
                value,
                ephemeral,
            } => {
                let mut e = Encoder::new(buf, SET);
                e.bytes(key.as_bytes()).bytes(value).u8(*ephemeral as u8);
                e.finish()
            }
            Request::Get { key, wait_ms } => {
                let mut e = Encoder::new(buf, GET);
                e.bytes(key.as_bytes()).u64(*wait_ms);
                e.finish()
            }
            Request::Add { key, delta } => {
                let mut e = Encoder::new(buf, ADD);
                e.bytes(key.as_bytes()).i64(*delta);
                e.finish()
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let mut e = Encoder::new(buf, CAS);
                e.bytes(key.as_bytes()).bytes(expected).bytes(desired);
                e.finish()
            }
            Request::Delete { key } => {
                let mut e = Encoder::new(buf, DELETE);
                e.bytes(key.as_bytes());
                e.finish()
            }
            Request::Append { key, value } => {
                let mut e = Encoder::new(buf, APPEND);
                e.bytes(key.as_bytes()).bytes(value);
                e.finish()
            }
            Request::Exists { keys } => {
                let mut e = Encoder::new(buf, EXISTS);
                e.strs(keys);
                e.finish()
            }
            Request::MultiGet { keys, wait_ms } => {
                let mut e = Encoder::new(buf, MULTI_GET);
                e.strs(keys).u64(*wait_ms);
                e.finish()
            }
            Request::MultiSet { entries, ephemeral } => {
                let mut e = Encoder::new(buf, MULTI_SET);
                e.u32(entries.len() as u32);
                for (k, v) in entries {
                    e.bytes(k.as_bytes()).bytes(v);
                }
                e.u8(*ephemeral as u8);
                e.finish()
            }
            Request::List { prefix } => {
                let mut e = Encoder::new(buf, LIST);
                e.bytes(prefix.as_bytes());
                e.finish()
            }
            Request::Wait {
                keys,
                timeout_ms,
                watch,
            } => {
                let mut e = Encoder::new(buf, WAIT);
                e.strs(keys).u64(*timeout_ms);
                match watch {
                    Some((p, min)) => e.u8(1).bytes(p.as_bytes()).u64(*min),
                    None => e.u8(0),
                };
                e.finish()
            }
            Request::OpenChannel => Encoder::new(buf, OPEN_CHANNEL).finish(),
        }
    }

    /// Parses the body of a request frame of `kind`.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Request> {
        use kind::*;
        let mut d = Decoder::new(body);
        let req = match kind {
            PING => Request::Ping,
            SET => Request::Set {
                key: d.string()?,
                value: value_copy(d.bytes()?),
                ephemeral: flag(&mut d)?,
            },
            GET => Request::Get {
                key: d.string()?,
                wait_ms: d.u64()?,
            },
            ADD => Request::Add {
                key: d.string()?,
                delta: d.i64()?,
            },
            CAS => Request::CompareSet {
                key: d.string()?,
                expected: d.bytes()?.to_vec(),
                desired: d.bytes()?.to_vec(),
            },
            DELETE => Request::Delete { key: d.string()? },
            APPEND => Request::Append {
                key: d.string()?,
                value: d.bytes()?.to_vec(),
            },
            EXISTS => Request::Exists { keys: d.strings()? },
            MULTI_GET => Request::MultiGet {
                keys: d.strings()?,
                wait_ms: d.u64()?,
            },
            MULTI_SET => {
                let n = d.count(8)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push((d.string()?, d.bytes()?.to_vec()));
                }
                Request::MultiSet {
                    entries,
                    ephemeral: flag(&mut d)?,
                }
            }
            LIST => Request::List {
                prefix: d.string()?,
            },
            WAIT => {
                let keys = d.strings()?;
                let timeout_ms = d.u64()?;
                let watch = if flag(&mut d)? {
                    Some((d.string()?, d.u64()?))
                } else {
                    None
                };
                Request::Wait {
                    keys,
                    timeout_ms,
                    watch,
                }
            }
            OPEN_CHANNEL => Request::OpenChannel,
            k => return Err(Error::Protocol(format!("unknown request kind {k}"))),
        };
        d.end()?;
        Ok(req)
    }
}

fn flag(d: &mut Decoder<'_>) -> Result<bool> {
    match d.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(Error::Protocol(format!("flag byte {v} is not 0 or 1"))),
    }
}

impl Response {
    /// Appends this response as one frame to `buf`. A response too big for a frame becomes a
    /// BadRequest naming the limit, so the client learns why instead of losing the link.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        if let Err(e) = self.encode_inner(buf) {
            let _ = Response::BadRequest(e.to_string()).encode_inner(buf);
        }
    }

    /// Appends the frame of `Response::Value(value)` without the response itself (the value
    /// stays where it is).
    pub fn encode_value(value: &[u8], buf: &mut Vec<u8>) {
        let start = buf.len();
        let mut e = Encoder::new(buf, kind::R_VALUE);
        e.bytes(value);
        if let Err(err) = e.finish() {
            buf.truncate(start);
            Response::BadRequest(err.to_string()).encode(buf);
        }
    }

    fn encode_inner(&self, buf: &mut Vec<u8>) -> Result<()> {
        use kind::*;
        match self {
            Response::Ok => Encoder::new(buf, R_OK).finish(),
            Response::Value(v) => {
                let mut e = Encoder::new(buf, R_VALUE);
                e.bytes(v);
                e.finish()
            }
            Response::Values(vs) => {
                let mut e = Encoder::new(buf, R_VALUES);
                e.u32(vs.len() as u32);
                for v in vs {
                    e.bytes(v);
                }
                e.finish()
            }
            Response::Int(i) => {
                let mut e = Encoder::new(buf, R_INT);
                e.i64(*i);
                e.finish()
            }
            Response::Bools(bs) => {
                let mut e = Encoder::new(buf, R_BOOLS);
                e.u32(bs.len() as u32);
                for b in bs {
                    e.u8(*b as u8);
                }
                e.finish()
            }
            Response::Keys(ks) => {
                let mut e = Encoder::new(buf, R_KEYS);
                e.strs(ks);
                e.finish()
            }
            Response::NotFound(k) => {
                let mut e = Encoder::new(buf, R_NOT_FOUND);
                e.bytes(k.as_bytes());
                e.finish()
            }
            Response::Timeout => Encoder::new(buf, R_TIMEOUT).finish(),
            Response::Aborted(m) => {
                let mut e = Encoder::new(buf, R_ABORTED);
                e.bytes(m.as_bytes());
                e.finish()
            }
            Response::BadRequest(m) => {
                let mut e = Encoder::new(buf, R_BAD_REQUEST);
                e.bytes(m.as_bytes());
                e.finish()
            }
            Response::Channel { slot } => {
                let mut e = Encoder::new(buf, R_CHANNEL);
                e.u32(*slot);
                e.finish()
            }
        }
    }

    /// Parses the body of a response frame of `kind`.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Response> {
        use kind::*;
        let mut d = Decoder::new(body);
        let r = match kind {
            R_OK => Response::Ok,
            R_VALUE => Response::Value(value_copy(d.bytes()?)),
            R_VALUES => {
                let n = d.count(4)?;
                let mut vs = Vec::with_capacity(n);
                for _ in 0..n {
                    vs.push(d.bytes()?.to_vec());
                }
                Response::Values(vs)
            }
            R_INT => Response::Int(d.i64()?),
            R_BOOLS => {
                let n = d.count(1)?;
                let mut bs = Vec::with_capacity(n);
                for _ in 0..n {
                    bs.push(flag(&mut d)?);
                }
                Response::Bools(bs)
            }
            R_KEYS => Response::Keys(d.strings()?),
            R_NOT_FOUND => Response::NotFound(d.string()?),
            R_TIMEOUT => Response::Timeout,
            R_ABORTED => Response::Aborted(d.string()?),
            R_BAD_REQUEST => Response::BadRequest(d.string()?),
            R_CHANNEL => Response::Channel { slot: d.u32()? },
            k => return Err(Error::Protocol(format!("unknown response kind {k}"))),
        };
        d.end()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(r: Request) {
        let mut buf = Vec::new();
        r.encode(&mut buf).unwrap();
        let (kind, body, used) = split_frame(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(Request::decode(kind, body).unwrap(), r);
        // Every strict prefix is "need more", never an error or a frame.
        for cut in 0..buf.len() {
            assert!(split_frame(&buf[..cut]).unwrap().is_none());
        }
    }

    #[test]
    fn large_values_reuse_a_recycled_buffer_of_a_fitting_size() {
        let data = vec![3u8; 1 << 20];
        let first = value_copy(&data);
        let at = first.as_ptr();
        recycle(first);
        let again = value_copy(&data);
        assert_eq!(again.as_ptr(), at, "the recycled buffer was not reused");
        assert_eq!(again, data);
        // A spare much larger than the value stays where it is (the copy may be stored).
        recycle(again);
        let small = value_copy(&data[..100 << 10]);
        assert_ne!(small.as_ptr(), at);
        assert!(small.capacity() < 1 << 20);
        // Small values never touch the spare.
        assert_eq!(value_copy(b"abc"), b"abc");
        let last = value_copy(&data);
        assert_eq!(last.as_ptr(), at);
    }

    #[test]
    fn requests_roundtrip() {
        roundtrip(Request::Ping);
        roundtrip(Request::OpenChannel);
        roundtrip(Request::Set {
            key: "k".into(),
            value: vec![1, 2, 3],
            ephemeral: true,
        });
        roundtrip(Request::Get {
            key: "ü".into(),
            wait_ms: 5,
        });
        roundtrip(Request::Add {
            key: "c".into(),
            delta: -7,
        });
        roundtrip(Request::CompareSet {
            key: "c".into(),
            expected: vec![],
            desired: vec![9],
        });
        roundtrip(Request::MultiSet {
            entries: vec![("a".into(), vec![1]), ("b".into(), vec![])],
            ephemeral: false,
        });
        roundtrip(Request::MultiGet {
            keys: vec!["a".into(), "b".into()],
            wait_ms: 0,
        });
        roundtrip(Request::Wait {
            keys: vec!["d".into()],
            timeout_ms: 9,
            watch: Some(("alive/".into(), 3)),
        });
        roundtrip(Request::Wait {
            keys: vec![],
            timeout_ms: 9,
            watch: None,
        });
        roundtrip(Request::List { prefix: "".into() });
    }

    #[test]
    fn responses_roundtrip() {
        for r in [
            Response::Ok,
            Response::Value(vec![0; 10]),
            Response::Values(vec![vec![1], vec![]]),
            Response::Int(-5),
            Response::Bools(vec![true, false]),
            Response::Keys(vec!["x".into()]),
            Response::NotFound("k".into()),
            Response::Timeout,
            Response::Aborted("rank 3".into()),
            Response::BadRequest("no".into()),
            Response::Channel { slot: 4095 },
        ] {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            let (kind, body, _) = split_frame(&buf).unwrap().unwrap();
            assert_eq!(Response::decode(kind, body).unwrap(), r);
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        // 1 GiB length prefix.
        assert!(split_frame(&[0x40, 0, 0, 0, VERSION, 1]).is_err());
        // Wrong version.
        assert!(split_frame(&[0, 0, 0, 2, 99, 1]).is_err());
        // Length too short.
        assert!(split_frame(&[0, 0, 0, 1, VERSION]).is_err());
        // Unknown kind, truncated bodies, forged counts, trailing bytes, bad flags.
        assert!(Request::decode(77, &[]).is_err());
        assert!(Request::decode(kind::SET, &[0, 0, 0, 9, b'a']).is_err());
        assert!(Request::decode(kind::EXISTS, &[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Request::decode(kind::PING, &[1]).is_err());
        assert!(Request::decode(kind::SET, &[0, 0, 0, 1, b'a', 0, 0, 0, 0, 7]).is_err());
        assert!(
            Request::decode(kind::GET, &[0, 0, 0, 2, 0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0]).is_err()
        );
        // Pseudo-random garbage never panics.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            let _ = Request::decode((x >> 56) as u8 % 14, &bytes);
            let _ = Response::decode(128 + (x >> 56) as u8 % 11, &bytes);
            let _ = split_frame(&bytes);
        }
    }

    #[test]
    fn oversized_message_is_refused_before_sending() {
        let mut buf = Vec::new();
        let r = Request::Set {
            key: "k".into(),
            value: vec![0; MAX_FRAME],
            ephemeral: false,
        };
        assert_eq!(r.encode(&mut buf).unwrap_err().code(), -2000);
        assert!(buf.is_empty());
    }
}
