//! Paged KV-cache blocks to transfer descriptors.
//!
//! A paged KV cache is a set of *segments* (one per layer, or per layer and K/V plane), each an
//! array of `num_blocks` equal blocks `block_stride` bytes apart. Moving request blocks from a
//! prefill engine to a decode engine means, for every segment, copying block `src[i]` of the
//! local segment to block `dst[i]` of the peer's matching segment. This module turns that into
//! as few descriptors as possible: pairs are sorted by source block, and runs where both ids
//! go up by one become one descriptor when both sides store their blocks back to back. Vendor
//! caches hand the allocator's free list to the transfer, so runs are common and long.

use crate::error::{Error, Result};
use crate::transport::Op;

/// Most blocks in one call: bounds what a caller can make us allocate (4096 blocks per
/// request x 64 segments is the largest case seen in serving).
pub const MAX_BLOCKS: usize = 1 << 20;

/// One array of equal blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub num_blocks: u64,
    pub block_stride: u64,
    pub block_bytes: u64,
}

impl Segment {
    fn block(&self, id: u64) -> u64 {
        self.addr + id * self.block_stride
    }

    fn check(&self, side: &str, i: usize) -> Result<()> {
        if self.block_bytes == 0 || self.num_blocks == 0 {
            return Err(Error::InvalidParam(format!(
                "{side} segment {i} is empty ({} blocks of {} bytes)",
                self.num_blocks, self.block_bytes
            )));
        }
        if self.block_stride < self.block_bytes {
            return Err(Error::InvalidParam(format!(
                "{side} segment {i}: block stride {} is smaller than the block ({} bytes), \
                 so blocks would overlap",
                self.block_stride, self.block_bytes
            )));
        }
        let span = (self.num_blocks - 1)
            .checked_mul(self.block_stride)
            .and_then(|v| v.checked_add(self.block_bytes))
            .and_then(|v| v.checked_add(self.addr));
        if span.is_none() {
            return Err(Error::InvalidParam(format!(
                "{side} segment {i} runs past the end of the address space"
            )));
        }
        Ok(())
    }
}

/// Descriptors that copy blocks `src_ids[i]` of every `local` segment to blocks `dst_ids[i]`
/// of the matching `remote` segment (or back, for a read: the descriptors are the same).
pub fn block_ops(
    local: &[Segment],
    remote: &[Segment],
    src_ids: &[u64],
    dst_ids: &[u64],
) -> Result<Vec<Op>> {
    if local.len() != remote.len() {
        return Err(Error::InvalidParam(format!(
            "the local cache has {} segments but the peer's has {}: the layouts do not match",
            local.len(),
            remote.len()
        )));
    }
    if src_ids.len() != dst_ids.len() {
        return Err(Error::InvalidParam(format!(
            "{} source block ids but {} destination block ids",
            src_ids.len(),
            dst_ids.len()
        )));
    }
    if src_ids.len() > MAX_BLOCKS {
        return Err(Error::InvalidParam(format!(
            "{} blocks in one call (at most {MAX_BLOCKS})",
            src_ids.len()
        )));
    }
    for (i, (l, r)) in local.iter().zip(remote).enumerate() {
        l.check("local", i)?;
        r.check("peer", i)?;
        if l.block_bytes != r.block_bytes {
            return Err(Error::InvalidParam(format!(
                "segment {i}: local blocks are {} bytes but the peer's are {}",
                l.block_bytes, r.block_bytes
            )));
        }
    }
    let src_limit = local.iter().map(|s| s.num_blocks).min().unwrap_or(0);
    let dst_limit = remote.iter().map(|s| s.num_blocks).min().unwrap_or(0);
    let mut pairs: Vec<(u64, u64)> = Vec::with_capacity(src_ids.len());
    for (&s, &d) in src_ids.iter().zip(dst_ids) {
        if s >= src_limit {
            return Err(Error::OutOfBounds(format!(
                "source block id {s} is out of range (the local cache has {src_limit} blocks)"
            )));
        }
        if d >= dst_limit {
            return Err(Error::OutOfBounds(format!(
                "destination block id {d} is out of range (the peer's cache has {dst_limit} blocks)"
            )));
        }
        pairs.push((s, d));
    }
    // Two writes to one destination block would race; refuse rather than pick a winner.
    let mut seen_dst: Vec<u64> = pairs.iter().map(|p| p.1).collect();
    seen_dst.sort_unstable();
    if let Some(w) = seen_dst.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidParam(format!(
            "destination block id {} appears more than once",
            w[0]
        )));
    }
    pairs.sort_unstable();
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for (s, d) in pairs {
        match runs.last_mut() {
            Some((rs, rd, n)) if *rs + *n == s && *rd + *n == d => *n += 1,
            _ => runs.push((s, d, 1)),
        }
    }
    let mut ops = Vec::with_capacity(runs.len() * local.len());
    for (l, r) in local.iter().zip(remote) {
        let dense = l.block_stride == l.block_bytes && r.block_stride == r.block_bytes;
        for &(s, d, n) in &runs {
            if dense {
                ops.push(Op::new(l.block(s), r.block(d), n * l.block_bytes));
            } else {
                for k in 0..n {
                    ops.push(Op::new(l.block(s + k), r.block(d + k), l.block_bytes));
                }
            }
        }
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, n: u64, stride: u64, bytes: u64) -> Segment {
        Segment {
            addr,
            num_blocks: n,
            block_stride: stride,
            block_bytes: bytes,
        }
    }

    #[test]
    fn runs_coalesce_per_segment() {
        let local = [seg(0x1000, 8, 16, 16), seg(0x2000, 8, 16, 16)];
        let remote = [seg(0x9000, 10, 16, 16), seg(0xa000, 10, 16, 16)];
        // Unordered input; 0,1,2 -> 5,6,7 is one run, 6 -> 1 another.
        let ops = block_ops(&local, &remote, &[2, 6, 0, 1], &[7, 1, 5, 6]).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::new(0x1000, 0x9000 + 5 * 16, 48),
                Op::new(0x1000 + 6 * 16, 0x9000 + 16, 16),
                Op::new(0x2000, 0xa000 + 5 * 16, 48),
                Op::new(0x2000 + 6 * 16, 0xa000 + 16, 16),
            ]
        );
    }

    #[test]
    fn strided_blocks_stay_separate() {
        let local = [seg(0, 4, 32, 16)];
        let remote = [seg(1 << 20, 4, 16, 16)];
        let ops = block_ops(&local, &remote, &[0, 1], &[2, 3]).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::new(0, (1 << 20) + 32, 16),
                Op::new(32, (1 << 20) + 48, 16)
            ]
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let l = [seg(0, 4, 16, 16)];
        let r = [seg(64, 4, 16, 16)];
        let code = |e: Error| e.code();
        assert_eq!(code(block_ops(&l, &r, &[4], &[0]).unwrap_err()), -3002);
        assert_eq!(code(block_ops(&l, &r, &[0], &[4]).unwrap_err()), -3002);
        assert!(block_ops(&l, &r, &[0, 1], &[2, 2]).is_err());
        assert!(block_ops(&l, &r, &[0], &[]).is_err());
        assert!(block_ops(&l, &[], &[0], &[0]).is_err());
        assert!(block_ops(&l, &[seg(64, 4, 8, 8)], &[0], &[0]).is_err());
        assert!(block_ops(&[seg(0, 4, 8, 16)], &r, &[0], &[0]).is_err());
        assert!(block_ops(&[seg(u64::MAX - 8, 4, 16, 16)], &r, &[0], &[0]).is_err());
        assert!(block_ops(&l, &r, &[], &[]).unwrap().is_empty());
    }
}
