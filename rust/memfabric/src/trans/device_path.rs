//! Descriptors that touch device memory (CUDA, or Ascend once it runs on hardware).
//!
//! Registration tells host from device memory once; the published region list carries a
//! device section (start, length, ordinal and an IPC handle per device region), so peers know
//! which of their descriptors land in device memory without asking any driver per transfer.
//! Host-only descriptors never come here.
//!
//! How a device descriptor moves, by path:
//! - **local** (peer is this process): one device copy (`cuMemcpy` through unified
//!   addressing) between the two addresses, whatever memory either side is.
//! - **cma** (same host): the peer's device region is mapped here through its IPC handle
//!   (opened once, cached) and the copy is a device copy again; a host region of the peer
//!   with a device buffer here goes through a host staging buffer and `process_vm_*`.
//! - **tcp** (other hosts): a device buffer here is staged through host memory in chunks,
//!   the next chunk's device copy overlapping the current chunk's network transfer; the
//!   peer's data server does the same on its side for its device regions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::device::staging::StageBuffer;
use crate::device::{self, Device, IpcHandle, IpcPlace, Kind as DeviceKind};
use crate::error::{Error, Result};
use crate::log::WARN;
use crate::mem::regions::{decode_list, encode_list, RegionTable};
use crate::mf_log;
use crate::transport::{CheckedOps, Kind, Op, Transport};

/// Marks the device section after the region list in the published value.
const DEVICE_MAGIC: &[u8; 4] = b"MFDV";
/// Bytes of one staging chunk on the network paths.
pub const STAGE_CHUNK: usize = device::staging::STAGE_BYTES;

/// A device region of a peer, from its published list.
#[derive(Clone, Debug)]
pub struct PeerDeviceRegion {
    /// Length of the region (its start is the key of [`PeerTable::device`]).
    pub len: u64,
    pub device: i32,
    pub kind: DeviceKind,
    pub ipc: Vec<u8>,
}

/// A peer's published tables: all its regions (device ones marked) and the IPC handles of
/// the device ones.
#[derive(Debug, Default)]
pub struct PeerTable {
    pub regions: RegionTable,
    pub device: HashMap<u64, PeerDeviceRegion>,
}

/// Encodes what an engine publishes: the region list, then (when it has device regions)
/// "MFDV", u32 count, and per device region u64 start, u64 length, i32 ordinal, u8 backend
/// (1 CUDA, 2 Ascend, 3 host), u16 handle length, handle bytes; little-endian.
pub fn encode_published(regions: &RegionTable, ipc: &HashMap<u64, IpcHandle>) -> Vec<u8> {
    let mut out = encode_list(&regions.snapshot());
    let dev = regions.device_regions();
    if dev.is_empty() {
        return out;
    }
    out.extend_from_slice(DEVICE_MAGIC);
    out.extend_from_slice(&(dev.len() as u32).to_le_bytes());
    for (start, len, ord) in dev {
        let h = ipc.get(&start);
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&ord.to_le_bytes());
        out.push(match h.map(|h| h.kind) {
            Some(DeviceKind::Ascend) => 2,
            Some(DeviceKind::Host) => 3,
            _ => 1,
        });
        let bytes = h.map(|h| h.bytes.as_slice()).unwrap_or(&[]);
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Decodes [`encode_published`]; a value without a device section is a plain region list.
pub fn decode_published(bytes: &[u8]) -> Result<PeerTable> {
    let bad = |why: &str| Error::Protocol(format!("published regions: {why}"));
    if bytes.len() < 12 {
        return Err(bad("shorter than its header"));
    }
    let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let list_len = count
        .checked_mul(16)
        .and_then(|n| n.checked_add(12))
        .filter(|&n| n <= bytes.len())
        .ok_or_else(|| bad("region count larger than the value"))?;
    let list = decode_list(&bytes[..list_len])?;
    let regions = RegionTable::from_list(&list)?;
    let listed: HashMap<u64, u64> = list.into_iter().collect();
    let mut rest = &bytes[list_len..];
    let mut device = HashMap::new();
    if rest.is_empty() {
        return Ok(PeerTable { regions, device });
    }
    if rest.len() < 8 || &rest[..4] != DEVICE_MAGIC {
        return Err(bad("trailing bytes that are not a device section"));
    }
    let n = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
    rest = &rest[8..];
    for i in 0..n {
        if rest.len() < 23 {
            return Err(bad(&format!("device entry {i} is cut short")));
        }
        let start = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
        let ord = i32::from_le_bytes(rest[16..20].try_into().unwrap_or_default());
        let kind = match rest[20] {
            1 => DeviceKind::Cuda,
            2 => DeviceKind::Ascend,
            3 => DeviceKind::Host,
            k => return Err(bad(&format!("device entry {i}: unknown backend {k}"))),
        };
        let hl = u16::from_le_bytes([rest[21], rest[22]]) as usize;
        if rest.len() < 23 + hl {
            return Err(bad(&format!("device entry {i}: handle cut short")));
        }
        let ipc = rest[23..23 + hl].to_vec();
        rest = &rest[23 + hl..];
        if listed.get(&start) != Some(&len) || device.contains_key(&start) {
            return Err(bad(&format!(
                "device entry {i} ({start:#x}, {len} bytes) is not a listed region, or repeats one"
            )));
        }
        regions.mark_device(start, ord);
        device.insert(
            start,
            PeerDeviceRegion {
                len,
                device: ord,
                kind,
                ipc,
            },
        );
    }
    if !rest.is_empty() {
        return Err(bad("bytes after the device section"));
    }
    Ok(PeerTable { regions, device })
}

/// A device registration that passed [`check_device_registration`].
pub struct DeviceRegistration {
    pub ordinal: i32,
    /// What same-host peers open; `None` where the memory cannot be exported (e.g.
    /// virtual-memory allocations: then only this process and the tcp path reach it).
    pub ipc: Option<IpcHandle>,
}

/// Checks a device registration: `[addr, addr + len)` inside one live allocation of the
/// backend that owns `addr`. `None` when `addr` is not device memory.
pub fn check_device_registration(addr: u64, len: u64) -> Option<Result<DeviceRegistration>> {
    let (dev, ord) = device::memory_of(addr)?;
    Some((|| {
        let (base, size) = dev.allocation_of(addr).ok_or_else(|| {
            Error::InvalidParam(format!(
                "{addr:#x} is {} device memory, but its allocation cannot be found",
                dev.kind().name()
            ))
        })?;
        let end = addr.checked_add(len);
        if end.is_none_or(|e| e > base + size as u64) {
            return Err(Error::InvalidParam(format!(
                "[{addr:#x}, +{len}) runs past the end of its device allocation [{base:#x}, +{size})"
            )));
        }
        Ok(DeviceRegistration {
            ordinal: ord,
            ipc: dev.ipc_export(addr).ok(),
        })
    })())
}

/// Peer device memory mapped into this process, one mapping per peer allocation (keyed by
/// the backend and the handle of the allocation's start). A mapping is closed once its peer's
/// table no longer lists the allocation and the last copy using it has ended.
#[derive(Default)]
pub struct IpcCache {
    opened: Mutex<HashMap<IpcKey, Arc<Opened>>>,
}

type IpcKey = (DeviceKind, Vec<u8>);

/// A peer allocation mapped here: the backend that mapped it and the local base address.
/// Unmapped when the last holder lets go (the cache, and each copy in flight through it).
pub(crate) struct Opened {
    pub(crate) dev: Arc<dyn Device>,
    base: u64,
}

impl Drop for Opened {
    fn drop(&mut self) {
        let (dev, base) = (self.dev.clone(), self.base);
        if dev.kind() == DeviceKind::Host {
            let _ = dev.ipc_close(base);
            return;
        }
        // A driver may wait for every stream when it unmaps, and this may run inside a
        // transfer ordered on a caller's stream (which waits for it): unmapped elsewhere.
        let closing = std::thread::Builder::new()
            .name("mf-ipc-close".into())
            .spawn(move || dev.ipc_close(base));
        if let Err(e) = closing {
            mf_log!(
                WARN,
                "peer memory at {base:#x} stays mapped: no thread to unmap it: {e}"
            );
        }
    }
}

/// The peer region's handle, and where it points, where its backend is present here.
fn place_of(region: &PeerDeviceRegion) -> Result<(Arc<dyn Device>, IpcPlace)> {
    let kind = region.kind.name();
    let dev = device::registry()
        .get(region.kind)
        .clone()
        .map_err(|why| Error::Unsupported(format!("the peer's {kind} memory: {why}")))?;
    let handle = IpcHandle {
        kind: region.kind,
        device: region.device,
        bytes: region.ipc.clone(),
    };
    let place = dev.ipc_place(&handle)?;
    Ok((dev, place))
}

impl IpcCache {
    /// This process's address for `remote`, inside the peer's device region `region` that
    /// starts at `start`, and the mapping it lies in (hold it while copying).
    pub(crate) fn map(
        &self,
        region: &PeerDeviceRegion,
        start: u64,
        remote: u64,
    ) -> Result<(u64, Arc<Opened>)> {
        let kind = region.kind.name();
        // Opened at the allocation's start so that every region of one allocation shares the
        // mapping: a driver maps an allocation once per process.
        let (dev, place) = place_of(region).map_err(|e| {
            Error::Unsupported(format!(
                "the peer's {kind} region at {start:#x} was published without an IPC handle \
                 this host can open ({}); use the tcp path (MF_TRANSPORT=tcp)",
                device::reason_of(e)
            ))
        })?;
        // The handle comes from the peer: the region must lie inside the allocation it names.
        if place
            .offset
            .checked_add(region.len)
            .is_none_or(|end| end > place.len)
        {
            return Err(Error::Protocol(format!(
                "the peer's {kind} region at {start:#x} ({} bytes) is published at offset {} of \
                 a {}-byte allocation",
                region.len, place.offset, place.len
            )));
        }
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        let key = (region.kind, place.whole.bytes);
        let mapping = match opened.get(&key) {
            Some(o) => o.clone(),
            None => {
                let whole = IpcHandle {
                    kind: region.kind,
                    device: region.device,
                    bytes: key.1.clone(),
                };
                let base = dev.ipc_open(&whole, region.device)?;
                let o = Arc::new(Opened { dev, base });
                opened.insert(key, o.clone());
                o
            }
        };
        Ok((mapping.base + place.offset + (remote - start), mapping))
    }

    /// Lets go of the mappings of allocations that `old` listed and `fresh` (the same peer's
    /// newer table) does not: the peer unregistered every region of them, and perhaps freed
    /// them. Copies still running through one keep it until they end.
    pub(crate) fn forget_missing(&self, old: &PeerTable, fresh: &PeerTable) {
        let key_of = |r: &PeerDeviceRegion| place_of(r).ok().map(|(_, p)| (r.kind, p.whole.bytes));
        let gone: Vec<IpcKey> = {
            let keep: std::collections::HashSet<IpcKey> =
                fresh.device.values().filter_map(key_of).collect();
            old.device
                .values()
                .filter_map(key_of)
                .filter(|k| !keep.contains(k))
                .collect()
        };
        if gone.is_empty() {
            return;
        }
        let dropped: Vec<Arc<Opened>> = {
            let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            gone.iter().filter_map(|k| opened.remove(k)).collect()
        };
        // Unmapped here, outside the lock, unless a copy still holds one.
        drop(dropped);
    }
}

/// One descriptor touching device memory, with what each side is.
pub struct DevOp {
    op: Op,
    /// Device ordinal of the local side (`None`: host memory).
    local: Option<i32>,
    /// Start of the peer's device region holding the remote side (`None`: host memory).
    remote: Option<u64>,
}

/// Splits checked descriptors into host-only ones and those touching device memory.
pub fn split(
    checked: &CheckedOps,
    mine: &RegionTable,
    peer: &PeerTable,
) -> Result<(Vec<Op>, Vec<DevOp>)> {
    let mut host = Vec::new();
    let mut dev = Vec::new();
    let mut lc = mine.batch();
    let mut rc = peer.regions.batch();
    for op in checked.ops() {
        let local = if mine.has_device() {
            mine.device_at(lc.region_of(op.local, op.len)?)
        } else {
            None
        };
        let remote = if peer.regions.has_device() {
            let s = rc.region_of(op.remote, op.len)?;
            peer.regions.device_at(s).map(|_| s)
        } else {
            None
        };
        if local.is_none() && remote.is_none() {
            host.push(*op);
        } else {
            dev.push(DevOp {
                op: *op,
                local,
                remote,
            });
        }
    }
    Ok((host, dev))
}

/// Moves descriptors that touch device memory over the path `kind` to a peer.
pub fn transfer(
    kind: Kind,
    transport: &dyn Transport,
    peer: &PeerTable,
    ipc: &IpcCache,
    write: bool,
    ops: Vec<DevOp>,
    deadline: Instant,
) -> Result<()> {
    for (i, d) in ops.iter().enumerate() {
        move_one(kind, transport, peer, ipc, write, d, deadline).map_err(|e| match e {
            Error::InvalidParam(m) => Error::InvalidParam(format!("device descriptor {i}: {m}")),
            e => e,
        })?;
        crate::transport::expired(deadline, "device transfer")?;
    }
    Ok(())
}

fn move_one(
    kind: Kind,
    transport: &dyn Transport,
    peer: &PeerTable,
    ipc: &IpcCache,
    write: bool,
    d: &DevOp,
    deadline: Instant,
) -> Result<()> {
    let op = d.op;
    // Where the peer's bytes are, as an address of this process (same-process and mapped),
    // and the backend that copies between the two sides.
    let remote_here = match (kind, d.remote) {
        (Kind::Local, _) => {
            let (dst, src) = if write {
                (op.remote, op.local)
            } else {
                (op.local, op.remote)
            };
            Some((op.remote, device_for(dst, src)?, None))
        }
        (Kind::Cma, Some(start)) => {
            let region = peer.device.get(&start).ok_or_else(|| {
                Error::Protocol(format!("peer region {start:#x} has no device entry"))
            })?;
            let (r, mapping) = ipc.map(region, start, op.remote)?;
            let here = device::memory_of(op.local).map(|(d, _)| d);
            let dev = copier(here, mapping.dev.clone())?;
            Some((r, dev, Some(mapping)))
        }
        _ => None,
    };
    // `_mapping` keeps a peer's mapped allocation mapped until the copy has ended.
    if let Some((r, dev, _mapping)) = remote_here {
        let (dst, src) = if write { (r, op.local) } else { (op.local, r) };
        // SAFETY: the local side lies in a region this engine registered (checked), the
        // remote side in one the peer registered (checked against its published table) and
        // mapped here (same process, or opened through its IPC handle).
        return unsafe { dev.copy_between(dst, src, op.len as usize, None) };
    }
    match d.local {
        // Host memory here, device memory over there: the peer's data server copies.
        None => {
            // SAFETY: checked against both tables by the caller.
            let one = unsafe { CheckedOps::assume_checked(vec![op], true) };
            if write {
                transport.write(&one, deadline)
            } else {
                transport.read(&one, deadline)
            }
        }
        Some(_) => staged(transport, write, op, deadline),
    }
}

/// The backend that copies between device memory of `here` (`None`: host memory) and peer
/// memory that `mapped_by` mapped into this process. Memory of the host backend is plain host
/// memory to an accelerator's copies; two different accelerators cannot copy directly.
fn copier(here: Option<Arc<dyn Device>>, mapped_by: Arc<dyn Device>) -> Result<Arc<dyn Device>> {
    match here {
        None => Ok(mapped_by),
        Some(h) if h.kind() == mapped_by.kind() || mapped_by.kind() == DeviceKind::Host => Ok(h),
        Some(h) if h.kind() == DeviceKind::Host => Ok(mapped_by),
        Some(h) => Err(Error::Unsupported(format!(
            "no copy between {} memory here and the peer's {} memory; use the tcp path \
             (MF_TRANSPORT=tcp)",
            h.kind().name(),
            mapped_by.kind().name()
        ))),
    }
}

fn device_for(dst: u64, src: u64) -> Result<Arc<dyn Device>> {
    device::memory_of(dst)
        .or_else(|| device::memory_of(src))
        .map(|(d, _)| d)
        .ok_or_else(|| {
            Error::InvalidParam(format!(
                "neither {dst:#x} nor {src:#x} is device memory any more (freed while registered?)"
            ))
        })
}

/// Moves `op` whose local side is device memory over a host-only path, in chunks through two
/// host buffers: while one chunk is on the network, the device copy of the next one runs.
fn staged(transport: &dyn Transport, write: bool, op: Op, deadline: Instant) -> Result<()> {
    let (dev, device) = device::memory_of(op.local)
        .ok_or_else(|| Error::InvalidParam(format!("{:#x} is not device memory", op.local)))?;
    let total = op.len as usize;
    let chunk = STAGE_CHUNK.min(total);
    let chunks: Vec<(usize, usize)> = (0..total)
        .step_by(chunk)
        .map(|off| (off, chunk.min(total - off)))
        .collect();
    // Two host buffers (pinned where the device can) for device bytes on their way to or from
    // the network (one suffices for a single chunk); they live until the end of this function.
    let mut first = StageBuffer::take(&dev, device, chunk);
    let mut second = (chunks.len() > 1).then(|| StageBuffer::take(&dev, device, chunk));
    let a0 = first.addr();
    let a1 = second.as_mut().map_or(a0, |b| b.addr());
    let net = |stage: u64, off: usize, n: usize| -> Result<()> {
        let one = Op::new(stage, op.remote + off as u64, n as u64);
        // SAFETY: `stage` is our own buffer of at least `n` bytes, alive for the call; the
        // remote range was checked against the peer's table (and its server checks again).
        let checked = unsafe { CheckedOps::assume_checked(vec![one], true) };
        if write {
            transport.write(&checked, deadline)
        } else {
            transport.read(&checked, deadline)
        }
    };
    if chunks.len() == 1 {
        // Nothing to overlap: no helper thread (starting one costs more than a small copy).
        // SAFETY: the stage holds `total` bytes; the device range is registered (checked).
        return if write {
            unsafe { dev.copy_between(a0, op.local, total, None)? };
            net(a0, 0, total)
        } else {
            net(a0, 0, total)?;
            unsafe { dev.copy_between(op.local, a0, total, None) }
        };
    }
    // Helper threads copy the way this thread does (a stream-ordered job's private stream).
    let private = device::cuda::private_stream_copies();
    let addr_of = |i: usize| if i.is_multiple_of(2) { a0 } else { a1 };
    if write {
        // Device -> host for chunk i+1 runs on a helper thread while chunk i is sent.
        // SAFETY: chunk 0 lies in the registered device range; the stage holds `chunk` bytes.
        unsafe { dev.copy_between(a0, op.local, chunks[0].1, None)? };
        for i in 0..chunks.len() {
            let (off, n) = chunks[i];
            let next = chunks.get(i + 1).copied();
            std::thread::scope(|s| -> Result<()> {
                let pre = next.map(|(noff, nn)| {
                    let dev = dev.clone();
                    let to = addr_of(i + 1);
                    s.spawn(move || {
                        device::cuda::use_private_stream_copies(private);
                        // SAFETY: the other stage is not in flight (its send finished); the
                        // source lies in the registered device range.
                        unsafe { dev.copy_between(to, op.local + noff as u64, nn, None) }
                    })
                });
                let sent = net(addr_of(i), off, n);
                let copied = match pre {
                    Some(h) => h.join().unwrap_or_else(|_| {
                        Err(Error::Failed("device staging copy panicked".into()))
                    }),
                    None => Ok(()),
                };
                sent.and(copied)
            })?;
        }
    } else {
        // Host -> device for chunk i runs while chunk i+1 is received.
        net(a0, chunks[0].0, chunks[0].1)?;
        for i in 0..chunks.len() {
            let (off, n) = chunks[i];
            let next = chunks.get(i + 1).copied();
            std::thread::scope(|s| -> Result<()> {
                let dev = dev.clone();
                let from = addr_of(i);
                let h = s.spawn(move || {
                    device::cuda::use_private_stream_copies(private);
                    // SAFETY: stage `i % 2` holds chunk i, received above; the destination
                    // lies in the registered device range.
                    unsafe { dev.copy_between(op.local + off as u64, from, n, None) }
                });
                let got = match next {
                    Some((noff, nn)) => net(addr_of(i + 1), noff, nn),
                    None => Ok(()),
                };
                let copied = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Failed("device staging copy panicked".into())));
                got.and(copied)
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_value_round_trips_with_and_without_device_regions() {
        let t = RegionTable::new();
        let host = vec![0u8; 4096];
        t.register(host.as_ptr() as u64, 4096).unwrap();
        let v = encode_published(&t, &HashMap::new());
        assert_eq!(v, encode_list(&t.snapshot()));
        let p = decode_published(&v).unwrap();
        assert_eq!(p.regions.snapshot(), t.snapshot());
        assert!(!p.regions.has_device() && p.device.is_empty());

        // A device region as a peer with a GPU would publish it (no GPU needed to encode).
        t.register_device(0x7f00_0000_0000, 1 << 20, 0).unwrap();
        let mut ipc = HashMap::new();
        ipc.insert(
            0x7f00_0000_0000,
            IpcHandle {
                kind: DeviceKind::Cuda,
                device: 0,
                bytes: vec![7u8; 80],
            },
        );
        let v = encode_published(&t, &ipc);
        let p = decode_published(&v).unwrap();
        assert_eq!(p.regions.snapshot(), t.snapshot());
        assert_eq!(p.regions.device_at(0x7f00_0000_0000), Some(0));
        assert_eq!(p.regions.device_at(host.as_ptr() as u64), None);
        assert_eq!(p.device[&0x7f00_0000_0000].ipc, vec![7u8; 80]);

        // Every truncation and a trailing byte are refused, never a panic.
        for cut in 0..v.len() {
            assert!(
                decode_published(&v[..cut]).is_err() || cut == encode_list(&t.snapshot()).len()
            );
        }
        let mut long = v.clone();
        long.push(0);
        assert!(decode_published(&long).is_err());
        // A device entry for an address that is not a listed region is refused.
        let other = RegionTable::new();
        other.register(host.as_ptr() as u64, 4096).unwrap();
        other.register_device(0x7f00_0010_0000, 4096, 0).unwrap();
        let listed = encode_list(&[(host.as_ptr() as u64, 4096)]);
        let full = encode_published(&other, &HashMap::new());
        let section = &full[encode_list(&other.snapshot()).len()..];
        let mut forged = listed.clone();
        forged.extend_from_slice(section);
        let e = decode_published(&forged).unwrap_err();
        assert!(e.to_string().contains("not a listed region"), "{e}");
    }
}
