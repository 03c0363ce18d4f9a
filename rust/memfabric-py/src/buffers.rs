//! "An address or a memory object": ints take the fast path; anything else goes through
//! `memfabric_hybrid.buffers.buffer_info` (tensors, arrays, buffers), whose owner object is
//! kept alive for as long as the memory is in use.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyInt;

/// A resolved address, with the size and owner when it came from a memory object.
pub struct Buf {
    pub addr: u64,
    pub len: Option<u64>,
    pub owner: Option<Py<PyAny>>,
}

static BUFFER_INFO: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Resolves `obj` (an int address or a memory object; `writable` when it is a destination).
pub fn resolve(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Buf> {
    if obj.is_instance_of::<PyInt>() {
        // Negative or too large ints raise OverflowError here, as for any int argument.
        return Ok(Buf {
            addr: obj.extract::<u64>()?,
            len: None,
            owner: None,
        });
    }
    let py = obj.py();
    let f = BUFFER_INFO.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py
            .import("memfabric_hybrid.buffers")?
            .getattr("buffer_info")?
            .unbind())
    })?;
    let (addr, len, owner): (u64, u64, Py<PyAny>) = f.bind(py).call1((obj, writable))?.extract()?;
    Ok(Buf {
        addr,
        len: Some(len),
        owner: Some(owner),
    })
}

/// The transfer length: `length` if given (at most the object's size), else the object's size.
pub fn length(buf: &Buf, length: Option<u64>) -> PyResult<u64> {
    match (buf.len, length) {
        (Some(n), Some(l)) if l > n => Err(PyValueError::new_err(format!(
            "length {l} exceeds the {n}-byte buffer"
        ))),
        (_, Some(l)) => Ok(l),
        (Some(n), None) => Ok(n),
        (None, None) => Err(PyTypeError::new_err(
            "length is required when the buffer is an int address",
        )),
    }
}
