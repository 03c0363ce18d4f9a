//! The native half of `memfabric_hybrid.offload`: the pool and the four copy operators.
//!
//! `memfabric_hybrid/offload.py` holds the Python API (OffloadConfig, Scene, the tensor
//! wrappers) and calls these with plain values: caller memory as `(address, nbytes or None,
//! device type or None)`, where the device type is the framework's name ("cpu", "cuda",
//! "npu"...). Every call releases the GIL and returns upstream's convention: 0 or a negative
//! code (malloc and get_dva: an address, 0 on failure), the reason in `get_last_err_msg()`.

use memfabric::offload::{self as core, OffloadConfig, Residence, Scene, Span};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::{code, to_fabric_err};

/// Caller memory: (address, size in bytes when known, device type when not host).
type SpanArg = (u64, Option<u64>, Option<String>);

fn residence(device: Option<String>) -> Residence {
    match device {
        None => Residence::Host,
        Some(t) if t == "cpu" => Residence::Host,
        Some(t) => Residence::Device(t),
    }
}

fn span((addr, len, device): SpanArg) -> Span {
    Span {
        addr,
        len,
        residence: residence(device),
    }
}

/// Build the offload pool (see ``memfabric_hybrid.offload.initialize``). Returns 0 or an
/// error code.
#[pyfunction]
#[pyo3(signature = (device_id, reserve_size, alloc_size, world_size, rank_id, scene, store_url, flags, local_world_size))]
#[allow(clippy::too_many_arguments)]
fn offload_initialize(
    py: Python<'_>,
    device_id: u32,
    reserve_size: u64,
    alloc_size: u64,
    world_size: u32,
    rank_id: u32,
    scene: u32,
    store_url: String,
    flags: u32,
    local_world_size: u32,
) -> i32 {
    let scene = match Scene::from_value(scene) {
        Ok(s) => s,
        Err(e) => return code::<()>(Err(e)),
    };
    let cfg = OffloadConfig {
        device_id,
        reserve_size,
        alloc_size,
        world_size,
        rank_id,
        scene,
        store_url,
        flags,
        local_world_size,
    };
    code(py.detach(move || core::initialize(&cfg)))
}

/// Release the offload pool (nothing happens when it is not initialized).
#[pyfunction]
fn offload_uninitialize(py: Python<'_>) {
    py.detach(core::uninitialize)
}

/// ``size`` bytes of the pool; 0 on failure.
#[pyfunction]
#[pyo3(signature = (size, flags = 0))]
fn offload_malloc(py: Python<'_>, size: u64, flags: u64) -> u64 {
    match py.detach(move || core::malloc(size, flags)) {
        Ok(p) => p,
        Err(e) => {
            memfabric::error::record(&e);
            0
        }
    }
}

/// As ``offload_malloc``, but raises MemFabricError (with ``code``) instead of returning 0.
#[pyfunction]
fn offload_alloc(py: Python<'_>, size: u64) -> PyResult<u64> {
    py.detach(move || core::malloc(size, 0))
        .map_err(to_fabric_err)
}

/// Return memory from ``offload_malloc``; a pointer it did not return is reported through
/// ``get_last_err_msg()``.
#[pyfunction]
#[pyo3(signature = (ptr, flags = 0))]
fn offload_free(py: Python<'_>, ptr: u64, flags: u64) {
    if let Err(e) = py.detach(move || core::free(ptr, flags)) {
        memfabric::error::record(&e);
    }
}

/// The device's address of pool address ``ptr``; 0 on failure.
#[pyfunction]
fn offload_get_dva(py: Python<'_>, ptr: u64) -> u64 {
    match py.detach(move || core::get_dva(ptr)) {
        Ok(p) => p,
        Err(e) => {
            memfabric::error::record(&e);
            0
        }
    }
}

/// Register the pool's row grid for ``offload_entry_gather``. Returns 0 or an error code.
#[pyfunction]
fn offload_register_entry_table(py: Python<'_>, entry_bytes: u32, rows_per_slot: u32) -> i32 {
    code(py.detach(move || core::register_entry_table(entry_bytes, rows_per_slot)))
}

/// ``sparse_copy`` over descriptor arrays. Returns 0 or an error code.
#[pyfunction]
#[pyo3(signature = (src_ptrs, dst_ptrs, len_ptrs, size_ptr, device = None))]
fn offload_sparse_copy(
    py: Python<'_>,
    src_ptrs: SpanArg,
    dst_ptrs: SpanArg,
    len_ptrs: SpanArg,
    size_ptr: SpanArg,
    device: Option<String>,
) -> i32 {
    let (s, d, l, n, dev) = (
        span(src_ptrs),
        span(dst_ptrs),
        span(len_ptrs),
        span(size_ptr),
        residence(device),
    );
    code(py.detach(move || core::sparse_copy(&s, &d, &l, &n, &dev)))
}

/// ``group_pack_copy`` over descriptor arrays. Returns 0 or an error code.
#[pyfunction]
#[pyo3(signature = (src_ptrs, dst_ptrs, len_ptrs, num_local_expert_ptr, group_list, packed_group_list, device = None))]
#[allow(clippy::too_many_arguments)]
fn offload_group_pack_copy(
    py: Python<'_>,
    src_ptrs: SpanArg,
    dst_ptrs: SpanArg,
    len_ptrs: SpanArg,
    num_local_expert_ptr: SpanArg,
    group_list: SpanArg,
    packed_group_list: SpanArg,
    device: Option<String>,
) -> i32 {
    let (s, d, l, n) = (
        span(src_ptrs),
        span(dst_ptrs),
        span(len_ptrs),
        span(num_local_expert_ptr),
    );
    let (g, p, dev) = (span(group_list), span(packed_group_list), residence(device));
    code(py.detach(move || core::group_pack_copy(&s, &d, &l, &n, &g, &p, &dev)))
}

/// ``kv_exchange_copy`` of a meta array. Returns 0 or an error code.
#[pyfunction]
#[pyo3(signature = (meta_ptr, device = None))]
fn offload_kv_exchange_copy(py: Python<'_>, meta_ptr: SpanArg, device: Option<String>) -> i32 {
    let (m, dev) = (span(meta_ptr), residence(device));
    code(py.detach(move || core::kv_exchange_copy(&m, &dev)))
}

/// ``entry_gather`` over the registered row grid. Returns 0 or an error code.
#[pyfunction]
#[pyo3(signature = (dst, ids_ptr, count_ptr, device = None))]
fn offload_entry_gather(
    py: Python<'_>,
    dst: SpanArg,
    ids_ptr: SpanArg,
    count_ptr: SpanArg,
    device: Option<String>,
) -> i32 {
    let (d, i, c, dev) = (span(dst), span(ids_ptr), span(count_ptr), residence(device));
    code(py.detach(move || core::entry_gather(&d, &i, &c, &dev)))
}

/// The pool's layout as a dict; raises MemFabricError (``code`` SMEM_NOT_INIT) before
/// ``initialize``.
#[pyfunction]
fn offload_pool_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let info = py.detach(core::pool_info).map_err(to_fabric_err)?;
    let d = PyDict::new(py);
    d.set_item("scene", info.scene as u32)?;
    d.set_item("rank", info.rank)?;
    d.set_item("slots", info.slots)?;
    d.set_item("base", info.base)?;
    d.set_item("slot_stride", info.slot_stride)?;
    d.set_item("local_base", info.local_base)?;
    d.set_item("local_size", info.local_size)?;
    d.set_item("backed", info.backed)?;
    d.set_item("bytes_in_use", info.bytes_in_use)?;
    d.set_item("dva_unsupported", info.dva_unsupported)?;
    d.set_item("entry_table", info.entry_table)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(offload_initialize, m)?)?;
    m.add_function(wrap_pyfunction!(offload_uninitialize, m)?)?;
    m.add_function(wrap_pyfunction!(offload_malloc, m)?)?;
    m.add_function(wrap_pyfunction!(offload_alloc, m)?)?;
    m.add_function(wrap_pyfunction!(offload_free, m)?)?;
    m.add_function(wrap_pyfunction!(offload_get_dva, m)?)?;
    m.add_function(wrap_pyfunction!(offload_register_entry_table, m)?)?;
    m.add_function(wrap_pyfunction!(offload_sparse_copy, m)?)?;
    m.add_function(wrap_pyfunction!(offload_group_pack_copy, m)?)?;
    m.add_function(wrap_pyfunction!(offload_kv_exchange_copy, m)?)?;
    m.add_function(wrap_pyfunction!(offload_entry_gather, m)?)?;
    m.add_function(wrap_pyfunction!(offload_pool_info, m)?)?;
    Ok(())
}
