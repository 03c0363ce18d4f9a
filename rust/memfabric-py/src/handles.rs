//! Objects that a runtime's `uninitialize` must invalidate: a Python object holds a `Handle`,
//! the runtime's `Registry` holds weak references to every handle it gave out, and
//! `uninitialize` empties them all, so that a later call on a stale object is a clear
//! "not initialized" error instead of silently using a runtime the caller shut down.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

type Slot<T> = Mutex<Option<Arc<T>>>;

/// A Python object's reference to a core object; empty once destroyed or uninitialized.
pub struct Handle<T> {
    slot: Arc<Slot<T>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Handle<T> {
    pub fn get(&self) -> Option<Arc<T>> {
        lock(&self.slot).clone()
    }

    pub fn take(&self) -> Option<Arc<T>> {
        lock(&self.slot).take()
    }
}

/// Every handle a runtime gave out.
pub struct Registry<T> {
    live: Mutex<Vec<Weak<Slot<T>>>>,
}

impl<T> Registry<T> {
    pub const fn new() -> Self {
        Registry {
            live: Mutex::new(Vec::new()),
        }
    }

    pub fn adopt(&self, value: T) -> Handle<T> {
        let slot = Arc::new(Mutex::new(Some(Arc::new(value))));
        let mut live = lock(&self.live);
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&slot));
        Handle { slot }
    }

    /// Empties every live handle; the caller drops what comes back (without the GIL).
    pub fn release_all(&self) -> Vec<Arc<T>> {
        lock(&self.live)
            .drain(..)
            .filter_map(|w| w.upgrade())
            .filter_map(|slot| lock(&slot).take())
            .collect()
    }
}
