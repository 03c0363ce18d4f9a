//! Host streams: ordered queues of asynchronous work with a synchronize that reports errors.
//!
//! A stream runs its jobs one after another on its own worker thread, in submission order.
//! The first failure is kept and returned by `synchronize` (and `query`); jobs submitted after
//! a failure still run, as a CUDA stream's would, but cannot hide the earlier error. Nothing is
//! lost: a stream dropped with work pending finishes that work first.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() -> Result<()> + Send>;

#[derive(Default)]
struct Progress {
    submitted: u64,
    done: u64,
    first_error: Option<Error>,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An ordered host work queue.
pub struct HostStream {
    tx: Option<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl HostStream {
    pub fn new() -> Result<HostStream> {
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("mf-stream".into())
            .spawn(move || {
                for job in rx {
                    let r = job();
                    let mut p = s.lock();
                    p.done += 1;
                    if let Err(e) = r {
                        if p.first_error.is_none() {
                            p.first_error = Some(e);
                        }
                    }
                    drop(p);
                    s.changed.notify_all();
                }
            })
            .map_err(|e| Error::NoResources(format!("cannot start a stream worker thread: {e}")))?;
        Ok(HostStream {
            tx: Some(tx),
            shared,
            worker: Some(worker),
        })
    }

    /// Queues `job` behind everything submitted before it.
    pub fn submit(&self, job: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::NotInit("the stream is closed".into()))?;
        self.shared.lock().submitted += 1;
        tx.send(Box::new(job)).map_err(|_| {
            self.shared.lock().submitted -= 1;
            Error::Failed("the stream worker has stopped".into())
        })
    }

    /// `Ok(true)` when all submitted work is done, `Ok(false)` while some runs; the first
    /// error of the stream once it is done (the error is cleared by reporting it).
    pub fn query(&self) -> Result<bool> {
        let mut p = self.shared.lock();
        if p.done < p.submitted {
            return Ok(false);
        }
        match p.first_error.take() {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }

    /// Waits until all work submitted so far is done (up to `timeout`), then reports the first
    /// error since the last report.
    pub fn synchronize(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.lock();
        let target = p.submitted;
        while p.done < target {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "stream synchronize: {} of {} jobs still pending after {timeout:?}",
                    target - p.done,
                    target
                )));
            }
            p = self
                .shared
                .changed
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match p.first_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A point in a stream's work: done once everything submitted before it is done. Events
/// order work across streams (`HostStream::wait_event`) and let a caller poll or wait for part
/// of a stream without draining it.
#[derive(Clone)]
pub struct Event {
    shared: Arc<Shared>,
    target: u64,
}

impl Event {
    /// True once the work before the event is done.
    pub fn query(&self) -> bool {
        self.shared.lock().done >= self.target
    }

    /// Waits (up to `timeout`) for the work before the event. Errors stay with the stream:
    /// they are reported by its `synchronize`, not here.
    pub fn synchronize(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.lock();
        while p.done < self.target {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "event synchronize: {} jobs before the event still pending after {timeout:?}",
                    self.target - p.done
                )));
            }
            p = self
                .shared
                .changed
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

impl HostStream {
    /// An event marking everything submitted so far.
    pub fn record_event(&self) -> Event {
        Event {
            shared: self.shared.clone(),
            target: self.shared.lock().submitted,
        }
    }

    /// Work submitted after this waits for `event` (of any stream) first. The wait is bounded
    /// by `timeout`; past it this stream records a timeout error and goes on, so that a stuck
    /// stream elsewhere cannot hang this one forever.
    pub fn wait_event(&self, event: &Event, timeout: Duration) -> Result<()> {
        let event = event.clone();
        self.submit(move || event.synchronize(timeout))
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        // Closing the channel lets the worker drain what is queued and stop.
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn runs_in_order_and_reports_the_first_error() {
        let s = HostStream::new().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..100 {
            let seen = seen.clone();
            s.submit(move || {
                seen.lock().unwrap().push(i);
                if i == 10 {
                    Err(Error::OutOfBounds("job 10".into()))
                } else if i == 20 {
                    Err(Error::Timeout("job 20".into()))
                } else {
                    Ok(())
                }
            })
            .unwrap();
        }
        let e = s.synchronize(Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("job 10"));
        assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
        // Reported once; the stream goes on.
        s.synchronize(Duration::from_secs(1)).unwrap();
        assert!(s.query().unwrap());
    }

    #[test]
    fn events_mark_points_and_order_streams() {
        let a = HostStream::new().unwrap();
        let b = HostStream::new().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s1 = seen.clone();
        a.submit(move || {
            std::thread::sleep(Duration::from_millis(200));
            s1.lock().unwrap().push("a");
            Ok(())
        })
        .unwrap();
        let ev = a.record_event();
        assert!(!ev.query());
        b.wait_event(&ev, Duration::from_secs(10)).unwrap();
        let s2 = seen.clone();
        b.submit(move || {
            s2.lock().unwrap().push("b");
            Ok(())
        })
        .unwrap();
        b.synchronize(Duration::from_secs(10)).unwrap();
        assert!(ev.query());
        assert_eq!(*seen.lock().unwrap(), vec!["a", "b"]);
        // An event that never completes in time fails the waiting stream, bounded.
        a.submit(|| {
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        })
        .unwrap();
        let late = a.record_event();
        assert_eq!(
            late.synchronize(Duration::from_millis(20))
                .unwrap_err()
                .code(),
            -2004
        );
        b.wait_event(&late, Duration::from_millis(20)).unwrap();
        assert_eq!(
            b.synchronize(Duration::from_secs(10)).unwrap_err().code(),
            -2004
        );
    }

    #[test]
    fn synchronize_has_a_deadline_and_drop_drains() {
        let count = Arc::new(AtomicU32::new(0));
        {
            let s = HostStream::new().unwrap();
            s.submit(|| {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })
            .unwrap();
            let c = count.clone();
            s.submit(move || {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
            assert!(!s.query().unwrap());
            assert_eq!(
                s.synchronize(Duration::from_millis(50)).unwrap_err().code(),
                -2004
            );
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
