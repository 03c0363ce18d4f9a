//! Copies large enough to use more than one core, without ever waiting for a core.
//!
//! Same-host copies are memory-bound: two threads move a large copy faster than one on an idle
//! machine. But a serving host is rarely idle, and a copy cut into fixed parts and handed to
//! fresh threads waits for the slowest of them to be scheduled, so under load it ran at half
//! the speed of one thread. Here the copy is cut into many chunks that threads *claim*: the
//! caller starts claiming at once, resident helper threads join in when the scheduler lets
//! them, and a helper that arrives after the last chunk was claimed just leaves. The caller
//! only ever waits for chunks already being copied.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::Op;
use crate::error::{Error, Result};

/// Below this a copy runs on the caller's thread alone: handing work over costs more.
pub(crate) const PARALLEL_MIN: u64 = 4 << 20;
/// Chunks are about this large: small enough to balance, large enough that claiming is noise.
const CHUNK: u64 = 1 << 20;
const MAX_CHUNKS: usize = 256;
const MAX_HELPERS: usize = 3;

type Work = dyn Fn(&[Op]) -> Result<()> + Send + Sync;

struct Job {
    chunks: Vec<Vec<Op>>,
    next: AtomicUsize,
    work: Box<Work>,
    state: Mutex<JobState>,
    finished: Condvar,
}

#[derive(Default)]
struct JobState {
    done: usize,
    /// The error of the lowest-numbered failed chunk.
    first_error: Option<(usize, Error)>,
}

impl Job {
    /// Claims and runs chunks until none is left.
    fn help(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            let Some(chunk) = self.chunks.get(i) else {
                return;
            };
            let r = (self.work)(chunk);
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.done += 1;
            if let Err(e) = r {
                if st.first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                    st.first_error = Some((i, e));
                }
            }
            if st.done == self.chunks.len() {
                self.finished.notify_all();
            }
        }
    }
}

/// Resident helper threads, started on first use; each takes jobs from its own queue.
fn helpers() -> &'static [Mutex<Sender<Arc<Job>>>] {
    static HELPERS: OnceLock<Vec<Mutex<Sender<Arc<Job>>>>> = OnceLock::new();
    HELPERS.get_or_init(|| {
        let n = super::cores().saturating_sub(1).min(MAX_HELPERS);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::channel::<Arc<Job>>();
            let spawned = std::thread::Builder::new()
                .name(format!("mf-copy-{i}"))
                .spawn(move || {
                    for job in rx {
                        job.help();
                    }
                });
            if spawned.is_ok() {
                out.push(Mutex::new(tx));
            }
        }
        out
    })
}

/// Cuts `ops` into chunks of about [`CHUNK`] bytes (splitting ops where needed).
fn chunks(ops: &[Op], total: u64) -> Vec<Vec<Op>> {
    let count = (total.div_ceil(CHUNK) as usize).clamp(1, MAX_CHUNKS);
    let per = total.div_ceil(count as u64).max(1);
    let mut out: Vec<Vec<Op>> = Vec::with_capacity(count);
    let mut cur: Vec<Op> = Vec::new();
    let mut room = per;
    for op in ops {
        let mut op = *op;
        while op.len > 0 {
            let take = op.len.min(room);
            cur.push(Op::new(op.local, op.remote, take));
            op.local += take;
            op.remote += take;
            op.len -= take;
            room -= take;
            if room == 0 {
                out.push(std::mem::take(&mut cur));
                room = per;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Runs `work` over `ops` (`total` bytes), on this thread and whichever helpers get a core.
/// Returns the error of the first failed chunk in op order. `work` must respect its own
/// deadline: this waits only for chunks that are being copied.
pub(crate) fn run<F>(ops: &[Op], total: u64, work: F) -> Result<()>
where
    F: Fn(&[Op]) -> Result<()> + Send + Sync + 'static,
{
    if total < PARALLEL_MIN || helpers().is_empty() {
        return work(ops);
    }
    let job = Arc::new(Job {
        chunks: chunks(ops, total),
        next: AtomicUsize::new(0),
        work: Box::new(work),
        state: Mutex::new(JobState::default()),
        finished: Condvar::new(),
    });
    for h in helpers() {
        // A helper that is gone only means less help.
        let _ = h
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job.clone());
    }
    job.help();
    let mut st = job.state.lock().unwrap_or_else(|p| p.into_inner());
    while st.done < job.chunks.len() {
        st = job
            .finished
            .wait_timeout(st, Duration::from_millis(100))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    match st.first_error.take() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_byte_in_order() {
        let ops = [Op::new(0, 1000, 3 << 20), Op::new(10 << 20, 20 << 20, 5)];
        let total = (3 << 20) + 5;
        let parts = chunks(&ops, total);
        assert!(parts.len() >= 3);
        let flat: Vec<Op> = parts.concat();
        assert_eq!(flat.iter().map(|o| o.len).sum::<u64>(), total);
        let mut expect = 0u64;
        for o in flat.iter().filter(|o| o.local < (10 << 20)) {
            assert_eq!(o.local, expect);
            assert_eq!(o.remote, 1000 + expect);
            expect += o.len;
        }
    }

    #[test]
    fn every_chunk_runs_once_and_the_first_error_wins() {
        use std::sync::atomic::AtomicU64;
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let ops = [Op::new(0, 0, 64 << 20)];
        run(&ops, 64 << 20, move |part| {
            s.fetch_add(part.iter().map(|o| o.len).sum::<u64>(), Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 64 << 20);
        let e = run(&ops, 64 << 20, |part| {
            if part[0].local >= 10 << 20 {
                Err(Error::OutOfBounds(format!("chunk at {}", part[0].local)))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            Error::OutOfBounds("chunk at 10485760".into()).to_string()
        );
    }
}
