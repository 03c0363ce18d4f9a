//! The host backend: host DRAM behind the [`Device`] interface.
//!
//! Allocations are memfd-backed shared mappings, so they can be shared with other processes
//! of this host the way the fabric shares segments: the IPC handle names the exporter's pid
//! and fd, and the importer opens `/proc/<pid>/fd/<fd>` and maps it. Copies are `memmove`;
//! streams are [`HostStream`]s (a worker thread each), events their [`Event`]s.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Device, DeviceInfo, Direction, EventHandle, IpcHandle, IpcPlace, Kind, StreamHandle};
use crate::error::{Error, Result};
use crate::stream::{Event, HostStream};

/// How long a host stream waits for another stream's event before it records a timeout (the
/// trait's `stream_wait_event` has no deadline argument: device streams wait on the device).
pub const WAIT_EVENT_LIMIT: Duration = Duration::from_secs(600);

/// u32 pid, i32 fd, u64 allocation length, u64 offset, u64 inode of the memfd.
const IPC_LEN: usize = 32;

struct Mapping {
    len: usize,
    // The memfd behind an allocation; `None` for a mapping opened from another process (the
    // mapping keeps the memory alive by itself).
    fd: Option<OwnedFd>,
}

#[derive(Default)]
struct Tables {
    allocs: BTreeMap<u64, Mapping>,
    opened: BTreeMap<u64, Mapping>,
    streams: HashMap<u64, Arc<HostStream>>,
    events: HashMap<u64, Event>,
}

/// Host memory as a device (ordinal 0).
pub struct HostDevice {
    tables: Mutex<Tables>,
    next_id: AtomicU64,
}

impl Default for HostDevice {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The mapping of `map` that contains `addr`, as (start, len).
fn containing(map: &BTreeMap<u64, Mapping>, addr: u64) -> Option<(u64, usize)> {
    let (&start, m) = map.range(..=addr).next_back()?;
    (addr - start < m.len as u64).then_some((start, m.len))
}

fn check_device(device: i32) -> Result<()> {
    if device != 0 {
        return Err(Error::InvalidParam(format!(
            "host device {device}: the host backend has one device, 0"
        )));
    }
    Ok(())
}

fn inode(fd: i32) -> std::io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes one `stat` into the buffer we own; `fd` is checked by the kernel.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it initialized the structure.
    Ok(unsafe { st.assume_init() }.st_ino)
}

fn check_handle(handle: &IpcHandle) -> Result<()> {
    if handle.kind != Kind::Host || handle.bytes.len() != IPC_LEN {
        return Err(Error::InvalidParam(format!(
            "not a host IPC handle ({} handle of {} bytes)",
            handle.kind.name(),
            handle.bytes.len()
        )));
    }
    Ok(())
}

fn map_shared(fd: i32, len: usize, what: &str) -> Result<u64> {
    crate::mem::map_shared(fd, len, libc::PROT_READ | libc::PROT_WRITE)
        .map(|p| p as u64)
        .map_err(|e| Error::MallocFailed(format!("{what}: mmap of {len} bytes: {e}")))
}

fn unmap(addr: u64, len: usize) {
    // SAFETY: (addr, len) is a mapping this backend made and removed from its tables, so
    // nothing here refers to it any more.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

impl HostDevice {
    pub fn new() -> HostDevice {
        HostDevice {
            tables: Mutex::new(Tables::default()),
            next_id: AtomicU64::new(1),
        }
    }

    fn stream(&self, s: StreamHandle) -> Result<Arc<HostStream>> {
        lock(&self.tables)
            .streams
            .get(&s.0)
            .cloned()
            .ok_or_else(|| Error::InvalidParam(format!("host stream {:#x} does not exist", s.0)))
    }

    fn event(&self, e: EventHandle) -> Result<Event> {
        lock(&self.tables)
            .events
            .get(&e.0)
            .cloned()
            .ok_or_else(|| Error::InvalidParam(format!("host event {:#x} does not exist", e.0)))
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn total_memory() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        0
    }
}

impl Device for HostDevice {
    fn kind(&self) -> Kind {
        Kind::Host
    }

    fn library(&self) -> Option<String> {
        None
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>> {
        Ok(vec![DeviceInfo {
            id: 0,
            name: "host".into(),
            memory: total_memory(),
        }])
    }

    fn alloc(&self, device: i32, len: usize) -> Result<u64> {
        check_device(device)?;
        if len == 0 {
            return Err(Error::InvalidParam("allocation of 0 bytes".into()));
        }
        // SAFETY: a valid NUL-terminated name; returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(c"mf-host-device".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io(
                "memfd_create for host device memory",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len)
            .map_err(|_| Error::InvalidParam(format!("allocation of {len} bytes is too large")))?;
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(Error::MallocFailed(format!(
                "cannot size {len} bytes of host device memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        let addr = map_shared(fd.as_raw_fd(), len, "host device alloc")?;
        lock(&self.tables)
            .allocs
            .insert(addr, Mapping { len, fd: Some(fd) });
        Ok(addr)
    }

    fn free(&self, ptr: u64) -> Result<()> {
        let m = lock(&self.tables).allocs.remove(&ptr).ok_or_else(|| {
            Error::InvalidParam(format!(
                "{ptr:#x} was not returned by this host device's alloc"
            ))
        })?;
        unmap(ptr, m.len);
        Ok(())
    }

    unsafe fn copy(&self, _dir: Direction, dst: u64, src: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller guarantees both ranges are valid for `len` bytes (trait
        // contract); `copy` is memmove, so overlapping ranges are fine too.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
        Ok(())
    }

    unsafe fn copy_async(
        &self,
        _dir: Direction,
        dst: u64,
        src: u64,
        len: usize,
        stream: StreamHandle,
    ) -> Result<()> {
        let s = self.stream(stream)?;
        s.submit(move || {
            // SAFETY: the caller keeps both ranges valid until the stream has run this job
            // (trait contract of `copy_async`).
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
            Ok(())
        })
    }

    fn launch_host_func(&self, stream: StreamHandle, f: Box<dyn FnOnce() + Send>) -> Result<()> {
        // The stream's worker runs it in order, as a device runs a host function.
        self.stream(stream)?.submit(move || {
            f();
            Ok(())
        })
    }

    fn stream_create(&self, device: i32) -> Result<StreamHandle> {
        check_device(device)?;
        let s = Arc::new(HostStream::new()?);
        let id = self.id();
        lock(&self.tables).streams.insert(id, s);
        Ok(StreamHandle(id))
    }

    fn stream_synchronize(&self, stream: StreamHandle, timeout: Duration) -> Result<()> {
        self.stream(stream)?.synchronize(timeout)
    }

    fn stream_destroy(&self, stream: StreamHandle) -> Result<()> {
        let s = lock(&self.tables).streams.remove(&stream.0);
        // Dropped outside the lock: a stream's drop waits for its queued work.
        match s {
            Some(s) => {
                drop(s);
                Ok(())
            }
            None => Err(Error::InvalidParam(format!(
                "host stream {:#x} does not exist",
                stream.0
            ))),
        }
    }

    fn event_record(&self, stream: StreamHandle) -> Result<EventHandle> {
        let ev = self.stream(stream)?.record_event();
        let id = self.id();
        lock(&self.tables).events.insert(id, ev);
        Ok(EventHandle(id))
    }

    fn event_query(&self, event: EventHandle) -> Result<bool> {
        Ok(self.event(event)?.query())
    }

    fn event_synchronize(&self, event: EventHandle, timeout: Duration) -> Result<()> {
        self.event(event)?.synchronize(timeout)
    }

    fn event_destroy(&self, event: EventHandle) -> Result<()> {
        lock(&self.tables)
            .events
            .remove(&event.0)
            .map(|_| ())
            .ok_or_else(|| Error::InvalidParam(format!("host event {:#x} does not exist", event.0)))
    }

    fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        let ev = self.event(event)?;
        self.stream(stream)?.wait_event(&ev, WAIT_EVENT_LIMIT)
    }

    fn ipc_export(&self, ptr: u64) -> Result<IpcHandle> {
        let t = lock(&self.tables);
        let (start, len) = containing(&t.allocs, ptr).ok_or_else(|| {
            Error::InvalidParam(format!(
                "{ptr:#x} is not inside memory allocated by this host device"
            ))
        })?;
        let fd = t
            .allocs
            .get(&start)
            .and_then(|m| m.fd.as_ref())
            .map(|fd| fd.as_raw_fd())
            .ok_or_else(|| Error::Failed(format!("allocation at {start:#x} has no fd")))?;
        // The inode tells this allocation from a later one that reuses its fd number.
        let ino = inode(fd).map_err(|e| Error::io("fstat of a host allocation", e))?;
        let mut bytes = Vec::with_capacity(IPC_LEN);
        bytes.extend_from_slice(&std::process::id().to_le_bytes());
        bytes.extend_from_slice(&fd.to_le_bytes());
        bytes.extend_from_slice(&(len as u64).to_le_bytes());
        bytes.extend_from_slice(&(ptr - start).to_le_bytes());
        bytes.extend_from_slice(&ino.to_le_bytes());
        Ok(IpcHandle {
            kind: Kind::Host,
            device: 0,
            bytes,
        })
    }

    fn ipc_place(&self, handle: &IpcHandle) -> Result<IpcPlace> {
        check_handle(handle)?;
        // Layout: see IPC_LEN.
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&handle.bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let mut whole = handle.clone();
        whole.bytes[16..24].fill(0);
        Ok(IpcPlace {
            whole,
            offset: word(16),
            len: word(8),
        })
    }

    fn ipc_open(&self, handle: &IpcHandle, device: i32) -> Result<u64> {
        check_device(device)?;
        check_handle(handle)?;
        let b = &handle.bytes;
        let word = |r: std::ops::Range<usize>| -> [u8; 8] {
            let mut w = [0u8; 8];
            w[..r.len()].copy_from_slice(&b[r]);
            w
        };
        let pid = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let fd = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let len = u64::from_le_bytes(word(8..16));
        let offset = u64::from_le_bytes(word(16..24));
        let len = usize::try_from(len)
            .map_err(|_| Error::InvalidParam(format!("IPC handle length {len} is too large")))?;
        if offset >= len as u64 {
            return Err(Error::InvalidParam(format!(
                "IPC handle offset {offset} is outside its {len}-byte allocation"
            )));
        }
        let (file, meta, path) = crate::mem::open_peer_fd(pid, fd, "exported memory")?;
        let ino = u64::from_le_bytes(word(24..32));
        if std::os::unix::fs::MetadataExt::ino(&meta) != ino {
            return Err(Error::PeerGone(format!(
                "{path} is no longer the exported memory (freed, its fd number reused)"
            )));
        }
        let size = meta.len();
        if size < len as u64 {
            return Err(Error::Protocol(format!(
                "{path} has {size} bytes, the IPC handle says {len}"
            )));
        }
        let addr = map_shared(file.as_raw_fd(), len, "host IPC open")?;
        lock(&self.tables)
            .opened
            .insert(addr, Mapping { len, fd: None });
        Ok(addr + offset)
    }

    fn ipc_close(&self, ptr: u64) -> Result<()> {
        let mut t = lock(&self.tables);
        let (start, len) = containing(&t.opened, ptr)
            .ok_or_else(|| Error::InvalidParam(format!("{ptr:#x} was not returned by ipc_open")))?;
        t.opened.remove(&start);
        drop(t);
        unmap(start, len);
        Ok(())
    }

    fn allocation_of(&self, addr: u64) -> Option<(u64, usize)> {
        let t = lock(&self.tables);
        containing(&t.allocs, addr).or_else(|| containing(&t.opened, addr))
    }

    fn device_of(&self, addr: u64) -> Option<i32> {
        let t = lock(&self.tables);
        (containing(&t.allocs, addr).is_some() || containing(&t.opened, addr).is_some())
            .then_some(0)
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        let t = std::mem::take(&mut *lock(&self.tables));
        // Streams first: their queued copies may still use the mappings.
        drop(t.streams);
        for (addr, m) in t.allocs.into_iter().chain(t.opened) {
            unmap(addr, m.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    const T: Duration = Duration::from_secs(10);

    fn fill(addr: u64, len: usize, seed: u8) {
        // SAFETY: test memory from `alloc` of at least `len` bytes.
        let s = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
        for (i, b) in s.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
    }

    fn bytes(addr: u64, len: usize) -> Vec<u8> {
        // SAFETY: test memory from `alloc` of at least `len` bytes.
        unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
    }

    #[test]
    fn alloc_copy_free() {
        let d = HostDevice::new();
        assert_eq!(d.kind(), Kind::Host);
        assert_eq!(d.devices().unwrap()[0].id, 0);
        assert!(d.devices().unwrap()[0].memory > 0);
        let n = 1 << 20;
        let a = d.alloc(0, n).unwrap();
        let b = d.alloc(0, n).unwrap();
        assert_eq!(d.device_of(a), Some(0));
        assert_eq!(d.device_of(a + n as u64 - 1), Some(0));
        let local = [0u8; 16];
        assert_eq!(d.device_of(local.as_ptr() as u64), None);
        fill(a, n, 7);
        // SAFETY: both are live allocations of `n` bytes.
        unsafe { d.copy(Direction::DeviceToDevice, b, a, n) }.unwrap();
        assert_eq!(bytes(a, n), bytes(b, n));
        let mut host = vec![0u8; 4096];
        // SAFETY: `host` is 4096 bytes; `b + 100` has more than that left.
        unsafe {
            d.copy(
                Direction::DeviceToHost,
                host.as_mut_ptr() as u64,
                b + 100,
                4096,
            )
        }
        .unwrap();
        assert_eq!(host, bytes(a + 100, 4096));

        assert_eq!(d.alloc(1, n).unwrap_err().code(), -2000);
        assert_eq!(d.alloc(0, 0).unwrap_err().code(), -2000);
        d.free(a).unwrap();
        assert_eq!(d.device_of(a), None);
        assert_eq!(d.free(a).unwrap_err().code(), -2000);
        assert_eq!(d.free(b + 8).unwrap_err().code(), -2000);
        d.free(b).unwrap();
    }

    #[test]
    fn stream_copies_run_in_order_and_events_mark_them() {
        let d = HostDevice::new();
        let n = 4 << 20;
        let a = d.alloc(0, n).unwrap();
        let b = d.alloc(0, n).unwrap();
        let c = d.alloc(0, n).unwrap();
        fill(a, n, 1);
        let s = d.stream_create(0).unwrap();
        // a -> b, then b -> c: c holds a's bytes only if the second ran after the first.
        // SAFETY: live allocations, freed only after the stream is synchronized.
        unsafe {
            d.copy_async(Direction::HostToDevice, b, a, n, s).unwrap();
            d.copy_async(Direction::DeviceToDevice, c, b, n, s).unwrap();
        }
        let ev = d.event_record(s).unwrap();
        d.event_synchronize(ev, T).unwrap();
        assert!(d.event_query(ev).unwrap());
        assert_eq!(bytes(c, n), bytes(a, n));
        d.stream_synchronize(s, T).unwrap();
        d.event_destroy(ev).unwrap();
        assert_eq!(d.event_query(ev).unwrap_err().code(), -2000);

        // A second stream ordered after the first through an event.
        let s2 = d.stream_create(0).unwrap();
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let gate = d.stream(s).unwrap();
        let s1_seen = seen.clone();
        gate.submit(move || {
            std::thread::sleep(Duration::from_millis(100));
            s1_seen.lock().unwrap().push(1);
            Ok(())
        })
        .unwrap();
        let ev = d.event_record(s).unwrap();
        assert!(!d.event_query(ev).unwrap());
        d.stream_wait_event(s2, ev).unwrap();
        let s2_seen = seen.clone();
        d.stream(s2)
            .unwrap()
            .submit(move || {
                s2_seen.lock().unwrap().push(2);
                Ok(())
            })
            .unwrap();
        d.stream_synchronize(s2, T).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);

        d.stream_destroy(s).unwrap();
        d.stream_destroy(s2).unwrap();
        assert_eq!(d.stream_destroy(s).unwrap_err().code(), -2000);
        // SAFETY: the stream handle is gone, so nothing is copied.
        let e = unsafe { d.copy_async(Direction::HostToDevice, b, a, 8, s) }.unwrap_err();
        assert_eq!(e.code(), -2000);
        assert_eq!(d.stream_create(3).unwrap_err().code(), -2000);
        for p in [a, b, c] {
            d.free(p).unwrap();
        }
    }

    #[test]
    fn ipc_maps_the_same_memory() {
        let exporter = HostDevice::new();
        let importer = HostDevice::new();
        let n = 2 << 20;
        let a = exporter.alloc(0, n).unwrap();
        fill(a, n, 3);
        let h = exporter.ipc_export(a + 4096).unwrap();
        assert_eq!(h.kind, Kind::Host);
        let p = importer.ipc_open(&h, 0).unwrap();
        assert_ne!(p, a + 4096);
        assert_eq!(importer.device_of(p), Some(0));
        assert_eq!(bytes(p, 4096), bytes(a + 4096, 4096));
        // Writes through one mapping are seen through the other.
        fill(p, 64, 99);
        assert_eq!(bytes(a + 4096, 64), bytes(p, 64));
        importer.ipc_close(p).unwrap();
        assert_eq!(importer.ipc_close(p).unwrap_err().code(), -2000);

        // Handles into one allocation share their whole handle; opening it maps the start.
        let place = exporter.ipc_place(&h).unwrap();
        assert_eq!((place.offset, place.len), (4096, n as u64));
        let other = exporter
            .ipc_place(&exporter.ipc_export(a + 12).unwrap())
            .unwrap();
        assert_eq!((other.whole, other.offset), (place.whole.clone(), 12));
        let base = importer.ipc_open(&place.whole, 0).unwrap();
        assert_eq!(bytes(base + 4096, 64), bytes(a + 4096, 64));
        importer.ipc_close(base).unwrap();

        let stack = [0u8; 8];
        assert_eq!(
            exporter
                .ipc_export(stack.as_ptr() as u64)
                .unwrap_err()
                .code(),
            -2000
        );
        let mut bad = h.clone();
        bad.kind = Kind::Cuda;
        assert_eq!(importer.ipc_open(&bad, 0).unwrap_err().code(), -2000);
        assert_eq!(importer.ipc_place(&bad).unwrap_err().code(), -2000);
        let mut gone = h.clone();
        gone.bytes[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        assert!(importer.ipc_open(&gone, 0).is_err());
        exporter.free(a).unwrap();

        // A handle of freed memory whose fd number now names a new allocation is refused:
        // the old handle's inode with the new allocation's fd.
        let b = exporter.alloc(0, n).unwrap();
        let fresh = exporter.ipc_export(b).unwrap();
        assert_ne!(
            fresh.bytes[24..32],
            h.bytes[24..32],
            "a new inode per allocation"
        );
        let mut stale = fresh.clone();
        stale.bytes[24..32].copy_from_slice(&h.bytes[24..32]);
        let e = importer.ipc_open(&stale, 0).unwrap_err();
        assert!(matches!(e, Error::PeerGone(_)), "{e}");
        let p = importer.ipc_open(&fresh, 0).unwrap();
        importer.ipc_close(p).unwrap();
        exporter.free(b).unwrap();
    }
}
