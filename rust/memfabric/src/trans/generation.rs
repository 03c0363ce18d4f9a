//! The page same-host peers share with an engine: its registration generation, and the copies
//! they have in flight into its memory.
//!
//! Same-host paths (local, cma) copy into a peer without asking it, so the initiator must know
//! the peer's registered regions, and the peer must know when the initiator's copies are done.
//! The initiator caches the table the peer published in the store. The peer bumps the
//! generation every time it unregisters memory, after publishing the new table, and then waits
//! until every copy that started under the old generation has finished ([`GenerationPage::retire`]).
//! The initiator pins the generation for the length of each transfer ([`GenerationView::pin`]):
//! it counts itself in, reads the generation again, and refetches the table when it moved. So a
//! copy either sees the table without the region, or finishes before `unregister` returns;
//! afterwards the owner may free or reuse the memory at once.
//!
//! Each initiator process counts its copies in a slot of its own (tagged with its pid), with a
//! counter per generation parity: copies started under the new generation use the other
//! counter, so a steady stream of transfers cannot hold an unregister up, and a slot whose
//! process died is ignored (and may be taken over).
//!
//! The page is a memfd; a peer maps it through `/proc/<pid>/fd/<fd>`, which needs the same
//! permission as CMA itself. Its contents are written by other processes, so the owner trusts
//! nothing it reads there beyond waiting a bounded time.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::wait::poll_until;

const PAGE: usize = 4096;
/// The generation sits alone in the first cache line; the slots follow.
const SLOTS_AT: usize = 64;

/// One initiator process's copies in flight into the page's owner.
#[repr(C)]
struct Slot {
    /// The pid of the process that holds the slot; 0 when free.
    pid: AtomicU64,
    /// Copies in flight, by the parity of the generation they started under.
    active: [AtomicU64; 2],
    _pad: u64,
}

const SLOTS: usize = (PAGE - SLOTS_AT) / std::mem::size_of::<Slot>();

/// The shared page, seen through a mapping of `PAGE` bytes.
struct Shared {
    map: *mut libc::c_void,
}

// SAFETY: the mapping is only accessed through atomics; atomics are safe to share between
// threads, and the mapping lives as long as the struct.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn map(fd: i32, prot: i32) -> Result<Shared> {
        let map = crate::mem::map_shared(fd, PAGE, prot)
            .map_err(|e| Error::io("mmap of the generation page", e))?;
        Ok(Shared { map })
    }

    fn generation(&self) -> &AtomicU64 {
        // SAFETY: the mapping is PAGE bytes, page-aligned (so aligned for u64), zero-filled by
        // the kernel, and lives as long as self; every access to it is atomic.
        unsafe { &*(self.map as *const AtomicU64) }
    }

    fn slots(&self) -> &[Slot] {
        // SAFETY: SLOTS slots of 32 bytes fit in the page after SLOTS_AT, 8-byte aligned; a
        // Slot is atomics only (any bit pattern is valid), accessed atomically.
        unsafe {
            std::slice::from_raw_parts((self.map as *const u8).add(SLOTS_AT) as *const Slot, SLOTS)
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping we created, exactly once.
        unsafe { libc::munmap(self.map, PAGE) };
    }
}

/// The owner's side: the engine whose memory same-host peers copy into.
pub struct GenerationPage {
    fd: OwnedFd,
    page: Shared,
    /// A retire gave up before the copies it waited for ended: they may run under either
    /// parity now, so the next retire waits for both.
    unfinished: AtomicBool,
}

impl GenerationPage {
    pub fn create() -> Result<Self> {
        let name = c"memfabric-te-generation";
        // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it returns a new fd.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io(
                "memfd_create for the registration generation",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), PAGE as libc::off_t) } != 0 {
            return Err(Error::io(
                "ftruncate of the generation page",
                std::io::Error::last_os_error(),
            ));
        }
        let page = Shared::map(fd.as_raw_fd(), libc::PROT_READ | libc::PROT_WRITE)?;
        Ok(GenerationPage {
            fd,
            page,
            unfinished: AtomicBool::new(false),
        })
    }

    /// The fd number peers open as `/proc/<pid>/fd/<n>`.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub fn get(&self) -> u64 {
        self.page.generation().load(Ordering::SeqCst)
    }

    /// Announces that regions were removed (call it after the new table is published) and
    /// waits until no same-host peer has a copy in flight that started before: when it returns
    /// `Ok`, no copy of a peer reaches memory that is not in the published table. Copies that
    /// start later pin the new generation and see the new table. After a retire that timed
    /// out, the next one waits for copies under both parities (two rounds), so it covers the
    /// copies the earlier one gave up on.
    pub fn retire(&self, deadline: Instant) -> Result<()> {
        let rounds = if self.unfinished.load(Ordering::SeqCst) {
            2
        } else {
            1
        };
        for _ in 0..rounds {
            if let Err(e) = self.retire_once(deadline) {
                self.unfinished.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        self.unfinished.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn retire_once(&self, deadline: Instant) -> Result<()> {
        // SeqCst here and in `pin`: either the peer's count-in is seen below, or the peer sees
        // the new generation after counting itself in (and backs off).
        let old = self.page.generation().fetch_add(1, Ordering::SeqCst);
        let parity = (old & 1) as usize;
        for slot in self.page.slots() {
            let mut pid = 0;
            let copying = || {
                pid = slot.pid.load(Ordering::SeqCst);
                let done = pid == 0
                    || slot.active[parity].load(Ordering::SeqCst) == 0
                    || !process_alive(pid);
                Ok(done)
            };
            poll_until(left(deadline), "retire", copying).map_err(|_| {
                Error::Timeout(format!(
                    "a same-host peer (pid {pid}) still had a copy into this engine's memory in \
                     flight when the deadline passed; the region is unregistered (no new copy \
                     reaches it) but that copy may still land: unregister it again to wait for it"
                ))
            })?;
        }
        Ok(())
    }
}

/// A peer's page, mapped read-write to count this process's copies in.
pub struct GenerationView {
    page: Shared,
    /// This view's slot in the peer's page.
    slot: usize,
}

impl GenerationView {
    /// Maps the page of process `pid` published as fd `fd` and takes a slot in it for this
    /// process's copies. `NoResources` when every slot is held by a live process.
    pub fn open(pid: u32, fd: i32) -> Result<Self> {
        let (file, meta, path) = crate::mem::open_peer_fd(pid, fd, "generation page")?;
        if meta.len() < PAGE as u64 {
            return Err(Error::Refused(format!(
                "{path} is {} bytes, not a generation page",
                meta.len()
            )));
        }
        let page = Shared::map(file.as_raw_fd(), libc::PROT_READ | libc::PROT_WRITE)?;
        let slot = take_slot(page.slots()).ok_or_else(|| {
            Error::NoResources(format!(
                "all {SLOTS} slots for same-host peers of process {pid} are taken by live processes"
            ))
        })?;
        Ok(GenerationView { page, slot })
    }

    pub fn get(&self) -> u64 {
        self.page.generation().load(Ordering::SeqCst)
    }

    /// Counts one transfer of this process in under the current generation, which stays
    /// current for the owner's purposes until the pin is dropped: an unregister that bumps it
    /// waits for the pin. Gives up at `deadline` (only reached while the owner keeps bumping).
    pub fn pin(&self, deadline: Instant) -> Result<Pin<'_>> {
        // The usual case takes no clock reading: a transfer's fast path.
        if let Some(pin) = self.try_pin() {
            return Ok(pin);
        }
        let mut pinned = None;
        poll_until(left(deadline), "pin", || {
            pinned = self.try_pin();
            Ok(pinned.is_some())
        })
        .map_err(|_| Error::Timeout("the peer's registration generation kept moving".into()))?;
        pinned.ok_or_else(|| Error::Failed("pinned without a pin".into()))
    }

    /// Counts in under the generation read now, unless it moved meanwhile.
    fn try_pin(&self) -> Option<Pin<'_>> {
        let slot = &self.page.slots()[self.slot];
        let generation = self.get();
        let active = &slot.active[(generation & 1) as usize];
        active.fetch_add(1, Ordering::SeqCst);
        if self.get() == generation {
            return Some(Pin { active, generation });
        }
        active.fetch_sub(1, Ordering::SeqCst);
        None
    }
}

impl Drop for GenerationView {
    fn drop(&mut self) {
        // Every pin borrowed this view, so none is left: the slot's counts are zero.
        let _ = self.page.slots()[self.slot].pid.compare_exchange(
            u64::from(std::process::id()),
            0,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

/// One transfer counted in at a generation; counted out on drop, after its copies returned.
pub struct Pin<'a> {
    active: &'a AtomicU64,
    generation: u64,
}

impl Pin<'_> {
    /// The generation the transfer runs under: its table must be at least this new.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A free slot, else one whose process is gone; its counts start at zero.
fn take_slot(slots: &[Slot]) -> Option<usize> {
    let me = u64::from(std::process::id());
    let take = |i: usize, was: u64| {
        let s = &slots[i];
        if s.pid
            .compare_exchange(was, me, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        s.active[0].store(0, Ordering::SeqCst);
        s.active[1].store(0, Ordering::SeqCst);
        true
    };
    if let Some(i) = (0..SLOTS).find(|&i| slots[i].pid.load(Ordering::SeqCst) == 0 && take(i, 0)) {
        return Some(i);
    }
    (0..SLOTS).find(|&i| {
        let pid = slots[i].pid.load(Ordering::SeqCst);
        pid != me && !process_alive(pid) && take(i, pid)
    })
}

/// Whether `pid` names a running process (a zombie's copies are over). Values no process can
/// have (0 would address a process group) count as gone.
fn process_alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

fn is_zombie(pid: libc::pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state follows the command name, which is in parentheses and may hold anything.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .is_none_or(|state| matches!(state, 'Z' | 'X'))
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn a_view_sees_bumps() {
        let page = GenerationPage::create().unwrap();
        let view = GenerationView::open(std::process::id(), page.fd()).unwrap();
        assert_eq!(view.get(), 0);
        page.retire(far()).unwrap();
        page.retire(far()).unwrap();
        assert_eq!(view.get(), 2);
        assert_eq!(page.get(), 2);
        assert!(matches!(
            GenerationView::open(std::process::id(), 987_654),
            Err(Error::PeerGone(_))
        ));
    }

    /// Runs `retire` on another thread, drops `pins` one by one 30 ms apart meanwhile, and
    /// returns how long the retire took.
    fn retire_while_dropping(page: &GenerationPage, pins: Vec<Pin<'_>>) -> Duration {
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let t = Instant::now();
                page.retire(far()).map(|_| t.elapsed())
            });
            for pin in pins {
                std::thread::sleep(Duration::from_millis(30));
                drop(pin);
            }
            waiter.join().unwrap().unwrap()
        })
    }

    #[test]
    fn retire_waits_for_the_pins_of_the_old_generation() {
        let page = GenerationPage::create().unwrap();
        let view = GenerationView::open(std::process::id(), page.fd()).unwrap();
        let p0 = view.pin(far()).unwrap();
        assert_eq!(p0.generation(), 0);
        let waited = retire_while_dropping(&page, vec![p0]);
        assert!(waited >= Duration::from_millis(25), "{waited:?}");
        assert_eq!(page.get(), 1);
        // Held at generation 1 while a retire bumps to 2: a pin taken meanwhile is under 2 and
        // does not hold that retire up (a steady stream of transfers cannot starve it).
        let p1 = view.pin(far()).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| page.retire(far()));
            while page.get() != 2 {
                std::hint::spin_loop();
            }
            let p2 = view.pin(far()).unwrap();
            assert_eq!(p2.generation(), 2);
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                !waiter.is_finished(),
                "retire returned with a pin of its generation"
            );
            drop(p1);
            waiter.join().unwrap().unwrap();
            drop(p2);
        });
    }

    #[test]
    fn after_a_retire_gave_up_the_next_one_waits_for_both_parities() {
        let page = GenerationPage::create().unwrap();
        let view = GenerationView::open(std::process::id(), page.fd()).unwrap();
        let stuck = view.pin(far()).unwrap();
        let t0 = Instant::now();
        let e = page.retire(t0 + Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(page.get(), 1);
        // Generation 0's copy is still running, and one under generation 1 started since: the
        // next retire waits for both, though the first is of the parity it would not wait for.
        let later = view.pin(far()).unwrap();
        assert_eq!(later.generation(), 1);
        let waited = retire_while_dropping(&page, vec![later, stuck]);
        assert!(waited >= Duration::from_millis(55), "{waited:?}");
        assert_eq!(page.get(), 3, "two rounds after an unfinished retire");
        page.retire(far()).unwrap();
        assert_eq!(page.get(), 4, "one round again");
    }

    #[test]
    fn slots_of_dead_processes_are_ignored_and_taken_over() {
        let page = GenerationPage::create().unwrap();
        let slots = page.page.slots();
        // A process that no longer exists, with a copy counted in under generation 0.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = u64::from(child.id());
        child.wait().unwrap();
        for s in slots {
            s.pid.store(dead, Ordering::SeqCst);
            s.active[0].store(1, Ordering::SeqCst);
        }
        page.retire(Instant::now() + Duration::from_millis(500))
            .expect("a dead process's count is not waited for");
        let view = GenerationView::open(std::process::id(), page.fd()).unwrap();
        assert_eq!(
            slots[view.slot].active[0].load(Ordering::SeqCst),
            0,
            "a slot taken over starts at zero"
        );
        drop(view);
        // Every slot held by a live process: no room.
        for s in slots {
            s.pid.store(1, Ordering::SeqCst);
        }
        assert!(matches!(
            GenerationView::open(std::process::id(), page.fd()),
            Err(Error::NoResources(_))
        ));
    }

    #[test]
    fn values_no_process_has_are_not_alive() {
        assert!(!process_alive(0));
        assert!(!process_alive(u64::MAX));
        assert!(!process_alive(1 << 40));
        assert!(process_alive(u64::from(std::process::id())));
    }
}
