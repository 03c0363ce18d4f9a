//! The common API of the seed: runtime, logging, TLS settings, error messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memfabric::store::tls;
use memfabric::Error;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::error::code;

static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// Initialize the runtime environment.
///
/// Args:
///     flags: reserved, pass 0.
///
/// Returns:
///     0 on success, otherwise an error code.
#[pyfunction]
#[pyo3(signature = (flags = 0))]
fn initialize(flags: i64) -> i32 {
    if flags != 0 {
        return code::<()>(Err(Error::InvalidParam(format!(
            "flags {flags} is reserved and must be 0"
        ))));
    }
    match memfabric::runtime::runtime() {
        Ok(_) => {
            INITIALIZED.store(true, Ordering::Release);
            0
        }
        Err(e) => code::<()>(Err(e)),
    }
}

/// Exit the runtime environment: stops the config stores this process created.
#[pyfunction]
fn uninitialize(py: Python<'_>) {
    INITIALIZED.store(false, Ordering::Release);
    py.detach(crate::store::stop_created_stores);
}

/// Set the log level: 0 debug, 1 info, 2 warn (default), 3 error.
///
/// Returns:
///     0 on success, -2000 for a level outside 0..3.
#[pyfunction]
fn set_log_level(level: i64) -> i32 {
    code(memfabric::log::set_level(level))
}

/// Send every log message at or above the log level to ``log_fn(level, message)``.
///
/// The function may be called from library threads. If it raises, the exception is printed
/// once and the message is dropped; the library carries on.
///
/// Args:
///     log_fn: a callable taking (int level, str message), or None to log to stderr again.
///
/// Returns:
///     0 on success.
#[pyfunction]
fn set_extern_logger(log_fn: Bound<'_, PyAny>) -> PyResult<i32> {
    if log_fn.is_none() {
        memfabric::log::set_sink(None);
        return Ok(0);
    }
    if !log_fn.is_callable() {
        return Err(PyTypeError::new_err(
            "set_extern_logger expects a callable (level: int, message: str)",
        ));
    }
    let f: Py<PyAny> = log_fn.unbind();
    let reported = AtomicBool::new(false);
    memfabric::log::set_sink(Some(Arc::new(move |level, msg| {
        // try_attach: messages logged while the interpreter shuts down are dropped.
        let _ = Python::try_attach(|py| {
            if let Err(e) = f.call1(py, (level as i32, msg)) {
                if !reported.swap(true, Ordering::Relaxed) {
                    eprintln!("[memfabric WARN] the extern logger raised; messages it fails on are dropped:");
                    e.print(py);
                }
            }
        });
    })));
    Ok(0)
}

/// Register the private key for config store TLS.
///
/// Args:
///     tls_pk: the private key, as a PEM file path or the PEM text (may be an encrypted PKCS#8 key).
///     tls_pk_pw: the encrypted pass phrase of the key ("" when the key is not encrypted).
///     py_decrypt_func: called as ``py_decrypt_func(tls_pk_pw)``; returns the pass phrase.
///
/// Returns:
///     0 on success, otherwise an error code (see ``get_last_err_msg()``).
#[pyfunction]
fn set_conf_store_tls_key(
    tls_pk: &str,
    tls_pk_pw: &str,
    py_decrypt_func: Bound<'_, PyAny>,
) -> PyResult<i32> {
    if !py_decrypt_func.is_callable() {
        return Err(PyTypeError::new_err(
            "py_decrypt_func must be callable (str) -> str",
        ));
    }
    let password = if tls_pk_pw.is_empty() {
        None
    } else {
        match py_decrypt_func
            .call1((tls_pk_pw,))
            .and_then(|v| v.extract::<String>())
        {
            Ok(p) => Some(p),
            Err(e) => {
                let msg = format!("the decrypt function failed: {e}");
                return Ok(code::<()>(Err(Error::Tls(msg))));
            }
        }
    };
    let key = tls::KeyOverride {
        key: tls_pk.to_string(),
        password,
    };
    Ok(code(
        py_decrypt_func.py().detach(move || tls::set_tls_key(key)),
    ))
}

/// Enable or disable TLS for config stores and clients created afterwards.
///
/// Args:
///     enable: True for mutual TLS, False for plaintext.
///     tls_info: ``"ca=PATH;cert=PATH;key=PATH"`` (``key`` may be omitted after
///         ``set_conf_store_tls_key``; ``key_password=...`` is accepted too).
///
/// Returns:
///     0 on success, non-zero on error.
#[pyfunction]
fn set_conf_store_tls(py: Python<'_>, enable: bool, tls_info: &str) -> i32 {
    let info = tls_info.to_string();
    code(py.detach(move || tls::set_tls(enable, &info)))
}

/// The last error message of this thread ("" when none).
#[pyfunction]
fn get_last_err_msg() -> String {
    memfabric::error::last_error()
}

/// The last error message of this thread; clears it.
#[pyfunction]
fn get_and_clear_last_err_msg() -> String {
    memfabric::error::take_last_error()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(initialize, m)?)?;
    m.add_function(wrap_pyfunction!(uninitialize, m)?)?;
    m.add_function(wrap_pyfunction!(set_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(set_extern_logger, m)?)?;
    m.add_function(wrap_pyfunction!(set_conf_store_tls_key, m)?)?;
    m.add_function(wrap_pyfunction!(set_conf_store_tls, m)?)?;
    m.add_function(wrap_pyfunction!(get_last_err_msg, m)?)?;
    m.add_function(wrap_pyfunction!(get_and_clear_last_err_msg, m)?)?;
    let codes = pyo3::types::PyDict::new(m.py());
    for (c, name) in memfabric::error::CODES {
        m.add(*name, *c)?;
        codes.set_item(*c, *name)?;
    }
    m.add("ERROR_NAMES", codes)?;
    Ok(())
}
