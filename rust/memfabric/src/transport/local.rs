//! The peer is this process: a plain memory copy.

use std::time::Instant;

use super::{expired, run_split, sane, CheckedOps, Op, Transport};
use crate::error::{Error, Result};

/// Copies within this process. Large batches (>= 4 MiB) are split across up to 4 threads,
/// because one core cannot saturate memory bandwidth.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalTransport;

impl LocalTransport {
    pub fn new() -> Self {
        LocalTransport
    }

    fn run(&self, ops: &CheckedOps, deadline: Instant, to_remote: bool) -> Result<()> {
        if !ops.remote_checked() {
            return Err(Error::InvalidParam(
                "local transport: the remote side of the ops was not checked against the \
                 peer's region table"
                    .into(),
            ));
        }
        if ops.total_bytes() == 0 {
            return Ok(());
        }
        expired(deadline, "local copy")?;
        for op in ops.ops() {
            sane(op)?;
        }
        run_split(ops.ops(), ops.total_bytes(), move |part| {
            copy_part(part, to_remote, deadline)
        })
    }
}

/// A copy cannot be interrupted, so large ones go in pieces of this size with a deadline
/// check between them (~10 ms each at memory speed).
const PIECE: u64 = 64 << 20;

fn copy_part(part: &[Op], to_remote: bool, deadline: Instant) -> Result<()> {
    for op in part {
        let mut off = 0u64;
        while off < op.len {
            if off > 0 {
                expired(deadline, "local copy")?;
            }
            let n = (op.len - off).min(PIECE);
            let (src, dst) = if to_remote {
                (op.local + off, op.remote + off)
            } else {
                (op.remote + off, op.local + off)
            };
            // SAFETY: both ranges come from CheckedOps: each lies inside a region of this
            // process that registration found mapped readable and writable and that its owner
            // keeps mapped while registered; `sane` ruled out null and wrapping ranges. `copy`
            // (memmove) because nothing stops a caller from pointing both sides into one region.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, n as usize) };
            off += n;
        }
    }
    Ok(())
}

impl Transport for LocalTransport {
    fn name(&self) -> &'static str {
        "local"
    }

    fn write(&self, ops: &CheckedOps, deadline: Instant) -> Result<()> {
        self.run(ops, deadline, true)
    }

    fn read(&self, ops: &CheckedOps, deadline: Instant) -> Result<()> {
        self.run(ops, deadline, false)
    }
}
