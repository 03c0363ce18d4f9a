//! Config store: `create_config_store` (seed), `start_config_store` and `StoreClient`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use memfabric::store::{url::parse_store_url, ClientOptions, StoreServer};
use memfabric::Error;
use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

use crate::error::{code, ToPyResult};

/// Stores started by `create_config_store`; they run until `uninitialize()` or process exit.
static CREATED: Mutex<Vec<StoreServer>> = Mutex::new(Vec::new());

pub fn stop_created_stores() {
    CREATED.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

fn start_server(url: &str, allow_port_zero: bool) -> memfabric::Result<StoreServer> {
    let addr = parse_store_url(url, allow_port_zero)?;
    let tls = memfabric::store::tls::current()?.map(|m| m.server.clone());
    StoreServer::start(addr, tls)
}

/// Create (start) a config store server in this process at ``store_url``.
///
/// Args:
///     store_url: ``"tcp://ip:port"`` or ``"tcp://[ipv6]:port"``.
///
/// Returns:
///     0 on success, otherwise an error code (-2000 for a malformed URL or port 0).
#[pyfunction]
fn create_config_store(py: Python<'_>, store_url: &str) -> i32 {
    let url = store_url.to_string();
    code(py.detach(move || {
        let s = start_server(&url, false)?;
        CREATED.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        Ok(())
    }))
}

/// A config store server owned by a Python object; stops on ``close()`` or garbage collection.
#[pyclass(module = "memfabric_hybrid", frozen)]
struct ConfigStoreServer {
    server: Mutex<Option<StoreServer>>,
    url: String,
}

#[pymethods]
impl ConfigStoreServer {
    /// The URL clients connect to (with the port actually bound).
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// The TCP port the server listens on.
    #[getter]
    fn port(&self) -> u16 {
        parse_store_url(&self.url, true)
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// Stop the server; connected clients see the connection close.
    fn close(&self, py: Python<'_>) {
        let s = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(s));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!("ConfigStoreServer(url={:?})", self.url)
    }
}

/// Start a config store server and return it (beyond the seed: port 0 picks a free port).
///
/// Args:
///     store_url: ``"tcp://ip:port"``; default ``"tcp://127.0.0.1:0"``.
///
/// Returns:
///     a ConfigStoreServer whose ``url`` names the bound port. Raises StoreError on failure.
#[pyfunction]
#[pyo3(signature = (store_url = "tcp://127.0.0.1:0"))]
fn start_config_store(py: Python<'_>, store_url: &str) -> PyResult<ConfigStoreServer> {
    let url = store_url.to_string();
    let s = py.detach(move || start_server(&url, true)).py_result()?;
    Ok(ConfigStoreServer {
        url: s.url(),
        server: Mutex::new(Some(s)),
    })
}

fn seconds(what: &str, v: f64) -> PyResult<Duration> {
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        return Err(PyValueError::new_err(format!(
            "{what} must be a positive number of seconds, got {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Accepts bytes, bytearray, str (UTF-8) or any object supporting ``bytes(obj)`` except ints.
fn value_bytes(v: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    use memfabric::store::proto::value_copy;
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(value_copy(b.as_bytes()));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(value_copy(s.to_cow()?.as_bytes()));
    }
    if let Ok(b) = v.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    if v.is_instance_of::<pyo3::types::PyInt>() || v.is_instance_of::<pyo3::types::PyFloat>() {
        return Err(PyTypeError::new_err(format!(
            "a store value must be bytes-like or str, not {}",
            v.get_type().name()?
        )));
    }
    let b = v.py().get_type::<PyBytes>().call1((v,)).map_err(|_| {
        PyTypeError::new_err(format!(
            "a store value must be bytes-like or str, not {}",
            v.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    Ok(b.cast::<PyBytes>()?.as_bytes().to_vec())
}

/// A client of a config store, named like torch's ``TCPStore`` where the operations match.
///
/// ``url`` is ``tcp://ip:port`` (an embedded store server) or
/// ``etcd://ip:port[,ip:port...][/prefix]`` (an etcd cluster, keys under ``prefix``; ephemeral
/// keys live on a lease of 3 s that the client keeps alive).
///
/// Every call is acknowledged (a ``set`` that returned is stored), has a deadline (the
/// ``timeout`` given here unless the call takes its own) and releases the GIL while it waits.
/// Failures raise ``StoreError`` (``.code`` is the library's error code); timeouts raise
/// ``StoreTimeoutError``.
///
/// Example:
///     >>> server = mf.start_config_store()
///     >>> with mf.StoreClient(server.url) as store:
///     ...     store.set("k", b"v")
///     ...     store.get("k")
///     b'v'
#[pyclass(module = "memfabric_hybrid", frozen)]
pub struct StoreClient {
    client: Mutex<Option<Arc<memfabric::store::StoreClient>>>,
    url: String,
    timeout: f64,
}

impl StoreClient {
    fn client(&self) -> PyResult<Arc<memfabric::store::StoreClient>> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                crate::error::to_pyerr(Error::NotInit(format!(
                    "StoreClient for {} is closed",
                    self.url
                )))
            })
    }

    /// Runs `f` on the core client with the GIL released.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&memfabric::store::StoreClient) -> memfabric::Result<T> + Send,
    ) -> PyResult<T> {
        let c = self.client()?;
        py.detach(move || f(&c)).py_result()
    }

    fn wait_for(&self, timeout: Option<f64>) -> PyResult<Duration> {
        seconds("timeout", timeout.unwrap_or(self.timeout))
    }
}

#[pymethods]
impl StoreClient {
    /// Connect to the store at ``url`` (``tcp://ip:port`` or ``etcd://ip:port[,ip:port...][/prefix]``),
    /// retrying until ``timeout`` seconds pass.
    #[new]
    #[pyo3(signature = (url, timeout = 30.0))]
    fn new(py: Python<'_>, url: &str, timeout: f64) -> PyResult<Self> {
        let opts = ClientOptions {
            timeout: seconds("timeout", timeout)?,
            ..Default::default()
        };
        let u = url.to_string();
        let c = py
            .detach(move || memfabric::store::StoreClient::connect(&u, opts))
            .py_result()?;
        Ok(StoreClient {
            url: c.url().to_string(),
            client: Mutex::new(Some(Arc::new(c))),
            timeout,
        })
    }

    /// The store's URL.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// How the store is reached now: ``"local socket"`` (a store on this host, through a Unix
    /// socket beside its TCP port), ``"shared memory"`` (that socket plus a shared-memory
    /// channel, which a client gets after its first few calls), ``"tcp"``, ``"tls"`` or
    /// ``"etcd"``; ``"none"`` once closed.
    ///
    /// Example:
    ///     >>> srv = mf.start_config_store("tcp://127.0.0.1:0")
    ///     >>> mf.StoreClient(srv.url).connection
    ///     'local socket'
    #[getter]
    fn connection(&self) -> &'static str {
        self.client().map(|c| c.connection()).unwrap_or("none")
    }

    /// Store ``value`` under ``key``. With ``ephemeral=True`` the key is deleted when this
    /// client's connection ends (liveness records).
    #[pyo3(signature = (key, value, ephemeral = false))]
    fn set(
        &self,
        py: Python<'_>,
        key: String,
        value: &Bound<'_, PyAny>,
        ephemeral: bool,
    ) -> PyResult<()> {
        let v = value_bytes(value)?;
        let c = self.client()?;
        py.detach(move || {
            if ephemeral {
                c.set_ephemeral(&key, &v)?;
                // So that the key comes back promptly after a store restart even if this
                // client makes no further call.
                memfabric::store::keep_alive(&c);
                Ok(())
            } else {
                let r = c.set(&key, &v);
                memfabric::store::proto::recycle(v);
                r
            }
        })
        .py_result()
    }

    /// The value of ``key``. With ``wait=True`` (as TCPStore) waits up to ``timeout`` seconds
    /// for it to be set, raising StoreTimeoutError; with ``wait=False`` raises KeyError if absent.
    #[pyo3(signature = (key, wait = true, timeout = None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: String,
        wait: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let t = self.wait_for(timeout)?;
        let k = key.clone();
        let v = if wait {
            Some(self.run(py, move |c| c.get_wait(&k, t))?)
        } else {
            self.run(py, move |c| c.get(&k))?
        };
        match v {
            Some(v) => {
                let bytes = PyBytes::new(py, &v);
                memfabric::store::proto::recycle(v);
                Ok(bytes)
            }
            None => Err(PyKeyError::new_err(key)),
        }
    }

    /// Atomically add ``amount`` to the integer counter at ``key`` (missing: 0); returns the new value.
    #[pyo3(signature = (key, amount = 1))]
    fn add(&self, py: Python<'_>, key: String, amount: i64) -> PyResult<i64> {
        self.run(py, move |c| c.add(&key, amount))
    }

    /// Set ``key`` to ``desired`` if its value equals ``expected`` (a missing key equals b"").
    /// Returns the value stored afterwards: equal to ``desired`` when the swap happened.
    fn compare_set<'py>(
        &self,
        py: Python<'py>,
        key: String,
        expected: &Bound<'py, PyAny>,
        desired: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (e, d) = (value_bytes(expected)?, value_bytes(desired)?);
        let v = self.run(py, move |c| c.compare_set(&key, &e, &d))?;
        Ok(PyBytes::new(py, &v))
    }

    /// Delete ``key``; returns whether it existed.
    fn delete(&self, py: Python<'_>, key: String) -> PyResult<bool> {
        self.run(py, move |c| c.delete(&key))
    }

    /// Alias of ``delete`` (TCPStore's name).
    fn delete_key(&self, py: Python<'_>, key: String) -> PyResult<bool> {
        self.delete(py, key)
    }

    /// Append ``value`` to ``key`` (creating it); returns the new length in bytes.
    fn append(&self, py: Python<'_>, key: String, value: &Bound<'_, PyAny>) -> PyResult<u64> {
        let v = value_bytes(value)?;
        self.run(py, move |c| c.append(&key, &v))
    }

    /// Whether ``key`` exists.
    fn exists(&self, py: Python<'_>, key: String) -> PyResult<bool> {
        Ok(self
            .run(py, move |c| c.exists(&[key]))?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Whether all of ``keys`` exist (TCPStore's ``check``).
    fn check(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<bool> {
        Ok(self.run(py, move |c| c.exists(&keys))?.iter().all(|b| *b))
    }

    /// The values of ``keys`` in order. With ``wait=True`` waits up to ``timeout`` for all of
    /// them; with ``wait=False`` raises StoreError (code -2007) if one is missing.
    #[pyo3(signature = (keys, wait = true, timeout = None))]
    fn multi_get<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
        wait: bool,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let t = if wait {
            Some(self.wait_for(timeout)?)
        } else {
            None
        };
        let vs = self.run(py, move |c| c.multi_get(&keys, t))?;
        Ok(vs.iter().map(|v| PyBytes::new(py, v)).collect())
    }

    /// Store ``values[i]`` under ``keys[i]`` in one round trip.
    #[pyo3(signature = (keys, values, ephemeral = false))]
    fn multi_set(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        values: Vec<Bound<'_, PyAny>>,
        ephemeral: bool,
    ) -> PyResult<()> {
        if keys.len() != values.len() {
            return Err(PyValueError::new_err(format!(
                "{} keys but {} values",
                keys.len(),
                values.len()
            )));
        }
        let entries = keys
            .into_iter()
            .zip(
                values
                    .iter()
                    .map(value_bytes)
                    .collect::<PyResult<Vec<_>>>()?,
            )
            .collect::<Vec<_>>();
        self.run(py, move |c| c.multi_set(&entries, ephemeral))
    }

    /// Keys that start with ``prefix``, sorted.
    #[pyo3(signature = (prefix = String::new()))]
    fn list(&self, py: Python<'_>, prefix: String) -> PyResult<Vec<String>> {
        self.run(py, move |c| c.list(&prefix))
    }

    /// Number of keys in the store (TCPStore's ``num_keys``).
    fn num_keys(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.run(py, |c| c.list(""))?.len())
    }

    /// Wait until all ``keys`` exist, up to ``timeout`` seconds (StoreTimeoutError after).
    #[pyo3(signature = (keys, timeout = None))]
    fn wait(&self, py: Python<'_>, keys: Vec<String>, timeout: Option<f64>) -> PyResult<()> {
        let t = self.wait_for(timeout)?;
        self.run(py, move |c| c.wait(&keys, t, None))
    }

    /// One round trip to the store; returns its duration in seconds.
    fn ping(&self, py: Python<'_>) -> PyResult<f64> {
        Ok(self.run(py, |c| c.ping())?.as_secs_f64())
    }

    /// Close the connection (ephemeral keys of this client vanish). Further calls raise.
    fn close(&self, py: Python<'_>) {
        let c = self.client.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(c));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!("StoreClient(url={:?}, timeout={})", self.url, self.timeout)
    }
}

/// Membership in a group of ranks coordinated through a config store (beyond the seed).
///
/// Joining waits until ``world_size`` ranks have joined. Ranks are assigned in join order when
/// ``rank`` is None (auto-ranking), else the given rank is claimed. Each member's liveness is
/// its store connection (on etcd: its lease): when a member dies, the others'
/// ``barrier``/``all_gather`` fail with StoreError (code -3001) at once (on etcd: within the
/// 3 s lease) instead of hanging. ``store_url`` as for ``StoreClient``.
///
/// Example:
///     >>> g = mf.StoreGroup(url, "job", world_size=4)
///     >>> g.barrier()
///     >>> pieces = g.all_gather(b"my part")   # list of bytes, in rank order
#[pyclass(module = "memfabric_hybrid", frozen)]
struct StoreGroup {
    group: Mutex<Option<Arc<memfabric::store::Group>>>,
    timeout: f64,
}

impl StoreGroup {
    fn group(&self) -> PyResult<Arc<memfabric::store::Group>> {
        self.group
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                crate::error::to_pyerr(Error::NotInit("this StoreGroup has left".into()))
            })
    }
}

#[pymethods]
impl StoreGroup {
    #[new]
    #[pyo3(signature = (store_url, name, world_size, rank = None, timeout = 120.0))]
    fn new(
        py: Python<'_>,
        store_url: &str,
        name: &str,
        world_size: u32,
        rank: Option<u32>,
        timeout: f64,
    ) -> PyResult<Self> {
        let t = seconds("timeout", timeout)?;
        let (url, name) = (store_url.to_string(), name.to_string());
        let g = py
            .detach(move || {
                let opts = ClientOptions {
                    timeout: t,
                    ..Default::default()
                };
                let c = Arc::new(memfabric::store::StoreClient::connect(&url, opts)?);
                memfabric::store::Group::join(c, &name, world_size, rank, t)
            })
            .py_result()?;
        Ok(StoreGroup {
            group: Mutex::new(Some(Arc::new(g))),
            timeout,
        })
    }

    /// This member's rank in [0, world_size).
    #[getter]
    fn rank(&self) -> PyResult<u32> {
        Ok(self.group()?.rank())
    }

    /// Number of ranks in the group.
    #[getter]
    fn world_size(&self) -> PyResult<u32> {
        Ok(self.group()?.world())
    }

    /// Wait until every rank reaches this barrier (``timeout`` seconds, default the group's).
    #[pyo3(signature = (timeout = None))]
    fn barrier(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let g = self.group()?;
        let t = seconds("timeout", timeout.unwrap_or(self.timeout))?;
        py.detach(move || g.barrier(t)).py_result()
    }

    /// Gather ``data`` from every rank; returns a list of bytes in rank order.
    #[pyo3(signature = (data, timeout = None))]
    fn all_gather<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let g = self.group()?;
        let d = value_bytes(data)?;
        let t = seconds("timeout", timeout.unwrap_or(self.timeout))?;
        let pieces = py.detach(move || g.all_gather(&d, t)).py_result()?;
        Ok(pieces.iter().map(|p| PyBytes::new(py, p)).collect())
    }

    /// Leave the group; the others' waits fail from now on. Idempotent.
    fn leave(&self, py: Python<'_>) -> PyResult<()> {
        let g = self.group.lock().unwrap_or_else(|p| p.into_inner()).take();
        match g {
            Some(g) => py.detach(move || g.leave()).py_result(),
            None => Ok(()),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<StoreGroup>()?;
    m.add_function(wrap_pyfunction!(create_config_store, m)?)?;
    m.add_function(wrap_pyfunction!(start_config_store, m)?)?;
    m.add_class::<ConfigStoreServer>()?;
    m.add_class::<StoreClient>()?;
    Ok(())
}
