//! The registered-region table of one engine: which byte ranges of this process peers may
//! read and write.
//!
//! Ranges are kept exactly as registered. Upstream widens each registration to 2 MiB and
//! merges neighbours; we do not: widening would expose to peers bytes the owner never offered
//! (other heap objects on the same huge page), and merging would let one transfer span two
//! registrations that can be unregistered independently. The price is that a transfer spanning
//! two adjacent registrations is refused; callers register a buffer once, whole.
//!
//! Registration checks that the range is mapped readable and writable in this process, because
//! the TCP data server and the local path copy into it with plain loads and stores. What the
//! table cannot check is the future: the owner must keep the memory mapped until it
//! unregisters it (the same contract as every RDMA registration). The data server touches
//! registered memory only inside [`RegionTable::while_registered`], so unregistering is a
//! barrier for it: after `unregister` returns the owner may unmap or reuse the memory.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};

/// Magic and version at the start of an encoded region list.
const LIST_MAGIC: &[u8; 4] = b"MFRG";
const LIST_VERSION: u8 = 1;
const LIST_HEADER: usize = 12;
const LIST_ENTRY: usize = 16;

/// The interval table: start address -> length, non-overlapping. Thread-safe; lookups take a
/// read lock only, so checks from many connections do not serialize.
#[derive(Debug, Default)]
pub struct RegionTable {
    map: RwLock<BTreeMap<u64, u64>>,
    /// The regions that are device memory: start -> device ordinal. Plain loads and stores
    /// (memcpy, recv into the address) must not touch these; copies go through the device
    /// backend. Empty, and never locked, on hosts that register no device memory.
    device: RwLock<BTreeMap<u64, i32>>,
    has_device: AtomicBool,
}

fn range_str(addr: u64, len: u64) -> String {
    match addr.checked_add(len) {
        Some(end) => format!("[{addr:#x}, {end:#x}) ({len} bytes)"),
        None => format!("[{addr:#x}, +{len}) (past the end of the address space)"),
    }
}

impl RegionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<u64, u64>> {
        // The map is consistent after every statement that touches it; a panic elsewhere while
        // the lock was held cannot leave it half-updated.
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, u64>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the table a peer published (see [`decode_list`]). No mapping check: the
    /// addresses belong to the peer's address space, not ours.
    pub fn from_list(list: &[(u64, u64)]) -> Result<Self> {
        let table = Self::new();
        {
            let mut map = table.write();
            for &(addr, len) in list {
                validate_shape(addr, len)?;
                if let Some((s, l)) = overlapping(&map, addr, len) {
                    return Err(Error::Duplicated(format!(
                        "region list: {} overlaps {}",
                        range_str(addr, len),
                        range_str(s, l)
                    )));
                }
                map.insert(addr, len);
            }
        }
        Ok(table)
    }

    /// Decodes a published list into a table.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Self::from_list(&decode_list(bytes)?)
    }

    /// Encodes the current registrations for publishing.
    pub fn encode(&self) -> Vec<u8> {
        encode_list(&self.snapshot())
    }

    /// Registers `[addr, addr + len)` of this process.
    ///
    /// Errors: `InvalidParam` for a null address, length 0, a range past the end of the address
    /// space, or a range not entirely mapped readable and writable here; `Duplicated` when it
    /// overlaps an existing registration (registering the same range twice included).
    pub fn register(&self, addr: u64, len: u64) -> Result<()> {
        validate_shape(addr, len)?;
        // Outside the lock: reading the maps file costs tens of microseconds and must not hold
        // up the checks of in-flight transfers.
        check_mapped_rw(addr, len)?;
        self.insert(addr, len)
    }

    /// Adds a region that overlaps none registered (`Duplicated` otherwise).
    fn insert(&self, addr: u64, len: u64) -> Result<()> {
        let mut map = self.write();
        if let Some((s, l)) = overlapping(&map, addr, len) {
            return Err(Error::Duplicated(format!(
                "{} overlaps the registered region {}",
                range_str(addr, len),
                range_str(s, l)
            )));
        }
        map.insert(addr, len);
        Ok(())
    }

    /// Registers `[addr, addr + len)` of device memory on `device`. The caller has checked
    /// with the device backend that the range lies inside one live allocation (the maps file
    /// knows nothing of device memory).
    pub fn register_device(&self, addr: u64, len: u64, device: i32) -> Result<()> {
        validate_shape(addr, len)?;
        self.insert(addr, len)?;
        self.mark_device(addr, device);
        Ok(())
    }

    /// Records that the region starting at `start` is device memory (for a peer's table,
    /// built from its published lists).
    pub fn mark_device(&self, start: u64, device: i32) {
        let mut d = self.device.write().unwrap_or_else(|p| p.into_inner());
        d.insert(start, device);
        self.has_device.store(true, Ordering::Release);
    }

    /// Whether any region is device memory.
    pub fn has_device(&self) -> bool {
        self.has_device.load(Ordering::Acquire)
    }

    /// The device ordinal of the region starting at `start`, `None` for host memory.
    pub fn device_at(&self, start: u64) -> Option<i32> {
        if !self.has_device() {
            return None;
        }
        let d = self.device.read().unwrap_or_else(|p| p.into_inner());
        d.get(&start).copied()
    }

    /// [`check`](Self::check), also telling whether the range is device memory (its ordinal).
    pub fn check_kind(&self, addr: u64, len: u64) -> Result<Option<i32>> {
        let start = check_in(&self.read(), addr, len)?;
        Ok(self.device_at(start))
    }

    /// The device regions: (start, length, device ordinal), sorted by address.
    pub fn device_regions(&self) -> Vec<(u64, u64, i32)> {
        if !self.has_device() {
            return Vec::new();
        }
        let map = self.read();
        let d = self.device.read().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .filter_map(|(&s, &dev)| map.get(&s).map(|&l| (s, l, dev)))
            .collect()
    }

    /// Removes the registration that starts at `addr`; `NotExist` when none does.
    ///
    /// Waits for the copies that this process's data server is making into or out of the
    /// region (each a bounded piece: one system call, or one device copy of a staging buffer or
    /// of one request; see [`while_registered`](Self::while_registered)); once this returns, none
    /// starts, so the owner may unmap the memory even while peers are writing to it. The
    /// owner's own transfers from or into the region must have finished.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        match self.write().remove(&addr) {
            Some(_) => {
                if self.has_device() {
                    let mut d = self.device.write().unwrap_or_else(|p| p.into_inner());
                    d.remove(&addr);
                }
                Ok(())
            }
            None => Err(Error::NotExist(format!(
                "no registered region starts at {addr:#x}"
            ))),
        }
    }

    /// Runs `f` while `[addr, addr + len)` lies inside one registered region, which cannot be
    /// unregistered until `f` returns; `OutOfBounds` (and `f` not run) when the range is not
    /// registered. This is how the data server touches registered memory, piece by piece, so
    /// that [`unregister`](Self::unregister) is a barrier for it. `f` must be short (register
    /// and unregister wait for it) and must not use this table.
    pub fn while_registered<T>(&self, addr: u64, len: u64, f: impl FnOnce() -> T) -> Result<T> {
        let map = self.read();
        check_in(&map, addr, len)?;
        Ok(f())
    }

    /// [`while_registered`](Self::while_registered) for several ranges at once.
    pub fn while_all_registered<T>(
        &self,
        ranges: impl IntoIterator<Item = (u64, u64)>,
        f: impl FnOnce() -> T,
    ) -> Result<T> {
        let map = self.read();
        for (addr, len) in ranges {
            check_in(&map, addr, len)?;
        }
        Ok(f())
    }

    /// `Ok` when `[addr, addr + len)` lies entirely inside ONE registered region, else
    /// `OutOfBounds` naming the range. A zero-length range is accepted when `addr` is inside a
    /// region or at its end.
    pub fn check(&self, addr: u64, len: u64) -> Result<()> {
        check_in(&self.read(), addr, len).map(|_| ())
    }

    /// [`check`](Self::check) for many ranges under one lock acquisition; stops at the first
    /// failure. This is what a batch of 10^5 descriptors uses.
    pub fn check_all(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<()> {
        let map = self.read();
        for (addr, len) in ranges {
            check_in(&map, addr, len)?;
        }
        Ok(())
    }

    /// A checker holding the read lock for a batch of lookups, remembering the last region it
    /// hit: descriptors of one batch usually fall in the same region, which then costs two
    /// comparisons instead of a tree walk.
    pub fn batch(&self) -> BatchChecker<'_> {
        BatchChecker {
            map: self.read(),
            last: None,
        }
    }

    /// The registrations, sorted by address.
    pub fn snapshot(&self) -> Vec<(u64, u64)> {
        self.read().iter().map(|(&a, &l)| (a, l)).collect()
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

/// See [`RegionTable::batch`]. Holds the table's read lock: registrations wait until it drops.
pub struct BatchChecker<'a> {
    map: RwLockReadGuard<'a, BTreeMap<u64, u64>>,
    last: Option<(u64, u64)>,
}

impl BatchChecker<'_> {
    /// The start address of the one region holding `[addr, addr + len)`, or `OutOfBounds`.
    pub fn region_of(&mut self, addr: u64, len: u64) -> Result<u64> {
        if let Some((s, l)) = self.last {
            if addr >= s && addr.checked_add(len).is_some_and(|e| e <= s + l) {
                return Ok(s);
            }
        }
        let s = check_in(&self.map, addr, len)?;
        self.last = self.map.get(&s).map(|&l| (s, l));
        Ok(s)
    }
}

fn validate_shape(addr: u64, len: u64) -> Result<()> {
    if addr == 0 {
        return Err(Error::InvalidParam("region address is null".into()));
    }
    if len == 0 {
        return Err(Error::InvalidParam(format!(
            "region at {addr:#x} has length 0"
        )));
    }
    if addr.checked_add(len).is_none() {
        return Err(Error::InvalidParam(format!(
            "region {} runs past the end of the address space",
            range_str(addr, len)
        )));
    }
    Ok(())
}

fn overlapping(map: &BTreeMap<u64, u64>, addr: u64, len: u64) -> Option<(u64, u64)> {
    let end = addr + len;
    if let Some((&s, &l)) = map.range(..=addr).next_back() {
        if s + l > addr {
            return Some((s, l));
        }
    }
    map.range(addr..end).next().map(|(&s, &l)| (s, l))
}

/// Returns the start of the region holding the range.
fn check_in(map: &BTreeMap<u64, u64>, addr: u64, len: u64) -> Result<u64> {
    let Some(end) = addr.checked_add(len) else {
        return Err(Error::OutOfBounds(format!(
            "{} is not inside a registered region",
            range_str(addr, len)
        )));
    };
    if let Some((&s, &l)) = map.range(..=addr).next_back() {
        if end <= s + l {
            return Ok(s);
        }
        if addr < s + l {
            return Err(Error::OutOfBounds(format!(
                "{} runs past the end of the registered region {}",
                range_str(addr, len),
                range_str(s, l)
            )));
        }
    }
    Err(Error::OutOfBounds(format!(
        "{} is not inside a registered region",
        range_str(addr, len)
    )))
}

/// Refuses a range that is not wholly covered by mappings that are readable and writable.
///
/// /proc/self/maps is the only interface that reports protections (mincore and msync only
/// see holes, and a PROT_NONE reservation, like the GVA space, is mapped but would fault).
/// The file is sorted by address, so the scan stops as soon as it passes the range.
pub(crate) fn check_mapped_rw(addr: u64, len: u64) -> Result<()> {
    let end = addr + len;
    let file = std::fs::File::open("/proc/self/maps")
        .map_err(|e| Error::io("cannot read /proc/self/maps to check a registration", e))?;
    let mut reader = std::io::BufReader::with_capacity(64 << 10, file);
    let mut line = String::with_capacity(256);
    // The next byte that still has to be found mapped.
    let mut need = addr;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io("reading /proc/self/maps", e))?;
        if n == 0 {
            break;
        }
        let Some((start, stop, perms)) = parse_maps_line(&line) else {
            continue;
        };
        if stop <= need {
            continue;
        }
        if start > need {
            break;
        }
        if !(perms.starts_with("rw")) {
            return Err(Error::InvalidParam(format!(
                "{} is not all readable and writable: {start:#x}..{stop:#x} is mapped {perms}",
                range_str(addr, len)
            )));
        }
        need = stop;
        if need >= end {
            return Ok(());
        }
    }
    Err(Error::InvalidParam(format!(
        "{} is not mapped in this process (first unmapped byte {need:#x})",
        range_str(addr, len)
    )))
}

fn parse_maps_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut parts = line.split_ascii_whitespace();
    let range = parts.next()?;
    let perms = parts.next()?;
    let (a, b) = range.split_once('-')?;
    let start = u64::from_str_radix(a, 16).ok()?;
    let stop = u64::from_str_radix(b, 16).ok()?;
    Some((start, stop, perms))
}

/// Encodes a region list: "MFRG", version, 3 reserved bytes, u32 count, then count x
/// (u64 addr, u64 len), all little-endian.
pub fn encode_list(list: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LIST_HEADER + list.len() * LIST_ENTRY);
    out.extend_from_slice(LIST_MAGIC);
    out.push(LIST_VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for &(a, l) in list {
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&l.to_le_bytes());
    }
    out
}

/// Decodes what [`encode_list`] wrote. The count must match the byte length exactly, so a
/// corrupt or hostile value never drives an allocation.
pub fn decode_list(bytes: &[u8]) -> Result<Vec<(u64, u64)>> {
    let bad = |why: &str| Error::Protocol(format!("region list: {why}"));
    if bytes.len() < LIST_HEADER {
        return Err(bad("shorter than its header"));
    }
    if &bytes[..4] != LIST_MAGIC {
        return Err(bad("bad magic"));
    }
    if bytes[4] != LIST_VERSION {
        return Err(bad(&format!(
            "version {} (this build reads {LIST_VERSION})",
            bytes[4]
        )));
    }
    let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let body = &bytes[LIST_HEADER..];
    if Some(body.len()) != count.checked_mul(LIST_ENTRY) {
        return Err(bad(&format!(
            "{count} entries announced, {} bytes present",
            body.len()
        )));
    }
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    Ok(body
        .chunks_exact(LIST_ENTRY)
        .map(|e| (word(&e[..8]), word(&e[8..])))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(n: usize) -> (Vec<u8>, u64) {
        let v = vec![0u8; n];
        let a = v.as_ptr() as u64;
        (v, a)
    }

    #[test]
    fn register_check_unregister() {
        let t = RegionTable::new();
        let (_v, a) = buf(8192);
        t.register(a, 8192).unwrap();
        t.check(a, 8192).unwrap();
        t.check(a + 100, 1).unwrap();
        t.check(a + 8192, 0).unwrap();
        assert!(matches!(t.check(a, 8193), Err(Error::OutOfBounds(_))));
        assert!(matches!(t.check(a - 1, 2), Err(Error::OutOfBounds(_))));
        assert!(matches!(t.check(u64::MAX, 2), Err(Error::OutOfBounds(_))));
        assert!(matches!(t.register(a, 8192), Err(Error::Duplicated(_))));
        assert!(matches!(t.register(a + 10, 10), Err(Error::Duplicated(_))));
        assert!(matches!(t.unregister(a + 1), Err(Error::NotExist(_))));
        assert_eq!(t.snapshot(), vec![(a, 8192)]);
        t.unregister(a).unwrap();
        assert!(t.is_empty());
        assert!(matches!(t.unregister(a), Err(Error::NotExist(_))));
    }

    #[test]
    fn adjacent_registrations_are_not_merged() {
        let t = RegionTable::new();
        let (_v, a) = buf(8192);
        t.register(a, 4096).unwrap();
        t.register(a + 4096, 4096).unwrap();
        t.check(a, 4096).unwrap();
        t.check(a + 4096, 4096).unwrap();
        let e = t.check(a + 4000, 200).unwrap_err();
        assert!(matches!(e, Error::OutOfBounds(_)), "{e}");
        assert!(e.to_string().contains("runs past"), "{e}");
        assert!(t.check_all([(a, 10), (a + 4096, 10)]).is_ok());
        assert!(t.check_all([(a, 10), (a + 9000, 10)]).is_err());
    }

    #[test]
    fn bad_shapes_and_unmapped_memory_are_refused() {
        let t = RegionTable::new();
        assert!(matches!(t.register(0, 10), Err(Error::InvalidParam(_))));
        assert!(matches!(t.register(4096, 0), Err(Error::InvalidParam(_))));
        assert!(matches!(
            t.register(u64::MAX - 10, 100),
            Err(Error::InvalidParam(_))
        ));
        let page = 4096usize;
        // SAFETY: anonymous mapping owned by this test; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p as u64;
        // SAFETY: the middle page belongs to the mapping made above.
        assert_eq!(
            unsafe { libc::munmap((a + page as u64) as *mut _, page) },
            0
        );
        let e = t.register(a, 3 * page as u64).unwrap_err();
        assert!(matches!(e, Error::InvalidParam(_)), "{e}");
        assert!(e.to_string().contains("not mapped"), "{e}");
        t.register(a, page as u64).unwrap();
        // SAFETY: the last page still belongs to the mapping made above.
        let r = unsafe { libc::mprotect((a + 2 * page as u64) as *mut _, page, libc::PROT_NONE) };
        assert_eq!(r, 0);
        let e = t.register(a + 2 * page as u64, page as u64).unwrap_err();
        assert!(e.to_string().contains("readable and writable"), "{e}");
        // SAFETY: unmapping the two pages still mapped above.
        unsafe {
            libc::munmap(p, page);
            libc::munmap((a + 2 * page as u64) as *mut _, page);
        }
    }

    #[test]
    fn list_roundtrip_and_garbage() {
        let list = vec![(0x1000, 0x100), (0x5000, 0x2000)];
        let bytes = encode_list(&list);
        assert_eq!(decode_list(&bytes).unwrap(), list);
        let t = RegionTable::decode(&bytes).unwrap();
        t.check(0x5000, 0x2000).unwrap();
        assert!(t.check(0x1000, 0x101).is_err());
        assert!(decode_list(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_list(b"MFRG").is_err());
        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_list(&huge).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(decode_list(&bad).is_err());
        assert!(RegionTable::from_list(&[(0x1000, 0x100), (0x1080, 0x10)]).is_err());
        assert!(RegionTable::from_list(&[(0, 0x100)]).is_err());
    }

    #[test]
    fn large_registration_is_fast() {
        let len = 64usize << 20;
        // SAFETY: anonymous mapping owned by this test, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let t = RegionTable::new();
        let t0 = std::time::Instant::now();
        t.register(p as u64, len as u64).unwrap();
        let took = t0.elapsed();
        // Untouched pages: the cost must not depend on the size, only on the mapping count.
        assert!(took < std::time::Duration::from_millis(50), "{took:?}");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
    }
}
