//! `memfabric_hybrid._native`: the Python face of the memfabric core.
//!
//! One Rust file per Python concept; this file only registers them. Every method extracts its
//! arguments into owned Rust values, releases the GIL for the core call, and converts the
//! result once (see `error.rs`).

use pyo3::prelude::*;

mod bm;
mod buffers;
mod common;
mod device;
mod error;
mod handles;
mod offload;
mod shm;
mod store;
mod stream;
mod trans;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MemFabricError", m.py().get_type::<error::MemFabricError>())?;
    m.add("StoreError", m.py().get_type::<error::StoreError>())?;
    m.add(
        "StoreTimeoutError",
        m.py().get_type::<error::StoreTimeoutError>(),
    )?;
    common::register(m)?;
    device::register(m)?;
    store::register(m)?;
    stream::register(m)?;
    trans::register(m)?;
    shm::register(m)?;
    bm::register(m)?;
    offload::register(m)?;
    Ok(())
}
