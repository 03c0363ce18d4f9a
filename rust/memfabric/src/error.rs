//! One error type for the whole core, with stable numeric codes.
//!
//! The public (seed) API returns ints; the codes of the upstream C headers (`SMEM_*`) are kept
//! so callers that test for them keep working. Conditions the upstream set has no code for live
//! in a range of their own (-3000 ..). The README has the table.

use std::cell::RefCell;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the library reports. Each variant carries the context a user needs to act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Generic failure with no better classification (SMEM_ERROR).
    #[error("{0}")]
    Failed(String),
    /// A caller passed an argument outside its documented domain.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// An allocation or mapping failed.
    #[error("allocation failed: {0}")]
    MallocFailed(String),
    /// A bounded resource (ids, descriptors, fds) is exhausted.
    #[error("no resources: {0}")]
    NoResources(String),
    /// The component the call needs has not been started.
    #[error("not started: {0}")]
    NotStarted(String),
    /// A deadline passed before the operation finished.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A one-shot call was made twice.
    #[error("called twice: {0}")]
    RepeatInvoke(String),
    /// Something with this identity exists already.
    #[error("already exists: {0}")]
    Duplicated(String),
    /// The named thing does not exist.
    #[error("not found: {0}")]
    NotExist(String),
    /// The library (or this object) is not initialized.
    #[error("not initialized: {0}")]
    NotInit(String),
    /// The resource is still in use.
    #[error("in use: {0}")]
    InUse(String),
    /// The store connection was lost and re-established during a non-idempotent call; the
    /// caller cannot know whether it was applied.
    #[error("store connection re-established, outcome unknown: {0}")]
    Reconnected(String),
    /// Part of a batch failed; the message names the first failure.
    #[error("partially failed: {0}")]
    PartialFailed(String),
    /// No connection to the peer or store could be made.
    #[error("not connected: {0}")]
    NotConnected(String),
    /// A caller-provided buffer is smaller than the data.
    #[error("buffer too small: {0}")]
    BufferTooSmall(String),
    /// A peer (rank, engine) went away while a call depended on it.
    #[error("peer gone: {0}")]
    PeerGone(String),
    /// An address range is not inside memory registered for it.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// The other side refused the request (authentication, permission, state).
    #[error("refused: {0}")]
    Refused(String),
    /// TLS configuration or handshake failure.
    #[error("tls: {0}")]
    Tls(String),
    /// A malformed frame or message was received.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The feature cannot work on this machine (no device, no driver, kernel refuses).
    #[error("unsupported here: {0}")]
    Unsupported(String),
    /// An operating-system error.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The stable numeric code of this error (see the README's table).
    pub fn code(&self) -> i32 {
        match self {
            Error::Failed(_) => -1,
            Error::InvalidParam(_) => -2000,
            Error::MallocFailed(_) => -2001,
            Error::NoResources(_) => -2002,
            Error::NotStarted(_) => -2003,
            Error::Timeout(_) => -2004,
            Error::RepeatInvoke(_) => -2005,
            Error::Duplicated(_) => -2006,
            Error::NotExist(_) => -2007,
            Error::NotInit(_) => -2008,
            Error::InUse(_) => -2009,
            Error::Reconnected(_) => -2010,
            Error::PartialFailed(_) => -2012,
            Error::NotConnected(_) => -2014,
            Error::BufferTooSmall(_) => -2015,
            Error::PeerGone(_) => -3001,
            Error::OutOfBounds(_) => -3002,
            Error::Refused(_) => -3003,
            Error::Tls(_) => -3004,
            Error::Protocol(_) => -3005,
            Error::Unsupported(_) => -3006,
            Error::Io { .. } => -3007,
        }
    }

    /// An error of the kind `code` names carrying `msg` (for errors kept as code and text,
    /// e.g. across threads); an unknown code gives `Failed`.
    pub fn from_code_message(code: i32, msg: String) -> Self {
        match code {
            -2000 => Error::InvalidParam(msg),
            -2001 => Error::MallocFailed(msg),
            -2002 => Error::NoResources(msg),
            -2003 => Error::NotStarted(msg),
            -2004 => Error::Timeout(msg),
            -2005 => Error::RepeatInvoke(msg),
            -2006 => Error::Duplicated(msg),
            -2007 => Error::NotExist(msg),
            -2008 => Error::NotInit(msg),
            -2009 => Error::InUse(msg),
            -2010 => Error::Reconnected(msg),
            -2012 => Error::PartialFailed(msg),
            -2014 => Error::NotConnected(msg),
            -2015 => Error::BufferTooSmall(msg),
            -3001 => Error::PeerGone(msg),
            -3002 => Error::OutOfBounds(msg),
            -3003 => Error::Refused(msg),
            -3004 => Error::Tls(msg),
            -3005 => Error::Protocol(msg),
            -3006 => Error::Unsupported(msg),
            _ => Error::Failed(msg),
        }
    }

    /// Whether retrying the same call later may succeed (drives connect retry).
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::NotConnected(_) | Error::Timeout(_) | Error::Reconnected(_) => true,
            Error::Io { source, .. } => is_temporary_io(source),
            _ => false,
        }
    }

    /// Wraps an OS error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub(crate) fn is_temporary_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | TimedOut
            | WouldBlock
            | Interrupted
            | UnexpectedEof
            | NotConnected
            | AddrNotAvailable
    )
}

/// The codes a caller may see, with their names, for documentation and bindings.
pub const CODES: &[(i32, &str)] = &[
    (0, "SMEM_OK"),
    (-1, "SMEM_ERROR"),
    (-2000, "SMEM_INVALID_PARAM"),
    (-2001, "SMEM_MALLOC_FAILED"),
    (-2002, "SMEM_NO_RESOURCES"),
    (-2003, "SMEM_NOT_STARTED"),
    (-2004, "SMEM_TIMEOUT"),
    (-2005, "SMEM_REPEAT_INVOKE"),
    (-2006, "SMEM_DUPLICATED"),
    (-2007, "SMEM_NOT_EXIST"),
    (-2008, "SMEM_NOT_INIT"),
    (-2009, "SMEM_RES_IN_USE"),
    (-2010, "SMEM_RECONNECTED"),
    (-2012, "SMEM_PARTIAL_FAILED"),
    (-2014, "SMEM_NOT_CONNECTED"),
    (-2015, "SMEM_BUFFER_TOO_SMALL"),
    (-3001, "MF_PEER_GONE"),
    (-3002, "MF_OUT_OF_BOUNDS"),
    (-3003, "MF_REFUSED"),
    (-3004, "MF_TLS"),
    (-3005, "MF_PROTOCOL"),
    (-3006, "MF_UNSUPPORTED"),
    (-3007, "MF_IO"),
];

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
    static LAST_CODE: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// Records `msg` as this thread's last error message, with the generic code -1 (0 when `msg`
/// is empty); [`record`] sets the error's own code.
pub fn set_last_error(msg: &str) {
    set_last(msg, if msg.is_empty() { 0 } else { -1 });
}

fn set_last(msg: &str, code: i32) {
    LAST_ERROR.with(|m| {
        let mut m = m.borrow_mut();
        m.clear();
        m.push_str(msg);
    });
    LAST_CODE.with(|c| c.set(code));
}

/// The code of this thread's last error (0 when none, or once cleared).
pub fn last_error_code() -> i32 {
    LAST_CODE.with(|c| c.get())
}

/// This thread's last error message ("" when none).
pub fn last_error() -> String {
    LAST_ERROR.with(|m| m.borrow().clone())
}

/// This thread's last error message, cleared afterwards (with its code).
pub fn take_last_error() -> String {
    LAST_CODE.with(|c| c.set(0));
    LAST_ERROR.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

/// Converts a result to the seed's int convention, recording the message on failure.
pub fn to_code<T>(r: Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => record(&e),
    }
}

/// Records `e` as the last error (and logs it at debug level); returns its code.
pub fn record(e: &Error) -> i32 {
    let msg = e.to_string();
    crate::log::debug(&msg);
    set_last(&msg, e.code());
    e.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_listed() {
        let mut seen = std::collections::HashSet::new();
        for (c, _) in CODES {
            assert!(seen.insert(*c), "duplicate code {c}");
        }
        let samples = [
            Error::InvalidParam(String::new()),
            Error::Timeout(String::new()),
            Error::PeerGone(String::new()),
            Error::io("x", std::io::Error::other("y")),
        ];
        for e in samples {
            assert!(seen.contains(&e.code()), "{e:?} not in CODES");
        }
    }

    #[test]
    fn last_error_is_per_thread() {
        set_last_error("main");
        std::thread::spawn(|| assert_eq!(last_error(), ""))
            .join()
            .unwrap();
        assert_eq!(take_last_error(), "main");
        assert_eq!(last_error(), "");
    }

    #[test]
    fn the_last_code_follows_the_last_message() {
        take_last_error();
        assert_eq!(last_error_code(), 0);
        record(&Error::Timeout("slow".into()));
        assert_eq!(last_error_code(), Error::Timeout(String::new()).code());
        set_last_error("something else");
        assert_eq!(last_error_code(), -1);
        assert_eq!(take_last_error(), "something else");
        assert_eq!(last_error_code(), 0);
    }
}
