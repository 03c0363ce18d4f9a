//! Work of this library ordered with a caller's device stream (`torch.cuda.current_stream()`).
//!
//! [`submit`] makes a job run after everything queued on the stream before the call and
//! before everything queued on it after the call, without blocking the caller: a host
//! function is queued on the stream; when the stream reaches it, it lets a worker thread run
//! the job and waits (bounded) until the job is done; then the stream goes on.
//!
//! The job runs on our worker, not on the driver's thread (which may not call the device
//! API), and its synchronous device copies run on a private non-blocking stream: the caller's
//! stream may be the legacy default stream, which is held by the host function until the job
//! ends.
//!
//! A failed job cannot fail the stream. Its error is logged and kept: the next [`submit`] on
//! the same stream returns it instead of queueing more work on data that never arrived, and
//! [`take_error`] hands it out.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{Device, StreamHandle};
use crate::error::{Error, Result};
use crate::log::ERROR;
use crate::mf_log;

/// How long a job may wait for the stream to reach it (the work queued before it may be
/// long kernels), on top of the job's own timeout.
const REACH_GRACE: Duration = Duration::from_secs(300);

const WAITING: u8 = 0;
const GO: u8 = 1;
const DONE: u8 = 2;

struct Gate {
    state: Mutex<u8>,
    cv: Condvar,
}

impl Gate {
    fn set(&self, v: u8) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *s < v {
            *s = v;
        }
        self.cv.notify_all();
    }

    /// Waits until the state is at least `v`; `false` on timeout.
    fn wait_for(&self, v: u8, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while *s < v {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Errors of finished jobs, by stream handle: (code, message).
fn errors() -> &'static Mutex<HashMap<u64, (i32, String)>> {
    static ERRORS: OnceLock<Mutex<HashMap<u64, (i32, String)>>> = OnceLock::new();
    ERRORS.get_or_init(Default::default)
}

/// The error of a failed job on `stream` not reported yet (and forgets it).
pub fn take_error(stream: StreamHandle) -> Option<Error> {
    let (code, msg) = errors()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&stream.0)?;
    Some(Error::from_code_message(
        code,
        format!(
            "an earlier transfer on device stream {:#x} failed: {msg}",
            stream.0
        ),
    ))
}

/// Queues `job` in order with the work on `stream` of `dev` (see the module notes). `timeout`
/// bounds the job once the stream has reached it.
pub fn submit(
    dev: &Arc<dyn Device>,
    stream: StreamHandle,
    job: Box<dyn FnOnce() -> Result<()> + Send>,
    timeout: Duration,
) -> Result<()> {
    if let Some(e) = take_error(stream) {
        return Err(e);
    }
    dev.prepare_ordered_work(0)?;
    let gate = Arc::new(Gate {
        state: Mutex::new(WAITING),
        cv: Condvar::new(),
    });
    let on_stream = gate.clone();
    // The job has its own deadline; a little more lets it report a timeout itself.
    let hold = timeout + Duration::from_secs(5);
    dev.launch_host_func(
        stream,
        Box::new(move || {
            on_stream.set(GO);
            if !on_stream.wait_for(DONE, hold) {
                mf_log!(
                    ERROR,
                    "a transfer ordered on a device stream ran past {hold:?}; the stream goes on"
                );
            }
        }),
    )?;
    let worker = gate.clone();
    let spawned = std::thread::Builder::new()
        .name("mf-stream-order".into())
        .spawn(move || {
            super::cuda::use_private_stream_copies(true);
            let r = if worker.wait_for(GO, timeout + REACH_GRACE) {
                job()
            } else {
                Err(Error::Timeout(format!(
                    "device stream {:#x} did not reach the transfer within {:?}",
                    stream.0,
                    timeout + REACH_GRACE
                )))
            };
            if let Err(e) = r {
                mf_log!(
                    ERROR,
                    "transfer on device stream {:#x} failed: {e}",
                    stream.0
                );
                errors()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(stream.0, (e.code(), e.to_string()));
            }
            worker.set(DONE);
        });
    if let Err(e) = spawned {
        // Nobody will run the job: release the host function at once.
        gate.set(DONE);
        return Err(Error::NoResources(format!(
            "cannot start a thread for a stream-ordered transfer: {e}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::host::HostDevice;
    use crate::device::Direction;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// On the host backend (whose streams run host functions in order, as devices do): a job
    /// runs after the work queued before it and before the work queued after it, and a failed
    /// job is reported by the next submit on that stream, not lost.
    #[test]
    fn jobs_run_in_stream_order_and_failures_are_reported() {
        let host = Arc::new(HostDevice::new());
        let dev: Arc<dyn Device> = host.clone();
        let s = dev.stream_create(0).unwrap();
        let n = 1 << 20;
        let buf = dev.alloc(0, n).unwrap();
        let fill = vec![0x5au8; n];
        // Work before the job: a slow step, then a copy the job must see.
        dev.launch_host_func(
            s,
            Box::new(|| std::thread::sleep(Duration::from_millis(300))),
        )
        .unwrap();
        // SAFETY: `buf` and `fill` outlive the stream synchronize below.
        unsafe { dev.copy_async(Direction::HostToDevice, buf, fill.as_ptr() as u64, n, s) }
            .unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let job_seen = seen.clone();
        submit(
            &dev,
            s,
            Box::new(move || {
                // SAFETY: `buf` holds `n` bytes until the test frees it after synchronize.
                let bytes = unsafe { std::slice::from_raw_parts(buf as *const u8, n) };
                let sum = bytes.iter().map(|&b| b as u64).sum();
                job_seen.store(sum, Ordering::SeqCst);
                Ok(())
            }),
            Duration::from_secs(10),
        )
        .unwrap();
        // The submit did not wait for the stream: the job cannot have run yet.
        assert_eq!(
            seen.load(Ordering::SeqCst),
            0,
            "submit waited for the stream"
        );
        // Work after the job sees what the job did.
        let after = seen.clone();
        let observed = Arc::new(AtomicU64::new(u64::MAX));
        let o = observed.clone();
        dev.launch_host_func(
            s,
            Box::new(move || o.store(after.load(Ordering::SeqCst), Ordering::SeqCst)),
        )
        .unwrap();
        dev.stream_synchronize(s, Duration::from_secs(10)).unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 0x5a * n as u64);
        assert_eq!(observed.load(Ordering::SeqCst), 0x5a * n as u64);

        // A failing job: the stream goes on, the next submit returns the error.
        submit(
            &dev,
            s,
            Box::new(|| Err(Error::OutOfBounds("the bytes were not there".into()))),
            Duration::from_secs(10),
        )
        .unwrap();
        dev.stream_synchronize(s, Duration::from_secs(10)).unwrap();
        let e = submit(&dev, s, Box::new(|| Ok(())), Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.code(), Error::OutOfBounds(String::new()).code());
        assert!(e.to_string().contains("the bytes were not there"), "{e}");
        // Reported once: the next submit is accepted again.
        submit(&dev, s, Box::new(|| Ok(())), Duration::from_secs(10)).unwrap();
        dev.stream_synchronize(s, Duration::from_secs(10)).unwrap();
        dev.stream_destroy(s).unwrap();
        dev.free(buf).unwrap();
    }
}
