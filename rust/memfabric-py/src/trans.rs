//! `TransferEngine` and `Stream`: the seed's TRANSFER interface plus the 1.3 extensions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use memfabric::blocks::{self, Segment};
use memfabric::trans::{self, Direction, EngineConfig, Role};
use memfabric::transport::Op;
use memfabric::Error;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::buffers;
use crate::error::code;
use crate::stream::StreamArg;

fn fail(e: Error) -> i32 {
    code::<()>(Err(e))
}

/// The Transfer Engine: point-to-point writes and reads between engines' registered memory.
///
/// Every method returns 0 on success or an error code (see ``get_last_err_msg()``). Addresses
/// are ints; the local buffer of a transfer must be inside memory registered with this engine,
/// the peer's inside one region the peer registered.
///
/// Example:
///     >>> engine = mf.TransferEngine()
///     >>> engine.initialize("tcp://10.0.0.1:8570", "10.0.0.2:0", "Prefill", 0)
///     0
///     >>> engine.register_memory(addr, nbytes)
///     0
///     >>> engine.transfer_sync_write("10.0.0.3:16000", addr, peer_addr, nbytes)
///     0
#[pyclass(module = "memfabric_hybrid", subclass, weakref)]
pub struct TransferEngine {
    engine: Mutex<Option<Arc<trans::TransferEngine>>>,
    /// Memory objects registered with the engine, kept alive until unregistered.
    owners: Mutex<std::collections::HashMap<u64, Py<PyAny>>>,
    reserved: Mutex<Option<std::net::TcpListener>>,
    transfer_timeout: Mutex<Duration>,
}

impl TransferEngine {
    fn engine(&self) -> Result<Arc<trans::TransferEngine>, Error> {
        self.engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::NotInit(
                    "the TransferEngine is not initialized: call initialize() first".into(),
                )
            })
    }

    fn run(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&trans::TransferEngine) -> memfabric::Result<()> + Send,
    ) -> i32 {
        match self.engine() {
            Ok(e) => code(py.detach(move || f(&e))),
            Err(e) => fail(e),
        }
    }

    /// Runs or queues a transfer; `owner` (memory objects) lives until the transfer is done.
    fn submit(
        &self,
        py: Python<'_>,
        dest: String,
        dir: Direction,
        ops: Vec<Op>,
        stream: Option<&Bound<'_, PyAny>>,
        owner: Option<Py<PyAny>>,
    ) -> PyResult<i32> {
        let stream = StreamArg::from_py(stream)?;
        let engine = match self.engine() {
            Ok(e) => e,
            Err(e) => return Ok(fail(e)),
        };
        if matches!(stream, StreamArg::Device(..)) {
            if let Err(e) = py.detach(|| engine.prepare_peer(&dest)) {
                return Ok(fail(e));
            }
        }
        Ok(stream.dispatch(py, move || engine.transfer_batch(&dest, dir, ops), owner))
    }

    /// One transfer: `buffer` an int address or a memory object (kept alive until done).
    #[allow(clippy::too_many_arguments)]
    fn single(
        &self,
        py: Python<'_>,
        dest: String,
        dir: Direction,
        buffer: &Bound<'_, PyAny>,
        peer: u64,
        length: Option<u64>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let b = buffers::resolve(buffer, dir == Direction::Read)?;
        let n = buffers::length(&b, length)?;
        if n == 0 {
            return Ok(fail(Error::InvalidParam("length 0".into())));
        }
        self.submit(
            py,
            dest,
            dir,
            vec![Op::new(b.addr, peer, n)],
            stream,
            b.owner,
        )
    }

    /// A batch: `buffers` a list of int addresses or memory objects.
    #[allow(clippy::too_many_arguments)]
    fn batch(
        &self,
        py: Python<'_>,
        dest: String,
        dir: Direction,
        buffers: &Bound<'_, PyAny>,
        peers: Vec<u64>,
        lengths: Vec<u64>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let list = buffers::resolve_list(buffers, dir == Direction::Read)?;
        buffers::check_lengths(&list, &lengths)?;
        match batch_ops(list.addrs, peers, lengths) {
            Ok(ops) => self.submit(py, dest, dir, ops, stream, list.owner),
            Err(e) => Ok(fail(e)),
        }
    }
}

/// An argument the seed and 1.3 name differently (``destflag`` / ``dest_session``...): exactly
/// one of the two names must be given.
fn one_of<T>(seed: (&str, Option<T>), upstream: (&str, Option<T>)) -> PyResult<T> {
    match (seed.1, upstream.1) {
        (Some(v), None) | (None, Some(v)) => Ok(v),
        (None, None) => Err(PyTypeError::new_err(format!(
            "missing required argument '{}' (or '{}')",
            seed.0, upstream.0
        ))),
        (Some(_), Some(_)) => Err(PyTypeError::new_err(format!(
            "'{}' and '{}' name the same argument: give one",
            seed.0, upstream.0
        ))),
    }
}

/// A required argument that follows one with two names (so it has a default in the signature).
fn given<T>(name: &str, v: Option<T>) -> PyResult<T> {
    v.ok_or_else(|| PyTypeError::new_err(format!("missing required argument '{name}'")))
}

fn batch_ops(buffers: Vec<u64>, peers: Vec<u64>, lengths: Vec<u64>) -> Result<Vec<Op>, Error> {
    if buffers.len() != peers.len() || buffers.len() != lengths.len() {
        return Err(Error::InvalidParam(format!(
            "batch lists differ in length: {} buffers, {} peer buffers, {} lengths",
            buffers.len(),
            peers.len(),
            lengths.len()
        )));
    }
    Ok(buffers
        .into_iter()
        .zip(peers)
        .zip(lengths)
        .map(|((l, r), n)| Op::new(l, r, n))
        .collect())
}

#[pymethods]
impl TransferEngine {
    #[new]
    fn new() -> Self {
        TransferEngine {
            engine: Mutex::new(None),
            owners: Mutex::new(std::collections::HashMap::new()),
            reserved: Mutex::new(None),
            transfer_timeout: Mutex::new(trans::DEFAULT_TRANSFER_TIMEOUT),
        }
    }

    /// Start the engine and publish it in the config store.
    ///
    /// Args:
    ///     store_url: the config store, ``tcp://ip:port`` or ``etcd://ip:port[,...][/prefix]``.
    ///     session_id: ``ip:port`` (``unique_id`` in the seed): the ip peers reach this engine
    ///         at; the port its data server listens on (``ip`` or ``ip:0``: picked here, see
    ///         ``get_rpc_port()``).
    ///     role: ``"Prefill"`` or ``"Decode"`` (any letter case).
    ///     device_id: the device of this engine (recorded; hosts have none).
    ///     data_op_type: a TransDataOpType; on a host every kind maps to the real host paths.
    ///     store_server_role: the engine of this role starts the config store at store_url
    ///         when nobody serves it yet.
    ///     nic: accepted for compatibility; the session ip selects the interface.
    ///
    /// Returns:
    ///     0 on success, otherwise an error code. When it returns, peers can use this engine.
    #[pyo3(signature = (store_url, session_id = None, role = None, device_id = 0, data_op_type = 1, store_server_role = "Decode", nic = "", *, unique_id = None))]
    #[allow(clippy::too_many_arguments)]
    fn initialize(
        &self,
        py: Python<'_>,
        store_url: &str,
        session_id: Option<&str>,
        role: Option<&str>,
        device_id: i64,
        data_op_type: i64,
        store_server_role: &str,
        nic: &str,
        unique_id: Option<&str>,
    ) -> i32 {
        let _ = nic;
        if self
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return fail(Error::RepeatInvoke(
                "this TransferEngine is already initialized".into(),
            ));
        }
        let Some(session) = session_id.or(unique_id) else {
            return fail(Error::InvalidParam(
                "session_id (unique_id) is required".into(),
            ));
        };
        let Some(role) = role else {
            return fail(Error::InvalidParam(
                "role is required: \"Prefill\" or \"Decode\"".into(),
            ));
        };
        if ![1, 2, 4, 8, 16, 32, 64, 128].contains(&data_op_type) {
            return fail(Error::InvalidParam(format!(
                "data_op_type {data_op_type} is not a TransDataOpType"
            )));
        }
        let role = match Role::parse(role) {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let server_role = if store_server_role.trim().is_empty() {
            None
        } else {
            Role::parse(store_server_role).ok()
        };
        let device_id = match i32::try_from(device_id) {
            Ok(d) if d >= 0 => d,
            _ => {
                return fail(Error::InvalidParam(format!(
                    "device_id {device_id} is out of range"
                )))
            }
        };
        let cfg = EngineConfig {
            store_url: store_url.to_string(),
            session_id: session.to_string(),
            role,
            device_id,
            store_server_role: server_role,
            transfer_timeout: *self
                .transfer_timeout
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            store_timeout: Duration::from_secs(120),
            reserved_listener: self
                .reserved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        };
        match py.detach(move || trans::TransferEngine::start(cfg)) {
            Ok(e) => {
                *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(e));
                0
            }
            Err(e) => fail(e),
        }
    }

    /// Move to the config store now at ``store_url`` (it came back at another address): this
    /// engine's records and region table are published there, and peers are looked up there
    /// from now on; peers already known stay reachable. Every engine of the job calls it.
    /// Returns 0, or an error code with nothing moved (SMEM_NOT_CONNECTED when no store
    /// answers there, SMEM_INVALID_PARAM for a malformed URL).
    fn update_store_url(&self, py: Python<'_>, store_url: String) -> i32 {
        self.run(py, move |e| e.update_store_url(&store_url))
    }

    /// The engine's data port. Before ``initialize`` it reserves a free port in
    /// [15000, 25000] for the caller to put in its session id (that port is then used);
    /// after, the port actually listened on. 0 on failure.
    fn get_rpc_port(&self) -> u16 {
        if let Ok(e) = self.engine() {
            return e.rpc_port();
        }
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = r.as_ref() {
            return l.local_addr().map(|a| a.port()).unwrap_or(0);
        }
        match trans::reserve_rpc_port() {
            Ok(l) => {
                let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
                *r = Some(l);
                port
            }
            Err(e) => {
                fail(e);
                0
            }
        }
    }

    /// This engine's session id (``ip:port`` with the real port); "" before initialize.
    #[getter]
    fn session_id(&self) -> String {
        self.engine()
            .map(|e| e.session_id().to_string())
            .unwrap_or_default()
    }

    /// Seconds each transfer call may take before it fails with SMEM_TIMEOUT (default 30).
    /// Set it before ``initialize``.
    #[getter]
    fn get_transfer_timeout(&self) -> f64 {
        self.transfer_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_secs_f64()
    }

    #[setter]
    fn set_transfer_timeout(&self, seconds: f64) -> PyResult<()> {
        if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e9) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "transfer_timeout must be a positive number of seconds",
            ));
        }
        *self
            .transfer_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Duration::from_secs_f64(seconds);
        Ok(())
    }

    /// The data path to ``dest_session``: "local", "cma" or "tcp" (raises on failure).
    fn transport_for(&self, py: Python<'_>, dest_session: String) -> PyResult<String> {
        let e = self.engine().map_err(crate::error::to_pyerr)?;
        py.detach(move || e.transport_for(&dest_session))
            .map(str::to_string)
            .map_err(crate::error::to_pyerr)
    }

    /// Register memory for peers to write and read: ``buffer_addr`` is an int address (then
    /// ``capacity`` is required) or a tensor/array/writable buffer (``capacity`` defaults to its
    /// size), which is kept alive until ``unregister_memory``.
    #[pyo3(signature = (buffer_addr, capacity = None))]
    fn register_memory(
        &self,
        py: Python<'_>,
        buffer_addr: &Bound<'_, PyAny>,
        capacity: Option<u64>,
    ) -> PyResult<i32> {
        let buf = buffers::resolve(buffer_addr, true)?;
        let len = buffers::length(&buf, capacity)?;
        let addr = buf.addr;
        let rc = self.run(py, move |e| e.register(addr, len));
        if rc == 0 {
            if let Some(owner) = buf.owner {
                self.owners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(addr, owner);
            }
        }
        Ok(rc)
    }

    /// Unregister the region starting at ``buffer_addr`` (an int or the registered object).
    /// When it returns 0, peers see the region gone and no copy of theirs reaches it any more
    /// (those in flight have finished): the memory may be freed or reused at once, and the
    /// object is no longer kept alive. ``SMEM_TIMEOUT`` when a same-host peer's copy was still
    /// running at ``transfer_timeout``: the region is unregistered (no new copy reaches it),
    /// but that copy may still land, so the object stays alive; call this again to wait for
    /// the copy once more (0 when it has ended).
    fn unregister_memory(&self, py: Python<'_>, buffer_addr: &Bound<'_, PyAny>) -> PyResult<i32> {
        let addr = buffers::resolve(buffer_addr, false)?.addr;
        let rc = self.run(py, move |e| e.unregister(addr));
        if rc == 0 {
            let owner = self
                .owners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&addr);
            drop(owner);
        }
        Ok(rc)
    }

    /// Register several regions at once (all or nothing); elements as for ``register_memory``.
    fn batch_register_memory(
        &self,
        py: Python<'_>,
        buffer_addrs: Vec<Bound<'_, PyAny>>,
        capacities: Vec<u64>,
    ) -> PyResult<i32> {
        if buffer_addrs.len() != capacities.len() {
            return Ok(fail(Error::InvalidParam(format!(
                "{} addresses but {} capacities",
                buffer_addrs.len(),
                capacities.len()
            ))));
        }
        let mut list = Vec::with_capacity(buffer_addrs.len());
        let mut owners = Vec::new();
        for (obj, cap) in buffer_addrs.iter().zip(capacities) {
            let b = buffers::resolve(obj, true)?;
            list.push((b.addr, buffers::length(&b, Some(cap))?));
            if let Some(o) = b.owner {
                owners.push((b.addr, o));
            }
        }
        let rc = self.run(py, move |e| e.register_batch(&list));
        if rc == 0 {
            self.owners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(owners);
        }
        Ok(rc)
    }

    /// Write ``length`` bytes from local ``buffer`` (an int address, or a tensor/array/buffer
    /// inside registered memory; ``length`` then defaults to its size) to
    /// ``peer_buffer_address`` in ``destflag``.
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffer`` are accepted too.
    #[pyo3(signature = (destflag = None, buffer = None, peer_buffer_address = None, length = None, flags = 0, *, dest_session = None, peer_buffer = None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_sync_write(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffer: Option<&Bound<'_, PyAny>>,
        peer_buffer_address: Option<u64>,
        length: Option<u64>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffer: Option<u64>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peer = one_of(
            ("peer_buffer_address", peer_buffer_address),
            ("peer_buffer", peer_buffer),
        )?;
        self.single(
            py,
            dest,
            Direction::Write,
            given("buffer", buffer)?,
            peer,
            length,
            None,
        )
    }

    /// Read ``length`` bytes from ``peer_buffer_address`` in ``destflag`` into local ``buffer``
    /// (an int address or a writable tensor/array/buffer inside registered memory).
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffer`` are accepted too.
    #[pyo3(signature = (destflag = None, buffer = None, peer_buffer_address = None, length = None, flags = 0, *, dest_session = None, peer_buffer = None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_sync_read(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffer: Option<&Bound<'_, PyAny>>,
        peer_buffer_address: Option<u64>,
        length: Option<u64>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffer: Option<u64>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peer = one_of(
            ("peer_buffer_address", peer_buffer_address),
            ("peer_buffer", peer_buffer),
        )?;
        self.single(
            py,
            dest,
            Direction::Read,
            given("buffer", buffer)?,
            peer,
            length,
            None,
        )
    }

    /// Write many blocks in one call (lists of equal length; adjacent blocks are coalesced).
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffers`` are accepted too.
    #[pyo3(signature = (destflag = None, buffers = None, peer_buffer_addresses = None, lengths = None, flags = 0, *, dest_session = None, peer_buffers = None))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_sync_write(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffers: Option<&Bound<'_, PyAny>>,
        peer_buffer_addresses: Option<Vec<u64>>,
        lengths: Option<Vec<u64>>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffers: Option<Vec<u64>>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peers = one_of(
            ("peer_buffer_addresses", peer_buffer_addresses),
            ("peer_buffers", peer_buffers),
        )?;
        let (buffers, lengths) = (given("buffers", buffers)?, given("lengths", lengths)?);
        self.batch(py, dest, Direction::Write, buffers, peers, lengths, None)
    }

    /// Write float16/bfloat16 blocks as int8 with per-unit scales and offsets (1.3). The
    /// quantizing copy runs as an Ascend device kernel, which this library does not have, so
    /// it returns ``MF_UNSUPPORTED`` (-3006) with the reason in ``get_last_err_msg()``, once
    /// the lists are checked (equal lengths). Quantize first, then ``batch_transfer_sync_write``.
    #[pyo3(signature = (dest_session, buffers, peer_buffers, lengths, scale_buffers, offset_buffers, unit_num, input_type = 0, stream = 0, flags = 0))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_write_with_quant(
        &self,
        dest_session: String,
        buffers: Vec<u64>,
        peer_buffers: Vec<u64>,
        lengths: Vec<u64>,
        scale_buffers: Vec<u64>,
        offset_buffers: Vec<u64>,
        unit_num: u32,
        input_type: u32,
        stream: u64,
        flags: i64,
    ) -> i32 {
        let _ = (dest_session, unit_num, input_type, stream, flags);
        let n = buffers.len();
        // Scales and offsets may be left empty; the other lists pair with `buffers`.
        let lists = [
            ("peer_buffers", peer_buffers.len(), false),
            ("lengths", lengths.len(), false),
            ("scale_buffers", scale_buffers.len(), true),
            ("offset_buffers", offset_buffers.len(), true),
        ];
        let wrong = lists
            .iter()
            .find(|(_, len, optional)| *len != n && !(*optional && *len == 0));
        if let Some((name, len, _)) = wrong {
            return fail(Error::InvalidParam(format!(
                "{name} has {len} entries, buffers {n}"
            )));
        }
        fail(Error::Unsupported(
            "quantizing writes (float16/bfloat16 to int8) run as an Ascend device kernel, which \
             this library does not have; quantize first, then batch_transfer_sync_write"
                .into(),
        ))
    }

    /// Read many blocks in one call (lists of equal length).
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffers`` are accepted too.
    #[pyo3(signature = (destflag = None, buffers = None, peer_buffer_addresses = None, lengths = None, flags = 0, *, dest_session = None, peer_buffers = None))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_sync_read(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffers: Option<&Bound<'_, PyAny>>,
        peer_buffer_addresses: Option<Vec<u64>>,
        lengths: Option<Vec<u64>>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffers: Option<Vec<u64>>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peers = one_of(
            ("peer_buffer_addresses", peer_buffer_addresses),
            ("peer_buffers", peer_buffers),
        )?;
        let (buffers, lengths) = (given("buffers", buffers)?, given("lengths", lengths)?);
        self.batch(py, dest, Direction::Read, buffers, peers, lengths, None)
    }

    /// Queue a write on ``stream`` (None/0: run now; a ``Stream``: queued, errors reported by
    /// its ``synchronize()``; a device stream handle: needs a device backend). A memory object
    /// as ``buffer`` is kept alive until the transfer has run.
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffer`` are accepted too.
    #[pyo3(signature = (destflag = None, buffer = None, peer_buffer_address = None, length = None, stream = None, flags = 0, *, dest_session = None, peer_buffer = None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_async_write_submit(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffer: Option<&Bound<'_, PyAny>>,
        peer_buffer_address: Option<u64>,
        length: Option<u64>,
        stream: Option<&Bound<'_, PyAny>>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffer: Option<u64>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peer = one_of(
            ("peer_buffer_address", peer_buffer_address),
            ("peer_buffer", peer_buffer),
        )?;
        self.single(
            py,
            dest,
            Direction::Write,
            given("buffer", buffer)?,
            peer,
            length,
            stream,
        )
    }

    /// Queue a read on ``stream`` (see ``transfer_async_write_submit``).
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffer`` are accepted too.
    #[pyo3(signature = (destflag = None, buffer = None, peer_buffer_address = None, length = None, stream = None, flags = 0, *, dest_session = None, peer_buffer = None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_async_read_submit(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffer: Option<&Bound<'_, PyAny>>,
        peer_buffer_address: Option<u64>,
        length: Option<u64>,
        stream: Option<&Bound<'_, PyAny>>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffer: Option<u64>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peer = one_of(
            ("peer_buffer_address", peer_buffer_address),
            ("peer_buffer", peer_buffer),
        )?;
        self.single(
            py,
            dest,
            Direction::Read,
            given("buffer", buffer)?,
            peer,
            length,
            stream,
        )
    }

    /// Queue a batch of writes on ``stream``.
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffers`` are accepted too.
    #[pyo3(signature = (destflag = None, buffers = None, peer_buffer_addresses = None, lengths = None, stream = None, flags = 0, *, dest_session = None, peer_buffers = None))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_async_write_submit(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffers: Option<&Bound<'_, PyAny>>,
        peer_buffer_addresses: Option<Vec<u64>>,
        lengths: Option<Vec<u64>>,
        stream: Option<&Bound<'_, PyAny>>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffers: Option<Vec<u64>>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peers = one_of(
            ("peer_buffer_addresses", peer_buffer_addresses),
            ("peer_buffers", peer_buffers),
        )?;
        let (buffers, lengths) = (given("buffers", buffers)?, given("lengths", lengths)?);
        self.batch(py, dest, Direction::Write, buffers, peers, lengths, stream)
    }

    /// Queue a batch of reads on ``stream``.
    ///
    /// 1.3's keyword names ``dest_session`` and ``peer_buffers`` are accepted too.
    #[pyo3(signature = (destflag = None, buffers = None, peer_buffer_addresses = None, lengths = None, stream = None, flags = 0, *, dest_session = None, peer_buffers = None))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_async_read_submit(
        &self,
        py: Python<'_>,
        destflag: Option<String>,
        buffers: Option<&Bound<'_, PyAny>>,
        peer_buffer_addresses: Option<Vec<u64>>,
        lengths: Option<Vec<u64>>,
        stream: Option<&Bound<'_, PyAny>>,
        flags: i64,
        dest_session: Option<String>,
        peer_buffers: Option<Vec<u64>>,
    ) -> PyResult<i32> {
        let _ = flags;
        let dest = one_of(("destflag", destflag), ("dest_session", dest_session))?;
        let peers = one_of(
            ("peer_buffer_addresses", peer_buffer_addresses),
            ("peer_buffers", peer_buffers),
        )?;
        let (buffers, lengths) = (given("buffers", buffers)?, given("lengths", lengths)?);
        self.batch(py, dest, Direction::Read, buffers, peers, lengths, stream)
    }

    /// Move paged KV-cache blocks: for every segment, block ``src_block_ids[i]`` of
    /// ``local_segments`` goes to block ``dst_block_ids[i]`` of the matching
    /// ``peer_segments`` (``opcode`` WRITE, the default) or comes from it (READ).
    ///
    /// A segment is ``(address, num_blocks, block_stride, block_bytes)``: one layer's (or one
    /// K/V plane's) array of blocks. Blocks are sorted and runs of adjacent blocks on both sides
    /// become one descriptor, so a request's blocks move in one batched transfer. Ids out of
    /// range give MF_OUT_OF_BOUNDS, a destination id given twice or mismatched layouts
    /// SMEM_INVALID_PARAM. ``stream`` as for ``transfer_async_write_submit``.
    /// ``memfabric_hybrid.torch_ext.transfer_blocks`` builds the segments from tensors.
    ///
    /// Example:
    ///     >>> engine.transfer_blocks(peer, [(addr, 64, 8192, 8192)],
    ///     ...                        [(peer_addr, 64, 8192, 8192)], [0, 1, 2], [5, 6, 7])
    ///     0
    #[pyo3(signature = (dest_session, local_segments, peer_segments, src_block_ids, dst_block_ids, opcode = 1, stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_blocks(
        &self,
        py: Python<'_>,
        dest_session: String,
        local_segments: Vec<(u64, u64, u64, u64)>,
        peer_segments: Vec<(u64, u64, u64, u64)>,
        src_block_ids: Vec<u64>,
        dst_block_ids: Vec<u64>,
        opcode: i64,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let dir = match opcode {
            0 => Direction::Read,
            1 => Direction::Write,
            other => {
                return Ok(fail(Error::InvalidParam(format!(
                    "opcode {other} is neither TransferOpcode.READ (0) nor WRITE (1)"
                ))))
            }
        };
        let seg = |v: Vec<(u64, u64, u64, u64)>| -> Vec<Segment> {
            v.into_iter()
                .map(|(addr, num_blocks, block_stride, block_bytes)| Segment {
                    addr,
                    num_blocks,
                    block_stride,
                    block_bytes,
                })
                .collect()
        };
        let (local, remote) = (seg(local_segments), seg(peer_segments));
        match blocks::block_ops(&local, &remote, &src_block_ids, &dst_block_ids) {
            Ok(ops) if ops.is_empty() => Ok(0),
            Ok(ops) => self.submit(py, dest_session, dir, ops, stream, None),
            Err(e) => Ok(fail(e)),
        }
    }

    /// Stop the engine: unpublish it, stop its data server, forget its registrations.
    fn destroy(&self, py: Python<'_>) {
        let e = self.engine.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(e));
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Same as ``destroy()`` (the seed's name).
    #[allow(non_snake_case)]
    fn unInitialize(&self, py: Python<'_>) {
        self.destroy(py)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TransferEngine>()?;
    Ok(())
}
