//! Big Memory (`memfabric_hybrid.bm`): runtime, `BmConfig` and `BigMemory`.

use std::sync::{Arc, Mutex};

use memfabric::bm::{self as core, BmRuntime, CopyType};
use memfabric::Error;
use pyo3::prelude::*;

use crate::buffers;
use crate::error::{code, to_fabric_err};
use crate::handles::{Handle, Registry};
use crate::stream::StreamArg;

/// Every object created by this process's runtime, emptied by uninitialize.
static OBJECTS: Registry<core::BigMemory> = Registry::new();
static RUNTIME: Mutex<Option<Arc<BmRuntime>>> = Mutex::new(None);

fn runtime() -> Result<Arc<BmRuntime>, Error> {
    RUNTIME
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| Error::NotInit("bm is not initialized: call bm.initialize() first".into()))
}

fn fail(e: Error) -> i32 {
    code::<()>(Err(e))
}

/// Configuration of ``bm.initialize`` (timeouts in seconds, 1 .. 4294967295).
#[pyclass(module = "memfabric_hybrid.bm", name = "BmConfig", get_all, set_all)]
#[derive(Clone)]
pub struct BmConfig {
    /// Timeout of initialize, seconds (default 120).
    init_timeout: u32,
    /// Timeout of create, seconds (default 120).
    create_timeout: u32,
    /// Timeout of copies and control operations, seconds (default 120).
    operation_timeout: u32,
    /// This process may start the config store (rank 0, or with auto_ranking the first
    /// process on the store's host). Default True.
    start_store: bool,
    /// Only start the config store; this process takes no rank.
    start_store_only: bool,
    /// Accepted; membership is fixed at world_size in this version.
    dynamic_world_size: bool,
    /// SVM unified addressing: the GVA is the same in every rank (always true here).
    unified_address_space: bool,
    /// Let the store assign ranks in join order (default False, as the seed says).
    auto_ranking: bool,
    /// This rank when auto_ranking is False.
    rank_id: u32,
    /// Reserved.
    flags: u32,
    /// The interface named with set_nic.
    network_interface: String,
}

#[pymethods]
impl BmConfig {
    #[new]
    fn new() -> Self {
        let d = core::BmConfig::default();
        BmConfig {
            init_timeout: d.init_timeout,
            create_timeout: d.create_timeout,
            operation_timeout: d.operation_timeout,
            start_store: d.start_store,
            start_store_only: d.start_store_only,
            dynamic_world_size: d.dynamic_world_size,
            unified_address_space: d.unified_address_space,
            auto_ranking: d.auto_ranking,
            rank_id: d.rank_id,
            flags: d.flags,
            network_interface: String::new(),
        }
    }

    /// Name the network interface (accepted; the route to the store picks the interface).
    fn set_nic(&mut self, nic: String) {
        self.network_interface = nic;
    }
}

/// Initialize Big Memory: connect to (or start) the config store and join as one of
/// ``world_size`` ranks (at most 1024). Returns 0 on success, otherwise an error code.
#[pyfunction]
#[pyo3(signature = (store_url, world_size, device_id, config = None))]
fn bm_initialize(
    py: Python<'_>,
    store_url: &str,
    world_size: u32,
    device_id: i32,
    config: Option<PyRef<'_, BmConfig>>,
) -> i32 {
    if RUNTIME.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
        return fail(Error::RepeatInvoke(
            "bm is already initialized in this process".into(),
        ));
    }
    let c = config.map(|c| c.clone()).unwrap_or_else(BmConfig::new);
    let cfg = core::BmConfig {
        init_timeout: c.init_timeout,
        create_timeout: c.create_timeout,
        operation_timeout: c.operation_timeout,
        start_store: c.start_store,
        start_store_only: c.start_store_only,
        dynamic_world_size: c.dynamic_world_size,
        unified_address_space: c.unified_address_space,
        auto_ranking: c.auto_ranking,
        rank_id: c.rank_id,
        flags: c.flags,
    };
    let url = store_url.to_string();
    match py.detach(move || BmRuntime::initialize(&url, world_size, device_id, cfg)) {
        Ok(r) => {
            *RUNTIME.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(r));
            0
        }
        Err(e) => fail(e),
    }
}

/// Leave Big Memory (``flags`` reserved).
#[pyfunction]
#[pyo3(signature = (flags = 0))]
fn bm_uninitialize(py: Python<'_>, flags: i64) {
    let _ = flags;
    let r = RUNTIME.lock().unwrap_or_else(|p| p.into_inner()).take();
    let objects = OBJECTS.release_all();
    py.detach(move || drop((objects, r)));
}

/// This process's rank, or 4294967295 (u32 max) when Big Memory is not initialized.
#[pyfunction]
fn bm_rank_id() -> u32 {
    match runtime().map(|r| r.rank()) {
        Ok(Some(r)) => r,
        Ok(None) => u32::MAX,
        Err(e) => {
            fail(e);
            u32::MAX
        }
    }
}

/// Move to the config store now at ``store_url`` (a store restarted at a new address). Returns
/// 0 once this rank's records are published there, otherwise an error code (nothing changed).
#[pyfunction]
fn bm_update_store_url(py: Python<'_>, store_url: &str) -> i32 {
    let r = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let url = store_url.to_string();
    match py.detach(move || r.update_store_url(&url)) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// Create Big Memory object ``id`` (0..63): every rank contributes ``local_dram_size`` bytes
/// (``local_hbm_size`` needs a device). Collective: returns when all ranks have created it.
/// Raises MemFabricError (``.code``) on failure.
#[pyfunction]
#[pyo3(signature = (id, local_dram_size, local_hbm_size = 0, data_op_type = 1, flags = 0))]
fn bm_create(
    py: Python<'_>,
    id: u32,
    local_dram_size: u64,
    local_hbm_size: u64,
    data_op_type: u32,
    flags: u32,
) -> PyResult<BigMemory> {
    let _ = flags;
    if data_op_type == 0 || data_op_type > 255 {
        return Err(to_fabric_err(Error::InvalidParam(format!(
            "data_op_type {data_op_type} is not a BmDataOpType"
        ))));
    }
    let rt = runtime().map_err(to_fabric_err)?;
    let obj = py
        .detach(move || rt.create(id, local_dram_size, local_hbm_size))
        .map_err(to_fabric_err)?;
    Ok(BigMemory {
        inner: OBJECTS.adopt(obj),
        joined: Mutex::new(false),
    })
}

/// A Big Memory object: the GVA space over every rank's DRAM.
#[pyclass(module = "memfabric_hybrid.bm", name = "BigMemory", frozen)]
pub struct BigMemory {
    inner: Handle<core::BigMemory>,
    joined: Mutex<bool>,
}

impl BigMemory {
    fn get(&self) -> Result<Arc<core::BigMemory>, Error> {
        self.inner.get().ok_or_else(|| {
            Error::NotInit("this BigMemory was destroyed, or bm.uninitialize() was called".into())
        })
    }

    fn run(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&core::BigMemory) -> memfabric::Result<()> + Send,
    ) -> i32 {
        match self.get() {
            Ok(b) => code(py.detach(move || f(&b))),
            Err(e) => fail(e),
        }
    }
}

#[pymethods]
impl BigMemory {
    /// Join the object (peers are mapped at create; this marks the rank ready). Returns 0.
    #[pyo3(signature = (flags = 0))]
    fn join(&self, flags: i64) -> i32 {
        let _ = flags;
        match self.get() {
            Ok(_) => {
                *self.joined.lock().unwrap_or_else(|p| p.into_inner()) = true;
                0
            }
            Err(e) => fail(e),
        }
    }

    /// Leave the object. Returns 0.
    #[pyo3(signature = (flags = 0))]
    fn leave(&self, flags: i64) -> i32 {
        let _ = flags;
        *self.joined.lock().unwrap_or_else(|p| p.into_inner()) = false;
        0
    }

    /// Bytes this rank contributed of ``mem_type``: DEVICE (2, the default) or LOCAL_DEVICE (0)
    /// gives the HBM part, HOST (3) or LOCAL_HOST (1) the DRAM part. An object without an HBM
    /// part answers DEVICE with its DRAM part, so seed-style calls keep working.
    #[pyo3(signature = (mem_type = 2))]
    fn local_mem_size(&self, mem_type: i64) -> u64 {
        self.get()
            .map(|b| {
                let hbm = b.local_hbm_size();
                if is_device_type(mem_type) && hbm > 0 {
                    hbm
                } else {
                    b.local_mem_size()
                }
            })
            .unwrap_or(0)
    }

    /// The GVA of ``peer_rank``'s part of ``mem_type`` (DEVICE, the default: its HBM part when
    /// the object has one, else its DRAM part; HOST: its DRAM part). 0 and an error message
    /// for a bad rank.
    #[pyo3(signature = (peer_rank, mem_type = 2))]
    fn peer_rank_ptr(&self, peer_rank: u32, mem_type: i64) -> u64 {
        let ptr = self.get().and_then(|b| {
            if is_device_type(mem_type) {
                if let Some(p) = b.peer_rank_hbm_ptr(peer_rank)? {
                    return Ok(p);
                }
            }
            b.peer_rank_ptr(peer_rank)
        });
        match ptr {
            Ok(p) => p,
            Err(e) => {
                fail(e);
                0
            }
        }
    }

    /// The rank whose part holds ``gva`` (negative error code when none does).
    fn get_rank_id_by_gva(&self, gva: u64) -> i64 {
        match self.get().and_then(|b| b.rank_of_gva(gva)) {
            Ok(r) => r as i64,
            Err(e) => fail(e) as i64,
        }
    }

    /// The address of ``gva`` in this process: for DRAM parts on this host the GVA itself,
    /// for HBM parts on this host the device pointer (usable by kernels); 0 and an error
    /// message for parts on other hosts.
    #[pyo3(signature = (gva, mem_type = 1))]
    fn gva_to_va(&self, gva: u64, mem_type: i64) -> u64 {
        let _ = mem_type;
        match self.get().and_then(|b| b.gva_to_va(gva)) {
            Ok(v) => v,
            Err(e) => {
                fail(e);
                0
            }
        }
    }

    /// Register memory of this process for copies to ranks on other hosts. Returns 0 or a code.
    fn register(&self, py: Python<'_>, addr: u64, size: u64) -> i32 {
        self.run(py, move |b| b.register(addr, size))
    }

    /// Undo ``register``. Returns 0 or a code.
    fn unregister(&self, py: Python<'_>, addr: u64) -> i32 {
        self.run(py, move |b| b.unregister(addr))
    }

    /// Ranks that are members of the object now (with dynamic_world_size: as last seen, at
    /// most 100 ms ago).
    fn members(&self) -> PyResult<Vec<u32>> {
        self.get().map(|b| b.members()).map_err(to_fabric_err)
    }

    /// Call ``handler(rank, event)`` (event: BmGroupEvent JOIN_EVENT 0 / LEAVE_EVENT 1) when a
    /// rank joins or leaves an object created with ``dynamic_world_size``; None removes it.
    /// The handler runs on a library thread; an exception in it is printed, not raised.
    fn set_group_event_handler(&self, handler: Bound<'_, PyAny>) -> PyResult<()> {
        let b = self.get().map_err(to_fabric_err)?;
        let h: Option<memfabric::fabric::GroupEventHandler> = if handler.is_none() {
            None
        } else {
            if !handler.is_callable() {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "the group event handler must be callable (rank, event)",
                ));
            }
            let f: Py<PyAny> = handler.unbind();
            Some(Arc::new(move |rank, joined| {
                let _ = Python::try_attach(|py| {
                    if let Err(e) = f.call1(py, (rank, if joined { 0 } else { 1 })) {
                        e.print(py);
                    }
                });
            }))
        };
        b.set_group_event_handler(h).map_err(to_fabric_err)
    }

    /// A barrier over the object's ranks. Returns 0 or a code.
    fn wait(&self, py: Python<'_>) -> i32 {
        self.run(py, |b| b.wait())
    }

    /// Growing a contribution after create is not supported in this version.
    #[pyo3(signature = (mem_type = 3, size = 0))]
    fn extend_local_mem(&self, mem_type: i64, size: u64) -> i32 {
        let _ = mem_type;
        fail(Error::Unsupported(format!(
            "extend_local_mem({size}): contributions are fixed at create in this version"
        )))
    }

    /// Copy ``size`` bytes from ``src_ptr`` to ``dst_ptr`` (GVAs or addresses of this process,
    /// per ``type``: a BmCopyType; a local side may also be a tensor/array/buffer, kept alive
    /// until the copy is done). ``stream`` 0/None copies now; a ``memfabric_hybrid.Stream``
    /// queues the copy and returns at once (errors come back from ``stream.synchronize()``).
    /// Returns 0 or an error code (MF_OUT_OF_BOUNDS for a range outside a rank's part or
    /// crossing into the next rank; a bad local address is an error, never a crash).
    ///
    /// Example:
    ///     >>> s = mf.Stream()
    ///     >>> obj.copy_data(host_array, gva, host_array.nbytes, bm.BmCopyType.L2G, stream=s)
    ///     0
    ///     >>> s.synchronize()
    ///     0
    #[pyo3(signature = (src_ptr, dst_ptr, size, r#type, flags = 0, stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn copy_data(
        &self,
        py: Python<'_>,
        src_ptr: &Bound<'_, PyAny>,
        dst_ptr: &Bound<'_, PyAny>,
        size: u64,
        r#type: i64,
        flags: i64,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let _ = flags;
        let stream = StreamArg::from_py(stream)?;
        let ty = match CopyType::from_value(r#type) {
            Ok(t) => t,
            Err(e) => return Ok(fail(e)),
        };
        let src = buffers::resolve(src_ptr, false)?;
        let dst = buffers::resolve(dst_ptr, true)?;
        buffers::length(&src, Some(size))?;
        buffers::length(&dst, Some(size))?;
        let b = match self.get() {
            Ok(b) => b,
            Err(e) => return Ok(fail(e)),
        };
        let (s, d) = (src.addr, dst.addr);
        let owner = match (src.owner, dst.owner) {
            (None, None) => None,
            (a, b) => Some((a, b).into_pyobject(py)?.into_any().unbind()),
        };
        Ok(stream.dispatch(py, move || b.copy(s, d, size, ty), owner))
    }

    /// Copy many ranges in one call (lists of ``count`` entries; addresses or, on the local
    /// side, memory objects). ``stream`` as for ``copy_data``.
    #[pyo3(signature = (src_addrs, dst_addrs, sizes, count, r#type, flags = 0, stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn copy_data_batch(
        &self,
        py: Python<'_>,
        src_addrs: &Bound<'_, PyAny>,
        dst_addrs: &Bound<'_, PyAny>,
        sizes: Vec<u64>,
        count: usize,
        r#type: i64,
        flags: i64,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let _ = flags;
        let stream = StreamArg::from_py(stream)?;
        let src = buffers::resolve_list(src_addrs, false)?;
        let dst = buffers::resolve_list(dst_addrs, true)?;
        if count != src.addrs.len() || count != dst.addrs.len() || count != sizes.len() {
            return Ok(fail(Error::InvalidParam(format!(
                "count {count} differs from the lists given ({} sources, {} destinations, {} sizes)",
                src.addrs.len(),
                dst.addrs.len(),
                sizes.len()
            ))));
        }
        buffers::check_lengths(&src, &sizes)?;
        buffers::check_lengths(&dst, &sizes)?;
        let ty = match CopyType::from_value(r#type) {
            Ok(t) => t,
            Err(e) => return Ok(fail(e)),
        };
        let b = match self.get() {
            Ok(b) => b,
            Err(e) => return Ok(fail(e)),
        };
        let owner = match (src.owner, dst.owner) {
            (None, None) => None,
            (a, b) => Some((a, b).into_pyobject(py)?.into_any().unbind()),
        };
        let (sa, da) = (src.addrs, dst.addrs);
        Ok(stream.dispatch(py, move || b.copy_batch(&sa, &da, &sizes, ty), owner))
    }

    /// Release the object.
    fn destroy(&self, py: Python<'_>) {
        let b = self.inner.take();
        py.detach(move || drop(b));
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BmConfig>()?;
    m.add_class::<BigMemory>()?;
    m.add_function(wrap_pyfunction!(bm_initialize, m)?)?;
    m.add_function(wrap_pyfunction!(bm_uninitialize, m)?)?;
    m.add_function(wrap_pyfunction!(bm_rank_id, m)?)?;
    m.add_function(wrap_pyfunction!(bm_create, m)?)?;
    m.add_function(wrap_pyfunction!(bm_update_store_url, m)?)?;
    Ok(())
}

/// BmMemType DEVICE (2) and LOCAL_DEVICE (0) name the HBM part.
fn is_device_type(mem_type: i64) -> bool {
    mem_type == 0 || mem_type == 2
}
