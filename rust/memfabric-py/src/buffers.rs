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

/// A list of addresses or memory objects (the batch calls' `buffers`).
pub struct BufList {
    pub addrs: Vec<u64>,
    /// The sizes of the objects (None for ints), for checking lengths.
    pub sizes: Vec<Option<u64>>,
    /// The objects, kept alive while the memory is in use (None when all were ints).
    pub owner: Option<Py<PyAny>>,
}

/// Resolves a list whose elements are int addresses or memory objects.
pub fn resolve_list(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<BufList> {
    // Lists of ints (the seed's form, and thousands long in KV-cache moves) take one extraction.
    if let Ok(addrs) = obj.extract::<Vec<u64>>() {
        let n = addrs.len();
        return Ok(BufList {
            addrs,
            sizes: vec![None; n],
            owner: None,
        });
    }
    if obj.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyTypeError::new_err(
            "expected a list of addresses or memory objects, not str",
        ));
    }
    let mut addrs = Vec::new();
    let mut sizes = Vec::new();
    let mut owners = Vec::new();
    for item in obj.try_iter()? {
        let b = resolve(&item?, writable)?;
        addrs.push(b.addr);
        sizes.push(b.len);
        if let Some(o) = b.owner {
            owners.push(o);
        }
    }
    let owner = if owners.is_empty() {
        None
    } else {
        Some(
            pyo3::types::PyList::new(obj.py(), owners)?
                .into_any()
                .unbind(),
        )
    };
    Ok(BufList {
        addrs,
        sizes,
        owner,
    })
}

/// Checks each length against its object's size.
pub fn check_lengths(list: &BufList, lengths: &[u64]) -> PyResult<()> {
    for (i, (size, &len)) in list.sizes.iter().zip(lengths).enumerate() {
        if let Some(n) = size {
            if len > *n {
                return Err(PyValueError::new_err(format!(
                    "length {len} of entry {i} exceeds its {n}-byte buffer"
                )));
            }
        }
    }
    Ok(())
}
