//! The C API (`libmf_smem.so`): `smem.h`, `smem_config_store_api.h`, `smem_trans.h`,
//! `smem_bm.h` and `smem_shm.h` with upstream 1.3.0's declarations (names, signatures, struct
//! layouts, enum and macro values), so C and C++ programs written against those headers build
//! and run on this library. The headers are in `memfabric_hybrid/include/smem/host` (shipped
//! in the Python package; `mf.get_include_path()`).
//!
//! The same rules as everywhere else hold at this edge: every pointer, handle, size and string
//! a caller passes is checked before use, a failure is an error code with a message for
//! `smem_get_last_err_msg`, and no panic crosses into C (one would be a bug: it is reported as
//! `SMEM_ERROR`). Handles are numbers looked up in a table, never dereferenced, so a stale or
//! made-up handle is refused rather than followed.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use memfabric::{Error, Result};

pub mod bm;
pub mod common;
pub mod config_store;
mod gate;
mod handles;
pub mod shm;
pub mod trans;

/// `SMEM_ERROR`: a panic inside the library (a bug) or an unclassified failure.
const SMEM_ERROR: i32 = -1;

/// Runs `f` and converts its result to the C convention: 0, or a negative code with the
/// message recorded for `smem_get_last_err_msg`.
fn guarded(what: &str, f: impl FnOnce() -> Result<()>) -> i32 {
    // Recording the error is inside too: it uses thread-local storage, which panics when
    // called during thread teardown (a C++ destructor calling in).
    match catch_unwind(AssertUnwindSafe(|| memfabric::error::to_code(f()))) {
        Ok(code) => code,
        Err(_) => {
            note_panic(what);
            SMEM_ERROR
        }
    }
}

/// Like [`guarded`] for calls that return a value; `failed` on error.
fn guarded_value<T>(what: &str, failed: T, f: impl FnOnce() -> Result<T>) -> T {
    let run = || {
        f().map_err(|e| {
            memfabric::error::record(&e);
        })
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(v)) => v,
        Ok(Err(())) => failed,
        Err(_) => {
            note_panic(what);
            failed
        }
    }
}

fn note_panic(what: &str) {
    let _ = catch_unwind(|| {
        memfabric::error::set_last_error(&format!("{what}: internal error (panic)"))
    });
}

/// The value at `p`, which must not be null.
///
/// # Safety
/// `p` is null or points to a valid `T` that stays valid for the call.
unsafe fn non_null<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: null is refused; otherwise valid by the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Error::InvalidParam(format!("{name} is NULL")))
}

/// The string at `p`, which must not be null and must be UTF-8.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid for the call.
unsafe fn c_str<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::InvalidParam(format!("{name} is NULL")));
    }
    // SAFETY: not null, and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::InvalidParam(format!("{name} is not UTF-8")))
}

/// `len` bytes at `p` as a string (for calls that pass a length beside the pointer).
///
/// # Safety
/// `p` is null or points to at least `len` readable bytes.
unsafe fn c_str_len<'a>(p: *const c_char, len: u32, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::InvalidParam(format!("{name} is NULL")));
    }
    // SAFETY: the caller's contract: `len` readable bytes at `p`.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) };
    // A C caller may count the terminating NUL in `len`.
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|_| Error::InvalidParam(format!("{name} is not UTF-8")))
}
