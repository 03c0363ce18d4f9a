//! Share Memory (`memfabric_hybrid.shm`): runtime, `ShmConfig` and `ShareMemory`.

use std::sync::{Arc, Mutex};

use memfabric::shm::{self as core, ShmRuntime};
use memfabric::Error;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::error::{code, to_fabric_err};
use crate::handles::{Handle, Registry};

/// Every object created by this process's runtime, emptied by uninitialize.
static OBJECTS: Registry<core::ShareMemory> = Registry::new();
static RUNTIME: Mutex<Option<Arc<ShmRuntime>>> = Mutex::new(None);

fn runtime() -> Result<Arc<ShmRuntime>, Error> {
    RUNTIME
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| Error::NotInit("shm is not initialized: call shm.initialize() first".into()))
}

/// Configuration of ``shm.initialize``: timeouts in seconds (1 .. 4294967295), whether this
/// process may start the config store (when the store's address is free on this host).
#[pyclass(module = "memfabric_hybrid.shm", name = "ShmConfig", get_all, set_all)]
#[derive(Clone)]
pub struct ShmConfig {
    /// Timeout of initialize, seconds (default 120).
    init_timeout: u32,
    /// Timeout of create, seconds (default 120).
    create_timeout: u32,
    /// Timeout of barrier/all_gather and other control operations, seconds (default 120).
    operation_timeout: u32,
    /// Start the config store in this process when its address is free here (default True).
    start_store: bool,
    /// Reserved.
    flags: u32,
}

#[pymethods]
impl ShmConfig {
    #[new]
    fn new() -> Self {
        let d = core::ShmConfig::default();
        ShmConfig {
            init_timeout: d.init_timeout,
            create_timeout: d.create_timeout,
            operation_timeout: d.operation_timeout,
            start_store: d.start_store,
            flags: d.flags,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "ShmConfig(init_timeout={}, create_timeout={}, operation_timeout={}, start_store={}, flags={})",
            self.init_timeout, self.create_timeout, self.operation_timeout, self.start_store, self.flags
        )
    }
}

/// Initialize Share Memory for this process: connect to (or start) the config store at
/// ``store_url`` and join as ``rank_id`` of ``world_size`` (at most 1024) ranks.
///
/// Returns 0 on success, otherwise an error code (see ``get_last_err_msg()``).
#[pyfunction]
#[pyo3(signature = (store_url, world_size, rank_id, device_id, config = None))]
fn shm_initialize(
    py: Python<'_>,
    store_url: &str,
    world_size: u32,
    rank_id: u32,
    device_id: i32,
    config: Option<PyRef<'_, ShmConfig>>,
) -> i32 {
    if RUNTIME.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
        return code::<()>(Err(Error::RepeatInvoke(
            "shm is already initialized in this process".into(),
        )));
    }
    let c = config.map(|c| c.clone()).unwrap_or_else(ShmConfig::new);
    let cfg = core::ShmConfig {
        init_timeout: c.init_timeout,
        create_timeout: c.create_timeout,
        operation_timeout: c.operation_timeout,
        start_store: c.start_store,
        flags: c.flags,
    };
    let url = store_url.to_string();
    match py.detach(move || ShmRuntime::initialize(&url, world_size, rank_id, device_id, cfg)) {
        Ok(r) => {
            *RUNTIME.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(r));
            0
        }
        Err(e) => code::<()>(Err(e)),
    }
}

/// Leave Share Memory: objects still alive keep working until destroyed.
#[pyfunction]
#[pyo3(signature = (flags = 0))]
fn shm_uninitialize(py: Python<'_>, flags: i64) {
    let _ = flags;
    let r = RUNTIME.lock().unwrap_or_else(|p| p.into_inner()).take();
    let objects = OBJECTS.release_all();
    py.detach(move || drop((objects, r)));
}

/// Create Share Memory object ``id`` (0..63) over ``rank_size`` ranks, this one ``rank_id``,
/// each contributing ``local_mem_size`` bytes ([2 MiB, 4 GiB], a multiple of 2 MiB).
/// Raises MemFabricError (with ``code``) on failure.
#[pyfunction]
#[pyo3(signature = (id, rank_size, rank_id, local_mem_size, data_op_type = 1, flags = 0))]
fn shm_create(
    py: Python<'_>,
    id: u32,
    rank_size: u32,
    rank_id: u32,
    local_mem_size: u64,
    data_op_type: u32,
    flags: u32,
) -> PyResult<ShareMemory> {
    let _ = flags;
    if ![1, 2, 4].contains(&data_op_type) {
        return Err(to_fabric_err(Error::InvalidParam(format!(
            "data_op_type {data_op_type} is not a ShmDataOpType (1, 2, 4)"
        ))));
    }
    let rt = runtime().map_err(to_fabric_err)?;
    let obj = py
        .detach(move || rt.create(id, rank_size, rank_id, local_mem_size))
        .map_err(to_fabric_err)?;
    Ok(ShareMemory {
        inner: OBJECTS.adopt(obj),
    })
}

/// A Share Memory object: every rank's ``local_mem_size`` bytes at ``gva + rank * stride``,
/// mapped in every same-host process at the same address.
#[pyclass(module = "memfabric_hybrid.shm", name = "ShareMemory", frozen)]
pub struct ShareMemory {
    inner: Handle<core::ShareMemory>,
}

impl ShareMemory {
    fn get(&self) -> Result<Arc<core::ShareMemory>, Error> {
        self.inner.get().ok_or_else(|| {
            Error::NotInit(
                "this ShareMemory was destroyed, or shm.uninitialize() was called".into(),
            )
        })
    }
}

#[pymethods]
impl ShareMemory {
    /// The global virtual address of the object (rank 0's part).
    #[getter]
    fn gva(&self) -> PyResult<u64> {
        self.get().map(|s| s.gva()).map_err(to_fabric_err)
    }

    /// This process's rank in the object.
    #[getter]
    fn local_rank(&self) -> PyResult<u32> {
        self.get().map(|s| s.local_rank()).map_err(to_fabric_err)
    }

    /// Number of ranks of the object.
    #[getter]
    fn rank_size(&self) -> PyResult<u32> {
        self.get().map(|s| s.rank_size()).map_err(to_fabric_err)
    }

    /// Bytes each rank contributes; rank r's part starts at ``gva + r * stride``.
    #[getter]
    fn local_mem_size(&self) -> PyResult<u64> {
        self.get()
            .map(|s| s.local_mem_size())
            .map_err(to_fabric_err)
    }

    /// Distance between two ranks' parts (``local_mem_size`` rounded up to 2 MiB).
    #[getter]
    fn stride(&self) -> PyResult<u64> {
        self.get()
            .map(|s| s.memory().stride())
            .map_err(to_fabric_err)
    }

    /// Attach user context bytes to the object; every rank reads them with ``get_context()``.
    /// Returns 0 or an error code.
    fn set_context(&self, py: Python<'_>, context: Vec<u8>) -> i32 {
        match self.get() {
            Ok(s) => code(py.detach(move || s.set_context(&context))),
            Err(e) => code::<()>(Err(e)),
        }
    }

    /// The context bytes last set by any rank (b"" when none).
    fn get_context<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let s = self.get().map_err(to_fabric_err)?;
        let v = py.detach(move || s.context()).map_err(to_fabric_err)?;
        Ok(PyBytes::new(py, &v))
    }

    /// Wait until every rank of the object reaches the barrier. Returns 0 or an error code
    /// (MF_PEER_GONE at once when a rank dies, SMEM_TIMEOUT after operation_timeout).
    fn barrier(&self, py: Python<'_>) -> i32 {
        match self.get() {
            Ok(s) => code(py.detach(move || s.barrier())),
            Err(e) => code::<()>(Err(e)),
        }
    }

    /// Gather ``local_data`` (the same length on every rank) from all ranks: returns
    /// ``len(local_data) * rank_size`` bytes in rank order. Raises MemFabricError on failure.
    fn all_gather<'py>(
        &self,
        py: Python<'py>,
        local_data: Vec<u8>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let s = self.get().map_err(to_fabric_err)?;
        let v = py
            .detach(move || s.all_gather(&local_data))
            .map_err(to_fabric_err)?;
        Ok(PyBytes::new(py, &v))
    }

    /// Bit mask of ShmDataOpType paths that reach ``remote_rank`` (MTE 1: load/store through
    /// the GVA; SDMA 2: same-host copy; RDMA 4: network), or a negative error code.
    #[pyo3(signature = (remote_rank, reach_info = 0))]
    fn topology_can_reach(&self, remote_rank: u32, reach_info: i64) -> i64 {
        let _ = reach_info;
        match self.get().and_then(|s| s.topology_can_reach(remote_rank)) {
            Ok(bits) => bits as i64,
            Err(e) => code::<()>(Err(e)) as i64,
        }
    }

    /// Bit mask of the ShmDataOpType paths this object can use.
    fn query_support_data_operation(&self) -> i64 {
        match self.get() {
            Ok(s) => s.query_support_data_operation() as i64,
            Err(e) => code::<()>(Err(e)) as i64,
        }
    }

    /// Release the object (its mapping disappears; other ranks' waits fail). Returns 0.
    #[pyo3(signature = (flags = 0))]
    fn destroy(&self, py: Python<'_>, flags: i64) -> i32 {
        let _ = flags;
        let s = self.inner.take();
        py.detach(move || drop(s));
        0
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ShmConfig>()?;
    m.add_class::<ShareMemory>()?;
    m.add_function(wrap_pyfunction!(shm_initialize, m)?)?;
    m.add_function(wrap_pyfunction!(shm_uninitialize, m)?)?;
    m.add_function(wrap_pyfunction!(shm_create, m)?)?;
    Ok(())
}
