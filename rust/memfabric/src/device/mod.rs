//! Device memory: one trait, [`Device`], with one implementation per kind of memory.
//!
//! - [`host`]: host DRAM through the same interface; always present, and what every test
//!   without an accelerator exercises.
//! - [`cuda`]: NVIDIA GPUs through the CUDA driver API, `libcuda.so.1` opened at run time.
//! - [`ascend`]: Ascend NPUs through the ACL runtime (`ascend-sys`), opened at run time.
//! - [`staging`]: reusable (pinned where possible) host buffers for staged device copies.
//!
//! Nothing device-specific is linked at build time: a backend whose library is missing reports
//! why ([`Registry`]) and the rest of the fabric keeps working on host memory. [`registry`]
//! probes each backend once per process; [`select`] picks the accelerator to use: CUDA, else
//! Ascend, unless `MF_DEVICE_BACKEND` ([`BACKEND_ENV`]) names one. `MF_DEVICE_BACKEND=host`
//! makes the host backend the device: its memory (shared memfd mappings) then takes every
//! device path of the fabric (IPC between processes, staging on the network path, the data
//! server's device copies, Big Memory HBM parts), so those paths run and are tested on
//! machines without an accelerator.
//!
//! Handles are raw integers (the driver's own `CUstream`/`aclrtStream` values for the
//! accelerators), so a stream that a framework created (`torch.cuda.Stream().cuda_stream`) can
//! be passed in as it is.

pub mod ascend;
pub mod cuda;
pub mod host;
pub mod staging;
pub mod stream_order;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};

/// The backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Host,
    Cuda,
    Ascend,
}

impl Kind {
    /// Lower-case name, as `device_info()` keys it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Cuda => "cuda",
            Kind::Ascend => "ascend",
        }
    }
}

/// One device of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal, as `alloc`/`stream_create` take it.
    pub id: i32,
    pub name: String,
    /// Total memory in bytes (0 where the backend cannot tell).
    pub memory: u64,
}

/// Which side of a copy is device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    HostToDevice,
    DeviceToHost,
    DeviceToDevice,
}

/// A stream of a backend: the driver's handle (for the host backend, an id of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamHandle(pub u64);

/// An event recorded on a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventHandle(pub u64);

/// What another process on this host needs to map a piece of device memory: opaque bytes
/// meaningful to the backend of `kind` only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcHandle {
    pub kind: Kind,
    /// The exporter's device ordinal (informational: ordinals differ between processes).
    pub device: i32,
    pub bytes: Vec<u8>,
}

/// Where an [`IpcHandle`] points: the handle of the start of its allocation, the offset
/// inside it, and the allocation's length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcPlace {
    pub whole: IpcHandle,
    pub offset: u64,
    pub len: u64,
}

/// Device memory, copies, streams, events and same-host sharing.
///
/// Contract, for every implementation:
/// - **Errors**: failures are typed [`Error`]s naming the call and the driver's reason; a bad
///   handle or an address the backend does not know is an error, never a crash.
/// - **Ownership**: `free`, `stream_destroy`, `event_destroy` and `ipc_close` accept only what
///   this backend handed out, so memory or streams of a framework (torch) are never released
///   here by mistake.
/// - **Ordering**: work on one stream runs in submission order; `copy` returns when the bytes
///   are at the destination (as `cudaMemcpy` does); `copy_async` returns once queued.
/// - **Threads**: implementations are `Send + Sync`; calls from any thread are allowed.
pub trait Device: Send + Sync {
    fn kind(&self) -> Kind;
    /// Where the backend was loaded from (the library file), for diagnostics.
    fn library(&self) -> Option<String>;
    /// The devices this backend sees.
    fn devices(&self) -> Result<Vec<DeviceInfo>>;

    /// Allocates `len` bytes on `device`.
    fn alloc(&self, device: i32, len: usize) -> Result<u64>;
    /// Frees memory returned by `alloc`.
    fn free(&self, ptr: u64) -> Result<()>;

    /// Copies `len` bytes from `src` to `dst`; returns when they are at `dst`.
    ///
    /// # Safety
    /// The host side(s) of `dir` must be memory of this process valid for `len` bytes (readable
    /// at `src`, writable at `dst`); the device side(s) must be device memory of this backend
    /// valid for `len` bytes.
    unsafe fn copy(&self, dir: Direction, dst: u64, src: u64, len: usize) -> Result<()>;

    /// Queues the copy on `stream`; it runs after the work queued there before it.
    ///
    /// # Safety
    /// As for [`Device::copy`], and both ranges must stay valid until the stream has run the
    /// copy (a `stream_synchronize` or an event recorded after it completed).
    unsafe fn copy_async(
        &self,
        dir: Direction,
        dst: u64,
        src: u64,
        len: usize,
        stream: StreamHandle,
    ) -> Result<()>;

    fn stream_create(&self, device: i32) -> Result<StreamHandle>;
    /// Waits (up to `timeout` where the backend can bound the wait) for the stream's work;
    /// returns the first error of that work.
    fn stream_synchronize(&self, stream: StreamHandle, timeout: Duration) -> Result<()>;
    /// Releases a stream made by `stream_create`; queued work still runs.
    fn stream_destroy(&self, stream: StreamHandle) -> Result<()>;

    /// Marks the work queued on `stream` so far.
    fn event_record(&self, stream: StreamHandle) -> Result<EventHandle>;
    /// `true` once the work before the event is done.
    fn event_query(&self, event: EventHandle) -> Result<bool>;
    fn event_synchronize(&self, event: EventHandle, timeout: Duration) -> Result<()>;
    fn event_destroy(&self, event: EventHandle) -> Result<()>;
    /// Work queued on `stream` after this call waits for `event` first.
    fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()>;

    /// A handle through which another process on this host can map the memory at `ptr` (which
    /// may point inside an allocation).
    fn ipc_export(&self, ptr: u64) -> Result<IpcHandle>;
    /// Maps memory exported by another process (or this one) for use on `device`; returns the
    /// address corresponding to the exported pointer.
    fn ipc_open(&self, handle: &IpcHandle, device: i32) -> Result<u64>;
    /// Unmaps what `ipc_open` returned.
    fn ipc_close(&self, ptr: u64) -> Result<()>;
    /// Where a handle of this backend points inside its allocation. Handles into one
    /// allocation give equal whole handles, so a process can map each allocation once
    /// (drivers refuse to map one twice).
    fn ipc_place(&self, handle: &IpcHandle) -> Result<IpcPlace> {
        Err(Error::Unsupported(format!(
            "{} handle of {} bytes: {} memory cannot be shared between processes",
            handle.kind.name(),
            handle.bytes.len(),
            self.kind().name()
        )))
    }

    /// The device ordinal when `addr` is memory of this backend's devices; `None` otherwise
    /// (for the host backend: memory it allocated or opened).
    fn device_of(&self, addr: u64) -> Option<i32>;

    /// Queues `f` on `stream`: it runs on a driver thread once the work queued before it is
    /// done, and work queued after it waits until it returns. `f` must not call the device
    /// API (the driver's rule for such functions).
    fn launch_host_func(&self, stream: StreamHandle, f: Box<dyn FnOnce() + Send>) -> Result<()> {
        let _ = (stream, f);
        Err(Error::Unsupported(format!(
            "{} streams cannot run host functions",
            self.kind().name()
        )))
    }

    /// Readies this process for work ordered on a caller's stream (see [`stream_order`]):
    /// whatever the backend does once and lazily (creating its private stream, loading the
    /// copy code) must happen here, on the caller's thread, and not inside such work, where
    /// anything that waits for every stream would wait for itself.
    fn prepare_ordered_work(&self, device: i32) -> Result<()> {
        let _ = device;
        Ok(())
    }

    /// `len` bytes of page-locked host memory, which this backend's copies move at full
    /// speed (see [`staging`]), made in the context of `device` (one the caller copies with,
    /// so that no other device gets a context for it). Unsupported where the backend has none.
    fn pinned_alloc(&self, device: i32, len: usize) -> Result<u64> {
        let _ = (device, len);
        Err(Error::Unsupported(format!(
            "{} has no page-locked host memory",
            self.kind().name()
        )))
    }

    /// Frees memory from [`Device::pinned_alloc`].
    ///
    /// # Safety
    /// `ptr` came from this backend's `pinned_alloc` for `device` and is not used afterwards.
    unsafe fn pinned_free(&self, device: i32, ptr: u64) -> Result<()> {
        let _ = device;
        Err(Error::Unsupported(format!(
            "{ptr:#x}: {} has no page-locked host memory",
            self.kind().name()
        )))
    }

    /// The range of page-locked host memory (this backend's, or another user's of its
    /// driver, such as torch's pinned tensors) holding `addr`: (start, length). `None` for
    /// other memory. The driver keeps such memory mapped while it is page-locked, so a copy
    /// inside the range needs no other check.
    fn pinned_range_of(&self, addr: u64) -> Option<(u64, usize)> {
        let _ = addr;
        None
    }

    /// Page-locks `len` bytes of existing host memory at `addr` (in the context of `device`)
    /// and makes them addressable from every device: returns the device's address of `addr`.
    /// Unsupported where the backend cannot register host memory.
    ///
    /// # Safety
    /// `addr..addr + len` is mapped and stays mapped until [`Device::host_unregister`].
    unsafe fn host_register(&self, device: i32, addr: u64, len: usize) -> Result<u64> {
        let _ = (device, addr, len);
        Err(Error::Unsupported(format!(
            "{} cannot register host memory for the device",
            self.kind().name()
        )))
    }

    /// Undoes [`Device::host_register`] of `addr`.
    ///
    /// # Safety
    /// `addr` was registered by this backend for `device`, and no device work still uses it.
    unsafe fn host_unregister(&self, device: i32, addr: u64) -> Result<()> {
        let _ = device;
        Err(Error::Unsupported(format!(
            "{addr:#x}: {} cannot register host memory",
            self.kind().name()
        )))
    }

    /// The allocation holding device address `addr`: (base, length). `None` for an address
    /// that is not device memory of this backend.
    fn allocation_of(&self, addr: u64) -> Option<(u64, usize)> {
        let _ = addr;
        None
    }

    /// Copies `len` bytes from `src` to `dst`, either of which may be device memory (the
    /// direction is found from the addresses); on `stream` when given, else synchronously.
    ///
    /// # Safety
    /// As for [`Device::copy`] (and [`Device::copy_async`] with a stream).
    unsafe fn copy_between(
        &self,
        dst: u64,
        src: u64,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        // The device of the device side: the destination's when both are.
        let (dir, device) = match (self.device_of(dst), self.device_of(src)) {
            (Some(d), Some(_)) => (Direction::DeviceToDevice, d),
            (Some(d), None) => (Direction::HostToDevice, d),
            (None, Some(s)) => (Direction::DeviceToHost, s),
            (None, None) => {
                return Err(Error::InvalidParam(format!(
                    "neither {dst:#x} nor {src:#x} is {} device memory",
                    self.kind().name()
                )))
            }
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_on_device(device, dir, dst, src, len, stream) }
    }

    /// [`Device::copy`] (or [`Device::copy_async`] on `stream`) once the caller has found the
    /// device of the device side (`copy_between` has): backends whose lookups cost a driver
    /// call take it from here instead of looking again.
    ///
    /// # Safety
    /// As for [`Device::copy`] (and [`Device::copy_async`] with a stream); `device` holds the
    /// device side.
    unsafe fn copy_on_device(
        &self,
        device: i32,
        dir: Direction,
        dst: u64,
        src: u64,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        let _ = device;
        // SAFETY: forwarded from the caller.
        unsafe {
            match stream {
                Some(s) => self.copy_async(dir, dst, src, len, s),
                None => self.copy(dir, dst, src, len),
            }
        }
    }
}

/// Host memory registered with a backend ([`Device::host_register`]) for as long as this lives.
pub struct HostRegistration {
    dev: Arc<dyn Device>,
    device: i32,
    addr: u64,
    dva: u64,
}

impl HostRegistration {
    /// Registers `addr..addr + len` with `dev` for `device`.
    ///
    /// # Safety
    /// The range stays mapped until the registration drops.
    pub unsafe fn new(dev: Arc<dyn Device>, device: i32, addr: u64, len: usize) -> Result<Self> {
        // SAFETY: passed on from the caller.
        let dva = unsafe { dev.host_register(device, addr, len) }?;
        Ok(HostRegistration {
            dev,
            device,
            addr,
            dva,
        })
    }

    /// The device's address of the registered range's start.
    pub fn dva(&self) -> u64 {
        self.dva
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        // SAFETY: registered in `new`, unregistered once; whoever owns the registration drops
        // it before the memory and after the last device work on it.
        if let Err(e) = unsafe { self.dev.host_unregister(self.device, self.addr) } {
            crate::log::warn(&format!(
                "unregistering host memory at {:#x}: {e}",
                self.addr
            ));
        }
    }
}

/// The backend whose device memory holds `addr`, with the device ordinal; `None` for host
/// memory (or when no accelerator is present). Memory of the host backend counts only where
/// the host backend is the chosen device (`MF_DEVICE_BACKEND=host`).
pub fn memory_of(addr: u64) -> Option<(Arc<dyn Device>, i32)> {
    let reg = registry();
    let host_is_device = reg.choice == Ok(Choice::Only(Kind::Host));
    for kind in [Kind::Cuda, Kind::Ascend, Kind::Host] {
        if kind == Kind::Host && !host_is_device {
            continue;
        }
        if let Ok(d) = reg.get(kind) {
            if let Some(ord) = d.device_of(addr) {
                return Some((d.clone(), ord));
            }
        }
    }
    None
}

/// The environment variable that picks the device backend: `auto` (or unset: CUDA, else
/// Ascend), `cuda`, `ascend` or `host`.
pub const BACKEND_ENV: &str = "MF_DEVICE_BACKEND";

/// Which backend plays the device, from [`BACKEND_ENV`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// CUDA, else Ascend.
    Auto,
    /// This backend, or an error saying why it is not available.
    Only(Kind),
}

impl Choice {
    /// Parses a value of [`BACKEND_ENV`] (case and surrounding blanks ignored; empty is
    /// `auto`).
    pub fn parse(value: &str) -> std::result::Result<Choice, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Choice::Auto),
            "cuda" => Ok(Choice::Only(Kind::Cuda)),
            "ascend" => Ok(Choice::Only(Kind::Ascend)),
            "host" => Ok(Choice::Only(Kind::Host)),
            _ => Err(format!(
                "{BACKEND_ENV}={value:?} is not a device backend: expected auto, cuda, ascend or host"
            )),
        }
    }

    fn from_env() -> std::result::Result<Choice, String> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) => Choice::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Choice::Auto),
            Err(std::env::VarError::NotUnicode(v)) => Choice::parse(&v.to_string_lossy()),
        }
    }
}

/// Whether any accelerator backend loaded (cheap after the first call).
pub fn any_accelerator() -> bool {
    registry().accelerator().is_ok()
}

/// The outcome of probing one backend.
pub type Probe = std::result::Result<Arc<dyn Device>, String>;

/// Every backend of this process, probed once.
pub struct Registry {
    host: Arc<dyn Device>,
    // `host` again, as a `Probe`, so `get` can hand every backend out alike.
    host_probe: Probe,
    cuda: Probe,
    ascend: Probe,
    /// `MF_DEVICE_BACKEND`, read once with the probes (or why its value is wrong).
    choice: std::result::Result<Choice, String>,
}

impl Registry {
    /// Probes the accelerators. Loading a driver costs time (and, for CUDA, initialises the
    /// driver in this process), so this runs once, on first use; see [`registry`].
    pub fn probe() -> Registry {
        Registry::probe_with(Choice::from_env())
    }

    /// As [`Registry::probe`], with the choice of backend given rather than read from the
    /// environment.
    pub fn probe_with(choice: std::result::Result<Choice, String>) -> Registry {
        let host: Arc<dyn Device> = Arc::new(host::HostDevice::new());
        Registry {
            choice,
            host_probe: Ok(host.clone()),
            host,
            cuda: cuda::Cuda::load()
                .map(|d| Arc::new(d) as Arc<dyn Device>)
                .map_err(reason_of),
            ascend: ascend::Ascend::load()
                .map(|d| Arc::new(d) as Arc<dyn Device>)
                .map_err(reason_of),
        }
    }

    /// The host backend (always present).
    pub fn host(&self) -> Arc<dyn Device> {
        self.host.clone()
    }

    /// A backend by kind, or why it is not available.
    pub fn get(&self, kind: Kind) -> &Probe {
        match kind {
            Kind::Host => &self.host_probe,
            Kind::Cuda => &self.cuda,
            Kind::Ascend => &self.ascend,
        }
    }

    /// The device backend to use: the one `MF_DEVICE_BACKEND` names, else CUDA, else Ascend.
    /// `Unsupported` naming what was looked for when none is present; `InvalidParam` for a
    /// value of `MF_DEVICE_BACKEND` that names no backend.
    pub fn accelerator(&self) -> Result<Arc<dyn Device>> {
        let choice = self.choice.clone().map_err(Error::InvalidParam)?;
        match choice {
            Choice::Auto => match (&self.cuda, &self.ascend) {
                (Ok(d), _) | (Err(_), Ok(d)) => Ok(d.clone()),
                (Err(c), Err(a)) => Err(Error::Unsupported(format!("no device backend: {c}; {a}"))),
            },
            Choice::Only(kind) => self.get(kind).clone().map_err(|why| {
                Error::Unsupported(format!(
                    "no device backend: {BACKEND_ENV}={} but {why}",
                    kind.name()
                ))
            }),
        }
    }

    /// The choice of backend (`MF_DEVICE_BACKEND`), or why its value is wrong.
    pub fn choice(&self) -> std::result::Result<Choice, String> {
        self.choice.clone()
    }

    /// Why no accelerator is available ("no device backend: ..."), `None` when one is.
    pub fn missing_reason(&self) -> Option<String> {
        match self.accelerator() {
            Ok(_) => None,
            Err(Error::Unsupported(m)) => Some(m),
            Err(e) => Some(e.to_string()),
        }
    }
}

/// The message of an error without the variant's prefix ("unsupported here: ").
pub(crate) fn reason_of(e: Error) -> String {
    match e {
        Error::Unsupported(m) => m,
        other => other.to_string(),
    }
}

/// The process's backends, probed on first use.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::probe)
}

/// The accelerator of this process (see [`Registry::accelerator`]).
pub fn select() -> Result<Arc<dyn Device>> {
    registry().accelerator()
}

/// The text of a loader error without a leading copy of the path it names.
pub(crate) fn loader_message(path: &str, e: &libloading::Error) -> String {
    let msg = e.to_string();
    match msg.strip_prefix(path).and_then(|m| m.strip_prefix(": ")) {
        Some(m) => m.to_owned(),
        None => msg,
    }
}

/// Joins the library list a loader tried into "path (message)" items.
pub(crate) fn tried_list(tried: &[(String, String)]) -> String {
    tried
        .iter()
        .map(|(p, m)| format!("{p} ({m})"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_reports_every_backend() {
        let r = registry();
        assert_eq!(r.host().kind(), Kind::Host);
        assert!(r.get(Kind::Host).is_ok());
        // Whatever this machine has, each accelerator is either usable or says why not.
        for k in [Kind::Cuda, Kind::Ascend] {
            match r.get(k) {
                Ok(d) => assert_eq!(d.kind(), k),
                Err(why) => assert!(!why.is_empty()),
            }
        }
        match (r.get(Kind::Cuda), r.get(Kind::Ascend)) {
            (Err(c), Err(a)) => {
                let e = select().err().expect("no accelerator");
                assert_eq!(e.code(), -3006);
                let msg = r.missing_reason().expect("a reason");
                assert_eq!(msg, format!("no device backend: {c}; {a}"));
                assert!(msg.contains("CUDA driver"), "{msg}");
                assert!(msg.contains("Ascend runtime"), "{msg}");
            }
            _ => assert!(select().is_ok() && r.missing_reason().is_none()),
        }
    }

    #[test]
    fn the_backend_choice_is_parsed_and_obeyed() {
        assert_eq!(Choice::parse(""), Ok(Choice::Auto));
        assert_eq!(Choice::parse(" AUTO "), Ok(Choice::Auto));
        assert_eq!(Choice::parse("Host"), Ok(Choice::Only(Kind::Host)));
        assert_eq!(Choice::parse("cuda"), Ok(Choice::Only(Kind::Cuda)));
        assert_eq!(Choice::parse("ascend\n"), Ok(Choice::Only(Kind::Ascend)));
        let why = Choice::parse("gpu").unwrap_err();
        assert!(why.contains("expected auto, cuda, ascend or host"), "{why}");

        let host = Registry::probe_with(Ok(Choice::Only(Kind::Host)));
        assert_eq!(host.accelerator().unwrap().kind(), Kind::Host);
        assert!(host.missing_reason().is_none());
        let bad = Registry::probe_with(Choice::parse("gpu"));
        let e = bad.accelerator().err().expect("a bad choice is an error");
        assert_eq!(e.code(), -2000);
        assert!(e.to_string().contains("MF_DEVICE_BACKEND=\"gpu\""), "{e}");
        // A backend named but missing is not replaced by another one.
        for kind in [Kind::Cuda, Kind::Ascend] {
            let r = Registry::probe_with(Ok(Choice::Only(kind)));
            match r.get(kind) {
                Ok(_) => assert_eq!(r.accelerator().unwrap().kind(), kind),
                Err(why) => {
                    let e = r.accelerator().err().expect("missing backend");
                    assert_eq!(e.code(), -3006);
                    let want = format!("MF_DEVICE_BACKEND={} but {why}", kind.name());
                    assert!(e.to_string().contains(&want), "{e}");
                }
            }
        }
    }
}
