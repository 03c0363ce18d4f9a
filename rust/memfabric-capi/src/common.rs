//! `smem.h`: the runtime, config stores, logging, TLS settings and the last error.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use memfabric::store::tls;
use memfabric::store::url::parse_store_url;
use memfabric::store::StoreServer;
use memfabric::Error;

use crate::{c_str, c_str_len, guarded};

/// Config stores started by `smem_create_config_store`, stopped by `smem_uninit`.
static CREATED: Mutex<Vec<StoreServer>> = Mutex::new(Vec::new());

/// The external logger: `func(level, message)`, level 0 debug .. 3 error.
pub type ExternLogger = Option<unsafe extern "C" fn(level: c_int, msg: *const c_char)>;

/// Decrypts the private key's pass phrase: `plain_len` holds the room at `plain` on entry and
/// the pass phrase's length on return (a C++ `size_t &`, which is a pointer in the ABI).
pub type DecryptHandler = Option<
    unsafe extern "C" fn(
        cipher: *const c_char,
        cipher_len: usize,
        plain: *mut c_char,
        plain_len: *mut usize,
    ) -> c_int,
>;

/// Length of each path in [`SmemTlsConfig`] (`SMEM_TLS_PATH_SIZE`).
pub const SMEM_TLS_PATH_SIZE: usize = 256;

/// `smem_tls_config` of `smem_bm_def.h`: TLS files of a network link, embedded in the Big
/// Memory and Transfer Engine configs. Paths are NUL-terminated within their arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemTlsConfig {
    pub tls_enable: bool,
    pub ca_path: [c_char; SMEM_TLS_PATH_SIZE],
    pub crl_path: [c_char; SMEM_TLS_PATH_SIZE],
    pub cert_path: [c_char; SMEM_TLS_PATH_SIZE],
    pub key_path: [c_char; SMEM_TLS_PATH_SIZE],
    pub key_pass_path: [c_char; SMEM_TLS_PATH_SIZE],
    pub package_path: [c_char; SMEM_TLS_PATH_SIZE],
    pub decrypter_lib_path: [c_char; SMEM_TLS_PATH_SIZE],
}

impl SmemTlsConfig {
    /// TLS off, every path empty (what the `*_config_init` calls write).
    pub const DISABLED: SmemTlsConfig = SmemTlsConfig {
        tls_enable: false,
        ca_path: [0; SMEM_TLS_PATH_SIZE],
        crl_path: [0; SMEM_TLS_PATH_SIZE],
        cert_path: [0; SMEM_TLS_PATH_SIZE],
        key_path: [0; SMEM_TLS_PATH_SIZE],
        key_pass_path: [0; SMEM_TLS_PATH_SIZE],
        package_path: [0; SMEM_TLS_PATH_SIZE],
        decrypter_lib_path: [0; SMEM_TLS_PATH_SIZE],
    };
}

/// Room given to a decrypt handler for the pass phrase.
const PASSPHRASE_ROOM: usize = 4096;

/// Initializes the runtime; `flags` is reserved (0).
#[no_mangle]
pub extern "C" fn smem_init(flags: u32) -> i32 {
    guarded("smem_init", || {
        if flags != 0 {
            return Err(Error::InvalidParam(format!(
                "flags {flags} is reserved and must be 0"
            )));
        }
        memfabric::runtime::runtime().map(|_| ())
    })
}

/// Stops the config stores this library started with `smem_create_config_store`.
#[no_mangle]
pub extern "C" fn smem_uninit() {
    guarded("smem_uninit", || {
        let stores = std::mem::take(&mut *CREATED.lock().unwrap_or_else(|p| p.into_inner()));
        drop(stores);
        Ok(())
    });
}

/// `SMEM_STORE_SKIP_RECOVER`: a store here always starts empty, so the flag changes nothing.
pub const SMEM_STORE_SKIP_RECOVER: u64 = 1;

/// The ABI version this library implements (1.3): major in the high 16 bits.
pub const ABI_VERSION: u32 = (1 << 16) | 3;

/// `major << 16 | minor` of the ABI this library implements.
#[no_mangle]
pub extern "C" fn smem_get_abi_version() -> u32 {
    ABI_VERSION
}

/// Starts a config store in this process at `storeUrl` (`tcp://ip:port`, port not 0);
/// `flags` 0 or `SMEM_STORE_SKIP_RECOVER`.
///
/// # Safety
/// `store_url` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn smem_create_config_store(store_url: *const c_char, flags: u64) -> i32 {
    guarded("smem_create_config_store", || {
        // SAFETY: the caller's contract on `store_url`.
        let url = unsafe { c_str(store_url, "storeUrl") }?;
        if flags & !SMEM_STORE_SKIP_RECOVER != 0 {
            return Err(Error::InvalidParam(format!(
                "flags {flags:#x}: only SMEM_STORE_SKIP_RECOVER (1) is defined"
            )));
        }
        let server = start_store(url)?;
        CREATED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(server);
        Ok(())
    })
}

/// A store server at `url` with the process-wide TLS setting; etcd:// and reg:// URLs are
/// refused, saying why.
pub(crate) fn start_store(url: &str) -> memfabric::Result<StoreServer> {
    if memfabric::store::url::is_etcd_url(url) {
        return Err(Error::InvalidParam(format!(
            "{url}: an etcd store is served by etcd itself; start etcd, not a store here"
        )));
    }
    if url.starts_with("reg://") {
        return Err(unsupported_backend());
    }
    let addr = parse_store_url(url, false)?;
    let tls = tls::current()?.map(|m| m.server.clone());
    StoreServer::start(addr, tls)
}

fn unsupported_backend() -> Error {
    Error::Unsupported(
        "reg:// stores (an external key-value backend) are not supported by this library; \
         use a tcp:// store (smem_create_config_store) or etcd://"
            .into(),
    )
}

/// Stops the store `smem_create_config_store` started at `storeUrl` (an unknown URL is
/// reported through the last error).
///
/// # Safety
/// `store_url` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn smem_destroy_config_store(store_url: *const c_char) {
    guarded("smem_destroy_config_store", || {
        // SAFETY: the caller's contract on `store_url`.
        let url = unsafe { c_str(store_url, "storeUrl") }?;
        let addr = parse_store_url(url, false)?;
        let server = {
            let mut created = CREATED.lock().unwrap_or_else(|p| p.into_inner());
            let at = created.iter().position(|s| s.local_addr() == addr);
            at.map(|i| created.remove(i))
        };
        match server {
            // Dropped outside the lock: it waits for its listeners to close.
            Some(server) => {
                drop(server);
                Ok(())
            }
            None => Err(Error::NotExist(format!(
                "no config store started by smem_create_config_store at {url}"
            ))),
        }
    });
}

/// Connections and keys of each store `smem_create_config_store` started, with its URL.
pub(crate) fn created_stores() -> Vec<(String, memfabric::store::server::ServerStats)> {
    CREATED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|s| (s.url(), s.stats()))
        .collect()
}

/// Registers an external key-value backend for reg:// URLs: not supported here.
#[no_mangle]
pub extern "C" fn smem_config_store_set_backend_op(backend_op: *const c_void) -> i32 {
    guarded("smem_config_store_set_backend_op", || {
        if backend_op.is_null() {
            return Err(Error::InvalidParam("backendOp is NULL".into()));
        }
        Err(unsupported_backend())
    })
}

/// `alarm(code, msg)` of `smem_set_extern_alarm`.
pub type AlarmFn = Option<unsafe extern "C" fn(code: u16, msg: *const c_char)>;
/// `resume(code)` of `smem_set_extern_alarm`.
pub type ResumeFn = Option<unsafe extern "C" fn(code: u16)>;

/// The alarm code for "the config store connection is lost".
pub const ALARM_STORE_CONNECTION: u16 = 1;

/// Calls `alarm(1, reason)` when a config store connection the library keeps (engines, Big
/// Memory and Share Memory ranks) is lost and `resume(1)` when it is back. NULL for both
/// removes them.
#[no_mangle]
pub extern "C" fn smem_set_extern_alarm(alarm: AlarmFn, resume: ResumeFn) -> i32 {
    guarded("smem_set_extern_alarm", || {
        if alarm.is_none() && resume.is_none() {
            memfabric::store::client::set_connection_listener(None);
            return Ok(());
        }
        memfabric::store::client::set_connection_listener(Some(Arc::new(
            move |url: &str, lost: Option<&str>| match lost {
                Some(reason) => {
                    if let Some(f) = alarm {
                        let text = format!("config store {url} unreachable: {reason}");
                        let text = CString::new(text.replace('\0', " ")).unwrap_or_default();
                        // SAFETY: the caller's alarm function; the message lives for the call.
                        unsafe { f(ALARM_STORE_CONNECTION, text.as_ptr()) }
                    }
                }
                None => {
                    if let Some(f) = resume {
                        // SAFETY: the caller's resume function.
                        unsafe { f(ALARM_STORE_CONNECTION) }
                    }
                }
            },
        )));
        Ok(())
    })
}

/// Sends every log message at or above the log level to `func` (NULL: back to stderr).
#[no_mangle]
pub extern "C" fn smem_set_extern_logger(func: ExternLogger) -> i32 {
    guarded("smem_set_extern_logger", || {
        let sink = func.map(|f| -> memfabric::log::Sink {
            Arc::new(move |level, msg| {
                let text = CString::new(msg.replace('\0', " ")).unwrap_or_default();
                // SAFETY: `f` is the caller's logger; the message lives for the call.
                unsafe { f(c_int::from(level), text.as_ptr()) }
            })
        });
        memfabric::log::set_sink(sink);
        Ok(())
    })
}

/// Sets the log level: 0 debug, 1 info, 2 warn (default), 3 error; others are refused.
#[no_mangle]
pub extern "C" fn smem_set_log_level(level: c_int) -> i32 {
    guarded("smem_set_log_level", || {
        memfabric::log::set_level(i64::from(level))
    })
}

/// Turns config store TLS on (`tls_info`: `ca=PATH;cert=PATH;key=PATH`) or off, for stores
/// and clients created afterwards.
///
/// # Safety
/// With `enable`, `tls_info` points to `tls_info_len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn smem_set_conf_store_tls(
    enable: bool,
    tls_info: *const c_char,
    tls_info_len: u32,
) -> i32 {
    guarded("smem_set_conf_store_tls", || {
        let info = if enable {
            // SAFETY: the caller's contract on `tls_info`.
            unsafe { c_str_len(tls_info, tls_info_len, "tls_info") }?
        } else {
            ""
        };
        tls::set_tls(enable, info)
    })
}

/// Sets the private key for config store TLS (PEM text or a path) and its pass phrase, which
/// `handler` decrypts when given (else it is used as it is).
///
/// # Safety
/// `tls_pk` points to `tls_pk_len` readable bytes, `tls_pk_pw` to `tls_pk_pw_len` (or is null
/// with length 0); `handler` is null or a function of the documented signature.
#[no_mangle]
pub unsafe extern "C" fn smem_set_config_store_tls_key(
    tls_pk: *const c_char,
    tls_pk_len: u32,
    tls_pk_pw: *const c_char,
    tls_pk_pw_len: u32,
    handler: DecryptHandler,
) -> i32 {
    guarded("smem_set_config_store_tls_key", || {
        // SAFETY: the caller's contract on `tls_pk`.
        let key = unsafe { c_str_len(tls_pk, tls_pk_len, "tls_pk") }?.to_string();
        let password = if tls_pk_pw_len == 0 {
            None
        } else {
            // SAFETY: the caller's contract on `tls_pk_pw`.
            let cipher = unsafe { c_str_len(tls_pk_pw, tls_pk_pw_len, "tls_pk_pw") }?;
            Some(match handler {
                None => cipher.to_string(),
                Some(h) => decrypt(h, cipher)?,
            })
        };
        tls::set_tls_key(tls::KeyOverride { key, password })
    })
}

fn decrypt(
    h: unsafe extern "C" fn(*const c_char, usize, *mut c_char, *mut usize) -> c_int,
    cipher: &str,
) -> memfabric::Result<String> {
    let mut plain = vec![0u8; PASSPHRASE_ROOM];
    let mut len = PASSPHRASE_ROOM - 1;
    // SAFETY: `cipher` is valid for its length, `plain` has PASSPHRASE_ROOM writable bytes of
    // which the handler is told it may use one less (room for a terminating NUL).
    let rc = unsafe {
        h(
            cipher.as_ptr().cast(),
            cipher.len(),
            plain.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let result = if rc != 0 {
        Err(Error::Tls(format!("the decrypt handler failed ({rc})")))
    } else if len >= PASSPHRASE_ROOM {
        Err(Error::Tls(format!(
            "the decrypt handler reported {len} bytes, more than the {} it was given",
            PASSPHRASE_ROOM - 1
        )))
    } else {
        String::from_utf8(plain[..len].to_vec())
            .map_err(|_| Error::Tls("the decrypted pass phrase is not UTF-8".into()))
    };
    plain.fill(0);
    result
}

thread_local! {
    /// The text behind the pointer the last-error calls return on this thread.
    static RETURNED: RefCell<CString> = RefCell::new(CString::default());
}

/// `msg()` behind a pointer that stays valid until this thread asks again; "" when the
/// thread's storage is gone (a call during thread teardown).
fn hand_out(msg: impl FnOnce() -> String) -> *const c_char {
    catch_unwind(AssertUnwindSafe(|| {
        let text = msg();
        RETURNED.with(|r| {
            let mut r = r.borrow_mut();
            *r = CString::new(text.replace('\0', " ")).unwrap_or_default();
            r.as_ptr()
        })
    }))
    .unwrap_or(c"".as_ptr())
}

/// This thread's last error message ("" when none). Valid until this thread's next call of
/// `smem_get_last_err_msg` or `smem_get_and_clear_last_err_msg`.
#[no_mangle]
pub extern "C" fn smem_get_last_err_msg() -> *const c_char {
    hand_out(memfabric::error::last_error)
}

/// The code of this thread's last error (0 when none; cleared with the message).
#[no_mangle]
pub extern "C" fn smem_get_last_err_code() -> i32 {
    memfabric::error::last_error_code()
}

/// As `smem_get_last_err_msg`, and clears it.
#[no_mangle]
pub extern "C" fn smem_get_and_clear_last_err_msg() -> *const c_char {
    hand_out(memfabric::error::take_last_error)
}
