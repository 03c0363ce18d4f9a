//! What the C API's test files share: the last error, refusals, ports, and taking turns where
//! a process-wide runtime allows one test at a time. (Each test file uses some of it.)
#![allow(dead_code)]

use std::ffi::CStr;
use std::sync::{Mutex, MutexGuard};

use mf_smem::common::smem_get_and_clear_last_err_msg;

/// This thread's last error message, cleared.
pub fn last_err() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(smem_get_and_clear_last_err_msg()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts `rc` is `code` and the last error message says `says`.
#[track_caller]
pub fn refused(rc: i32, code: i32, says: &str) {
    let msg = last_err();
    assert_eq!(rc, code, "{msg}");
    assert!(msg.contains(says), "{msg:?} does not say {says:?}");
}

/// The last error message says `says` (for calls that return no code).
#[track_caller]
pub fn said(says: &str) {
    let msg = last_err();
    assert!(msg.contains(says), "{msg:?} does not say {says:?}");
}

#[track_caller]
pub fn ok(rc: i32) {
    assert_eq!(rc, 0, "{}", last_err());
}

/// A TCP port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test at a time: a process has one Big Memory and one Share Memory runtime.
pub fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}
