//! `device_info()`: which device backends this process found, or why not.

use memfabric::device::{registry, Kind, Probe};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

fn backend<'py>(py: Python<'py>, probe: &Probe) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let dev = match probe {
        Ok(dev) => dev,
        Err(why) => {
            d.set_item("available", false)?;
            d.set_item("reason", why)?;
            return Ok(d);
        }
    };
    d.set_item("available", true)?;
    if let Some(lib) = dev.library() {
        d.set_item("library", lib)?;
    }
    let list = PyList::empty(py);
    match py.detach(|| dev.devices()) {
        Ok(devs) => {
            for info in devs {
                let e = PyDict::new(py);
                e.set_item("id", info.id)?;
                e.set_item("name", info.name)?;
                e.set_item("memory", info.memory)?;
                list.append(e)?;
            }
        }
        // Loaded, yet listing failed: keep the backend visible and say why the list is empty.
        Err(e) => d.set_item("error", e.to_string())?,
    }
    d.set_item("devices", list)?;
    Ok(d)
}

/// Which device backends this process can use, and why the others are missing.
///
/// The first call looks for the drivers (``libcuda.so.1``, or ``$MF_CUDA_LIBRARY``; CANN's
/// ``libascendcl.so``, or ``$MF_ASCEND_LIBRARY``) and initialises those it finds; the answer
/// is kept for the life of the process.
///
/// Device memory (Big Memory HBM parts, device buffers in the Transfer Engine) comes from the
/// backend ``$MF_DEVICE_BACKEND`` names (``cuda``, ``ascend`` or ``host``), else from CUDA,
/// else from Ascend. ``host`` makes host memory (shared mappings) play device memory, so
/// every device path runs on a machine without an accelerator.
///
/// Returns:
///     ``{"host": {...}, "cuda": {...}, "ascend": {...}}``. Each entry has ``available`` and
///     ``selected`` (whether it provides this process's device memory); an available one has
///     ``devices`` (a list of ``{"id", "name", "memory"}``, memory in bytes) and ``library``
///     (the file loaded); an unavailable one has ``reason``.
///
/// Example:
///     >>> info = mf.device_info()
///     >>> info["host"]["available"]
///     True
///     >>> if not info["cuda"]["available"]:
///     ...     print(info["cuda"]["reason"])
///     CUDA driver not found: tried libcuda.so.1 (...); libcuda.so (...) (...)
#[pyfunction]
fn device_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    // Probing loads and initialises drivers: seconds on some machines, so without the GIL.
    let reg = py.detach(registry);
    let chosen = reg.accelerator().ok().map(|d| d.kind());
    let out = PyDict::new(py);
    for k in [Kind::Host, Kind::Cuda, Kind::Ascend] {
        let entry = backend(py, reg.get(k))?;
        entry.set_item("selected", chosen == Some(k))?;
        out.set_item(k.name(), entry)?;
    }
    Ok(out)
}

/// Why a call that needs a device cannot run here: "no device backend: ..." naming what was
/// looked for, or that the backend present is not wired into that call yet.
pub fn unavailable(py: Python<'_>, call: &str) -> String {
    let reg = py.detach(registry);
    match reg.missing_reason() {
        Some(why) => why,
        None => match reg.accelerator() {
            Ok(d) => format!(
                "the {} backend is present, but {call} is not supported yet",
                d.kind().name()
            ),
            Err(e) => e.to_string(),
        },
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(device_info, m)?)?;
    Ok(())
}
