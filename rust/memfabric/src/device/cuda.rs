//! NVIDIA GPUs through the CUDA driver API, with `libcuda.so.1` opened at run time.
//!
//! Nothing CUDA is needed to build or to run without a GPU: when the driver library is
//! missing, [`Cuda::load`] returns `Unsupported("CUDA driver not found: ...")` naming every
//! file it tried. `$MF_CUDA_LIBRARY` names the exact file to load instead.
//!
//! The small driver subset is bound here with `libloading` rather than through `cudarc`:
//! cudarc (0.19, `dynamic-loading`) builds without CUDA, but it panics when `libcuda` is
//! missing or lacks a symbol, and it only searches its own list of names, so neither a clear
//! error nor `$MF_CUDA_LIBRARY` would be possible.
//!
//! Contexts: every call runs inside the device's *primary* context (the one the CUDA runtime,
//! and so torch, uses), pushed for the call and popped after it, so memory and streams are
//! shared with the framework and the caller's current context is left as it was.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use libloading::Library;

use super::{
    loader_message, tried_list, Device, DeviceInfo, Direction, EventHandle, IpcHandle, IpcPlace,
    Kind, StreamHandle,
};
use crate::error::{Error, Result};
use crate::wait::poll_until;

type CUresult = c_uint;
type CUdevice = c_int;
type CUdeviceptr = u64;
type CUcontext = *mut c_void;
type CUstream = *mut c_void;
type CUevent = *mut c_void;
type CUhostFn = unsafe extern "C" fn(*mut c_void);

#[repr(C)]
#[derive(Clone, Copy)]
struct CUipcMemHandle {
    reserved: [c_char; 64],
}

const CUDA_SUCCESS: CUresult = 0;
const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
const CUDA_ERROR_NO_DEVICE: CUresult = 100;
const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
const CUDA_ERROR_NOT_READY: CUresult = 600;

const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: c_uint = 2;
const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_uint = 9;
const CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: c_uint = 11;
const CU_POINTER_ATTRIBUTE_RANGE_SIZE: c_uint = 12;
const CU_MEMORYTYPE_HOST: c_uint = 1;
const CU_MEMORYTYPE_DEVICE: c_uint = 2;
const CU_STREAM_NON_BLOCKING: c_uint = 1;
const CU_EVENT_DISABLE_TIMING: c_uint = 2;
const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;

const IPC_HANDLE_LEN: usize = 64;
/// Driver handle, offset of the exported pointer in its allocation, allocation size.
const IPC_LEN: usize = IPC_HANDLE_LEN + 16;

/// Environment variable naming the exact driver library to load.
pub const LIBRARY_ENV: &str = "MF_CUDA_LIBRARY";
/// The driver's names, tried in order (the loader searches its usual paths).
pub const LIBRARY_NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

/// The files to try: `$MF_CUDA_LIBRARY` alone when set, else [`LIBRARY_NAMES`].
pub fn candidates() -> Vec<PathBuf> {
    candidates_from(std::env::var_os(LIBRARY_ENV))
}

/// [`candidates`] for a given value of `$MF_CUDA_LIBRARY`.
pub fn candidates_from(exact: Option<std::ffi::OsString>) -> Vec<PathBuf> {
    match exact.filter(|p| !p.is_empty()) {
        Some(p) => vec![PathBuf::from(p)],
        None => LIBRARY_NAMES.iter().map(PathBuf::from).collect(),
    }
}

// Declares the bound functions once: the struct of pointers and the code that resolves them.
macro_rules! driver_api {
    ($($name:ident($($arg:ty),*);)*) => {
        #[allow(non_snake_case)]
        struct Api {
            $($name: unsafe extern "C" fn($($arg),*) -> CUresult,)*
            // Last, so the pointers above are never used after the library is closed.
            _lib: Library,
        }

        impl Api {
            fn bind(lib: Library, path: &str) -> Result<Api> {
                Ok(Api {
                    $($name: symbol(&lib, path, stringify!($name))?,)*
                    _lib: lib,
                })
            }
        }
    };
}

// Signatures as in cuda.h (CUDA 11+; the `_v2` names are what its macros resolve to).
driver_api! {
    cuInit(c_uint);
    cuDriverGetVersion(*mut c_int);
    cuDeviceGetCount(*mut c_int);
    cuDeviceGet(*mut CUdevice, c_int);
    cuDeviceGetName(*mut c_char, c_int, CUdevice);
    cuDeviceTotalMem_v2(*mut usize, CUdevice);
    cuDevicePrimaryCtxRetain(*mut CUcontext, CUdevice);
    cuDevicePrimaryCtxRelease_v2(CUdevice);
    cuDevicePrimaryCtxGetState(CUdevice, *mut c_uint, *mut c_int);
    cuCtxGetCurrent(*mut CUcontext);
    cuCtxPushCurrent_v2(CUcontext);
    cuCtxPopCurrent_v2(*mut CUcontext);
    cuMemAlloc_v2(*mut CUdeviceptr, usize);
    cuMemFree_v2(CUdeviceptr);
    cuMemGetAddressRange_v2(*mut CUdeviceptr, *mut usize, CUdeviceptr);
    cuMemHostAlloc(*mut *mut c_void, usize, c_uint);
    cuMemFreeHost(*mut c_void);
    cuMemHostRegister_v2(*mut c_void, usize, c_uint);
    cuMemHostUnregister(*mut c_void);
    cuMemHostGetDevicePointer_v2(*mut CUdeviceptr, *mut c_void, c_uint);
    cuMemcpyHtoD_v2(CUdeviceptr, *const c_void, usize);
    cuMemcpyDtoH_v2(*mut c_void, CUdeviceptr, usize);
    cuMemcpyDtoD_v2(CUdeviceptr, CUdeviceptr, usize);
    cuMemcpyHtoDAsync_v2(CUdeviceptr, *const c_void, usize, CUstream);
    cuMemcpyDtoHAsync_v2(*mut c_void, CUdeviceptr, usize, CUstream);
    cuMemcpyDtoDAsync_v2(CUdeviceptr, CUdeviceptr, usize, CUstream);
    cuStreamCreate(*mut CUstream, c_uint);
    cuStreamQuery(CUstream);
    cuStreamDestroy_v2(CUstream);
    cuStreamGetCtx(CUstream, *mut CUcontext);
    cuStreamWaitEvent(CUstream, CUevent, c_uint);
    cuEventCreate(*mut CUevent, c_uint);
    cuEventRecord(CUevent, CUstream);
    cuEventQuery(CUevent);
    cuEventDestroy_v2(CUevent);
    cuIpcGetMemHandle(*mut CUipcMemHandle, CUdeviceptr);
    cuIpcOpenMemHandle_v2(*mut CUdeviceptr, CUipcMemHandle, c_uint);
    cuIpcCloseMemHandle(CUdeviceptr);
    cuPointerGetAttribute(*mut c_void, c_uint, CUdeviceptr);
    cuLaunchHostFunc(CUstream, CUhostFn, *mut c_void);
    cuGetErrorName(CUresult, *mut *const c_char);
    cuGetErrorString(CUresult, *mut *const c_char);
}

fn symbol<T: Copy>(lib: &Library, path: &str, name: &str) -> Result<T> {
    // SAFETY: every `T` used with this is the function-pointer type cuda.h declares for
    // `name` (the `driver_api!` table); the pointer is only used while `lib` is loaded.
    match unsafe { lib.get::<T>(name.as_bytes()) } {
        Ok(s) => Ok(*s),
        Err(e) => Err(Error::Unsupported(format!(
            "CUDA driver at {path} lacks {name} ({e}); a driver for CUDA 11 or newer is needed"
        ))),
    }
}

impl Api {
    fn text(
        &self,
        f: unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult,
        r: CUresult,
    ) -> Option<String> {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName/String write a pointer to a static NUL-terminated string (or
        // fail for an unknown code) and need no context.
        if unsafe { f(r, &mut p) } != CUDA_SUCCESS || p.is_null() {
            return None;
        }
        // SAFETY: non-null, static and NUL-terminated per the driver's contract.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// `what: NAME (description)`, typed by the code.
    fn error(&self, r: CUresult, what: &str) -> Error {
        let name = self
            .text(self.cuGetErrorName, r)
            .unwrap_or_else(|| format!("CUresult {r}"));
        let msg = match self.text(self.cuGetErrorString, r) {
            Some(d) => format!("{what}: {name} ({d})"),
            None => format!("{what}: {name}"),
        };
        match r {
            CUDA_ERROR_OUT_OF_MEMORY => Error::MallocFailed(msg),
            CUDA_ERROR_INVALID_VALUE | CUDA_ERROR_INVALID_HANDLE => Error::InvalidParam(msg),
            CUDA_ERROR_NO_DEVICE => Error::Unsupported(msg),
            _ => Error::Failed(msg),
        }
    }

    fn check(&self, r: CUresult, what: &str) -> Result<()> {
        if r == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(self.error(r, what))
        }
    }
}

struct Alloc {
    len: usize,
    device: i32,
}

struct Opened {
    base: u64,
    len: usize,
    device: i32,
    /// Opens not closed yet (the driver counts opens of one handle in one context).
    opens: usize,
}

#[derive(Default)]
struct Tables {
    allocs: BTreeMap<u64, Alloc>,
    // Keyed by the driver's base address of the mapping.
    opened: BTreeMap<u64, Opened>,
    streams: HashSet<u64>,
    // Callers' stream handles seen to point at mapped memory (see check_stream_handle).
    foreign_streams: HashSet<u64>,
    // Event -> the context it was created in.
    events: HashMap<u64, usize>,
}

thread_local! {
    /// Set on threads that run work ordered on a caller's stream (see
    /// [`crate::device::stream_order`]): their synchronous copies must not use the legacy
    /// default stream, which may be the very stream waiting for them.
    static PRIVATE_STREAM_COPIES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes synchronous copies on this thread run on a private non-blocking stream.
pub(crate) fn use_private_stream_copies(on: bool) {
    PRIVATE_STREAM_COPIES.with(|c| c.set(on));
}

/// Whether this thread's synchronous copies run on a private stream (threads a job starts
/// inherit it).
pub(crate) fn private_stream_copies() -> bool {
    PRIVATE_STREAM_COPIES.with(|c| c.get())
}

/// Runs `f` with this thread's synchronous copies on a private non-blocking stream: for
/// copies that must not wait behind (or be ordered with) the legacy default stream, such as
/// the data server's, which a stream-ordered job of this process may be holding.
pub(crate) fn with_private_stream_copies<T>(f: impl FnOnce() -> T) -> T {
    let before = private_stream_copies();
    use_private_stream_copies(true);
    let out = f();
    use_private_stream_copies(before);
    out
}

/// Timeout of a synchronous copy on a private stream: longer than any copy takes.
const PRIVATE_COPY_TIMEOUT: Duration = Duration::from_secs(120);

unsafe extern "C" fn run_host_fn(data: *mut c_void) {
    // SAFETY: `data` is the Box leaked by `launch_host_func`, handed to the driver once, and
    // the driver calls this function exactly once with it.
    let f: Box<Box<dyn FnOnce() + Send>> = unsafe { Box::from_raw(data.cast()) };
    // A panic must not unwind into the driver.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
}

/// The CUDA backend.
pub struct Cuda {
    api: Api,
    path: String,
    driver_version: i32,
    count: i32,
    // Retained primary contexts by ordinal (0 = not retained yet).
    contexts: Mutex<Vec<usize>>,
    tables: Mutex<Tables>,
    /// Per device: the private non-blocking stream for copies of stream-ordered work.
    private_streams: Mutex<Vec<u64>>,
    /// Per device: `prepare_ordered_work` done.
    prepared: Mutex<Vec<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A context made current on this thread for one call; the previous one is restored on drop.
struct Current<'a> {
    api: &'a Api,
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        let mut old: CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed by `Cuda::enter` on this same thread.
        unsafe { (self.api.cuCtxPopCurrent_v2)(&mut old) };
    }
}

impl Cuda {
    /// Loads the driver from [`candidates`] and initialises it.
    pub fn load() -> Result<Cuda> {
        Self::load_from(&candidates())
    }

    /// Loads the driver from the first of `paths` that opens, and initialises it.
    ///
    /// Errors: `Unsupported` with "CUDA driver not found: tried ..." when none opens, or naming
    /// what failed next (a missing function, `cuInit`, no device).
    pub fn load_from(paths: &[PathBuf]) -> Result<Cuda> {
        let mut tried = Vec::new();
        for p in paths {
            let shown = p.display().to_string();
            // SAFETY: opening the driver runs its initializers, which have no preconditions.
            match unsafe { Library::new(p.as_os_str()) } {
                Ok(lib) => return Self::init(lib, shown),
                Err(e) => {
                    let msg = loader_message(&shown, &e);
                    tried.push((shown, msg));
                }
            }
        }
        Err(Error::Unsupported(format!(
            "CUDA driver not found: tried {} (install the NVIDIA driver, or set {LIBRARY_ENV})",
            tried_list(&tried)
        )))
    }

    fn init(lib: Library, path: String) -> Result<Cuda> {
        let api = Api::bind(lib, &path)?;
        // SAFETY: cuInit takes flags (must be 0) and may be called any number of times.
        let r = unsafe { (api.cuInit)(0) };
        if r != CUDA_SUCCESS {
            let e = api.error(r, "cuInit");
            return Err(Error::Unsupported(format!(
                "CUDA driver at {path}: {}",
                super::reason_of(e)
            )));
        }
        let mut version: c_int = 0;
        // SAFETY: writes one int.
        api.check(
            unsafe { (api.cuDriverGetVersion)(&mut version) },
            "cuDriverGetVersion",
        )?;
        let mut count: c_int = 0;
        // SAFETY: writes one int; the driver is initialised.
        api.check(
            unsafe { (api.cuDeviceGetCount)(&mut count) },
            "cuDeviceGetCount",
        )?;
        if count <= 0 {
            return Err(Error::Unsupported(format!(
                "CUDA driver at {path} sees no device"
            )));
        }
        Ok(Cuda {
            api,
            path,
            driver_version: version,
            count,
            contexts: Mutex::new(vec![0; count as usize]),
            tables: Mutex::new(Tables::default()),
            private_streams: Mutex::new(vec![0; count as usize]),
            prepared: Mutex::new(vec![false; count as usize]),
        })
    }

    /// The driver's CUDA version (e.g. 12040 for 12.4).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    fn ordinal(&self, device: i32) -> Result<usize> {
        if (0..self.count).contains(&device) {
            Ok(device as usize)
        } else {
            Err(Error::InvalidParam(format!(
                "CUDA device {device} does not exist ({} present)",
                self.count
            )))
        }
    }

    /// The primary context of `device`, retained on first use (and kept for the process).
    fn context(&self, device: i32) -> Result<CUcontext> {
        let i = self.ordinal(device)?;
        let mut ctxs = lock(&self.contexts);
        if ctxs[i] != 0 {
            return Ok(ctxs[i] as CUcontext);
        }
        let mut dev: CUdevice = 0;
        // SAFETY: writes one device handle; `device` is a valid ordinal.
        self.api.check(
            unsafe { (self.api.cuDeviceGet)(&mut dev, device) },
            "cuDeviceGet",
        )?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: writes one context handle for a valid device.
        self.api.check(
            unsafe { (self.api.cuDevicePrimaryCtxRetain)(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        ctxs[i] = ctx as usize;
        Ok(ctx)
    }

    /// A context this process already has, so that using it creates none: one this backend
    /// retained, else the calling thread's current one, else the primary context of a device
    /// someone else in the process (torch) made active; device 0's only when there is none.
    fn some_context(&self) -> Result<CUcontext> {
        if let Some(c) = lock(&self.contexts).iter().copied().find(|&c| c != 0) {
            return Ok(c as CUcontext);
        }
        if let Some(c) = self.current_context() {
            return Ok(c);
        }
        match (0..self.count).find(|&d| self.primary_active(d)) {
            Some(d) => self.context(d),
            None => self.context(0),
        }
    }

    /// The calling thread's current context, if it has one.
    fn current_context(&self) -> Option<CUcontext> {
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: writes one context handle (null when none is current).
        let r = unsafe { (self.api.cuCtxGetCurrent)(&mut ctx) };
        (r == CUDA_SUCCESS && !ctx.is_null()).then_some(ctx)
    }

    /// Whether `device`'s primary context is active in this process (retained by this
    /// backend or by anyone else, such as torch).
    fn primary_active(&self, device: i32) -> bool {
        let Ok(i) = self.ordinal(device) else {
            return false;
        };
        if lock(&self.contexts).get(i).is_some_and(|&c| c != 0) {
            return true;
        }
        let mut dev: CUdevice = 0;
        let (mut flags, mut active): (c_uint, c_int) = (0, 0);
        // SAFETY: a valid ordinal; the calls write one device handle, then flags and state.
        unsafe {
            (self.api.cuDeviceGet)(&mut dev, device) == CUDA_SUCCESS
                && (self.api.cuDevicePrimaryCtxGetState)(dev, &mut flags, &mut active)
                    == CUDA_SUCCESS
                && active != 0
        }
    }

    /// The device to map a peer's allocation in: `hint` (the peer's ordinal, which names the
    /// same GPU only where both processes see the same devices) when this process uses it
    /// already, else a device it uses (the mapping is reachable from there with peer access,
    /// which the open enables), else `hint` if it exists here, else 0. Never a new context
    /// where one in use will do.
    fn mapping_device(&self, hint: i32) -> i32 {
        if self.primary_active(hint) {
            return hint;
        }
        (0..self.count)
            .find(|&d| self.primary_active(d))
            .unwrap_or(if self.ordinal(hint).is_ok() { hint } else { 0 })
    }

    /// The context whose legacy default stream (handle 0) a caller means: the calling thread's
    /// current one (where its own work on "the default stream" goes), else `device`'s.
    fn legacy_stream_context(&self, device: i32) -> Result<CUcontext> {
        match self.current_context() {
            Some(c) => Ok(c),
            None => self.context(device),
        }
    }

    fn enter(&self, ctx: CUcontext) -> Result<Current<'_>> {
        // SAFETY: `ctx` is a live context (a retained primary context or a stream's context).
        self.api.check(
            unsafe { (self.api.cuCtxPushCurrent_v2)(ctx) },
            "cuCtxPushCurrent",
        )?;
        Ok(Current { api: &self.api })
    }

    fn enter_device(&self, device: i32) -> Result<Current<'_>> {
        self.enter(self.context(device)?)
    }

    fn stream_context(&self, stream: StreamHandle) -> Result<CUcontext> {
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: writes one context handle; an invalid stream is reported as an error code.
        self.api.check(
            unsafe { (self.api.cuStreamGetCtx)(stream.0 as CUstream, &mut ctx) },
            "cuStreamGetCtx",
        )?;
        Ok(ctx)
    }

    /// Enters the context a call on `stream` needs: the stream's own, or for the legacy
    /// default stream (0) the caller's current context, else that of `device`.
    fn enter_stream(&self, stream: StreamHandle, device: i32) -> Result<Current<'_>> {
        self.check_stream_handle(stream)?;
        if stream.0 == 0 {
            self.enter(self.legacy_stream_context(device)?)
        } else {
            self.enter(self.stream_context(stream)?)
        }
    }

    fn attribute(&self, attr: c_uint, addr: u64, out: *mut c_void) -> CUresult {
        // SAFETY: `out` points to a value of the type the attribute requires (MEMORY_TYPE:
        // unsigned int, DEVICE_ORDINAL: int, RANGE_START_ADDR: CUdeviceptr, RANGE_SIZE:
        // size_t); an unknown address is reported as an error code.
        unsafe { (self.api.cuPointerGetAttribute)(out, attr, addr) }
    }

    /// Asks the driver what kind of memory `addr` is, then runs `then` with that type while
    /// the context the question needed (if any) is still current.
    fn with_memory_type<R>(&self, addr: u64, then: impl FnOnce(c_uint) -> Option<R>) -> Option<R> {
        let mut ty: c_uint = 0;
        let out = &mut ty as *mut c_uint as *mut c_void;
        let mut r = self.attribute(CU_POINTER_ATTRIBUTE_MEMORY_TYPE, addr, out);
        // Held for the follow-up queries too: a driver that wants a current context for one
        // wants it for the others.
        let mut _fallback = None;
        if r == CUDA_ERROR_INVALID_CONTEXT {
            // Some drivers want a current context even for this query: one this process has
            // already, so that asking about an address creates none on another device.
            _fallback = Some(self.enter(self.some_context().ok()?).ok()?);
            r = self.attribute(CU_POINTER_ATTRIBUTE_MEMORY_TYPE, addr, out);
        }
        if r != CUDA_SUCCESS {
            return None;
        }
        then(ty)
    }

    /// Asks the driver which device `addr` lives on (memory of torch or other processes).
    fn query_device(&self, addr: u64) -> Option<i32> {
        self.with_memory_type(addr, |ty| {
            if ty != CU_MEMORYTYPE_DEVICE {
                return None;
            }
            let mut ord: c_int = -1;
            let out = &mut ord as *mut c_int as *mut c_void;
            let r = self.attribute(CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, addr, out);
            (r == CUDA_SUCCESS && ord >= 0).then_some(ord)
        })
    }

    fn device_side(&self, addr: u64) -> Result<i32> {
        self.device_of(addr)
            .ok_or_else(|| Error::InvalidParam(format!("{addr:#x} is not CUDA device memory")))
    }

    /// Refuses a stream handle that cannot be one: the driver dereferences handles, so a
    /// wrong int from a caller would crash the process inside it. Accepted: the special
    /// handles (0 legacy, 1 legacy, 2 per-thread), streams made here, and handles that point
    /// at mapped read-write memory (driver stream objects do; remembered once seen).
    fn check_stream_handle(&self, stream: StreamHandle) -> Result<()> {
        if stream.0 <= 2 {
            return Ok(());
        }
        {
            let t = lock(&self.tables);
            if t.streams.contains(&stream.0) || t.foreign_streams.contains(&stream.0) {
                return Ok(());
            }
        }
        crate::mem::regions::check_mapped_rw(stream.0, 64).map_err(|_| {
            Error::InvalidParam(format!(
                "{:#x} is not a CUDA stream handle (pass torch.cuda.current_stream(), a \
                 torch.cuda.Stream or its cuda_stream)",
                stream.0
            ))
        })?;
        lock(&self.tables).foreign_streams.insert(stream.0);
        Ok(())
    }

    /// [`Device::prepare_ordered_work`] for one device.
    fn prepare_device(&self, device: i32) -> Result<()> {
        let i = self.ordinal(device)?;
        if lock(&self.prepared).get(i).copied().unwrap_or(false) {
            return Ok(());
        }
        // Lazy module loading makes the first copy of each kind load code, which waits for
        // the whole device: do one of each now, on the private stream the work will use.
        let s = self.private_stream(device)?;
        let n = 4096;
        let a = self.alloc(device, n)?;
        let b = match self.alloc(device, n) {
            Ok(b) => b,
            Err(e) => {
                let _ = self.free(a);
                return Err(e);
            }
        };
        let mut host = vec![0u8; n];
        let h = host.as_mut_ptr() as u64;
        // SAFETY: `a`, `b` are `n`-byte allocations, `host` holds `n` bytes; all outlive the
        // synchronization below.
        let copied = unsafe {
            self.copy_async(Direction::HostToDevice, a, h, n, s)
                .and_then(|_| self.copy_async(Direction::DeviceToDevice, b, a, n, s))
                .and_then(|_| self.copy_async(Direction::DeviceToHost, h, b, n, s))
        }
        .and_then(|_| self.stream_synchronize(s, PRIVATE_COPY_TIMEOUT));
        let _ = self.free(a);
        let _ = self.free(b);
        copied?;
        if let Some(p) = lock(&self.prepared).get_mut(i) {
            *p = true;
        }
        Ok(())
    }

    /// The private non-blocking stream of `device`, made on first use (kept for the process).
    fn private_stream(&self, device: i32) -> Result<StreamHandle> {
        let i = self.ordinal(device)?;
        let mut ps = lock(&self.private_streams);
        if ps[i] == 0 {
            ps[i] = self.stream_create(device)?.0;
        }
        Ok(StreamHandle(ps[i]))
    }

    fn event_context(&self, event: EventHandle) -> Result<CUcontext> {
        lock(&self.tables)
            .events
            .get(&event.0)
            .map(|&c| c as CUcontext)
            .ok_or_else(|| {
                Error::InvalidParam(format!(
                    "CUDA event {:#x} was not recorded by this backend",
                    event.0
                ))
            })
    }

    /// A synchronous copy whose device side is on `dev`.
    ///
    /// # Safety
    /// As for [`Device::copy`].
    unsafe fn copy_sync_on(
        &self,
        dev: i32,
        dir: Direction,
        dst: u64,
        src: u64,
        len: usize,
    ) -> Result<()> {
        if PRIVATE_STREAM_COPIES.with(|c| c.get()) {
            let s = self.private_stream(dev)?;
            // SAFETY: forwarded from the caller; the copy is complete when this returns.
            unsafe { self.copy_async_on(dev, dir, dst, src, len, s)? };
            return self.stream_synchronize(s, PRIVATE_COPY_TIMEOUT);
        }
        let _g = self.enter_device(dev)?;
        // SAFETY: the caller guarantees valid ranges of `len` bytes on both sides (trait
        // contract); the driver checks that the device side is device memory.
        let r = unsafe {
            match dir {
                Direction::HostToDevice => {
                    (self.api.cuMemcpyHtoD_v2)(dst, src as *const c_void, len)
                }
                Direction::DeviceToHost => (self.api.cuMemcpyDtoH_v2)(dst as *mut c_void, src, len),
                Direction::DeviceToDevice => (self.api.cuMemcpyDtoD_v2)(dst, src, len),
            }
        };
        self.api
            .check(r, &format!("CUDA copy {dir:?} of {len} bytes"))
    }

    /// A copy on `stream` whose device side is on `dev`.
    ///
    /// # Safety
    /// As for [`Device::copy_async`].
    unsafe fn copy_async_on(
        &self,
        dev: i32,
        dir: Direction,
        dst: u64,
        src: u64,
        len: usize,
        stream: StreamHandle,
    ) -> Result<()> {
        let _g = self.enter_stream(stream, dev)?;
        let s = stream.0 as CUstream;
        // SAFETY: the caller keeps both ranges valid until the stream has run the copy (trait
        // contract); the stream's context is current.
        let r = unsafe {
            match dir {
                Direction::HostToDevice => {
                    (self.api.cuMemcpyHtoDAsync_v2)(dst, src as *const c_void, len, s)
                }
                Direction::DeviceToHost => {
                    (self.api.cuMemcpyDtoHAsync_v2)(dst as *mut c_void, src, len, s)
                }
                Direction::DeviceToDevice => (self.api.cuMemcpyDtoDAsync_v2)(dst, src, len, s),
            }
        };
        self.api
            .check(r, &format!("CUDA async copy {dir:?} of {len} bytes"))
    }
}

fn containing<V>(map: &BTreeMap<u64, V>, addr: u64, len: impl Fn(&V) -> usize) -> Option<u64> {
    let (&start, v) = map.range(..=addr).next_back()?;
    (addr - start < len(v) as u64).then_some(start)
}

fn device_ptr_side(dir: Direction, dst: u64, src: u64) -> u64 {
    match dir {
        Direction::HostToDevice | Direction::DeviceToDevice => dst,
        Direction::DeviceToHost => src,
    }
}

impl Device for Cuda {
    fn kind(&self) -> Kind {
        Kind::Cuda
    }

    fn library(&self) -> Option<String> {
        Some(self.path.clone())
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let mut out = Vec::with_capacity(self.count as usize);
        for id in 0..self.count {
            let mut dev: CUdevice = 0;
            // SAFETY: writes one device handle; `id` is below the device count.
            self.api.check(
                unsafe { (self.api.cuDeviceGet)(&mut dev, id) },
                "cuDeviceGet",
            )?;
            let mut name = [0 as c_char; 256];
            // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `name`.
            self.api.check(
                unsafe { (self.api.cuDeviceGetName)(name.as_mut_ptr(), name.len() as c_int, dev) },
                "cuDeviceGetName",
            )?;
            // SAFETY: NUL-terminated within the buffer (above).
            let name = unsafe { CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            let mut bytes: usize = 0;
            // SAFETY: writes one size_t.
            self.api.check(
                unsafe { (self.api.cuDeviceTotalMem_v2)(&mut bytes, dev) },
                "cuDeviceTotalMem",
            )?;
            out.push(DeviceInfo {
                id,
                name,
                memory: bytes as u64,
            });
        }
        Ok(out)
    }

    fn alloc(&self, device: i32, len: usize) -> Result<u64> {
        if len == 0 {
            return Err(Error::InvalidParam("allocation of 0 bytes".into()));
        }
        let _g = self.enter_device(device)?;
        let mut p: CUdeviceptr = 0;
        // SAFETY: writes one device pointer; a context is current.
        self.api.check(
            unsafe { (self.api.cuMemAlloc_v2)(&mut p, len) },
            &format!("cuMemAlloc of {len} bytes on CUDA device {device}"),
        )?;
        lock(&self.tables).allocs.insert(p, Alloc { len, device });
        Ok(p)
    }

    fn pinned_alloc(&self, device: i32, len: usize) -> Result<u64> {
        if len == 0 {
            return Err(Error::InvalidParam("allocation of 0 bytes".into()));
        }
        // Portable: page-locked for every context, whichever device copies from it.
        const CU_MEMHOSTALLOC_PORTABLE: c_uint = 0x01;
        let _g = self.enter_device(device)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer; a context is current.
        self.api.check(
            unsafe { (self.api.cuMemHostAlloc)(&mut p, len, CU_MEMHOSTALLOC_PORTABLE) },
            &format!("cuMemHostAlloc of {len} bytes"),
        )?;
        Ok(p as u64)
    }

    unsafe fn pinned_free(&self, device: i32, ptr: u64) -> Result<()> {
        let _g = self.enter_device(device)?;
        // SAFETY: the caller passes memory from cuMemHostAlloc above, freed once.
        self.api.check(
            unsafe { (self.api.cuMemFreeHost)(ptr as *mut c_void) },
            "cuMemFreeHost",
        )
    }

    fn pinned_range_of(&self, addr: u64) -> Option<(u64, usize)> {
        self.with_memory_type(addr, |ty| {
            if ty != CU_MEMORYTYPE_HOST {
                return None;
            }
            let mut start: CUdeviceptr = 0;
            let mut size: usize = 0;
            let r1 = self.attribute(
                CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                addr,
                &mut start as *mut CUdeviceptr as *mut c_void,
            );
            let r2 = self.attribute(
                CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                addr,
                &mut size as *mut usize as *mut c_void,
            );
            let inside = start <= addr && addr - start < size as u64;
            (r1 == CUDA_SUCCESS && r2 == CUDA_SUCCESS && inside).then_some((start, size))
        })
    }

    unsafe fn host_register(&self, device: i32, addr: u64, len: usize) -> Result<u64> {
        if len == 0 {
            return Err(Error::InvalidParam("registration of 0 bytes".into()));
        }
        // Portable: for every context; device-mapped: the device may load and store it.
        const CU_MEMHOSTREGISTER_PORTABLE: c_uint = 0x01;
        const CU_MEMHOSTREGISTER_DEVICEMAP: c_uint = 0x02;
        let _g = self.enter_device(device)?;
        let host = addr as *mut c_void;
        // SAFETY: the caller keeps `addr..addr + len` mapped until it is unregistered.
        self.api.check(
            unsafe {
                (self.api.cuMemHostRegister_v2)(
                    host,
                    len,
                    CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP,
                )
            },
            &format!("cuMemHostRegister of {len} bytes at {addr:#x}"),
        )?;
        let mut dva: CUdeviceptr = 0;
        // SAFETY: writes one device pointer for memory registered just above.
        let r = unsafe { (self.api.cuMemHostGetDevicePointer_v2)(&mut dva, host, 0) };
        if let Err(e) = self.api.check(r, "cuMemHostGetDevicePointer") {
            // SAFETY: registered above and not handed out.
            unsafe { (self.api.cuMemHostUnregister)(host) };
            return Err(e);
        }
        Ok(dva)
    }

    unsafe fn host_unregister(&self, device: i32, addr: u64) -> Result<()> {
        let _g = self.enter_device(device)?;
        // SAFETY: the caller passes an address registered above, unregistered once.
        self.api.check(
            unsafe { (self.api.cuMemHostUnregister)(addr as *mut c_void) },
            "cuMemHostUnregister",
        )
    }

    fn free(&self, ptr: u64) -> Result<()> {
        let a = lock(&self.tables).allocs.remove(&ptr).ok_or_else(|| {
            Error::InvalidParam(format!("{ptr:#x} was not returned by this backend's alloc"))
        })?;
        let _g = self.enter_device(a.device)?;
        // SAFETY: `ptr` came from cuMemAlloc here and was just removed from the table, so it
        // is freed once.
        self.api
            .check(unsafe { (self.api.cuMemFree_v2)(ptr) }, "cuMemFree")
    }

    unsafe fn copy(&self, dir: Direction, dst: u64, src: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let dev = self.device_side(device_ptr_side(dir, dst, src))?;
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_on_device(dev, dir, dst, src, len, None) }
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
        let dev = self.device_side(device_ptr_side(dir, dst, src))?;
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_on_device(dev, dir, dst, src, len, Some(stream)) }
    }

    /// Each look at memory this backend did not allocate (torch's) is a driver call or two:
    /// `copy_between` passes the device it found, so no copy looks twice.
    unsafe fn copy_on_device(
        &self,
        device: i32,
        dir: Direction,
        dst: u64,
        src: u64,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: forwarded from the caller.
        unsafe {
            match stream {
                Some(s) => self.copy_async_on(device, dir, dst, src, len, s),
                None => self.copy_sync_on(device, dir, dst, src, len),
            }
        }
    }

    fn stream_create(&self, device: i32) -> Result<StreamHandle> {
        let _g = self.enter_device(device)?;
        let mut s: CUstream = std::ptr::null_mut();
        // SAFETY: writes one stream handle; a context is current.
        self.api.check(
            unsafe { (self.api.cuStreamCreate)(&mut s, CU_STREAM_NON_BLOCKING) },
            "cuStreamCreate",
        )?;
        lock(&self.tables).streams.insert(s as u64);
        Ok(StreamHandle(s as u64))
    }

    fn stream_synchronize(&self, stream: StreamHandle, timeout: Duration) -> Result<()> {
        let _g = self.enter_stream(stream, 0)?;
        // Polled rather than cuStreamSynchronize so that the wait has a deadline.
        poll_until(timeout, "CUDA stream synchronize", || {
            // SAFETY: queries a stream handle; an invalid one is reported as an error code.
            match unsafe { (self.api.cuStreamQuery)(stream.0 as CUstream) } {
                CUDA_SUCCESS => Ok(true),
                CUDA_ERROR_NOT_READY => Ok(false),
                r => Err(self.api.error(r, "cuStreamQuery")),
            }
        })
    }

    fn stream_destroy(&self, stream: StreamHandle) -> Result<()> {
        if !lock(&self.tables).streams.remove(&stream.0) {
            return Err(Error::InvalidParam(format!(
                "CUDA stream {:#x} was not created by this backend",
                stream.0
            )));
        }
        let _g = self.enter(self.stream_context(stream)?)?;
        // SAFETY: a stream created here, removed from the table so destroyed once; queued
        // work still completes (driver semantics).
        self.api.check(
            unsafe { (self.api.cuStreamDestroy_v2)(stream.0 as CUstream) },
            "cuStreamDestroy",
        )
    }

    fn event_record(&self, stream: StreamHandle) -> Result<EventHandle> {
        self.check_stream_handle(stream)?;
        let ctx = if stream.0 == 0 {
            self.legacy_stream_context(0)?
        } else {
            self.stream_context(stream)?
        };
        let _g = self.enter(ctx)?;
        let mut ev: CUevent = std::ptr::null_mut();
        // SAFETY: writes one event handle; a context is current.
        self.api.check(
            unsafe { (self.api.cuEventCreate)(&mut ev, CU_EVENT_DISABLE_TIMING) },
            "cuEventCreate",
        )?;
        // SAFETY: a fresh event and a stream of the current context.
        let r = unsafe { (self.api.cuEventRecord)(ev, stream.0 as CUstream) };
        if r != CUDA_SUCCESS {
            // SAFETY: the event was created above and is not shared.
            unsafe { (self.api.cuEventDestroy_v2)(ev) };
            return Err(self.api.error(r, "cuEventRecord"));
        }
        lock(&self.tables).events.insert(ev as u64, ctx as usize);
        Ok(EventHandle(ev as u64))
    }

    fn event_query(&self, event: EventHandle) -> Result<bool> {
        let _g = self.enter(self.event_context(event)?)?;
        // SAFETY: an event created by this backend and not destroyed (it is in the table).
        match unsafe { (self.api.cuEventQuery)(event.0 as CUevent) } {
            CUDA_SUCCESS => Ok(true),
            CUDA_ERROR_NOT_READY => Ok(false),
            r => Err(self.api.error(r, "cuEventQuery")),
        }
    }

    fn event_synchronize(&self, event: EventHandle, timeout: Duration) -> Result<()> {
        let _g = self.enter(self.event_context(event)?)?;
        poll_until(timeout, "CUDA event synchronize", || {
            // SAFETY: as in `event_query`.
            match unsafe { (self.api.cuEventQuery)(event.0 as CUevent) } {
                CUDA_SUCCESS => Ok(true),
                CUDA_ERROR_NOT_READY => Ok(false),
                r => Err(self.api.error(r, "cuEventQuery")),
            }
        })
    }

    fn event_destroy(&self, event: EventHandle) -> Result<()> {
        let ctx = lock(&self.tables).events.remove(&event.0).ok_or_else(|| {
            Error::InvalidParam(format!(
                "CUDA event {:#x} was not recorded by this backend",
                event.0
            ))
        })?;
        let _g = self.enter(ctx as CUcontext)?;
        // SAFETY: an event created here, removed from the table so destroyed once.
        self.api.check(
            unsafe { (self.api.cuEventDestroy_v2)(event.0 as CUevent) },
            "cuEventDestroy",
        )
    }

    fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.event_context(event)?;
        let _g = self.enter_stream(stream, 0)?;
        // SAFETY: a live event of this backend and a stream of the current context; the
        // event may belong to another context (allowed by the driver).
        self.api.check(
            unsafe { (self.api.cuStreamWaitEvent)(stream.0 as CUstream, event.0 as CUevent, 0) },
            "cuStreamWaitEvent",
        )
    }

    fn prepare_ordered_work(&self, device: i32) -> Result<()> {
        // The work may copy on any device this process uses, whichever stream it is ordered
        // on; a device nobody here uses holds no memory the work could touch, and preparing
        // it would give the process a context there (hundreds of MiB on every GPU of a host).
        let in_use: Vec<i32> = (0..self.count)
            .filter(|&d| self.primary_active(d))
            .collect();
        if in_use.is_empty() {
            return self.prepare_device(device);
        }
        for d in in_use {
            self.prepare_device(d)?;
        }
        Ok(())
    }

    fn launch_host_func(&self, stream: StreamHandle, f: Box<dyn FnOnce() + Send>) -> Result<()> {
        let _g = self.enter_stream(stream, 0)?;
        let data = Box::into_raw(Box::new(f));
        // SAFETY: `run_host_fn` takes back the box exactly once when the driver calls it.
        let r =
            unsafe { (self.api.cuLaunchHostFunc)(stream.0 as CUstream, run_host_fn, data.cast()) };
        if r != CUDA_SUCCESS {
            // SAFETY: the driver refused the launch, so it will never call `run_host_fn`; the
            // box is still ours.
            drop(unsafe { Box::from_raw(data) });
            return Err(self.api.error(r, "cuLaunchHostFunc"));
        }
        Ok(())
    }

    fn ipc_export(&self, ptr: u64) -> Result<IpcHandle> {
        let dev = self.device_side(ptr)?;
        let _g = self.enter_device(dev)?;
        let mut base: CUdeviceptr = 0;
        let mut size: usize = 0;
        // SAFETY: writes the allocation's base and size; `ptr` is device memory.
        self.api.check(
            unsafe { (self.api.cuMemGetAddressRange_v2)(&mut base, &mut size, ptr) },
            "cuMemGetAddressRange",
        )?;
        let mut h = CUipcMemHandle {
            reserved: [0; IPC_HANDLE_LEN],
        };
        // SAFETY: writes one handle for the base of a cuMemAlloc'd allocation.
        self.api.check(
            unsafe { (self.api.cuIpcGetMemHandle)(&mut h, base) },
            "cuIpcGetMemHandle",
        )?;
        let mut bytes: Vec<u8> = h.reserved.iter().map(|&c| c as u8).collect();
        bytes.extend_from_slice(&(ptr - base).to_le_bytes());
        bytes.extend_from_slice(&(size as u64).to_le_bytes());
        Ok(IpcHandle {
            kind: Kind::Cuda,
            device: dev,
            bytes,
        })
    }

    fn ipc_place(&self, handle: &IpcHandle) -> Result<IpcPlace> {
        if handle.kind != Kind::Cuda || handle.bytes.len() != IPC_LEN {
            return Err(Error::InvalidParam(format!(
                "not a CUDA IPC handle ({} handle of {} bytes)",
                handle.kind.name(),
                handle.bytes.len()
            )));
        }
        // Layout: the driver's handle (names the allocation), u64 offset, u64 allocation size.
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&handle.bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let (offset, len) = (word(IPC_HANDLE_LEN), word(IPC_HANDLE_LEN + 8));
        let mut whole = handle.clone();
        whole.bytes[IPC_HANDLE_LEN..IPC_HANDLE_LEN + 8].fill(0);
        Ok(IpcPlace { whole, offset, len })
    }

    fn ipc_open(&self, handle: &IpcHandle, device: i32) -> Result<u64> {
        if handle.kind != Kind::Cuda || handle.bytes.len() != IPC_LEN {
            return Err(Error::InvalidParam(format!(
                "not a CUDA IPC handle ({} handle of {} bytes)",
                handle.kind.name(),
                handle.bytes.len()
            )));
        }
        let mut h = CUipcMemHandle {
            reserved: [0; IPC_HANDLE_LEN],
        };
        for (d, s) in h.reserved.iter_mut().zip(&handle.bytes[..IPC_HANDLE_LEN]) {
            *d = *s as c_char;
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&handle.bytes[IPC_HANDLE_LEN..IPC_HANDLE_LEN + 8]);
        let offset = u64::from_le_bytes(word);
        word.copy_from_slice(&handle.bytes[IPC_HANDLE_LEN + 8..]);
        let len = u64::from_le_bytes(word);
        if offset >= len {
            return Err(Error::InvalidParam(format!(
                "IPC handle offset {offset} is outside its {len}-byte allocation"
            )));
        }
        let device = self.mapping_device(device);
        let _g = self.enter_device(device)?;
        let mut base: CUdeviceptr = 0;
        // SAFETY: writes one device pointer; the handle is passed by value as cuda.h declares.
        self.api.check(
            unsafe {
                (self.api.cuIpcOpenMemHandle_v2)(&mut base, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
            },
            "cuIpcOpenMemHandle",
        )?;
        // The length came from the peer with the handle: the mapping the driver made says
        // how large the allocation really is.
        let mut start: CUdeviceptr = 0;
        let mut size: usize = 0;
        // SAFETY: writes the mapping's base and size; `base` was just mapped.
        let r = unsafe { (self.api.cuMemGetAddressRange_v2)(&mut start, &mut size, base) };
        if r != CUDA_SUCCESS || (size as u64) < len {
            // SAFETY: `base` was opened above and is not in the table: closed once, here.
            unsafe { (self.api.cuIpcCloseMemHandle)(base) };
            return Err(if r != CUDA_SUCCESS {
                self.api.error(r, "cuMemGetAddressRange of an IPC mapping")
            } else {
                Error::Protocol(format!(
                    "IPC handle claims a {len}-byte allocation; the driver mapped {size} bytes"
                ))
            });
        }
        // Opening a handle this context has open already returns the same base and counts
        // the open: each open is closed once.
        lock(&self.tables)
            .opened
            .entry(base)
            .and_modify(|o| o.opens += 1)
            .or_insert(Opened {
                base,
                len: len as usize,
                device,
                opens: 1,
            });
        Ok(base + offset)
    }

    fn ipc_close(&self, ptr: u64) -> Result<()> {
        let (base, device) = {
            let mut t = lock(&self.tables);
            let start = containing(&t.opened, ptr, |o| o.len).ok_or_else(|| {
                Error::InvalidParam(format!("{ptr:#x} was not returned by ipc_open"))
            })?;
            let Some(o) = t.opened.get_mut(&start) else {
                return Err(Error::InvalidParam(format!(
                    "{ptr:#x} was not returned by ipc_open"
                )));
            };
            o.opens -= 1;
            let found = (o.base, o.device);
            if o.opens == 0 {
                t.opened.remove(&start);
            }
            found
        };
        let _g = self.enter_device(device)?;
        // SAFETY: a base returned by cuIpcOpenMemHandle here; the table counted this open, so
        // each open is closed once.
        self.api.check(
            unsafe { (self.api.cuIpcCloseMemHandle)(base) },
            "cuIpcCloseMemHandle",
        )
    }

    fn allocation_of(&self, addr: u64) -> Option<(u64, usize)> {
        let dev = self.device_of(addr)?;
        let _g = self.enter_device(dev).ok()?;
        let mut base: CUdeviceptr = 0;
        let mut size: usize = 0;
        // SAFETY: writes the allocation's base and size; an address that is not device
        // memory is reported as an error code.
        let r = unsafe { (self.api.cuMemGetAddressRange_v2)(&mut base, &mut size, addr) };
        (r == CUDA_SUCCESS).then_some((base, size))
    }

    fn device_of(&self, addr: u64) -> Option<i32> {
        {
            let t = lock(&self.tables);
            if let Some(s) = containing(&t.allocs, addr, |a| a.len) {
                return t.allocs.get(&s).map(|a| a.device);
            }
            if let Some(s) = containing(&t.opened, addr, |o| o.len) {
                return t.opened.get(&s).map(|o| o.device);
            }
        }
        self.query_device(addr)
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // Best effort: release what this backend made, then the primary contexts.
        let t = std::mem::take(&mut *lock(&self.tables));
        for (&ev, &ctx) in &t.events {
            if let Ok(_g) = self.enter(ctx as CUcontext) {
                // SAFETY: an event created here and not destroyed yet.
                unsafe { (self.api.cuEventDestroy_v2)(ev as CUevent) };
            }
        }
        for &s in &t.streams {
            if let Ok(ctx) = self.stream_context(StreamHandle(s)) {
                if let Ok(_g) = self.enter(ctx) {
                    // SAFETY: a stream created here and not destroyed yet.
                    unsafe { (self.api.cuStreamDestroy_v2)(s as CUstream) };
                }
            }
        }
        for (p, a) in &t.allocs {
            if let Ok(_g) = self.enter_device(a.device) {
                // SAFETY: allocated here and not freed yet.
                unsafe { (self.api.cuMemFree_v2)(*p) };
            }
        }
        for o in t.opened.values() {
            if let Ok(_g) = self.enter_device(o.device) {
                for _ in 0..o.opens {
                    // SAFETY: opened here `opens` times and not closed yet.
                    unsafe { (self.api.cuIpcCloseMemHandle)(o.base) };
                }
            }
        }
        let ctxs = std::mem::take(&mut *lock(&self.contexts));
        for (i, &c) in ctxs.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let mut dev: CUdevice = 0;
            // SAFETY: valid ordinal; releases the retain made by `context`.
            unsafe {
                if (self.api.cuDeviceGet)(&mut dev, i as c_int) == CUDA_SUCCESS {
                    (self.api.cuDevicePrimaryCtxRelease_v2)(dev);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_honour_the_override() {
        assert_eq!(
            candidates_from(Some("/opt/nv/libcuda.so.1".into())),
            vec![PathBuf::from("/opt/nv/libcuda.so.1")]
        );
        assert_eq!(
            candidates_from(Some("".into())),
            vec![PathBuf::from("libcuda.so.1"), PathBuf::from("libcuda.so")]
        );
        assert_eq!(candidates_from(None).len(), 2);
    }

    #[test]
    fn a_missing_driver_is_unsupported_and_named() {
        let paths = [
            PathBuf::from("/nonexistent/libcuda.so.1"),
            PathBuf::from("/nonexistent/other/libcuda.so"),
        ];
        let e = Cuda::load_from(&paths).err().expect("no driver there");
        assert_eq!(e.code(), -3006);
        let msg = e.to_string();
        assert!(msg.contains("CUDA driver not found: tried "), "{msg}");
        assert!(msg.contains("/nonexistent/libcuda.so.1 ("), "{msg}");
        assert!(msg.contains("/nonexistent/other/libcuda.so ("), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        assert!(msg.contains(LIBRARY_ENV), "{msg}");
    }

    #[test]
    fn a_library_that_is_not_the_driver_is_refused_by_symbol() {
        let e = Cuda::load_from(&[PathBuf::from("libc.so.6")])
            .err()
            .expect("libc is no driver");
        assert_eq!(e.code(), -3006);
        assert!(e.to_string().contains("lacks cuInit"), "{e}");
    }
}

/// Checks that need a GPU: each returns at once (passing, with a note on stderr) where the
/// driver cannot be loaded, and runs for real where it can
/// (`cargo test -p memfabric --lib device::cuda::gpu -- --nocapture`).
#[cfg(test)]
mod gpu {
    use super::*;

    const T: Duration = Duration::from_secs(30);
    /// Set in the child process of the IPC check: the exported handle, hex-encoded.
    const IPC_ENV: &str = "MF_TEST_CUDA_IPC_HANDLE";

    fn cuda() -> Option<Cuda> {
        match Cuda::load() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("GPU check skipped: {e}");
                None
            }
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn from_hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn gpu_pinned_staging_buffers_round_trip_and_are_reused() {
        let Some(c) = cuda() else { return };
        let dev: std::sync::Arc<dyn Device> = std::sync::Arc::new(c);
        let n = crate::device::staging::STAGE_BYTES;
        let d = dev.alloc(0, n).unwrap();
        let data = pattern(n, 5);
        let first_addr;
        {
            let mut stage = crate::device::staging::StageBuffer::take(&dev, 0, n);
            assert!(stage.pinned(), "cuMemHostAlloc gave no staging buffer");
            first_addr = stage.addr();
            stage.slice_mut(n).copy_from_slice(&data);
            // SAFETY: both ranges are `n` bytes: the device allocation and the stage.
            unsafe { dev.copy_between(d, stage.addr(), n, None).unwrap() };
            stage.slice_mut(n).fill(0);
            // SAFETY: as above.
            unsafe { dev.copy_between(stage.addr(), d, n, None).unwrap() };
            assert!(stage.slice_mut(n) == &data[..]);
        }
        let mut again = crate::device::staging::StageBuffer::take(&dev, 0, n);
        assert_eq!(again.addr(), first_addr, "a pinned buffer was not reused");
        dev.free(d).unwrap();
        // The backend's pair on its own: pinned memory is host memory, written and freed.
        let p = dev.pinned_alloc(0, 4096).unwrap();
        assert_eq!(dev.device_of(p), None);
        // SAFETY: 4096 bytes just allocated here, freed once below.
        unsafe {
            std::ptr::write_bytes(p as *mut u8, 0xA5, 4096);
            dev.pinned_free(0, p).unwrap();
        }
    }

    #[test]
    fn gpu_pinned_ranges_are_found_and_nothing_else_is() {
        let Some(c) = cuda() else { return };
        let n = 3 << 20;
        let p = c.pinned_alloc(0, n).unwrap();
        let (start, size) = c.pinned_range_of(p + 12345).expect("cuMemHostAlloc memory");
        assert!(
            start <= p && p + n as u64 <= start + size as u64,
            "{start:#x}+{size} vs {p:#x}+{n}"
        );
        let pageable = vec![1u8; n];
        assert_eq!(c.pinned_range_of(pageable.as_ptr() as u64), None);
        let dev = c.alloc(0, n).unwrap();
        assert_eq!(c.pinned_range_of(dev), None);
        let backing = vec![0u8; n + 4096];
        let skip = backing.as_ptr().align_offset(4096);
        let addr = backing[skip..].as_ptr() as u64;
        // SAFETY: `backing` outlives the registration, undone below.
        unsafe { c.host_register(0, addr, n) }.unwrap();
        let (start, size) = c.pinned_range_of(addr + 7).expect("registered memory");
        assert!(start <= addr && addr + n as u64 <= start + size as u64);
        // SAFETY: registered above, no device work on it.
        unsafe { c.host_unregister(0, addr) }.unwrap();
        assert_eq!(
            c.pinned_range_of(addr + 7),
            None,
            "unregistered memory is pageable again"
        );
        c.free(dev).unwrap();
        // SAFETY: from pinned_alloc above, freed once.
        unsafe { c.pinned_free(0, p) }.unwrap();
    }

    #[test]
    fn gpu_registered_host_memory_is_reached_by_its_device_address() {
        let Some(c) = cuda() else { return };
        let n = 1 << 20;
        let page = 4096;
        let mut backing = vec![0u8; n + page];
        let skip = backing.as_ptr().align_offset(page);
        let host = &mut backing[skip..skip + n];
        host.copy_from_slice(&pattern(n, 9));
        let addr = host.as_ptr() as u64;
        // SAFETY: `host` outlives the registration, undone below.
        let dva = unsafe { c.host_register(0, addr, n) }.unwrap();
        // SAFETY: as above; a second registration of the same range is refused, not crashed.
        assert!(unsafe { c.host_register(0, addr, n) }.is_err());
        let dev = c.alloc(0, n).unwrap();
        // A device-side copy between `dev` and the registered range, by the DVA.
        let device_copy = |dst: u64, src: u64, what: &str| {
            let _g = c.enter_device(0).unwrap();
            // SAFETY: both sides are `n` bytes: `dev` allocated, the range registered.
            c.api
                .check(unsafe { (c.api.cuMemcpyDtoD_v2)(dst, src, n) }, what)
                .unwrap();
        };
        device_copy(dev, dva, "read by DVA");
        let mut back = vec![0u8; n];
        // SAFETY: `back` is `n` bytes, `dev` an `n`-byte allocation.
        unsafe {
            c.copy(Direction::DeviceToHost, back.as_mut_ptr() as u64, dev, n)
                .unwrap();
        }
        assert!(
            back == pattern(n, 9),
            "the device read other bytes by the DVA"
        );
        let fresh = pattern(n, 77);
        // SAFETY: `fresh` is `n` bytes, `dev` an `n`-byte allocation.
        unsafe {
            c.copy(Direction::HostToDevice, dev, fresh.as_ptr() as u64, n)
                .unwrap();
        }
        device_copy(dva, dev, "write by DVA");
        // SAFETY: registered above; no device work is left on it (the copies were synchronous).
        unsafe { c.host_unregister(0, addr) }.unwrap();
        assert!(
            backing[skip..skip + n] == fresh[..],
            "the host missed the device's write"
        );
        c.free(dev).unwrap();
    }

    #[test]
    fn gpu_alloc_and_copies_in_every_direction() {
        let Some(c) = cuda() else { return };
        let devs = c.devices().unwrap();
        assert!(!devs.is_empty());
        assert!(devs.iter().all(|d| !d.name.is_empty() && d.memory > 0));
        let n = 8 << 20;
        let a = c.alloc(0, n).unwrap();
        let b = c.alloc(0, n).unwrap();
        assert_eq!(c.device_of(a), Some(0));
        assert_eq!(c.device_of(a + n as u64 - 1), Some(0));
        let src = pattern(n, 5);
        assert_eq!(c.device_of(src.as_ptr() as u64), None);
        let mut dst = vec![0u8; n];
        // SAFETY: `src`/`dst` are `n`-byte host buffers, `a`/`b` `n`-byte allocations.
        unsafe {
            c.copy(Direction::HostToDevice, a, src.as_ptr() as u64, n)
                .unwrap();
            c.copy(Direction::DeviceToDevice, b, a, n).unwrap();
            c.copy(Direction::DeviceToHost, dst.as_mut_ptr() as u64, b, n)
                .unwrap();
        }
        assert!(dst == src, "H2D -> D2D -> D2H changed the bytes");
        // Interior pointers work; a host address as the device side is refused, not crashed.
        let mut part = vec![0u8; 4096];
        // SAFETY: 4096 bytes inside `b`; `part` is 4096 bytes.
        unsafe {
            c.copy(
                Direction::DeviceToHost,
                part.as_mut_ptr() as u64,
                b + 12345,
                4096,
            )
            .unwrap();
        }
        assert_eq!(part, src[12345..12345 + 4096]);
        // SAFETY: refused before any copy (the device side is not device memory).
        let e = unsafe {
            c.copy(
                Direction::HostToDevice,
                part.as_mut_ptr() as u64,
                src.as_ptr() as u64,
                16,
            )
        }
        .unwrap_err();
        assert_eq!(e.code(), -2000);
        assert_eq!(c.free(a + 1).unwrap_err().code(), -2000);
        c.free(a).unwrap();
        assert_eq!(c.free(a).unwrap_err().code(), -2000);
        c.free(b).unwrap();
        assert_eq!(c.alloc(c.count, 16).unwrap_err().code(), -2000);
    }

    #[test]
    fn gpu_streams_and_events_order_copies() {
        let Some(c) = cuda() else { return };
        let n = 64 << 20;
        let a = c.alloc(0, n).unwrap();
        let b = c.alloc(0, n).unwrap();
        let src = pattern(n, 9);
        let mut dst = vec![0u8; n];
        let s1 = c.stream_create(0).unwrap();
        let s2 = c.stream_create(0).unwrap();
        // SAFETY: all buffers outlive the synchronizations below.
        unsafe {
            c.copy_async(Direction::HostToDevice, a, src.as_ptr() as u64, n, s1)
                .unwrap();
            c.copy_async(Direction::DeviceToDevice, b, a, n, s1)
                .unwrap();
        }
        let ev = c.event_record(s1).unwrap();
        // s2 reads `b` only after s1's copies, through the event.
        c.stream_wait_event(s2, ev).unwrap();
        // SAFETY: as above.
        unsafe {
            c.copy_async(Direction::DeviceToHost, dst.as_mut_ptr() as u64, b, n, s2)
                .unwrap();
        }
        let ev2 = c.event_record(s2).unwrap();
        c.event_synchronize(ev2, T).unwrap();
        assert!(c.event_query(ev).unwrap() && c.event_query(ev2).unwrap());
        c.stream_synchronize(s1, T).unwrap();
        c.stream_synchronize(s2, T).unwrap();
        assert!(dst == src, "stream-ordered copies changed the bytes");
        for e in [ev, ev2] {
            c.event_destroy(e).unwrap();
        }
        assert_eq!(c.event_query(ev).unwrap_err().code(), -2000);
        c.stream_destroy(s1).unwrap();
        c.stream_destroy(s2).unwrap();
        assert_eq!(c.stream_destroy(s1).unwrap_err().code(), -2000);
        c.free(a).unwrap();
        c.free(b).unwrap();
    }

    #[test]
    fn gpu_ipc_between_processes() {
        let Some(c) = cuda() else { return };
        let n = 4 << 20;
        let a = c.alloc(0, n).unwrap();
        let src = pattern(n, 77);
        // SAFETY: `n`-byte buffers on both sides.
        unsafe {
            c.copy(Direction::HostToDevice, a, src.as_ptr() as u64, n)
                .unwrap()
        };
        let h = c.ipc_export(a + 4096).unwrap();
        assert_eq!(h.bytes.len(), IPC_LEN);
        let place = c.ipc_place(&h).unwrap();
        assert_eq!((place.offset, place.len), (4096, n as u64));
        assert_eq!(
            c.ipc_place(&c.ipc_export(a).unwrap()).unwrap().whole,
            place.whole
        );
        // The driver refuses to open a handle in its own process; the importer is a child
        // running `gpu_ipc_child` of this same test binary.
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "device::cuda::gpu::gpu_ipc_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(IPC_ENV, to_hex(&h.bytes))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "IPC child failed:\n{text}");
        assert!(text.contains("ipc child verified"), "{text}");
        eprintln!("ipc child verified (in a child process)");
        c.free(a).unwrap();
    }

    /// The importer side of `gpu_ipc_between_processes` (does nothing on its own).
    #[test]
    fn gpu_ipc_child() {
        let Ok(hex) = std::env::var(IPC_ENV) else {
            return;
        };
        let c = Cuda::load().expect("driver in the child");
        let h = IpcHandle {
            kind: Kind::Cuda,
            device: 0,
            bytes: from_hex(&hex),
        };
        let p = c.ipc_open(&h, 0).unwrap();
        assert_eq!(c.device_of(p), Some(0));
        let want = pattern(4 << 20, 77);
        let mut got = vec![0u8; 4096];
        // SAFETY: `p` maps the exporter's allocation from offset 4096; 4096 bytes fit.
        unsafe {
            c.copy(Direction::DeviceToHost, got.as_mut_ptr() as u64, p, 4096)
                .unwrap()
        };
        assert_eq!(got, want[4096..8192]);
        c.ipc_close(p).unwrap();
        eprintln!("ipc child verified");
    }
}
