//! The subset of the Ascend ACL runtime (`libascendcl.so`, part of CANN) that memfabric needs:
//! init/finalize, the thread's device, device memory, copies, streams and events.
//!
//! Nothing is linked at build time: [`Acl::load`] opens the library at run time from the
//! standard CANN locations, so crates that depend on this one build and run on machines without
//! CANN, and report [`LoadError::NotFound`] there. No crate on crates.io offers these bindings,
//! hence this small one.
//!
//! Signatures follow CANN's `acl/acl_base.h` and `acl/acl_rt.h`. Every function is a raw
//! pointer into the loaded library; calling one is `unsafe` and the caller upholds the ACL
//! contract (a device set on the calling thread, valid pointers and lengths).

#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};

use libloading::Library;

/// `aclError`: 0 is success.
pub type aclError = c_int;
/// `aclrtStream`: an opaque stream handle.
pub type aclrtStream = *mut c_void;
/// `aclrtEvent`: an opaque event handle.
pub type aclrtEvent = *mut c_void;
/// `aclrtMemMallocPolicy`.
pub type aclrtMemMallocPolicy = c_int;
/// `aclrtMemcpyKind`.
pub type aclrtMemcpyKind = c_int;
/// `aclrtEventRecordedStatus`.
pub type aclrtEventRecordedStatus = c_int;

pub const ACL_SUCCESS: aclError = 0;
/// `aclInit` called again in one process; harmless (CANN documents that it may be ignored).
pub const ACL_ERROR_REPEAT_INITIALIZE: aclError = 100002;

pub const ACL_MEM_MALLOC_HUGE_FIRST: aclrtMemMallocPolicy = 0;
pub const ACL_MEM_MALLOC_HUGE_ONLY: aclrtMemMallocPolicy = 1;
pub const ACL_MEM_MALLOC_NORMAL_ONLY: aclrtMemMallocPolicy = 2;

pub const ACL_MEMCPY_HOST_TO_HOST: aclrtMemcpyKind = 0;
pub const ACL_MEMCPY_HOST_TO_DEVICE: aclrtMemcpyKind = 1;
pub const ACL_MEMCPY_DEVICE_TO_HOST: aclrtMemcpyKind = 2;
pub const ACL_MEMCPY_DEVICE_TO_DEVICE: aclrtMemcpyKind = 3;

pub const ACL_EVENT_RECORDED_STATUS_NOT_READY: aclrtEventRecordedStatus = 0;
pub const ACL_EVENT_RECORDED_STATUS_COMPLETE: aclrtEventRecordedStatus = 1;

/// Environment variable naming the exact library file to load; when set, nothing else is tried.
pub const LIBRARY_ENV: &str = "MF_ASCEND_LIBRARY";
/// The ACL runtime's file name.
pub const LIBRARY_NAME: &str = "libascendcl.so";
/// Variables CANN's `set_env.sh` exports, each naming an install root with a `lib64/`.
pub const HOME_ENVS: [&str; 2] = ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"];
/// Default install roots of the toolkit.
pub const DEFAULT_HOMES: [&str; 2] = [
    "/usr/local/Ascend/ascend-toolkit/latest",
    "/usr/local/Ascend/latest",
];

/// Why the runtime could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// No candidate could be opened: each path with the loader's message.
    NotFound { tried: Vec<(String, String)> },
    /// The library opened but lacks a function this crate needs (a CANN too old or not ACL).
    MissingSymbol {
        library: String,
        symbol: String,
        message: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotFound { tried } => {
                write!(f, "Ascend runtime not found: tried ")?;
                for (i, (path, msg)) in tried.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(f, "{path} ({msg})")?;
                }
                write!(
                    f,
                    " (install CANN and source its set_env.sh, or set {LIBRARY_ENV})"
                )
            }
            LoadError::MissingSymbol {
                library,
                symbol,
                message,
            } => write!(
                f,
                "Ascend runtime at {library} lacks {symbol} ({message}); a newer CANN is needed"
            ),
        }
    }
}

impl std::error::Error for LoadError {}

/// The library files to try, in order: `$MF_ASCEND_LIBRARY` alone when set; otherwise
/// `lib64/libascendcl.so` under `$ASCEND_HOME_PATH`, `$ASCEND_TOOLKIT_HOME` and the default
/// install roots, then the bare name (found through `LD_LIBRARY_PATH` and the loader cache).
pub fn candidates() -> Vec<PathBuf> {
    let homes: Vec<Option<OsString>> = HOME_ENVS.iter().map(std::env::var_os).collect();
    candidates_from(std::env::var_os(LIBRARY_ENV), &homes)
}

/// [`candidates`] for given values of the variables (testable without touching the process
/// environment).
pub fn candidates_from(exact: Option<OsString>, homes: &[Option<OsString>]) -> Vec<PathBuf> {
    if let Some(p) = exact.filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut out: Vec<PathBuf> = Vec::new();
    let roots = homes
        .iter()
        .flatten()
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .chain(DEFAULT_HOMES.iter().map(PathBuf::from));
    for root in roots {
        let p = root.join("lib64").join(LIBRARY_NAME);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out.push(PathBuf::from(LIBRARY_NAME));
    out
}

/// The loaded runtime. Function pointers stay valid as long as this value lives.
pub struct Acl {
    pub aclInit: unsafe extern "C" fn(config_path: *const c_char) -> aclError,
    pub aclFinalize: unsafe extern "C" fn() -> aclError,
    pub aclrtSetDevice: unsafe extern "C" fn(device_id: i32) -> aclError,
    pub aclrtGetDevice: unsafe extern "C" fn(device_id: *mut i32) -> aclError,
    pub aclrtGetDeviceCount: unsafe extern "C" fn(count: *mut u32) -> aclError,
    pub aclrtMalloc: unsafe extern "C" fn(
        dev_ptr: *mut *mut c_void,
        size: usize,
        policy: aclrtMemMallocPolicy,
    ) -> aclError,
    pub aclrtFree: unsafe extern "C" fn(dev_ptr: *mut c_void) -> aclError,
    pub aclrtMemcpy: unsafe extern "C" fn(
        dst: *mut c_void,
        dest_max: usize,
        src: *const c_void,
        count: usize,
        kind: aclrtMemcpyKind,
    ) -> aclError,
    pub aclrtMemcpyAsync: unsafe extern "C" fn(
        dst: *mut c_void,
        dest_max: usize,
        src: *const c_void,
        count: usize,
        kind: aclrtMemcpyKind,
        stream: aclrtStream,
    ) -> aclError,
    pub aclrtCreateStream: unsafe extern "C" fn(stream: *mut aclrtStream) -> aclError,
    pub aclrtSynchronizeStream: unsafe extern "C" fn(stream: aclrtStream) -> aclError,
    pub aclrtDestroyStream: unsafe extern "C" fn(stream: aclrtStream) -> aclError,
    pub aclrtCreateEvent: unsafe extern "C" fn(event: *mut aclrtEvent) -> aclError,
    pub aclrtRecordEvent: unsafe extern "C" fn(event: aclrtEvent, stream: aclrtStream) -> aclError,
    pub aclrtSynchronizeEvent: unsafe extern "C" fn(event: aclrtEvent) -> aclError,
    pub aclrtDestroyEvent: unsafe extern "C" fn(event: aclrtEvent) -> aclError,
    pub aclrtStreamWaitEvent:
        unsafe extern "C" fn(stream: aclrtStream, event: aclrtEvent) -> aclError,
    /// Newer CANN only; `None` where the library lacks it.
    pub aclrtQueryEventStatus: Option<
        unsafe extern "C" fn(event: aclrtEvent, status: *mut aclrtEventRecordedStatus) -> aclError,
    >,
    /// The calling thread's last ACL error text, where the library has it.
    pub aclGetRecentErrMsg: Option<unsafe extern "C" fn() -> *const c_char>,
    path: String,
    // Last, so the pointers above are never used after the library is closed.
    _lib: Library,
}

impl fmt::Debug for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acl").field("path", &self.path).finish()
    }
}

/// The text a loader error gives, without a leading copy of the path it names.
fn loader_message(path: &str, e: &libloading::Error) -> String {
    let msg = e.to_string();
    let msg = msg
        .strip_prefix(path)
        .and_then(|m| m.strip_prefix(": "))
        .map(str::to_owned)
        .unwrap_or(msg);
    msg
}

impl Acl {
    /// Loads the runtime from the first of [`candidates`] that opens.
    pub fn load() -> Result<Acl, LoadError> {
        Self::load_from(&candidates())
    }

    /// Loads the runtime from the first of `paths` that opens.
    pub fn load_from(paths: &[PathBuf]) -> Result<Acl, LoadError> {
        let mut tried = Vec::new();
        for p in paths {
            let shown = p.display().to_string();
            // SAFETY: loading runs the library's initializers; libascendcl's have no
            // preconditions on the caller.
            match unsafe { Library::new(p.as_os_str()) } {
                Ok(lib) => return Self::bind(lib, shown),
                Err(e) => {
                    let msg = loader_message(&shown, &e);
                    tried.push((shown, msg));
                }
            }
        }
        Err(LoadError::NotFound { tried })
    }

    fn bind(lib: Library, path: String) -> Result<Acl, LoadError> {
        fn req<T: Copy>(lib: &Library, path: &str, name: &str) -> Result<T, LoadError> {
            // SAFETY: `T` is the function-pointer type of `name` as CANN's headers declare it
            // (see the field types of `Acl`); the pointer is only used while `lib` lives.
            match unsafe { lib.get::<T>(name.as_bytes()) } {
                Ok(s) => Ok(*s),
                Err(e) => Err(LoadError::MissingSymbol {
                    library: path.to_owned(),
                    symbol: name.to_owned(),
                    message: e.to_string(),
                }),
            }
        }
        fn opt<T: Copy>(lib: &Library, name: &str) -> Option<T> {
            // SAFETY: as in `req`.
            unsafe { lib.get::<T>(name.as_bytes()) }.ok().map(|s| *s)
        }
        let p = path.as_str();
        Ok(Acl {
            aclInit: req(&lib, p, "aclInit")?,
            aclFinalize: req(&lib, p, "aclFinalize")?,
            aclrtSetDevice: req(&lib, p, "aclrtSetDevice")?,
            aclrtGetDevice: req(&lib, p, "aclrtGetDevice")?,
            aclrtGetDeviceCount: req(&lib, p, "aclrtGetDeviceCount")?,
            aclrtMalloc: req(&lib, p, "aclrtMalloc")?,
            aclrtFree: req(&lib, p, "aclrtFree")?,
            aclrtMemcpy: req(&lib, p, "aclrtMemcpy")?,
            aclrtMemcpyAsync: req(&lib, p, "aclrtMemcpyAsync")?,
            aclrtCreateStream: req(&lib, p, "aclrtCreateStream")?,
            aclrtSynchronizeStream: req(&lib, p, "aclrtSynchronizeStream")?,
            aclrtDestroyStream: req(&lib, p, "aclrtDestroyStream")?,
            aclrtCreateEvent: req(&lib, p, "aclrtCreateEvent")?,
            aclrtRecordEvent: req(&lib, p, "aclrtRecordEvent")?,
            aclrtSynchronizeEvent: req(&lib, p, "aclrtSynchronizeEvent")?,
            aclrtDestroyEvent: req(&lib, p, "aclrtDestroyEvent")?,
            aclrtStreamWaitEvent: req(&lib, p, "aclrtStreamWaitEvent")?,
            aclrtQueryEventStatus: opt(&lib, "aclrtQueryEventStatus"),
            aclGetRecentErrMsg: opt(&lib, "aclGetRecentErrMsg"),
            path,
            _lib: lib,
        })
    }

    /// The file the runtime was loaded from.
    pub fn path(&self) -> &Path {
        Path::new(&self.path)
    }

    /// The calling thread's most recent ACL error text, if the library reports one.
    pub fn recent_error(&self) -> Option<String> {
        let f = self.aclGetRecentErrMsg?;
        // SAFETY: aclGetRecentErrMsg takes no arguments and returns NULL or a NUL-terminated
        // string owned by the runtime, valid until the thread's next ACL call.
        let p = unsafe { f() };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated, per the contract above; copied at once.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        (!s.is_empty()).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_path_is_the_only_candidate() {
        let c = candidates_from(
            Some("/opt/x/libascendcl.so".into()),
            &[Some("/ignored".into())],
        );
        assert_eq!(c, vec![PathBuf::from("/opt/x/libascendcl.so")]);
    }

    #[test]
    fn homes_then_defaults_then_bare_name() {
        let c = candidates_from(
            None,
            &[
                Some("/cann".into()),
                None,
                Some("/usr/local/Ascend/latest".into()),
            ],
        );
        let want: Vec<PathBuf> = [
            "/cann/lib64/libascendcl.so",
            "/usr/local/Ascend/latest/lib64/libascendcl.so",
            "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so",
            "libascendcl.so",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(c, want);
    }

    #[test]
    fn missing_library_names_every_path_tried() {
        let paths = [
            PathBuf::from("/nonexistent/a/libascendcl.so"),
            PathBuf::from("/nonexistent/b/libascendcl.so"),
        ];
        let e = Acl::load_from(&paths).unwrap_err();
        let LoadError::NotFound { tried } = &e else {
            panic!("expected NotFound, got {e:?}");
        };
        assert_eq!(tried.len(), 2);
        let msg = e.to_string();
        assert!(msg.starts_with("Ascend runtime not found: tried "), "{msg}");
        assert!(msg.contains("/nonexistent/a/libascendcl.so ("), "{msg}");
        assert!(msg.contains("/nonexistent/b/libascendcl.so ("), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        assert!(msg.contains(LIBRARY_ENV), "{msg}");
    }

    #[test]
    fn a_library_without_acl_is_refused_by_symbol() {
        // libc opens everywhere and has none of the ACL functions.
        let e = Acl::load_from(&[PathBuf::from("libc.so.6")]).unwrap_err();
        match e {
            LoadError::MissingSymbol { symbol, .. } => assert_eq!(symbol, "aclInit"),
            other => panic!("expected MissingSymbol, got {other:?}"),
        }
    }
}
