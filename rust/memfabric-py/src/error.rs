//! The one place where core errors become Python results.
//!
//! Seed-API functions return the core's numeric codes and keep the message for
//! `get_last_err_msg()`; the Python-only classes (StoreClient, ...) raise `StoreError` (with a
//! `code` attribute) or its subclass `StoreTimeoutError`. Wrong argument types never reach
//! here: PyO3's extraction raises `TypeError` first.

use memfabric::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

create_exception!(
    memfabric_hybrid,
    MemFabricError,
    PyRuntimeError,
    "A call that returns an object failed; `code` holds the library's numeric error code."
);
create_exception!(
    memfabric_hybrid,
    StoreError,
    MemFabricError,
    "A config store call failed; `code` holds the library's numeric error code."
);
create_exception!(
    memfabric_hybrid,
    StoreTimeoutError,
    StoreError,
    "A config store call did not finish within its timeout."
);

/// Converts a core result into the seed's int convention (0 or a negative code).
pub fn code<T>(r: memfabric::Result<T>) -> i32 {
    memfabric::error::to_code(r)
}

/// Converts a core error into a Python exception, recording it as the last error too.
pub fn to_pyerr(e: Error) -> PyErr {
    let code = memfabric::error::record(&e);
    let msg = e.to_string();
    Python::attach(|py| {
        let err = if matches!(e, Error::Timeout(_)) {
            StoreTimeoutError::new_err(msg)
        } else {
            StoreError::new_err(msg)
        };
        let _ = err.value(py).setattr("code", code);
        err
    })
}

/// Converts a core error into `MemFabricError` (for calls that return objects).
pub fn to_fabric_err(e: Error) -> PyErr {
    let code = memfabric::error::record(&e);
    let msg = e.to_string();
    Python::attach(|py| {
        let err = MemFabricError::new_err(msg);
        let _ = err.value(py).setattr("code", code);
        err
    })
}

/// `Result<T, Error>` -> `PyResult<T>` at the end of a binding method.
pub trait ToPyResult<T> {
    fn py_result(self) -> PyResult<T>;
}

impl<T> ToPyResult<T> for memfabric::Result<T> {
    fn py_result(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}
