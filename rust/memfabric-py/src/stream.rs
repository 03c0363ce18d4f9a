//! `Stream` and `Event`: host work queues for asynchronous copies, and the `stream=` argument
//! every async call takes.

use std::sync::Arc;
use std::time::Duration;

use memfabric::device::Kind;
use memfabric::stream::{self as core, HostStream};
use memfabric::Error;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::error::code;

fn fail(e: Error) -> i32 {
    code::<()>(Err(e))
}

fn seconds(timeout: f64) -> Result<Duration, Error> {
    if timeout.is_finite() && timeout > 0.0 && timeout < 1e9 {
        Ok(Duration::from_secs_f64(timeout))
    } else {
        Err(Error::InvalidParam(format!(
            "timeout {timeout} must be a positive number of seconds"
        )))
    }
}

/// An ordered host work queue for asynchronous transfers (the role an ACL/CUDA stream plays
/// on a device). Work runs in submission order; ``synchronize()`` waits for it and returns the
/// first error (0 when all succeeded), so an async failure is never lost.
///
/// Example:
///     >>> s = mf.Stream()
///     >>> engine.transfer_async_write_submit(peer, buf, peer_buf, n, s)
///     0
///     >>> ev = s.record_event()
///     >>> s.synchronize()
///     0
///     >>> ev.query()
///     True
#[pyclass(module = "memfabric_hybrid", frozen)]
pub struct Stream {
    inner: Arc<HostStream>,
}

#[pymethods]
impl Stream {
    #[new]
    fn new() -> PyResult<Self> {
        HostStream::new()
            .map(|s| Stream { inner: Arc::new(s) })
            .map_err(crate::error::to_pyerr)
    }

    /// Wait for all submitted work (up to ``timeout`` seconds, default 600). Returns 0, or the
    /// error code of the first failed job since the last report (see ``get_last_err_msg()``).
    ///
    /// Example:
    ///     >>> s.synchronize(timeout=5.0)
    ///     0
    #[pyo3(signature = (timeout = 600.0))]
    fn synchronize(&self, py: Python<'_>, timeout: f64) -> i32 {
        let t = match seconds(timeout) {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        let s = self.inner.clone();
        code(py.detach(move || s.synchronize(t)))
    }

    /// 0 when all submitted work is done, 1 while some is running, or the error code of the
    /// first failed job.
    ///
    /// Example:
    ///     >>> s.query()
    ///     0
    fn query(&self) -> i32 {
        match self.inner.query() {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => fail(e),
        }
    }

    /// An ``Event`` marking all work submitted so far.
    ///
    /// Example:
    ///     >>> ev = s.record_event()
    ///     >>> ev.synchronize()
    ///     0
    fn record_event(&self) -> Event {
        Event {
            inner: self.inner.record_event(),
        }
    }

    /// Make work submitted to this stream from now on wait for ``event`` (of any stream).
    /// The wait is bounded by ``timeout`` seconds (default 600); past it this stream reports a
    /// timeout on ``synchronize()`` and goes on. Returns 0 or an error code.
    ///
    /// Example:
    ///     >>> s2.wait_event(s1.record_event())
    ///     0
    #[pyo3(signature = (event, timeout = 600.0))]
    fn wait_event(&self, event: &Event, timeout: f64) -> i32 {
        match seconds(timeout) {
            Ok(t) => code(self.inner.wait_event(&event.inner, t)),
            Err(e) => fail(e),
        }
    }
}

/// A point in a ``Stream``: done once everything submitted before it is done. Errors stay
/// with the stream (its ``synchronize()`` reports them).
///
/// Example:
///     >>> ev = s.record_event()
///     >>> ev.query()
///     False
///     >>> ev.synchronize()
///     0
#[pyclass(module = "memfabric_hybrid", frozen)]
pub struct Event {
    inner: core::Event,
}

#[pymethods]
impl Event {
    /// True once the work before the event is done.
    fn query(&self) -> bool {
        self.inner.query()
    }

    /// Wait (up to ``timeout`` seconds) for the work before the event; 0 or a timeout code.
    #[pyo3(signature = (timeout = 600.0))]
    fn synchronize(&self, py: Python<'_>, timeout: f64) -> i32 {
        let t = match seconds(timeout) {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        let ev = self.inner.clone();
        code(py.detach(move || ev.synchronize(t)))
    }
}

/// The `stream=` argument of async calls: None/0 (run now), a Stream, or a device handle
/// (with its backend when the object said: torch.cuda.Stream or torch_npu's stream).
pub enum StreamArg {
    Now,
    Host(Arc<HostStream>),
    Device(u64, Option<Kind>),
}

impl StreamArg {
    /// Parses `stream=`: None, 0, a `Stream`, an int handle, or an object with `cuda_stream`
    /// (torch.cuda.Stream) or `npu_stream` (torch_npu.npu.Stream).
    pub fn from_py(obj: Option<&Bound<'_, PyAny>>) -> PyResult<StreamArg> {
        let Some(obj) = obj else {
            return Ok(StreamArg::Now);
        };
        if obj.is_none() {
            return Ok(StreamArg::Now);
        }
        if let Ok(s) = obj.cast::<Stream>() {
            return Ok(StreamArg::Host(s.get().inner.clone()));
        }
        if let Ok(h) = obj.extract::<u64>() {
            return Ok(if h == 0 {
                StreamArg::Now
            } else {
                StreamArg::Device(h, None)
            });
        }
        for (attr, kind) in [("cuda_stream", Kind::Cuda), ("npu_stream", Kind::Ascend)] {
            if let Ok(h) = obj.getattr(attr).and_then(|h| h.extract::<u64>()) {
                return Ok(StreamArg::Device(h, Some(kind)));
            }
        }
        Err(PyTypeError::new_err(format!(
            "stream must be None, 0, a memfabric_hybrid.Stream or a device stream handle, not {}",
            obj.get_type().name()?
        )))
    }

    /// Runs `job` now (without the GIL) or queues it; `owner` lives until the job has run.
    pub fn dispatch(
        self,
        py: Python<'_>,
        job: impl FnOnce() -> memfabric::Result<()> + Send + 'static,
        owner: Option<Py<PyAny>>,
    ) -> i32 {
        match self {
            StreamArg::Now => {
                let rc = code(py.detach(job));
                drop(owner);
                rc
            }
            StreamArg::Host(s) => code(s.submit(move || {
                let r = job();
                // Dropping a Python object needs the GIL; pyo3 defers it when not held.
                drop(owner);
                r
            })),
            StreamArg::Device(h, kind) => {
                let dev = match kind {
                    Some(k) => py.detach(|| memfabric::device::registry().get(k).clone()),
                    None => py
                        .detach(memfabric::device::select)
                        .map_err(|e| e.to_string()),
                };
                let dev = match (dev, kind) {
                    (Ok(d), _) => d,
                    (Err(e), Some(k)) => {
                        return fail(Error::Unsupported(format!(
                            "a stream of the {} backend given, but {e}; \
                             pass a memfabric_hybrid.Stream or None",
                            k.name()
                        )));
                    }
                    (Err(_), None) => {
                        let why = crate::device::unavailable(py, "a transfer on a device stream");
                        return fail(Error::Unsupported(format!(
                            "device stream handle {h:#x} given, but {why}; \
                             pass a memfabric_hybrid.Stream or None"
                        )));
                    }
                };
                let job = Box::new(move || {
                    let r = job();
                    drop(owner);
                    r
                });
                code(py.detach(|| {
                    memfabric::device::stream_order::submit(
                        &dev,
                        memfabric::device::StreamHandle(h),
                        job,
                        memfabric::trans::DEFAULT_TRANSFER_TIMEOUT,
                    )
                }))
            }
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Stream>()?;
    m.add_class::<Event>()?;
    Ok(())
}
