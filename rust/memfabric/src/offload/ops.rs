//! The four offload operators, as host loops over the caller's descriptors.
//!
//! Each one reads its descriptors (through [`Access`], so a bad descriptor address is an
//! error), turns them into the list of contiguous copies the device kernel makes (the
//! `plan_*` functions, pure and tested against references), checks every copy's ranges, and
//! only then moves bytes. The semantics are those of upstream 1.3.0's AIV kernels
//! (`_kernel/acc_offload/operators/acc_offload_*.h`); where the kernel would read or write
//! outside what the caller described, or silently drop work, the call is refused instead
//! (each such case is named where it is checked, and in the README).

use super::access::{Access, Move, Span};
use super::pool::{EntryTable, Pool};
use crate::error::{Error, Result};

/// `acc_offload_sparse_copy.h`: with at least as many entries as vector cores, the kernel
/// pairs entry `i` with entry `i + n/2` (K with V) and moves each pair through one UB buffer
/// of 88 KiB. Cores: 48 on A3, 64 on A5; below 64 entries some SoC copies every entry on its
/// own, so the pairing's limits are enforced from 64 on, where every SoC pairs.
pub(crate) const SPARSE_PAIRED_FROM: usize = 64;
/// The UB buffer one K/V pair goes through in the paired mode.
pub(crate) const SPARSE_PAIR_MAX: u64 = 88 * 1024;

/// `acc_offload_kv_exchange.h`: header values, values per component, components at most.
pub(crate) const KV_HEADER: usize = 8;
pub(crate) const KV_STRIDE: usize = 9;
pub(crate) const KV_MAX_COMPONENTS: usize = 4;
/// The kernel runs its walk on the last two of the launched vector cores (blockDim 48 on A3,
/// 64 on A5, minus 46 or 62): the layer-first walk partitions pages into this many blocks and
/// merges contiguous pages only inside a block.
pub(crate) const KV_CORES: i64 = 2;
/// Most (page, layer, component) rows one kv_exchange_copy walks: far above real caches (a few
/// million), low enough that a meta with absurd page counts or layer ranges is refused at once
/// instead of keeping the host busy for hours.
pub(crate) const KV_MAX_ROWS: u64 = 1 << 26;
/// Rows placed and copied together once the whole walk has been checked.
const KV_CHUNK: usize = 4096;

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn i64s(b: &[u8]) -> Vec<i64> {
    u64s(b).into_iter().map(|v| v as i64).collect()
}

// ---------------------------------------------------------------------------------------
// sparse_copy

/// `sparse_copy`: `n = *size` entries; entry i copies `lens[i]` bytes from `srcs[i]` to
/// `dsts[i]` (the kernel is instantiated for bytes).
pub(crate) fn sparse_copy(
    pool: &Pool,
    src: &Span,
    dst: &Span,
    lens: &Span,
    size: &Span,
) -> Result<()> {
    let a = Access::new(pool);
    let n = u32s(&a.read(size, 1, 4, "sizePtr")?)[0] as u64;
    let srcs = u64s(&a.read(src, n, 8, "srcPtrs")?);
    let dsts = u64s(&a.read(dst, n, 8, "dstPtrs")?);
    let lens = u32s(&a.read(lens, n, 4, "lenPtrs")?);
    let moves = plan_sparse(&srcs, &dsts, &lens)?;
    a.run(&moves, &|i| format!("entry {i}"))
}

/// The copies of `sparse_copy`. Refused, where every SoC's kernel would pair entries: an odd
/// count (the kernel pairs `i` with `i + n/2` for `i < n/2` and never copies the last entry)
/// and a pair over [`SPARSE_PAIR_MAX`] bytes (it would overflow the kernel's buffer).
pub(crate) fn plan_sparse(srcs: &[u64], dsts: &[u64], lens: &[u32]) -> Result<Vec<Move>> {
    let n = lens.len();
    if n >= SPARSE_PAIRED_FROM {
        if n % 2 == 1 {
            return Err(Error::InvalidParam(format!(
                "sparse_copy of {n} entries: from {SPARSE_PAIRED_FROM} entries on, the device \
                 kernel copies entry i together with entry i + n/2 and skips the last entry of \
                 an odd count; pass K and V entries in pairs"
            )));
        }
        let half = n / 2;
        for i in 0..half {
            let pair = lens[i] as u64 + lens[i + half] as u64;
            if pair > SPARSE_PAIR_MAX {
                return Err(Error::InvalidParam(format!(
                    "sparse_copy of {n} entries: entries {i} and {} hold {pair} bytes together; \
                     from {SPARSE_PAIRED_FROM} entries on, the device kernel moves each such \
                     pair through one 88 KiB ({SPARSE_PAIR_MAX}-byte) buffer",
                    i + half
                )));
            }
        }
    }
    Ok((0..n)
        .map(|i| Move {
            dst: dsts[i],
            src: srcs[i],
            len: lens[i] as u64,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// group_pack_copy

/// `group_pack_copy`: `n = *num_local_expert`; the j-th entry i with `group_list[i] != 0`
/// copies `lens[i]` bytes from `srcs[i]` to `dsts[j]`, and `packed[j] = group_list[i]`.
pub(crate) fn group_pack_copy(
    pool: &Pool,
    src: &Span,
    dst: &Span,
    lens: &Span,
    num: &Span,
    groups: &Span,
    packed: &Span,
) -> Result<()> {
    let a = Access::new(pool);
    let n = u32s(&a.read(num, 1, 4, "numLocalExpertPtr")?)[0] as u64;
    let srcs = u64s(&a.read(src, n, 8, "srcPtrs")?);
    let dsts = u64s(&a.read(dst, n, 8, "dstPtrs")?);
    let lens = u32s(&a.read(lens, n, 4, "lenPtrs")?);
    let groups = i64s(&a.read(groups, n, 8, "groupList")?);
    let (mut moves, values) = plan_group_pack(&srcs, &dsts, &lens, &groups);
    // The packed group list is written like any copy (from our buffer), after the data, and
    // placed with it: a bad packedGroupList refuses the call before anything moves.
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    a.check_write(packed, bytes.len() as u64, "packedGroupList")?;
    let data = moves.len();
    moves.push(Move {
        dst: packed.addr,
        src: bytes.as_ptr() as u64,
        len: bytes.len() as u64,
    });
    a.run(&moves, &|i| {
        if i == data {
            "packedGroupList".to_string()
        } else {
            format!("packed entry {i}")
        }
    })
}

/// The copies and packed values of `group_pack_copy` (`dsts` is indexed by the compacted
/// position; the tails of `dsts` and the packed list are left alone).
pub(crate) fn plan_group_pack(
    srcs: &[u64],
    dsts: &[u64],
    lens: &[u32],
    groups: &[i64],
) -> (Vec<Move>, Vec<i64>) {
    let mut moves = Vec::new();
    let mut values = Vec::new();
    for i in 0..groups.len() {
        if groups[i] == 0 {
            continue;
        }
        let j = values.len();
        moves.push(Move {
            dst: dsts[j],
            src: srcs[i],
            len: lens[i] as u64,
        });
        values.push(groups[i]);
    }
    (moves, values)
}

// ---------------------------------------------------------------------------------------
// kv_exchange_copy

/// One component (K, V, index K, index K scale) of the kv_exchange meta.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KvComponent {
    pub device_base: i64,
    pub host_base: i64,
    pub device_layer_pitch: i64,
    pub device_page_pitch: i64,
    pub host_page_pitch: i64,
    pub host_layer_pitch: i64,
    pub width: i64,
    pub layer_lo: i64,
    pub layer_hi: i64,
}

impl KvComponent {
    /// A component that moves nothing (the kernel skips it).
    pub(crate) fn empty(&self) -> bool {
        self.width <= 0 || self.layer_lo >= self.layer_hi
    }
}

/// The kv_exchange meta, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KvMeta {
    pub num_pages: i64,
    pub page_size: i64,
    /// Device to host (direction 2); else host to device (direction 1).
    pub d2h: bool,
    pub device_indices: u64,
    pub host_indices: u64,
    /// Host layout 1 (layer-first walk, contiguous pages merged); else 0 (page-first).
    pub layer_first: bool,
    pub components: Vec<KvComponent>,
}

impl KvMeta {
    fn active(&self) -> bool {
        self.num_pages > 0 && self.components.iter().any(|c| !c.empty())
    }
}

/// Decodes the header (`values` holds at least [`KV_HEADER`] values) and how many values the
/// whole meta has.
pub(crate) fn kv_meta_len(values: &[i64]) -> Result<usize> {
    let nc = values[0];
    if !(0..=KV_MAX_COMPONENTS as i64).contains(&nc) {
        return Err(Error::InvalidParam(format!(
            "meta[0] num_components {nc} is outside [0, {KV_MAX_COMPONENTS}]"
        )));
    }
    Ok(KV_HEADER + KV_STRIDE * nc as usize)
}

/// Decodes a whole meta. Values the kernel would read as something else are refused: a
/// direction other than 1 (H2D) or 2 (D2H), a layout mode other than 0 or 1, a non-zero
/// reserved value, a negative page count, a page size below 1 (the kernel divides by it).
pub(crate) fn parse_kv_meta(values: &[i64]) -> Result<KvMeta> {
    let len = kv_meta_len(values)?;
    if values.len() < len {
        return Err(Error::InvalidParam(format!(
            "meta holds {} values, {len} expected",
            values.len()
        )));
    }
    let (np, ps, dir, mode, reserved) = (values[1], values[2], values[3], values[6], values[7]);
    if np < 0 {
        return Err(Error::InvalidParam(format!(
            "meta[1] num_pages {np} is negative"
        )));
    }
    if np > 0 && ps < 1 {
        return Err(Error::InvalidParam(format!(
            "meta[2] page_size {ps}: it must be at least 1 (token indices are divided by it)"
        )));
    }
    if dir != 1 && dir != 2 {
        return Err(Error::InvalidParam(format!(
            "meta[3] direction {dir}: 1 (host to device) or 2 (device to host)"
        )));
    }
    if mode != 0 && mode != 1 {
        return Err(Error::InvalidParam(format!(
            "meta[6] host_layout_mode {mode}: 0 (page first) or 1 (layer first)"
        )));
    }
    if reserved != 0 {
        return Err(Error::InvalidParam(format!(
            "meta[7] is reserved and must be 0, not {reserved}"
        )));
    }
    let components = values[KV_HEADER..len]
        .chunks_exact(KV_STRIDE)
        .map(|c| KvComponent {
            device_base: c[0],
            host_base: c[1],
            device_layer_pitch: c[2],
            device_page_pitch: c[3],
            host_page_pitch: c[4],
            host_layer_pitch: c[5],
            width: c[6],
            layer_lo: c[7],
            layer_hi: c[8],
        })
        .collect();
    Ok(KvMeta {
        num_pages: np,
        page_size: ps,
        d2h: dir == 2,
        device_indices: values[4] as u64,
        host_indices: values[5] as u64,
        layer_first: mode == 1,
        components,
    })
}

/// `kv_exchange_copy`: see [`walk_kv`].
pub(crate) fn kv_exchange_copy(pool: &Pool, meta: &Span) -> Result<()> {
    let a = Access::new(pool);
    let header = i64s(&a.read(meta, KV_HEADER as u64, 8, "metaPtr")?);
    let len = kv_meta_len(&header)?;
    let values = i64s(&a.read(meta, len as u64, 8, "metaPtr")?);
    let m = parse_kv_meta(&values)?;
    if !m.active() {
        return Ok(());
    }
    // The kernel reads the token index of each page's first token: positions p * page_size.
    let np = m.num_pages as u64;
    let stride = (m.page_size as u64).checked_mul(8).ok_or_else(|| {
        Error::InvalidParam(format!("meta[2] page_size {} is too large", m.page_size))
    })?;
    let index_span = |addr: u64| Span::host(addr, None);
    let dev_idx = i64s(&a.read_strided(
        &index_span(m.device_indices),
        np,
        8,
        stride,
        "meta[4] device indices",
    )?);
    let host_idx = i64s(&a.read_strided(
        &index_span(m.host_indices),
        np,
        8,
        stride,
        "meta[5] host indices",
    )?);
    // The walk is done twice rather than kept: first every row is placed (a refused row means
    // nothing moved), then the rows are copied in chunks.
    let mut row = 0usize;
    walk_kv(&m, &dev_idx, &host_idx, &mut |mv| {
        let r = a.check(&mv, &|| format!("kv_exchange row {row}"));
        row += 1;
        r
    })?;
    let mut chunk = Vec::with_capacity(KV_CHUNK);
    let mut first = 0usize;
    walk_kv(&m, &dev_idx, &host_idx, &mut |mv| {
        chunk.push(mv);
        if chunk.len() == KV_CHUNK {
            let at = first;
            a.run(&chunk, &|k| format!("kv_exchange row {}", at + k))?;
            first += KV_CHUNK;
            chunk.clear();
        }
        Ok(())
    })?;
    a.run(&chunk, &|k| format!("kv_exchange row {}", first + k))
}

/// Rows of the walk at most (page-first count; the layer-first walk merges some of them),
/// refused above [`KV_MAX_ROWS`].
pub(crate) fn kv_rows(m: &KvMeta) -> Result<u64> {
    let layers: i128 = m
        .components
        .iter()
        .filter(|c| !c.empty())
        .map(|c| c.layer_hi as i128 - c.layer_lo as i128)
        .sum();
    let rows = layers * m.num_pages as i128;
    if rows > KV_MAX_ROWS as i128 {
        return Err(Error::InvalidParam(format!(
            "kv_exchange of {} pages x {layers} component layers = {rows} rows: at most \
             {KV_MAX_ROWS} per call",
            m.num_pages
        )));
    }
    Ok(rows as u64)
}

/// The copies of `kv_exchange_copy`, given each page's first token index on both sides,
/// handed to `f` in the kernel's order.
///
/// Component c, layer l, device page d, host page h (a token index divided by the page size,
/// rounding toward zero as the kernel's integer division does):
/// `device row = device_base + l * device_layer_pitch + d * device_page_pitch`,
/// `host row = host_base + h * host_page_pitch + l * host_layer_pitch`, `width` bytes from the
/// host row to the device row (H2D) or back (D2H), for every page, every non-empty component
/// and every layer in `[layer_lo, layer_hi)`.
///
/// Layer first (mode 1): pages are split into [`KV_CORES`] blocks as the kernel splits them,
/// and inside a block a run of pages whose host and device page numbers both go up by one is
/// moved as one row of `run * width` bytes from the run's first row, as the kernel moves it.
pub(crate) fn walk_kv(
    m: &KvMeta,
    dev_idx: &[i64],
    host_idx: &[i64],
    f: &mut dyn FnMut(Move) -> Result<()>,
) -> Result<()> {
    kv_rows(m)?;
    let np = m.num_pages;
    let ps = m.page_size;
    let page = |p: i64| -> (i64, i64) { (dev_idx[p as usize] / ps, host_idx[p as usize] / ps) };
    let row = |c: &KvComponent, layer: i64, (d, h): (i64, i64), width: i128| -> Result<Move> {
        let dev = c.device_base as i128
            + layer as i128 * c.device_layer_pitch as i128
            + d as i128 * c.device_page_pitch as i128;
        let host = c.host_base as i128
            + h as i128 * c.host_page_pitch as i128
            + layer as i128 * c.host_layer_pitch as i128;
        let addr = |v: i128, side: &str| {
            u64::try_from(v).map_err(|_| {
                Error::InvalidParam(format!(
                    "layer {layer}, device page {d}, host page {h}: the {side} row address {v} \
                     is not an address"
                ))
            })
        };
        let (dev, host) = (addr(dev, "device")?, addr(host, "host")?);
        let len = u64::try_from(width)
            .map_err(|_| Error::InvalidParam(format!("a row of {width} bytes")))?;
        Ok(if m.d2h {
            Move {
                dst: host,
                src: dev,
                len,
            }
        } else {
            Move {
                dst: dev,
                src: host,
                len,
            }
        })
    };
    let comps: Vec<&KvComponent> = m.components.iter().filter(|c| !c.empty()).collect();
    if !m.layer_first {
        for p in 0..np {
            let pages = page(p);
            for c in &comps {
                for layer in c.layer_lo..c.layer_hi {
                    f(row(c, layer, pages, c.width as i128)?)?;
                }
            }
        }
        return Ok(());
    }
    for (start, end) in kv_blocks(np) {
        for c in &comps {
            for layer in c.layer_lo..c.layer_hi {
                let mut pos = start;
                while pos < end {
                    let (d, h) = page(pos);
                    let mut run = 1;
                    // Page numbers come from the caller: compared without overflowing.
                    while pos + run < end
                        && Some(page(pos + run)) == d.checked_add(run).zip(h.checked_add(run))
                    {
                        run += 1;
                    }
                    f(row(c, layer, (d, h), run as i128 * c.width as i128)?)?;
                    pos += run;
                }
            }
        }
    }
    Ok(())
}

/// The kernel's block partition of `np` pages over [`KV_CORES`] cores: the first
/// `np % cores` blocks take one page more.
pub(crate) fn kv_blocks(np: i64) -> Vec<(i64, i64)> {
    let per = np / KV_CORES;
    let rem = np % KV_CORES;
    (0..KV_CORES)
        .map(|core| {
            if core < rem {
                let s = core * (per + 1);
                (s, s + per + 1)
            } else {
                let s = rem * (per + 1) + (core - rem) * per;
                (s, s + per)
            }
        })
        .filter(|(s, e)| s < e)
        .collect()
}

// ---------------------------------------------------------------------------------------
// entry_gather

/// `entry_gather`: `count = *count` (u32); row id `ids[i]` (< 2^32) is row
/// `id % rows_per_slot` of slot `id / rows_per_slot`, at
/// `base + slot * stride + row * entry_bytes`; it is copied to `dst + i * entry_bytes`.
pub(crate) fn entry_gather(pool: &Pool, dst: &Span, ids: &Span, count: &Span) -> Result<()> {
    let table = pool.table().ok_or_else(|| {
        Error::NotInit(
            "no entry table is registered: call offload.register_entry_table(entryBytes, \
             rowsPerSlot) first"
                .into(),
        )
    })?;
    let a = Access::new(pool);
    let n = u32s(&a.read(count, 1, 4, "countPtr")?)[0] as u64;
    if n == 0 {
        return Ok(());
    }
    let ids = u64s(&a.read(ids, n, 8, "idsPtr")?);
    let bytes = n * table.entry_bytes as u64;
    a.check_write(dst, bytes, "dst")?;
    let slots: Vec<u64> = (0..pool.slots()).map(|s| pool.backed(s)).collect();
    let moves = plan_gather(&ids, dst.addr, table, pool.base(), pool.stride(), &slots)?;
    a.run(&moves, &|i| format!("ids[{i}]"))
}

/// The copies of `entry_gather` over slots backing `backed[s]` bytes each. Refused, where the
/// kernel would read outside the pool: an id of 2^32 or more (the kernel keeps its low 32
/// bits), an id past the last slot, and a row past what its slot backs.
pub(crate) fn plan_gather(
    ids: &[u64],
    dst: u64,
    t: EntryTable,
    base: u64,
    stride: u64,
    backed: &[u64],
) -> Result<Vec<Move>> {
    let eb = t.entry_bytes as u64;
    let rows = t.rows_per_slot as u64;
    let mut moves = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        if id > u32::MAX as u64 {
            return Err(Error::InvalidParam(format!(
                "ids[{i}] = {} is outside [0, 2^32)",
                id as i64
            )));
        }
        let (slot, r) = (id / rows, id % rows);
        let Some(&have) = backed.get(slot as usize) else {
            return Err(Error::OutOfBounds(format!(
                "ids[{i}] = {id} is row {r} of slot {slot}, and the pool has {} slot(s) of \
                 {rows} rows",
                backed.len()
            )));
        };
        if (r + 1) * eb > have {
            return Err(Error::OutOfBounds(format!(
                "ids[{i}] = {id} is row {r} of slot {slot}, past the {have} bytes that slot \
                 backs ({} rows of {eb} bytes)",
                have / eb
            )));
        }
        let d = (i as u64)
            .checked_mul(eb)
            .and_then(|o| dst.checked_add(o))
            .ok_or_else(|| Error::InvalidParam(format!("dst {dst:#x} + {i} rows overflows")))?;
        moves.push(Move {
            dst: d,
            src: base + slot * stride + r * eb,
            len: eb,
        });
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk's copies, collected.
    fn plan_kv(m: &KvMeta, dev_idx: &[i64], host_idx: &[i64]) -> Result<Vec<Move>> {
        let mut moves = Vec::new();
        walk_kv(m, dev_idx, host_idx, &mut |mv| {
            moves.push(mv);
            Ok(())
        })?;
        Ok(moves)
    }

    #[test]
    fn sparse_pairs_are_checked_only_where_every_soc_pairs() {
        let n = SPARSE_PAIRED_FROM - 1;
        let srcs: Vec<u64> = (0..n as u64).map(|i| 0x1000 + i).collect();
        let dsts: Vec<u64> = (0..n as u64).map(|i| 0x9000 + i).collect();
        // Below the paired mode: odd counts and big entries are fine, every entry is copied.
        let lens = vec![100_000u32; n];
        let m = plan_sparse(&srcs, &dsts, &lens).unwrap();
        assert_eq!(m.len(), n);
        assert_eq!(
            m[5],
            Move {
                dst: 0x9005,
                src: 0x1005,
                len: 100_000
            }
        );
        // Paired mode: an odd count, then a pair over the buffer, are refused.
        let n = SPARSE_PAIRED_FROM + 1;
        let e = plan_sparse(&vec![1; n], &vec![2; n], &vec![1; n]).unwrap_err();
        assert!(e.to_string().contains("odd"), "{e}");
        let n = SPARSE_PAIRED_FROM;
        let mut lens = vec![1u32; n];
        lens[3] = (SPARSE_PAIR_MAX - 1) as u32;
        plan_sparse(&vec![1; n], &vec![2; n], &lens).unwrap();
        lens[3 + n / 2] = 2;
        let e = plan_sparse(&vec![1; n], &vec![2; n], &lens).unwrap_err();
        assert!(e.to_string().contains("entries 3 and 35"), "{e}");
    }

    #[test]
    fn group_pack_compacts_nonzero_groups() {
        let (m, v) = plan_group_pack(
            &[10, 20, 30, 40],
            &[1, 2, 3, 4],
            &[5, 6, 7, 8],
            &[0, -3, 0, 9],
        );
        assert_eq!(
            m,
            [
                Move {
                    dst: 1,
                    src: 20,
                    len: 6
                },
                Move {
                    dst: 2,
                    src: 40,
                    len: 8
                }
            ]
        );
        assert_eq!(v, [-3, 9]);
    }

    fn meta(np: i64, ps: i64, dir: i64, mode: i64, comps: &[[i64; 9]]) -> Vec<i64> {
        let mut v = vec![comps.len() as i64, np, ps, dir, 0x1000, 0x2000, mode, 0];
        for c in comps {
            v.extend_from_slice(c);
        }
        v
    }

    #[test]
    fn kv_meta_refuses_what_the_kernel_would_misread() {
        let c = [0x10_0000, 0x20_0000, 64, 8, 8, 64, 8, 0, 2];
        assert!(parse_kv_meta(&meta(4, 2, 1, 0, &[c])).is_ok());
        for (bad, what) in [
            (meta(4, 2, 3, 0, &[c]), "direction"),
            (meta(4, 2, 1, 2, &[c]), "host_layout_mode"),
            (meta(4, 0, 1, 0, &[c]), "page_size"),
            (meta(-1, 2, 1, 0, &[c]), "num_pages"),
        ] {
            let e = parse_kv_meta(&bad).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let mut v = meta(4, 2, 1, 0, &[c]);
        v[7] = 5;
        assert!(parse_kv_meta(&v)
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        v[7] = 0;
        v[0] = 5;
        assert!(kv_meta_len(&v).is_err());
    }

    #[test]
    fn kv_rows_follow_the_kernel_formulas() {
        // 2 layers, 3 pages of 4 tokens; width 8; host page-first (page pitch 16, layer 8),
        // device layer-first (layer pitch 24, page 8).
        let c = [0x10_000, 0x20_000, 24, 8, 16, 8, 8, 0, 2];
        let m = parse_kv_meta(&meta(3, 4, 1, 0, &[c])).unwrap();
        // Device pages 2, 0, 1 for host pages 0, 1, 2 (token indices p * 4 + 1: divided).
        let moves = plan_kv(&m, &[9, 1, 5], &[1, 5, 9]).unwrap();
        let want: Vec<Move> = [(2, 0), (0, 1), (1, 2)]
            .iter()
            .flat_map(|&(d, h)| {
                (0..2).map(move |l| Move {
                    dst: 0x10_000 + l * 24 + d * 8,
                    src: 0x20_000 + h * 16 + l * 8,
                    len: 8,
                })
            })
            .collect();
        assert_eq!(moves, want);
        // D2H swaps the sides.
        let m2 = KvMeta {
            d2h: true,
            ..m.clone()
        };
        let back = plan_kv(&m2, &[9, 1, 5], &[1, 5, 9]).unwrap();
        assert!(back
            .iter()
            .zip(&want)
            .all(|(b, w)| b.src == w.dst && b.dst == w.src));
    }

    #[test]
    fn kv_row_count_is_bounded() {
        let c = [0x10_000, 0x20_000, 0, 8, 8, 0, 8, 0, i64::MAX];
        let m = parse_kv_meta(&meta(1, 1, 1, 0, &[c])).unwrap();
        let e = plan_kv(&m, &[0], &[0]).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let c = [0x10_000, 0x20_000, 0, 8, 8, 0, 8, i64::MIN, i64::MAX];
        assert!(kv_rows(&parse_kv_meta(&meta(1, 1, 1, 0, &[c])).unwrap()).is_err());
        let c = [0x10_000, 0x20_000, 0, 8, 8, 0, 8, 0, 61];
        assert_eq!(
            kv_rows(&parse_kv_meta(&meta(3200, 128, 1, 0, &[c, c])).unwrap()).unwrap(),
            3200 * 122
        );
    }

    #[test]
    fn kv_layer_first_merges_runs_inside_each_block() {
        // 5 pages, all contiguous on both sides: blocks [0,3) and [3,5), one row each.
        let c = [0x10_000, 0x20_000, 0, 8, 8, 0, 8, 0, 1];
        let m = parse_kv_meta(&meta(5, 1, 2, 1, &[c])).unwrap();
        let idx = [0, 1, 2, 3, 4];
        let moves = plan_kv(&m, &idx, &idx).unwrap();
        assert_eq!(
            moves,
            [
                Move {
                    dst: 0x20_000,
                    src: 0x10_000,
                    len: 24
                },
                Move {
                    dst: 0x20_000 + 24,
                    src: 0x10_000 + 24,
                    len: 16
                }
            ]
        );
        // A break in either side's numbering ends a run.
        let moves = plan_kv(&m, &[0, 1, 5, 6, 7], &[0, 1, 2, 3, 4]).unwrap();
        let lens: Vec<u64> = moves.iter().map(|m| m.len).collect();
        assert_eq!(lens, [16, 8, 16]);
        assert_eq!(kv_blocks(1), [(0, 1)]);
        assert_eq!(kv_blocks(0), []);
        assert_eq!(kv_blocks(7), [(0, 4), (4, 7)]);
    }

    #[test]
    fn gather_maps_ids_to_slots_and_refuses_outside_rows() {
        let t = EntryTable {
            entry_bytes: 64,
            rows_per_slot: 10,
        };
        let backed = [1 << 20, 640];
        let m = plan_gather(&[3, 10, 19], 0x5000, t, 0x100_000, 1 << 30, &backed).unwrap();
        assert_eq!(
            m,
            [
                Move {
                    dst: 0x5000,
                    src: 0x100_000 + 3 * 64,
                    len: 64
                },
                Move {
                    dst: 0x5040,
                    src: 0x100_000 + (1 << 30),
                    len: 64
                },
                Move {
                    dst: 0x5080,
                    src: 0x100_000 + (1 << 30) + 9 * 64,
                    len: 64
                }
            ]
        );
        let e = plan_gather(&[20], 0x5000, t, 0x100_000, 1 << 30, &backed).unwrap_err();
        assert_eq!(e.code(), -3002);
        let e = plan_gather(&[1 << 32], 0x5000, t, 0x100_000, 1 << 30, &backed).unwrap_err();
        assert_eq!(e.code(), -2000);
        let e = plan_gather(&[u64::MAX], 0x5000, t, 0x100_000, 1 << 30, &backed).unwrap_err();
        assert!(e.to_string().contains("-1"), "{e}");
        // Slot 1 backs 10 rows exactly; a smaller span cuts rows off.
        let e = plan_gather(&[19], 0x5000, t, 0x100_000, 1 << 30, &[1 << 20, 600]).unwrap_err();
        assert_eq!(e.code(), -3002);
    }
}
