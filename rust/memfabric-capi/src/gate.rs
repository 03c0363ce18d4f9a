//! A gate in front of a caller's C callback: once `close` returns, the callback is not running
//! and will not run again, so the caller may free what its user data points to. A callback
//! that closes its own gate (destroying its object from inside it) does not wait for itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

/// The gate of each handle's current callback, where a handle has one callback of a kind.
pub struct Gates(Mutex<Vec<(usize, Arc<Gate>)>>);

impl Gates {
    pub const fn new() -> Gates {
        Gates(Mutex::new(Vec::new()))
    }

    /// Makes `gate` the one of `handle`, closing the one it replaces.
    pub fn replace(&self, handle: *mut std::ffi::c_void, gate: Option<Arc<Gate>>) {
        let old = {
            let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let at = all.iter().position(|(h, _)| *h == handle as usize);
            let old = at.map(|i| all.remove(i).1);
            if let Some(gate) = gate {
                all.push((handle as usize, gate));
            }
            old
        };
        // Outside the lock: closing waits for a callback in progress.
        if let Some(old) = old {
            old.close();
        }
    }

    /// Closes every gate (an uninit).
    pub fn close_all(&self) {
        let all = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, gate) in all {
            gate.close();
        }
    }
}

#[derive(Default)]
pub struct Gate {
    /// Held while the callback runs.
    calling: Mutex<()>,
    /// The thread running the callback now.
    caller: Mutex<Option<ThreadId>>,
    closed: AtomicBool,
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Runs `f` unless the gate is closed.
    pub fn run(&self, f: impl FnOnce()) {
        let _calling = self.calling.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        *self.caller.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::current().id());
        f();
        *self.caller.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Closes the gate and waits for a callback in progress on another thread.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let me = std::thread::current().id();
        if *self.caller.lock().unwrap_or_else(|p| p.into_inner()) == Some(me) {
            return;
        }
        drop(self.calling.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn close_waits_for_a_running_callback_and_stops_later_ones() {
        let gate = Arc::new(Gate::new());
        let calls = Arc::new(AtomicU32::new(0));
        let running = {
            let (gate, calls) = (gate.clone(), calls.clone());
            std::thread::spawn(move || {
                gate.run(|| {
                    std::thread::sleep(Duration::from_millis(200));
                    calls.fetch_add(1, Ordering::SeqCst);
                })
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        gate.close();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "close returned while the callback ran"
        );
        gate.run(|| {
            calls.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        running.join().unwrap();
    }

    #[test]
    fn a_callback_may_close_its_own_gate() {
        let gate = Gate::new();
        gate.run(|| gate.close());
        let mut ran = false;
        gate.run(|| ran = true);
        assert!(!ran, "closed from inside, it stays closed");
    }
}
