//! The tables behind C handles. A handle is a number this library gave out, looked up on every
//! call and never dereferenced, so a stale, made-up or wrong-kind handle is refused instead of
//! followed. Numbers are unique across the tables: a Big Memory handle passed where a transfer
//! handle belongs is unknown there.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memfabric::{Error, Result};

static NEXT: AtomicUsize = AtomicUsize::new(1);

/// The live objects of one kind, by handle.
pub struct Table<T> {
    /// The kind, as messages name it ("transfer", "Big Memory", ...).
    what: &'static str,
    live: Mutex<Option<HashMap<usize, Arc<T>>>>,
}

impl<T> Table<T> {
    pub const fn new(what: &'static str) -> Self {
        Table {
            what,
            live: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<HashMap<usize, Arc<T>>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `obj` and gives its handle, unless `admit` (checked under the table's lock, so
    /// that it cannot change before the object is in) refuses; `obj` is then dropped.
    pub fn insert(&self, obj: T, admit: impl FnOnce() -> Result<()>) -> Result<*mut c_void> {
        let mut live = self.lock();
        if let Err(e) = admit() {
            drop(live);
            drop(obj);
            return Err(e);
        }
        let handle = NEXT.fetch_add(1, Ordering::Relaxed);
        live.get_or_insert_with(HashMap::new)
            .insert(handle, Arc::new(obj));
        Ok(handle as *mut c_void)
    }

    /// Every live object, in handle order.
    pub fn snapshot(&self) -> Vec<Arc<T>> {
        let live = self.lock();
        let mut all: Vec<(usize, Arc<T>)> = live
            .iter()
            .flat_map(|m| m.iter().map(|(h, o)| (*h, o.clone())))
            .collect();
        all.sort_by_key(|(h, _)| *h);
        all.into_iter().map(|(_, o)| o).collect()
    }

    /// The object behind `handle`.
    pub fn get(&self, handle: *mut c_void) -> Result<Arc<T>> {
        if handle.is_null() {
            return Err(Error::InvalidParam(format!("{} handle is NULL", self.what)));
        }
        self.lock()
            .as_ref()
            .and_then(|m| m.get(&(handle as usize)).cloned())
            .ok_or_else(|| {
                Error::InvalidParam(format!(
                    "{handle:p} is not a live {} handle (never created, destroyed, or its uninit \
                     was called)",
                    self.what
                ))
            })
    }

    /// Removes the object behind `handle` and waits until it is gone (see [`release`]).
    pub fn destroy(&self, handle: *mut c_void, limit: Duration) -> Result<()> {
        let removed = self
            .lock()
            .as_mut()
            .and_then(|m| m.remove(&(handle as usize)));
        match removed {
            Some(obj) => release(obj, limit, self.what),
            None => self.get(handle).map(|_| ()),
        }
    }

    /// Removes every object (after `close`, run under the table's lock, so that nothing is
    /// added meanwhile) and waits until each is gone; the first error.
    pub fn destroy_all(&self, limit: Duration, close: impl FnOnce()) -> Result<()> {
        let all = {
            let mut live = self.lock();
            close();
            live.take().unwrap_or_default()
        };
        let mut first = Ok(());
        for (_, obj) in all {
            let r = release(obj, limit, self.what);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// A process-wide runtime (Big Memory's, Share Memory's): set by its init, taken by its uninit.
pub struct Slot<T> {
    /// The product and its init call, as messages name them.
    what: &'static str,
    init: &'static str,
    inner: Mutex<Option<Arc<T>>>,
}

impl<T> Slot<T> {
    pub const fn new(what: &'static str, init: &'static str) -> Self {
        Slot {
            what,
            init,
            inner: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<T>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self) -> Result<Arc<T>> {
        self.lock().clone().ok_or_else(|| {
            Error::NotInit(format!(
                "{} is not initialized: call {} first",
                self.what, self.init
            ))
        })
    }

    /// Sets the runtime `start` makes (run under the slot's lock, so two inits cannot race);
    /// a second init is refused.
    pub fn fill(&self, start: impl FnOnce() -> Result<T>) -> Result<()> {
        let mut slot = self.lock();
        if slot.is_some() {
            return Err(Error::RepeatInvoke(format!(
                "{} is already initialized in this process",
                self.what
            )));
        }
        *slot = Some(Arc::new(start()?));
        Ok(())
    }

    pub fn take(&self) -> Option<Arc<T>> {
        self.lock().take()
    }
}

/// Drops the table's reference to an object once no call holds another (a transfer or copy
/// running on another thread, a job queued on a stream), so that when this returns the object
/// is gone: no peer reaches the memory it served any more. After `limit` it lets go anyway and
/// says so; the last call to finish then releases the object.
pub fn release<T>(obj: Arc<T>, limit: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut obj = obj;
    loop {
        match Arc::try_unwrap(obj) {
            Ok(last) => {
                drop(last);
                return Ok(());
            }
            Err(shared) if Instant::now() >= deadline => {
                let users = Arc::strong_count(&shared) - 1;
                drop(shared);
                return Err(Error::Timeout(format!(
                    "a {what} object: {users} call(s) still used it after {limit:?}; it is \
                     released when they end"
                )));
            }
            Err(shared) => {
                obj = shared;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn release_waits_for_the_other_holders_then_drops() {
        let dropped = Arc::new(AtomicBool::new(false));
        let obj = Arc::new(Flag(dropped.clone()));
        let held = obj.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let start = Instant::now();
        release(obj, Duration::from_secs(5), "test").unwrap();
        assert!(start.elapsed() >= Duration::from_millis(90));
        assert!(dropped.load(Ordering::SeqCst), "released before returning");
        t.join().unwrap();

        let dropped = Arc::new(AtomicBool::new(false));
        let obj = Arc::new(Flag(dropped.clone()));
        let held = obj.clone();
        let e = release(obj, Duration::from_millis(50), "test").unwrap_err();
        assert_eq!(e.code(), -2004);
        assert!(e.to_string().contains("1 call(s)"), "{e}");
        assert!(!dropped.load(Ordering::SeqCst));
        drop(held);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the last holder releases it"
        );
    }

    #[test]
    fn handles_are_unique_across_tables_and_refused_after_destroy() {
        static A: Table<u32> = Table::new("kind A");
        static B: Table<u32> = Table::new("kind B");
        let a = A.insert(1, || Ok(())).unwrap();
        let b = B.insert(2, || Ok(())).unwrap();
        assert_ne!(a, b);
        assert!(B
            .get(a)
            .unwrap_err()
            .to_string()
            .contains("not a live kind B handle"));
        assert_eq!(*A.get(a).unwrap(), 1);
        let refused = A.insert(3, || Err(Error::NotInit("closed".into())));
        assert_eq!(refused.unwrap_err().code(), -2008);
        A.destroy(a, Duration::from_secs(1)).unwrap();
        assert!(A.get(a).is_err());
        assert!(A.destroy(a, Duration::from_secs(1)).is_err());
        assert!(A
            .get(std::ptr::null_mut())
            .unwrap_err()
            .to_string()
            .contains("NULL"));
        B.destroy_all(Duration::from_secs(1), || {}).unwrap();
        assert!(B.get(b).is_err());
    }
}
