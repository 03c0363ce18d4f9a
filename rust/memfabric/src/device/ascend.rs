//! Ascend NPUs through the ACL runtime (`ascend-sys`, `libascendcl.so` opened at run time).
//!
//! Untested on hardware: no NPU has been available to this project. The calls follow CANN's
//! documented contracts; on every machine without CANN, [`Ascend::load`] reports
//! "Ascend runtime not found: tried ..." and the rest of the fabric is unaffected.
//!
//! ACL binds a device to each thread (`aclrtSetDevice`); every call here first makes sure the
//! thread is on the device it works on. The ACL subset has no pointer query, so
//! only memory allocated through this backend is known as device memory, and IPC is not
//! offered.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ascend_sys::{
    aclError, aclrtEvent, aclrtStream, Acl, LoadError, ACL_ERROR_REPEAT_INITIALIZE,
    ACL_EVENT_RECORDED_STATUS_COMPLETE, ACL_EVENT_RECORDED_STATUS_NOT_READY,
    ACL_MEMCPY_DEVICE_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_HOST_TO_DEVICE,
    ACL_MEM_MALLOC_HUGE_FIRST, ACL_SUCCESS,
};

use super::{Device, DeviceInfo, Direction, EventHandle, IpcHandle, Kind, StreamHandle};
use crate::error::{Error, Result};

pub use ascend_sys::LIBRARY_ENV;

#[derive(Default)]
struct Tables {
    // Allocation -> (length, device).
    allocs: BTreeMap<u64, (usize, i32)>,
    // Stream -> device.
    streams: HashMap<u64, i32>,
    // Event -> device.
    events: HashMap<u64, i32>,
}

/// The Ascend backend.
pub struct Ascend {
    acl: Acl,
    count: u32,
    tables: Mutex<Tables>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn load_error(e: LoadError) -> Error {
    Error::Unsupported(e.to_string())
}

impl Ascend {
    /// Loads `libascendcl.so` (see [`ascend_sys::candidates`]) and initialises ACL.
    pub fn load() -> Result<Ascend> {
        Self::init(Acl::load().map_err(load_error)?)
    }

    /// Loads the runtime from the first of `paths` that opens, and initialises ACL.
    pub fn load_from(paths: &[std::path::PathBuf]) -> Result<Ascend> {
        Self::init(Acl::load_from(paths).map_err(load_error)?)
    }

    fn init(acl: Acl) -> Result<Ascend> {
        let path = acl.path().display().to_string();
        // SAFETY: a NULL config path selects the defaults (documented); repeated init in one
        // process is reported as ACL_ERROR_REPEAT_INITIALIZE, which is harmless.
        let r = unsafe { (acl.aclInit)(std::ptr::null()) };
        if r != ACL_SUCCESS && r != ACL_ERROR_REPEAT_INITIALIZE {
            return Err(Error::Unsupported(format!(
                "Ascend runtime at {path}: aclInit failed: {}",
                describe(&acl, r)
            )));
        }
        let mut count: u32 = 0;
        // SAFETY: writes one u32.
        let r = unsafe { (acl.aclrtGetDeviceCount)(&mut count) };
        if r != ACL_SUCCESS {
            return Err(Error::Unsupported(format!(
                "Ascend runtime at {path}: aclrtGetDeviceCount failed: {}",
                describe(&acl, r)
            )));
        }
        if count == 0 {
            return Err(Error::Unsupported(format!(
                "Ascend runtime at {path} sees no device"
            )));
        }
        Ok(Ascend {
            acl,
            count,
            tables: Mutex::new(Tables::default()),
        })
    }

    fn check(&self, r: aclError, what: &str) -> Result<()> {
        if r == ACL_SUCCESS {
            Ok(())
        } else {
            Err(Error::Failed(format!("{what}: {}", describe(&self.acl, r))))
        }
    }

    /// The device bound to the calling thread, if any.
    fn current(&self) -> Option<i32> {
        let mut d: i32 = -1;
        // SAFETY: writes one int; fails (no device set) without side effects.
        let r = unsafe { (self.acl.aclrtGetDevice)(&mut d) };
        (r == ACL_SUCCESS && d >= 0).then_some(d)
    }

    /// Binds `device` to the calling thread unless it is bound already. Asked of ACL each
    /// time rather than remembered: a framework (torch_npu) may switch the thread's device in
    /// between, and each aclrtSetDevice takes a reference that is only dropped at exit.
    fn bind(&self, device: i32) -> Result<()> {
        if device < 0 || device as u32 >= self.count {
            return Err(Error::InvalidParam(format!(
                "Ascend device {device} does not exist ({} present)",
                self.count
            )));
        }
        if self.current() == Some(device) {
            return Ok(());
        }
        // SAFETY: a valid device id; ACL keeps the binding per thread.
        self.check(
            unsafe { (self.acl.aclrtSetDevice)(device) },
            &format!("aclrtSetDevice({device})"),
        )
    }

    /// The device of an allocation of this backend, else the thread's current device (or 0):
    /// ACL resolves device addresses itself once a device is bound.
    fn device_for(&self, addr: u64) -> i32 {
        self.device_of(addr).or_else(|| self.current()).unwrap_or(0)
    }

    fn stream_device(&self, s: StreamHandle) -> i32 {
        lock(&self.tables)
            .streams
            .get(&s.0)
            .copied()
            .or_else(|| self.current())
            .unwrap_or(0)
    }

    fn event_device(&self, e: EventHandle) -> Result<i32> {
        lock(&self.tables).events.get(&e.0).copied().ok_or_else(|| {
            Error::InvalidParam(format!(
                "Ascend event {:#x} was not recorded by this backend",
                e.0
            ))
        })
    }
}

fn describe(acl: &Acl, r: aclError) -> String {
    match acl.recent_error() {
        Some(m) => format!("aclError {r} ({m})"),
        None => format!("aclError {r}"),
    }
}

fn kind_of(dir: Direction) -> ascend_sys::aclrtMemcpyKind {
    match dir {
        Direction::HostToDevice => ACL_MEMCPY_HOST_TO_DEVICE,
        Direction::DeviceToHost => ACL_MEMCPY_DEVICE_TO_HOST,
        Direction::DeviceToDevice => ACL_MEMCPY_DEVICE_TO_DEVICE,
    }
}

fn device_side(dir: Direction, dst: u64, src: u64) -> u64 {
    match dir {
        Direction::HostToDevice | Direction::DeviceToDevice => dst,
        Direction::DeviceToHost => src,
    }
}

impl Device for Ascend {
    fn kind(&self) -> Kind {
        Kind::Ascend
    }

    fn library(&self) -> Option<String> {
        Some(self.acl.path().display().to_string())
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>> {
        // The bound subset has no name or memory query; ordinals are what callers need.
        Ok((0..self.count as i32)
            .map(|id| DeviceInfo {
                id,
                name: format!("Ascend NPU {id}"),
                memory: 0,
            })
            .collect())
    }

    fn alloc(&self, device: i32, len: usize) -> Result<u64> {
        if len == 0 {
            return Err(Error::InvalidParam("allocation of 0 bytes".into()));
        }
        self.bind(device)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one device pointer; a device is bound to this thread.
        let r = unsafe { (self.acl.aclrtMalloc)(&mut p, len, ACL_MEM_MALLOC_HUGE_FIRST) };
        if r != ACL_SUCCESS {
            return Err(Error::MallocFailed(format!(
                "aclrtMalloc of {len} bytes on Ascend device {device}: {}",
                describe(&self.acl, r)
            )));
        }
        lock(&self.tables).allocs.insert(p as u64, (len, device));
        Ok(p as u64)
    }

    fn free(&self, ptr: u64) -> Result<()> {
        let (_, device) = lock(&self.tables).allocs.remove(&ptr).ok_or_else(|| {
            Error::InvalidParam(format!("{ptr:#x} was not returned by this backend's alloc"))
        })?;
        self.bind(device)?;
        // SAFETY: allocated by aclrtMalloc here and removed from the table, so freed once.
        self.check(
            unsafe { (self.acl.aclrtFree)(ptr as *mut c_void) },
            "aclrtFree",
        )
    }

    unsafe fn copy(&self, dir: Direction, dst: u64, src: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.bind(self.device_for(device_side(dir, dst, src)))?;
        // SAFETY: the caller guarantees both ranges (trait contract); destMax is the copy
        // length, so ACL writes no more than `len` bytes.
        let r = unsafe {
            (self.acl.aclrtMemcpy)(
                dst as *mut c_void,
                len,
                src as *const c_void,
                len,
                kind_of(dir),
            )
        };
        self.check(r, &format!("aclrtMemcpy {dir:?} of {len} bytes"))
    }

    unsafe fn copy_async(
        &self,
        dir: Direction,
        dst: u64,
        src: u64,
        len: usize,
        stream: StreamHandle,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.bind(self.stream_device(stream))?;
        // SAFETY: the caller keeps both ranges valid until the stream has run the copy
        // (trait contract); destMax is the copy length.
        let r = unsafe {
            (self.acl.aclrtMemcpyAsync)(
                dst as *mut c_void,
                len,
                src as *const c_void,
                len,
                kind_of(dir),
                stream.0 as aclrtStream,
            )
        };
        self.check(r, &format!("aclrtMemcpyAsync {dir:?} of {len} bytes"))
    }

    fn stream_create(&self, device: i32) -> Result<StreamHandle> {
        self.bind(device)?;
        let mut s: aclrtStream = std::ptr::null_mut();
        // SAFETY: writes one stream handle; a device is bound to this thread.
        self.check(
            unsafe { (self.acl.aclrtCreateStream)(&mut s) },
            "aclrtCreateStream",
        )?;
        lock(&self.tables).streams.insert(s as u64, device);
        Ok(StreamHandle(s as u64))
    }

    /// Blocks until the stream is done: the bound ACL subset has no bounded wait, so
    /// `timeout` is not applied here.
    fn stream_synchronize(&self, stream: StreamHandle, _timeout: Duration) -> Result<()> {
        self.bind(self.stream_device(stream))?;
        // SAFETY: a stream handle; an invalid one is reported as an error code.
        self.check(
            unsafe { (self.acl.aclrtSynchronizeStream)(stream.0 as aclrtStream) },
            "aclrtSynchronizeStream",
        )
    }

    fn stream_destroy(&self, stream: StreamHandle) -> Result<()> {
        let device = lock(&self.tables)
            .streams
            .remove(&stream.0)
            .ok_or_else(|| {
                Error::InvalidParam(format!(
                    "Ascend stream {:#x} was not created by this backend",
                    stream.0
                ))
            })?;
        self.bind(device)?;
        // SAFETY: a stream created here, removed from the table so destroyed once.
        self.check(
            unsafe { (self.acl.aclrtDestroyStream)(stream.0 as aclrtStream) },
            "aclrtDestroyStream",
        )
    }

    fn event_record(&self, stream: StreamHandle) -> Result<EventHandle> {
        let device = self.stream_device(stream);
        self.bind(device)?;
        let mut ev: aclrtEvent = std::ptr::null_mut();
        // SAFETY: writes one event handle; a device is bound.
        self.check(
            unsafe { (self.acl.aclrtCreateEvent)(&mut ev) },
            "aclrtCreateEvent",
        )?;
        // SAFETY: a fresh event and a stream handle.
        let r = unsafe { (self.acl.aclrtRecordEvent)(ev, stream.0 as aclrtStream) };
        if let Err(e) = self.check(r, "aclrtRecordEvent") {
            // SAFETY: created above, not shared.
            unsafe { (self.acl.aclrtDestroyEvent)(ev) };
            return Err(e);
        }
        lock(&self.tables).events.insert(ev as u64, device);
        Ok(EventHandle(ev as u64))
    }

    fn event_query(&self, event: EventHandle) -> Result<bool> {
        self.bind(self.event_device(event)?)?;
        let f = self.acl.aclrtQueryEventStatus.ok_or_else(|| {
            Error::Unsupported(
                "this CANN lacks aclrtQueryEventStatus; use event_synchronize".into(),
            )
        })?;
        let mut status = ACL_EVENT_RECORDED_STATUS_NOT_READY;
        // SAFETY: an event of this backend; writes one status value.
        self.check(
            unsafe { f(event.0 as aclrtEvent, &mut status) },
            "aclrtQueryEventStatus",
        )?;
        Ok(status == ACL_EVENT_RECORDED_STATUS_COMPLETE)
    }

    /// Blocks until the event completes (no bounded wait in the ACL subset).
    fn event_synchronize(&self, event: EventHandle, _timeout: Duration) -> Result<()> {
        self.bind(self.event_device(event)?)?;
        // SAFETY: an event of this backend, not destroyed (it is in the table).
        self.check(
            unsafe { (self.acl.aclrtSynchronizeEvent)(event.0 as aclrtEvent) },
            "aclrtSynchronizeEvent",
        )
    }

    fn event_destroy(&self, event: EventHandle) -> Result<()> {
        let device = lock(&self.tables).events.remove(&event.0).ok_or_else(|| {
            Error::InvalidParam(format!(
                "Ascend event {:#x} was not recorded by this backend",
                event.0
            ))
        })?;
        self.bind(device)?;
        // SAFETY: an event created here, removed from the table so destroyed once.
        self.check(
            unsafe { (self.acl.aclrtDestroyEvent)(event.0 as aclrtEvent) },
            "aclrtDestroyEvent",
        )
    }

    fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.event_device(event)?;
        self.bind(self.stream_device(stream))?;
        // SAFETY: a live event of this backend and a stream handle.
        self.check(
            unsafe {
                (self.acl.aclrtStreamWaitEvent)(stream.0 as aclrtStream, event.0 as aclrtEvent)
            },
            "aclrtStreamWaitEvent",
        )
    }

    fn ipc_export(&self, ptr: u64) -> Result<IpcHandle> {
        Err(Error::Unsupported(format!(
            "IPC export of {ptr:#x}: Ascend IPC (aclrtIpcMem*) is not bound in this version"
        )))
    }

    fn ipc_open(&self, _handle: &IpcHandle, _device: i32) -> Result<u64> {
        Err(Error::Unsupported(
            "Ascend IPC (aclrtIpcMem*) is not bound in this version".into(),
        ))
    }

    fn ipc_close(&self, ptr: u64) -> Result<()> {
        Err(Error::InvalidParam(format!(
            "{ptr:#x} was not returned by ipc_open"
        )))
    }

    fn device_of(&self, addr: u64) -> Option<i32> {
        let t = lock(&self.tables);
        let (&start, &(len, device)) = t.allocs.range(..=addr).next_back()?;
        (addr - start < len as u64).then_some(device)
    }
}

impl Drop for Ascend {
    fn drop(&mut self) {
        // Best effort: release what this backend made. ACL itself stays initialised: other
        // users in the process (torch_npu) may still need it.
        let t = std::mem::take(&mut *lock(&self.tables));
        for (&ev, &device) in &t.events {
            if self.bind(device).is_ok() {
                // SAFETY: an event created here and not destroyed yet.
                unsafe { (self.acl.aclrtDestroyEvent)(ev as aclrtEvent) };
            }
        }
        for (&s, &device) in &t.streams {
            if self.bind(device).is_ok() {
                // SAFETY: a stream created here and not destroyed yet.
                unsafe { (self.acl.aclrtDestroyStream)(s as aclrtStream) };
            }
        }
        for (&p, &(_, device)) in &t.allocs {
            if self.bind(device).is_ok() {
                // SAFETY: allocated here and not freed yet.
                unsafe { (self.acl.aclrtFree)(p as *mut c_void) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_missing_runtime_is_unsupported_and_names_the_paths() {
        let e = Ascend::load_from(&[PathBuf::from("/nonexistent/cann/lib64/libascendcl.so")])
            .err()
            .expect("no runtime there");
        assert_eq!(e.code(), -3006);
        let msg = e.to_string();
        assert!(msg.contains("Ascend runtime not found: tried "), "{msg}");
        assert!(
            msg.contains("/nonexistent/cann/lib64/libascendcl.so ("),
            "{msg}"
        );
        assert!(msg.contains(LIBRARY_ENV), "{msg}");
    }

    #[test]
    fn the_default_search_reports_what_it_tried_when_cann_is_absent() {
        // Only meaningful where no CANN is installed (every machine this runs on so far).
        if std::env::var_os(LIBRARY_ENV).is_some() {
            return;
        }
        if let Err(e) = Ascend::load() {
            let msg = e.to_string();
            assert!(msg.contains("Ascend runtime"), "{msg}");
            assert!(msg.contains("libascendcl.so"), "{msg}");
        }
    }
}
