//! `smem_config_store_api.h`: config store servers held by handle, their TLS files, their
//! event callbacks and a status report. A store here is one server, so it is its own leader.

use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;
use std::time::Duration;

use memfabric::store::tls;
use memfabric::store::StoreServer;
use memfabric::{Error, Result};

use crate::gate::{Gate, Gates};
use crate::handles::Table;
use crate::{c_str, guarded, guarded_value};

/// A server handle as C sees it.
pub type SmemConfigStore = *mut c_void;

/// `smem_tls_options_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmemTlsOptions {
    pub enable_tls: u8,
    pub tls_top_path: *const c_char,
    pub tls_cert: *const c_char,
    pub tls_crl_path: *const c_char,
    pub tls_ca_path: *const c_char,
    pub tls_ca_file: *const c_char,
    pub tls_crl_file: *const c_char,
    pub tls_private_key: *const c_char,
    pub tls_private_key_password: *const c_char,
}

/// `smem_config_store_leader_info_t`.
#[repr(C)]
#[derive(Debug)]
pub struct SmemLeaderInfo {
    pub is_leader: u8,
    pub bindable_leader_address: *const c_char,
}

/// `smem_config_store_broken_cb`.
pub type BrokenCallback =
    Option<unsafe extern "C" fn(context: *mut c_void, link_id: u32, rank_id: u32) -> i32>;
/// `smem_config_store_leader_change_cb`.
pub type LeaderCallback =
    Option<unsafe extern "C" fn(context: *mut c_void, leader: *const SmemLeaderInfo)>;

static SERVERS: Table<StoreServer> = Table::new("config store server");
/// Longest a destroy waits for a status report that still reads the server.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// An optional string: NULL and "" are absent.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn optional<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: not null, NUL-terminated by the caller's contract.
    let s = unsafe { c_str(p, name) }?;
    Ok((!s.is_empty()).then_some(s))
}

/// `name` under `top` unless it is absolute.
fn under(top: Option<&str>, name: &str) -> String {
    match top {
        Some(top) if !name.starts_with('/') => format!("{}/{name}", top.trim_end_matches('/')),
        _ => name.to_string(),
    }
}

/// Sets config store TLS from files, for stores and clients created afterwards.
///
/// # Safety
/// `options` is null or points to a `smem_tls_options_t` whose strings are null or
/// NUL-terminated; the two library paths are null or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn smem_config_store_set_tls(
    options: *const SmemTlsOptions,
    tls_library: *const c_char,
    decrypter_library: *const c_char,
) -> i32 {
    guarded("smem_config_store_set_tls", || {
        let o = crate::non_null(options, "tls")?;
        // SAFETY: the caller's contract on the library paths.
        let _built_in = unsafe { optional(tls_library, "tls_library") }?;
        // SAFETY: as above.
        if let Some(lib) = unsafe { optional(decrypter_library, "decrypter_library") }? {
            return Err(Error::Unsupported(format!(
                "decrypter_library {lib:?}: this library loads no decrypter libraries; give the \
                 pass phrase in tls_private_key_password, or a handler to \
                 smem_set_config_store_tls_key"
            )));
        }
        if o.enable_tls == 0 {
            return tls::set_tls(false, "");
        }
        // SAFETY (the reads below): the caller's contract on the options' strings.
        let top = unsafe { optional(o.tls_top_path, "tls_top_path") }?;
        for (p, name) in [
            (o.tls_crl_path, "tls_crl_path"),
            (o.tls_crl_file, "tls_crl_file"),
        ] {
            // SAFETY: as above.
            if let Some(v) = unsafe { optional(p, name) }? {
                return Err(Error::Unsupported(format!(
                    "{name} {v:?}: certificate revocation lists are not supported here; leave \
                     the CRL fields NULL"
                )));
            }
        }
        let required = |p: *const c_char, name: &str| -> Result<String> {
            // SAFETY: as above.
            match unsafe { optional(p, name) }? {
                Some(v) => Ok(under(top, v)),
                None => Err(Error::InvalidParam(format!(
                    "{name} is required with enable_tls"
                ))),
            }
        };
        let ca_file = required(o.tls_ca_file, "tls_ca_file")?;
        // SAFETY: as above.
        let ca = match unsafe { optional(o.tls_ca_path, "tls_ca_path") }? {
            Some(dir) if !ca_file.starts_with('/') => format!("{}/{ca_file}", under(top, dir)),
            _ => ca_file,
        };
        let cert = required(o.tls_cert, "tls_cert")?;
        let key = required(o.tls_private_key, "tls_private_key")?;
        let mut info = format!("ca={ca};cert={cert};key={key}");
        // SAFETY: as above.
        if let Some(pw) =
            unsafe { optional(o.tls_private_key_password, "tls_private_key_password") }?
        {
            if pw.contains(';') {
                return Err(Error::InvalidParam(
                    "tls_private_key_password contains ';', which this setting cannot carry; \
                     use smem_set_config_store_tls_key"
                        .into(),
                ));
            }
            info.push_str(&format!(";key_password={pw}"));
        }
        tls::set_tls(true, &info)
    })
}

/// Starts a config store server at `url`; NULL on error.
///
/// # Safety
/// `url` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn smem_config_store_create_server(url: *const c_char) -> SmemConfigStore {
    guarded_value(
        "smem_config_store_create_server",
        std::ptr::null_mut(),
        || {
            // SAFETY: the caller's contract on `url`.
            let url = unsafe { c_str(url, "url") }?;
            let server = crate::common::start_store(url)?;
            SERVERS.insert(server, || Ok(()))
        },
    )
}

/// Stops a server started by `smem_config_store_create_server`. `url`, when given, must be
/// the one it serves.
///
/// # Safety
/// `url` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn smem_config_store_destroy_server(
    store: SmemConfigStore,
    url: *const c_char,
) {
    guarded("smem_config_store_destroy_server", || {
        let server = SERVERS.get(store)?;
        // SAFETY: the caller's contract on `url`.
        if let Some(url) = unsafe { optional(url, "url") }? {
            let addr = memfabric::store::url::parse_store_url(url, false)?;
            if addr != server.local_addr() {
                return Err(Error::InvalidParam(format!(
                    "url {url} is not the address this server serves ({})",
                    server.url()
                )));
            }
        }
        // No connection-end callback once this returns, though sessions end after it.
        server.on_session_end(None);
        drop(server);
        BROKEN_GATES.replace(store, None);
        SERVERS.destroy(store, RELEASE_WAIT)
    });
}

/// Raw pointers made sendable for a callback's context: the caller owns what it points to
/// and promised it stays valid while the callback is set.
#[derive(Clone, Copy)]
struct Context(*mut c_void);
// SAFETY: the library only passes the pointer back to the caller's callback.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// The gate of each server's connection-end callback (see [`crate::gate`]).
static BROKEN_GATES: Gates = Gates::new();

/// Tells `callback(context, link_id, UINT32_MAX)` of each client connection of `store` that
/// ends; NULL removes it. Once this returns, a replaced callback is not running and runs no
/// more. Unknown handles are reported through the last error.
#[no_mangle]
pub extern "C" fn smem_config_store_set_server_broken_handler(
    store: SmemConfigStore,
    callback: BrokenCallback,
    context: *mut c_void,
) {
    guarded("smem_config_store_set_server_broken_handler", || {
        let server = SERVERS.get(store)?;
        let context = Context(context);
        let gate = Arc::new(Gate::new());
        let hook = callback.map(|cb| -> memfabric::store::server::SessionEndHook {
            let gate = gate.clone();
            Arc::new(move |session: u64| {
                let context = context;
                let link = u32::try_from(session).unwrap_or(u32::MAX);
                gate.run(|| {
                    // SAFETY: the caller's callback and its context, as registered.
                    let _ = unsafe { cb(context.0, link, u32::MAX) };
                });
            })
        });
        server.on_session_end(hook);
        drop(server);
        BROKEN_GATES.replace(store, callback.is_some().then_some(gate));
        Ok(())
    });
}

/// A one-server store leads itself: `callback` runs once before this returns, with
/// `is_leader` 1 and the server's address.
///
/// # Safety
/// `callback` is null or a function of the documented signature that accepts `context`.
#[no_mangle]
pub unsafe extern "C" fn smem_config_store_set_leader_handler(
    store: SmemConfigStore,
    callback: LeaderCallback,
    context: *mut c_void,
) -> i32 {
    guarded("smem_config_store_set_leader_handler", || {
        let server = SERVERS.get(store)?;
        let Some(cb) = callback else {
            return Ok(());
        };
        let address = CString::new(server.local_addr().to_string())
            .map_err(|_| Error::InvalidParam("server address contains NUL".into()))?;
        // Not held during the callback, which may destroy the server.
        drop(server);
        let info = SmemLeaderInfo {
            is_leader: 1,
            bindable_leader_address: address.as_ptr(),
        };
        // SAFETY: the caller's callback; `info` and its string live for the call.
        unsafe { cb(context, &info) };
        Ok(())
    })
}

/// The servers this process runs, as JSON.
fn cluster_status() -> String {
    let mut servers: Vec<String> = crate::common::created_stores()
        .into_iter()
        .map(|(url, stats)| server_json(&url, stats))
        .collect();
    servers.extend(
        SERVERS
            .snapshot()
            .iter()
            .map(|s| server_json(&s.url(), s.stats())),
    );
    format!(
        "{{\"mode\":\"single\",\"servers\":[{}]}}",
        servers.join(",")
    )
}

fn server_json(url: &str, stats: memfabric::store::server::ServerStats) -> String {
    format!(
        "{{\"url\":\"{url}\",\"leader\":true,\"connections\":{},\"keys\":{}}}",
        stats.connections, stats.keys
    )
}

/// Writes the JSON status of this process's store servers into `json` (NUL-terminated) and
/// its length into `*out_len`; `SMEM_BUFFER_TOO_SMALL` (with `*out_len` set) when `buf_len`
/// has no room for it and its NUL.
///
/// # Safety
/// `json` is null or points to `buf_len` writable bytes; `out_len` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn smem_config_store_get_cluster_status(
    json: *mut c_char,
    buf_len: u32,
    out_len: *mut u32,
) -> i32 {
    guarded("smem_config_store_get_cluster_status", || {
        if json.is_null() || out_len.is_null() {
            return Err(Error::InvalidParam("json or outLen is NULL".into()));
        }
        let text = cluster_status();
        let len =
            u32::try_from(text.len()).map_err(|_| Error::InvalidParam("status too long".into()))?;
        // SAFETY: `out_len` is not null and writable by the caller's contract.
        unsafe { out_len.write(len) };
        if text.len() >= buf_len as usize {
            return Err(Error::BufferTooSmall(format!(
                "the status needs {} bytes with its NUL; bufLen is {buf_len}",
                text.len() + 1
            )));
        }
        // SAFETY: `json` has `buf_len` writable bytes, more than the text and its NUL.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), json.cast::<u8>(), text.len());
            json.add(text.len()).write(0);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_files_go_under_the_top_path() {
        assert_eq!(under(Some("/etc/tls/"), "cert.pem"), "/etc/tls/cert.pem");
        assert_eq!(under(Some("/etc/tls"), "/abs/cert.pem"), "/abs/cert.pem");
        assert_eq!(under(None, "cert.pem"), "cert.pem");
    }

    #[test]
    fn a_status_string_is_json() {
        let text = cluster_status();
        assert!(text.starts_with("{\"mode\":\"single\""), "{text}");
    }
}
