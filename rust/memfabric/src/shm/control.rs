//! What the ranks of a Share Memory object coordinate through the config store besides the
//! object's own barrier and all_gather: sub-groups of them named by a key, small integer values
//! each held by one rank at a time, and a global exit that runs every rank's exit function.
//!
//! Keys, next to those of the object's group `<obj>/` (see [`crate::store::group`]):
//! - a sub-group is a group of its own, `<obj>.sub.<key>` (`%` and `/` of the key escaped),
//!   entered and met as [`Group::enter`] and [`Group::meet`] describe, on a store connection of
//!   its own;
//! - `<obj>/value/<v>` names the rank that claimed value `v` (empty: free), and
//!   `<obj>/value-held/<v>/<holder>` lives while that holder's connection does;
//! - `<obj>/exit` holds the status of a global exit; `<obj>/exit-watch/<rank>/on` lives while
//!   that rank watches for it (deleting it wakes the watcher when the object goes).
//!
//! What stays in the store: the last rank to leave the object removes `<obj>/exit` and the
//! `value/` keys ([`forget_object`]), and the last member of a sub-group's meeting its keys;
//! when that rank dies instead, they stay (nothing can tell later that no one uses them).
//!
//! Every call ends by the deadline it is given (the object's control operation timeout), and
//! each costs a rank O(1) store round trips however many ranks there are (the allocator: O(1)
//! expected, retrying only when another rank took the same value at the same moment, and
//! waiting a grace before it takes back the value of a rank that seems gone).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::log::{DEBUG, WARN};
use crate::mf_log;
use crate::store::group::{reconnect_grace_left, MEMBER_GRACE};
use crate::store::{within, ClientOptions, Group, StoreClient};

/// Longest sub-group key, in bytes.
pub const MAX_KEY_LEN: usize = 63;
/// Values are allocated below a limit of at most this many (`SMEM_SHM_ATOMIC_NUM_LIMIT`).
pub const VALUE_LIMIT: u32 = 1024;
/// Longest teardown (leaving sub-groups, giving values back) may take when the store is gone.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(2);
/// How long one wait of the exit watcher may be held by the store before it asks again.
const EXIT_WAIT_SLICE: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// The object's group name (its key prefix without the trailing `/`).
fn object_name(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

/// A random number below `n` (> 0), different in every process and call.
fn random_below(n: usize) -> usize {
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (r % n as u64) as usize
}

/// Removes what the object's ranks shared here, once the last of them has left the object's
/// group: the published exit and the value claims. Nobody reads them afterwards; an object
/// created again in the same namespace (a later run on a long-lived store) must not see them.
pub fn forget_object(client: &StoreClient, object_prefix: &str) {
    within(Instant::now() + TEARDOWN_LIMIT, || {
        let forgotten = client
            .delete(&format!("{object_prefix}exit"))
            .and_then(|_| client.list(&format!("{object_prefix}value/")))
            .and_then(|keys| keys.iter().try_for_each(|k| client.delete(k).map(|_| ())));
        if let Err(e) = forgotten {
            mf_log!(
                DEBUG,
                "removing the keys of {}: {e}",
                object_name(object_prefix)
            );
        }
    });
}

// ---- sub-groups ---------------------------------------------------------------------------

/// The sub-groups this rank has met in, by key. A sub-group is entered the first time this rank
/// uses its key: its rank is claimed, then the first call waits until every member has claimed
/// theirs (a member that never comes is a timeout). From then on its barriers and gathers fail
/// at once when a member dies or destroys the object.
///
/// Each sub-group has a store connection of its own, opened when it is entered and closed when
/// it is left: a rendezvous or barrier waiting in one sub-group holds up no other, nor the
/// object's own calls.
///
/// A barrier or gather that failed because a member left (or because the store failed) ends
/// this rank's membership: it leaves the sub-group (the others' waits in it fail at once) and
/// forgets it, and the next call with the key enters and meets afresh, with barriers and
/// gathers numbered under the new meeting, so no count left by the failed one lets a barrier
/// pass early. One that timed out while every member of the meeting is still there keeps it:
/// each member's n-th barrier still adds its one count to barrier n (a member that comes later
/// passes it, its n+1-th meets the others' next), so nothing passes early either, and a slow
/// member does not break the sub-group for the others.
pub struct SubGroups {
    /// The object's connection: where the store is now (it may have moved since the object
    /// was created).
    client: Arc<StoreClient>,
    object: String,
    object_size: u32,
    /// One slot per key, locked while that key's sub-group is entered and met: a rendezvous
    /// waiting for late members holds up that key only.
    joined: Mutex<HashMap<String, Arc<JoinSlot>>>,
}

/// This rank's membership in one sub-group, once met.
type JoinSlot = Mutex<Option<Arc<Group>>>;

impl SubGroups {
    /// Sub-groups of the object whose group prefix is `object_prefix`, of `object_size` ranks,
    /// reached at the store of `client`.
    pub fn new(client: Arc<StoreClient>, object_prefix: &str, object_size: u32) -> SubGroups {
        SubGroups {
            client,
            object: object_name(object_prefix).to_string(),
            object_size,
            joined: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until the `size` ranks of sub-group `key` (this one being `rank`) reach it.
    pub fn barrier(&self, key: &str, size: u32, rank: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let group = self.member(key, size, rank, deadline)?;
        let done = group.barrier(left(deadline));
        self.forget_on_failure(key, &group, done)
    }

    /// Gathers `data` from the `size` ranks of sub-group `key`; the pieces in sub-group rank
    /// order.
    pub fn all_gather(
        &self,
        key: &str,
        size: u32,
        rank: u32,
        data: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let group = self.member(key, size, rank, deadline)?;
        let done = group.all_gather(data, left(deadline));
        self.forget_on_failure(key, &group, done)
    }

    fn check(&self, key: &str, size: u32, rank: u32) -> Result<()> {
        if key.len() > MAX_KEY_LEN {
            return Err(Error::InvalidParam(format!(
                "sub-group key of {} bytes; at most {MAX_KEY_LEN}",
                key.len()
            )));
        }
        if size == 0 || size > self.object_size {
            return Err(Error::InvalidParam(format!(
                "sub-group {key:?}: rankSize {size} is outside [1, {}] (the object's rank count)",
                self.object_size
            )));
        }
        if rank >= size {
            return Err(Error::InvalidParam(format!(
                "sub-group {key:?}: rankId {rank} is outside [0, {size})"
            )));
        }
        Ok(())
    }

    /// This rank's membership in sub-group `key`, entering and meeting it the first time.
    fn member(&self, key: &str, size: u32, rank: u32, deadline: Instant) -> Result<Arc<Group>> {
        self.check(key, size, rank)?;
        let slot = lock(&self.joined)
            .entry(key.to_string())
            .or_default()
            .clone();
        let mut slot = lock(&slot);
        if let Some(group) = slot.as_ref() {
            if (group.world(), group.rank()) != (size, rank) {
                return Err(Error::InvalidParam(format!(
                    "sub-group {key:?}: this rank is rank {} of {} there, not rank {rank} of {size}",
                    group.rank(),
                    group.world()
                )));
            }
            return Ok(group.clone());
        }
        let name = format!("{}.sub.{}", self.object, escape_key(key));
        let options = ClientOptions {
            timeout: left(deadline),
            ..Default::default()
        };
        let group = within(deadline, || {
            let own = StoreClient::connect(&self.client.url(), options)?;
            Group::enter(Arc::new(own), &name, size, rank)
        })?;
        // Outside `within`: the store answers the wait at the deadline, and the client must be
        // let read that answer rather than give up on the connection at the same instant.
        if let Err(e) = group.meet(left(deadline)) {
            // Give the rank back now (closing the connection would, a moment later), so that
            // calling again can take it.
            let _ = group.leave();
            return Err(e);
        }
        let group = Arc::new(group);
        *slot = Some(group.clone());
        Ok(group)
    }

    /// Passes `outcome` on; when it failed, this rank leaves sub-group `key` first unless it
    /// only timed out in an intact meeting (see the type's docs).
    fn forget_on_failure<T>(&self, key: &str, group: &Arc<Group>, outcome: Result<T>) -> Result<T> {
        let outcome = match outcome {
            Ok(v) => return Ok(v),
            Err(Error::Timeout(m)) => {
                // One short look, past the call's deadline (which has passed): bounded like
                // teardown.
                match within(Instant::now() + TEARDOWN_LIMIT, || group.meeting_intact()) {
                    Ok(true) => return Err(Error::Timeout(m)),
                    _ => Err(Error::Timeout(format!(
                        "{m}; a member of sub-group {key:?} left meanwhile: the next call meets \
                         the members again"
                    ))),
                }
            }
            Err(e) => Err(e),
        };
        let slot = lock(&self.joined).get(key).cloned();
        if let Some(slot) = slot {
            let mut slot = lock(&slot);
            if slot.as_ref().is_some_and(|g| Arc::ptr_eq(g, group)) {
                *slot = None;
            }
        }
        if let Err(e) = group.leave() {
            mf_log!(DEBUG, "leaving sub-group {key:?} of {}: {e}", self.object);
        }
        outcome
    }

    /// Leaves every sub-group (the object is going): the others' waits in them fail from now on.
    pub fn leave_all(&self) {
        let slots: Vec<_> = lock(&self.joined).drain().map(|(_, s)| s).collect();
        let deadline = Instant::now() + TEARDOWN_LIMIT;
        within(deadline, || {
            for slot in slots {
                if let Some(group) = lock(&slot).take() {
                    // Its connection closes when the group goes, which the store also takes as
                    // leaving: a failure here costs only the removal of the meeting's keys.
                    if let Err(e) = group.leave() {
                        mf_log!(DEBUG, "leaving a sub-group of {}: {e}", self.object);
                    }
                }
            }
        });
    }
}

/// `key` as part of a group name: no `/` (a group name has none), and no two keys alike.
fn escape_key(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

// ---- values -------------------------------------------------------------------------------

/// Small integer values that ranks of the object hold one at a time (`atomic_alloc_value`).
///
/// `value/<v>` is the claim: the holder's id (`<rank>-<random>`, one per allocator, so a rank
/// that comes back in a new process is another holder), taken and given back by compare-and-set
/// only, so a rank never erases a claim it does not hold; empty (or missing) is free.
/// `value-held/<v>/<holder>` is the holder's liveness for it: an ephemeral key of the holder's
/// connection, which its keeper publishes again after a connection blip or a store restart.
///
/// - A claim whose holder's liveness key is missing is taken back, but only when no value is
///   free, and only after it was seen missing [`MEMBER_GRACE`] apart: a blip or a restart
///   makes it vanish for less than that.
/// - A store restart loses the claims but not the liveness keys (they come back): a value with
///   no claim and a holder's liveness key is held by that holder (and its claim is written
///   again). A rank whose own connection was restored gives the keepers the same grace first.
/// - A rank never takes a value it holds itself, whatever the store says.
/// - A holder cut off for longer than the grace (a partition) may find its value taken back:
///   its release then says so, and its claim on it is gone.
pub struct ValueAllocator {
    client: Arc<StoreClient>,
    prefix: String,
    /// This allocator's holder id.
    me: String,
    /// The values this rank holds (released only by it; given back when the object goes). Not
    /// held across store calls.
    held: Mutex<BTreeSet<u32>>,
}

/// A value and the holder id its claim names.
type Claim = (u32, Vec<u8>);

/// The values below a limit, as one look at the store found them.
struct Survey {
    /// Free, lowest first.
    free: Vec<u32>,
    /// Claimed by a holder whose liveness key is missing: (value, holder), lowest first.
    orphaned: Vec<Claim>,
}

impl ValueAllocator {
    /// Values of the object whose group prefix is `object_prefix`, held as its rank `rank`.
    pub fn new(client: Arc<StoreClient>, object_prefix: &str, rank: u32) -> ValueAllocator {
        let nonce = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        ValueAllocator {
            client,
            prefix: object_prefix.to_string(),
            me: format!("{rank}-{nonce:016x}"),
            held: Mutex::new(BTreeSet::new()),
        }
    }

    fn value_key(&self, value: u32) -> String {
        format!("{}value/{value}", self.prefix)
    }

    fn liveness_key(&self, value: u32) -> String {
        format!("{}value-held/{value}/{}", self.prefix, self.me)
    }

    /// A value in `[0, limit)` that no other rank holds, held by this rank until it releases
    /// it. The lowest free one unless another rank takes that at the same moment.
    pub fn alloc(&self, limit: u32, timeout: Duration) -> Result<u32> {
        if limit == 0 || limit > VALUE_LIMIT {
            return Err(Error::InvalidParam(format!(
                "limit {limit} is outside [1, {VALUE_LIMIT}]"
            )));
        }
        let deadline = Instant::now() + timeout;
        within(deadline, || {
            // Orphaned claims first seen, and when: taken back only if still orphaned a grace
            // later.
            let mut suspects: Option<(Instant, Vec<Claim>)> = None;
            let mut collided = false;
            let mut first = true;
            loop {
                if !first && Instant::now() >= deadline {
                    return Err(Error::Timeout(format!(
                        "allocating a value below {limit}: other ranks kept taking the free ones"
                    )));
                }
                first = false;
                let Some(survey) = self.survey(limit)? else {
                    continue;
                };
                // This rank's connection came back just now (a store restart): the holders'
                // liveness keys may not all be back yet.
                if let Some(rest) = reconnect_grace_left(&self.client) {
                    std::thread::sleep(rest.min(left(deadline)));
                    continue;
                }
                let (value, expected) = if !survey.free.is_empty() {
                    // After a collision, spread over the free values rather than all retrying
                    // the lowest.
                    let at = if collided {
                        random_below(survey.free.len())
                    } else {
                        0
                    };
                    (survey.free[at], Vec::new())
                } else if survey.orphaned.is_empty() {
                    return Err(Error::NoResources(format!(
                        "every value below {limit} is held by a live rank of {}",
                        object_name(&self.prefix)
                    )));
                } else {
                    let confirmed: Vec<Claim> = match &suspects {
                        Some((seen, before)) if seen.elapsed() >= MEMBER_GRACE => survey
                            .orphaned
                            .iter()
                            .filter(|o| before.contains(o))
                            .cloned()
                            .collect(),
                        _ => Vec::new(),
                    };
                    if confirmed.is_empty() {
                        // First seen now (or others than before): they must stay orphaned for
                        // a grace before they are taken back.
                        match &suspects {
                            Some((seen, _)) if seen.elapsed() < MEMBER_GRACE => {}
                            _ => suspects = Some((Instant::now(), survey.orphaned)),
                        }
                        let seen = suspects.as_ref().map_or_else(Instant::now, |s| s.0);
                        let ripe = seen + MEMBER_GRACE;
                        if ripe >= deadline {
                            return Err(Error::NoResources(format!(
                                "every value below {limit} is held: by a live rank of {}, or by \
                                 one gone too recently to be taken back within the timeout",
                                object_name(&self.prefix)
                            )));
                        }
                        std::thread::sleep(ripe.saturating_duration_since(Instant::now()));
                        continue;
                    }
                    let at = random_below(confirmed.len());
                    confirmed[at].clone()
                };
                if self.claim(value, &expected)? {
                    return Ok(value);
                }
                collided = true;
            }
        })
    }

    /// Claims `value` if its claim is still `expected`; whether it did.
    fn claim(&self, value: u32, expected: &[u8]) -> Result<bool> {
        let key = self.value_key(value);
        let me = self.me.as_bytes();
        let now = match self.client.compare_set(&key, expected, me) {
            Ok(now) => now,
            // The answer was lost with the connection: look whether the claim landed.
            Err(Error::Reconnected(_)) => self.client.get(&key)?.unwrap_or_default(),
            Err(e) => return Err(e),
        };
        if now != me {
            return Ok(false);
        }
        if let Err(e) = self.client.set_ephemeral(&self.liveness_key(value), b"") {
            // Without its liveness key the claim would be taken back a moment later anyway.
            let _ = self.client.compare_set(&key, me, b"");
            return Err(e);
        }
        lock(&self.held).insert(value);
        Ok(true)
    }

    /// The values below `limit` that can be taken. `None` when a key went while looking: look
    /// again.
    fn survey(&self, limit: u32) -> Result<Option<Survey>> {
        let listed = self.client.list(&format!("{}value/", self.prefix))?;
        let claims: HashMap<u32, Vec<u8>> = if listed.is_empty() {
            HashMap::new()
        } else {
            match self.client.multi_get(&listed, None) {
                Ok(holders) => listed
                    .iter()
                    .zip(holders)
                    .filter_map(|(k, h)| Some((k.rsplit('/').next()?.parse().ok()?, h)))
                    .collect(),
                Err(Error::NotExist(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        };
        let live_prefix = format!("{}value-held/", self.prefix);
        let mut live: HashMap<u32, HashSet<Vec<u8>>> = HashMap::new();
        for key in self.client.list(&live_prefix)? {
            let Some((v, holder)) = key[live_prefix.len()..].split_once('/') else {
                continue;
            };
            if let Ok(v) = v.parse() {
                live.entry(v)
                    .or_default()
                    .insert(holder.as_bytes().to_vec());
            }
        }
        let me = self.me.as_bytes();
        let mine = lock(&self.held).clone();
        let mut survey = Survey {
            free: Vec::new(),
            orphaned: Vec::new(),
        };
        for v in 0..limit {
            let holders = live.get(&v);
            match claims.get(&v) {
                _ if mine.contains(&v) => {}
                Some(h) if h.as_slice() == me => {}
                Some(h) if h.is_empty() => survey.free.push(v),
                None => match holders {
                    None => survey.free.push(v),
                    // A restart lost the claim; its holder's liveness came back. Write the
                    // claim again, so that a later blip of that holder is not taken for a
                    // free value.
                    Some(hs) if hs.len() == 1 => {
                        if let Some(h) = hs.iter().next() {
                            let _ = self.client.compare_set(&self.value_key(v), b"", h);
                        }
                    }
                    Some(_) => {}
                },
                Some(h) if holders.is_some_and(|hs| hs.contains(h)) => {}
                Some(h) => survey.orphaned.push((v, h.clone())),
            }
        }
        Ok(Some(survey))
    }

    /// Gives back `value`, which this rank holds.
    pub fn release(&self, value: u32, timeout: Duration) -> Result<()> {
        if value >= VALUE_LIMIT {
            return Err(Error::InvalidParam(format!(
                "value {value} is outside [0, {VALUE_LIMIT})"
            )));
        }
        // Taken out first, so that two releases of one value do not both go to the store; put
        // back when the store could not be told.
        if !lock(&self.held).remove(&value) {
            return Err(Error::NotExist(format!(
                "value {value} is not held by this rank (never allocated here, or released already)"
            )));
        }
        match within(Instant::now() + timeout, || self.give_back(value)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::NotExist(format!(
                "value {value} is no longer held by this rank: it was taken back while this \
                 rank's connection to the store was lost"
            ))),
            Err(e) => {
                lock(&self.held).insert(value);
                Err(e)
            }
        }
    }

    /// Clears this rank's claim on `value` (only if it is still this rank's) and its liveness
    /// key; whether the claim was this rank's.
    fn give_back(&self, value: u32) -> Result<bool> {
        let key = self.value_key(value);
        let me = self.me.as_bytes();
        let now = match self.client.compare_set(&key, me, b"") {
            Ok(now) => now,
            Err(Error::Reconnected(_)) => self.client.get(&key)?.unwrap_or_default(),
            Err(e) => return Err(e),
        };
        if now == me {
            // Reconnected before the compare-and-set landed: it did not.
            return Err(Error::Reconnected(format!(
                "giving back value {value}: the store's connection broke; try again"
            )));
        }
        // Empty: given back now (or the claim was lost with a store restart). Another holder:
        // taken back meanwhile; this rank's liveness key for it is stale either way.
        self.client.delete(&self.liveness_key(value))?;
        Ok(now.is_empty())
    }

    /// The values this rank holds, lowest first.
    pub fn held(&self) -> Vec<u32> {
        lock(&self.held).iter().copied().collect()
    }

    /// Gives back every value this rank holds (the object is going).
    pub fn release_all(&self) {
        let values = std::mem::take(&mut *lock(&self.held));
        within(Instant::now() + TEARDOWN_LIMIT, || {
            for v in values {
                if let Err(e) = self.give_back(v) {
                    mf_log!(DEBUG, "giving back value {v} of {}: {e}", self.prefix);
                    // The client forgets the liveness key even when the store cannot be told:
                    // it goes with this connection at the latest (not to be published again
                    // after a reconnect), and the claim is then taken back.
                    let _ = self.client.delete(&self.liveness_key(v));
                }
            }
        });
    }
}

// ---- global exit --------------------------------------------------------------------------

/// An exit function: called with the status of a global exit.
pub type ExitHandler = Arc<dyn Fn(i32) + Send + Sync>;

/// Global exit of an object: [`publish`](Self::publish) records a status that every rank
/// which [`register`](Self::register)ed an exit function sees; each runs its function with it
/// on a thread of the library (this rank's too). A rank that registers after the exit was
/// published runs its function at once. Once [`stop`](Self::stop) returns, the function is not
/// running and is never called.
pub struct GlobalExit {
    client: Arc<StoreClient>,
    exit_key: String,
    watch_key: String,
    watch_prefix: String,
    watcher: Mutex<Option<Watcher>>,
}

struct Watcher {
    stop: Arc<AtomicBool>,
    delivery: Arc<Delivery>,
    thread: std::thread::JoinHandle<()>,
    /// How long stopping waits for an exit function that is running.
    timeout: Duration,
}

/// Where this rank's exit function is, and on which thread it runs.
struct Delivery {
    phase: Mutex<Phase>,
    changed: Condvar,
    thread: Mutex<Option<ThreadId>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Not called yet.
    Waiting,
    /// Being called.
    Running,
    /// Called, and returned (or panicked).
    Ran,
    /// Stopped before it was called: it never will be.
    Stopped,
}

impl Delivery {
    fn on_watcher_thread(&self) -> bool {
        *lock(&self.thread) == Some(std::thread::current().id())
    }

    /// Stops delivery: the function is never called from now on. When it is running, waits
    /// (up to `limit`) until it returns, unless this is that function calling. Whether it is
    /// not running now.
    fn stop(&self, limit: Duration) -> bool {
        let mut phase = lock(&self.phase);
        match *phase {
            Phase::Waiting => {
                *phase = Phase::Stopped;
                self.changed.notify_all();
                true
            }
            Phase::Running if self.on_watcher_thread() => false,
            Phase::Running => {
                let (phase, _) = self
                    .changed
                    .wait_timeout_while(phase, limit, |p| *p == Phase::Running)
                    .unwrap_or_else(|p| p.into_inner());
                let returned = *phase != Phase::Running;
                if !returned {
                    mf_log!(
                        WARN,
                        "the exit function still runs after {limit:?}; the object goes anyway"
                    );
                }
                returned
            }
            Phase::Ran | Phase::Stopped => true,
        }
    }
}

impl GlobalExit {
    /// Global exit of the object whose group prefix is `object_prefix`, as its rank `rank`.
    pub fn new(client: Arc<StoreClient>, object_prefix: &str, rank: u32) -> GlobalExit {
        let watch_prefix = format!("{object_prefix}exit-watch/{rank}/");
        GlobalExit {
            client,
            exit_key: format!("{object_prefix}exit"),
            watch_key: format!("{watch_prefix}on"),
            watch_prefix,
            watcher: Mutex::new(None),
        }
    }

    /// Runs `handler(status)` on a thread of the library when a global exit is published.
    /// The wait has a store connection of its own, so that it holds up no other call.
    pub fn register(&self, handler: ExitHandler, timeout: Duration) -> Result<()> {
        let repeated = || {
            Error::RepeatInvoke(
                "an exit function is registered on this object in this process already".into(),
            )
        };
        if lock(&self.watcher).is_some() {
            return Err(repeated());
        }
        // Connected without the lock held: `publish` and `stop` need it meanwhile.
        let own = Arc::new(StoreClient::connect(
            &self.client.url(),
            ClientOptions {
                timeout,
                ..Default::default()
            },
        )?);
        let mut watcher = lock(&self.watcher);
        if watcher.is_some() {
            return Err(repeated());
        }
        own.set_ephemeral(&self.watch_key, b"")?;
        let stop = Arc::new(AtomicBool::new(false));
        let delivery = Arc::new(Delivery {
            phase: Mutex::new(Phase::Waiting),
            changed: Condvar::new(),
            thread: Mutex::new(None),
        });
        let watch = ExitWait {
            client: own,
            exit_key: self.exit_key.clone(),
            watch_key: self.watch_key.clone(),
            watch_prefix: self.watch_prefix.clone(),
            stop: stop.clone(),
        };
        let (d, h) = (delivery.clone(), handler);
        let thread = std::thread::Builder::new()
            .name("mf-shm-exit".into())
            .spawn(move || {
                *lock(&d.thread) = Some(std::thread::current().id());
                let Some(status) = watch.run() else { return };
                drop(watch);
                {
                    // The one place that decides to call: `stop` either came first (and the
                    // function is never called) or waits until it has returned.
                    let mut phase = lock(&d.phase);
                    if *phase != Phase::Waiting {
                        return;
                    }
                    *phase = Phase::Running;
                }
                // No lock is held: the function may call back into the library, or end the
                // process.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(status))).is_err() {
                    mf_log!(WARN, "the exit function panicked (status {status})");
                }
                *lock(&d.phase) = Phase::Ran;
                d.changed.notify_all();
            })
            .map_err(|e| {
                Error::NoResources(format!("cannot start the exit watcher thread: {e}"))
            })?;
        *watcher = Some(Watcher {
            stop,
            delivery,
            thread,
            timeout,
        });
        Ok(())
    }

    /// Publishes a global exit with `status`: every rank's exit function runs with it. The
    /// returned [`PendingExit`] waits for this rank's own.
    pub fn publish(&self, status: i32, timeout: Duration) -> Result<PendingExit> {
        let deadline = Instant::now() + timeout;
        within(deadline, || {
            self.client
                .set(&self.exit_key, status.to_string().as_bytes())
        })?;
        Ok(PendingExit {
            delivery: lock(&self.watcher).as_ref().map(|w| w.delivery.clone()),
            deadline,
        })
    }

    /// Stops watching (the object is going): when this returns, this rank's exit function is
    /// not running (unless it is the caller) and is never called.
    pub fn stop(&self) {
        let Some(w) = lock(&self.watcher).take() else {
            return;
        };
        w.stop.store(true, Ordering::Release);
        let returned = w.delivery.stop(w.timeout);
        // Deleting the watched key answers the watcher's wait at once, so its thread and
        // connection end now. When the store is gone they end by themselves, calling nothing;
        // nor is a thread whose exit function never returned waited for.
        let woken = self.client.delete_within(&self.watch_key, TEARDOWN_LIMIT);
        if woken.is_ok() && returned && !w.delivery.on_watcher_thread() {
            let _ = w.thread.join();
        }
    }
}

impl Drop for GlobalExit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until this rank's own exit function has run after a global exit it published.
pub struct PendingExit {
    delivery: Option<Arc<Delivery>>,
    deadline: Instant,
}

impl PendingExit {
    /// Returns once this rank's exit function has returned (at once when it registered none,
    /// when called from that function, or when the object went before it was called);
    /// [`Error::Timeout`] at the deadline.
    pub fn wait(self) -> Result<()> {
        let Some(d) = self.delivery else {
            return Ok(());
        };
        if d.on_watcher_thread() {
            return Ok(());
        }
        let phase = lock(&d.phase);
        let (phase, _) = d
            .changed
            .wait_timeout_while(phase, left(self.deadline), |p| {
                matches!(p, Phase::Waiting | Phase::Running)
            })
            .unwrap_or_else(|p| p.into_inner());
        if matches!(*phase, Phase::Ran | Phase::Stopped) {
            Ok(())
        } else {
            Err(Error::Timeout(
                "the global exit was published, but this rank's exit function did not return \
                 within the control operation timeout"
                    .into(),
            ))
        }
    }
}

/// The watcher's side: waits for the exit key on its own connection.
struct ExitWait {
    client: Arc<StoreClient>,
    exit_key: String,
    watch_key: String,
    watch_prefix: String,
    stop: Arc<AtomicBool>,
}

impl ExitWait {
    /// The published status; `None` when told to stop first.
    fn run(&self) -> Option<i32> {
        let mut pause = Duration::from_millis(50);
        let keys = [self.exit_key.clone()];
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            let watch = Some((self.watch_prefix.as_str(), 1));
            let outcome = match self.client.wait(&keys, EXIT_WAIT_SLICE, watch) {
                Ok(()) => match self.client.get(&self.exit_key) {
                    Ok(Some(raw)) => {
                        match std::str::from_utf8(&raw).ok().and_then(|s| s.parse().ok()) {
                            Some(status) => {
                                return (!self.stop.load(Ordering::Acquire)).then_some(status)
                            }
                            None => {
                                mf_log!(
                                    WARN,
                                    "global exit key {} holds {:?}, not a status: not watching it",
                                    self.exit_key,
                                    String::from_utf8_lossy(&raw)
                                );
                                return None;
                            }
                        }
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                },
                Err(Error::Timeout(_)) => Ok(()),
                Err(Error::PeerGone(_)) if self.stop.load(Ordering::Acquire) => return None,
                // The watched key went without a stop (a store restart not caught up with yet):
                // put it back.
                Err(Error::PeerGone(_)) => self.client.set_ephemeral(&self.watch_key, b""),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => pause = Duration::from_millis(50),
                Err(e) => {
                    mf_log!(DEBUG, "exit watcher for {}: {e}", self.exit_key);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{client, server};
    use crate::store::StoreServer;
    use std::sync::atomic::AtomicI32;

    fn members(s: &StoreServer, obj: &str, n: u32) -> Vec<(Arc<StoreClient>, Group)> {
        (0..n)
            .map(|r| {
                let c = client(s);
                let g = Group::join_member(c.clone(), obj, n, Some(r)).unwrap();
                (c, g)
            })
            .collect()
    }

    const T: Duration = Duration::from_secs(10);

    /// Two members of object "o" whose sub-group "pair" has met once; rank 1's client, group
    /// and sub-groups apart, so that a test can make its process die.
    /// Two members that met at sub-group "pair", after rank 1's process died (its connection,
    /// and with it its keys, gone). Returns rank 0's client and group (keep them alive to the
    /// end of the test) and its sub-groups.
    fn pair_after_rank1_died(s: &StoreServer) -> (Vec<(Arc<StoreClient>, Group)>, SubGroups) {
        let mut m = members(s, "o", 2);
        let (c1, g1) = m.pop().unwrap();
        let sub0 = SubGroups::new(m[0].0.clone(), m[0].1.prefix(), 2);
        let sub1 = SubGroups::new(c1.clone(), g1.prefix(), 2);
        pair_barrier(&sub0, &sub1);
        drop((sub1, g1, c1));
        (m, sub0)
    }

    /// Sub-group "pair" of two members: a barrier both pass.
    fn pair_barrier(sub0: &SubGroups, sub1: &SubGroups) {
        std::thread::scope(|sc| {
            let h = sc.spawn(|| sub1.barrier("pair", 2, 1, T));
            sub0.barrier("pair", 2, 0, T).unwrap();
            h.join().unwrap().unwrap();
        });
    }

    #[test]
    fn sub_groups_meet_by_key_and_refuse_bad_arguments() {
        let s = server();
        let m = members(&s, "o", 4);
        let subs: Vec<SubGroups> = m
            .iter()
            .map(|(c, g)| SubGroups::new(c.clone(), g.prefix(), 4))
            .collect();
        // Ranks 1 and 3 form "odd", 0 and 2 "even/x" (a '/' in a key is fine); each gathers.
        let got: Vec<Vec<Vec<u8>>> = std::thread::scope(|sc| {
            let handles: Vec<_> = subs
                .iter()
                .enumerate()
                .map(|(r, sub)| {
                    sc.spawn(move || {
                        let key = if r % 2 == 1 { "odd" } else { "even/x" };
                        let sub_rank = r as u32 / 2;
                        sub.barrier(key, 2, sub_rank, T).unwrap();
                        sub.barrier(key, 2, sub_rank, T).unwrap();
                        sub.all_gather(key, 2, sub_rank, &[r as u8; 3], T).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got[0], vec![vec![0u8; 3], vec![2u8; 3]]);
        assert_eq!(got[1], vec![vec![1u8; 3], vec![3u8; 3]]);
        assert_eq!(got[2], got[0]);
        assert_eq!(got[3], got[1]);

        let e = subs[0].barrier(&"k".repeat(64), 1, 0, T).unwrap_err();
        assert_eq!(e.code(), -2000, "{e}");
        assert!(e.to_string().contains("at most 63"), "{e}");
        let e = subs[0].barrier("k", 5, 0, T).unwrap_err();
        assert!(e.to_string().contains("outside [1, 4]"), "{e}");
        let e = subs[0].barrier("k", 0, 0, T).unwrap_err();
        assert_eq!(e.code(), -2000, "{e}");
        let e = subs[0].barrier("k", 2, 2, T).unwrap_err();
        assert!(e.to_string().contains("rankId 2 is outside [0, 2)"), "{e}");
        // A key this rank met as sub-rank 0 of 2 cannot be used as another rank or size.
        let e = subs[0].barrier("even/x", 3, 1, T).unwrap_err();
        assert!(e.to_string().contains("rank 0 of 2 there"), "{e}");
        // Size 1: no one to wait for.
        subs[1].barrier("alone", 1, 0, T).unwrap();
        assert_eq!(
            subs[1].all_gather("alone", 1, 0, b"z", T).unwrap(),
            vec![b"z".to_vec()]
        );
        // Another rank claiming a sub-rank held by a live one is refused.
        let e = subs[2].barrier("alone", 1, 0, T).unwrap_err();
        assert_eq!(e.code(), -2006, "{e}");
        // ... and a size that differs from the one the sub-group met with.
        let e = subs[2].barrier("alone", 2, 1, T).unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
        for sub in &subs {
            sub.leave_all();
        }
    }

    #[test]
    fn a_sub_group_member_that_never_comes_is_a_timeout_and_may_be_waited_for_again() {
        let s = server();
        let m = members(&s, "o", 2);
        let sub = SubGroups::new(m[0].0.clone(), m[0].1.prefix(), 2);
        let t = Instant::now();
        let e = sub
            .barrier("pair", 2, 0, Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(e.code(), -2004, "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        // The failed rendezvous gave the sub-rank back: the pair meets when the other comes.
        let other = SubGroups::new(m[1].0.clone(), m[1].1.prefix(), 2);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| other.barrier("pair", 2, 1, T));
            sub.barrier("pair", 2, 0, T).unwrap();
            h.join().unwrap().unwrap();
        });
    }

    #[test]
    fn a_dead_sub_group_member_fails_the_others_at_once() {
        let s = server();
        // Rank 1's process dies: its connection, and with it its keys, go.
        let (_rank0, sub0) = pair_after_rank1_died(&s);
        let t = Instant::now();
        let e = sub0
            .barrier("pair", 2, 0, Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(e.code(), -3001, "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // Rank 0 left the sub-group with that failure: calling again meets afresh, and waits
        // for rank 1 to come (see the test of a member that comes back).
        let e = sub0
            .all_gather("pair", 2, 0, b"x", Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(e.code(), -2004, "{e}");
    }

    #[test]
    fn values_are_unique_below_the_limit_and_come_back_when_released() {
        let s = server();
        let m = members(&s, "o", 2);
        let a = ValueAllocator::new(m[0].0.clone(), m[0].1.prefix(), 0);
        let b = ValueAllocator::new(m[1].0.clone(), m[1].1.prefix(), 1);
        assert_eq!(a.alloc(3, T).unwrap(), 0);
        assert_eq!(b.alloc(3, T).unwrap(), 1);
        assert_eq!(a.alloc(3, T).unwrap(), 2);
        let e = b.alloc(3, T).unwrap_err();
        assert_eq!(e.code(), -2002, "{e}");
        assert!(e.to_string().contains("below 3"), "{e}");
        // A larger limit reaches further.
        assert_eq!(b.alloc(4, T).unwrap(), 3);
        // Only the holder releases a value, once.
        let e = b.release(0, T).unwrap_err();
        assert_eq!(e.code(), -2007, "{e}");
        a.release(0, T).unwrap();
        assert_eq!(a.release(0, T).unwrap_err().code(), -2007);
        assert_eq!(b.alloc(3, T).unwrap(), 0, "the lowest free value");
        assert_eq!(b.held(), vec![0, 1, 3]);
        assert_eq!(a.held(), vec![2]);
        for bad in [0, VALUE_LIMIT + 1] {
            let e = a.alloc(bad, T).unwrap_err();
            assert_eq!(e.code(), -2000, "{e}");
            assert!(e.to_string().contains("outside [1, 1024]"), "{e}");
        }
        assert_eq!(a.release(VALUE_LIMIT, T).unwrap_err().code(), -2000);
        // Giving everything back (the object going) frees the values for the others.
        b.release_all();
        assert!(b.held().is_empty());
        let mut got = vec![
            a.alloc(4, T).unwrap(),
            a.alloc(4, T).unwrap(),
            a.alloc(4, T).unwrap(),
        ];
        got.sort();
        assert_eq!(got, vec![0, 1, 3]);
    }

    #[test]
    fn colliding_allocators_all_get_distinct_values() {
        let s = server();
        let n = 8;
        let m = members(&s, "o", n);
        let allocators: Vec<ValueAllocator> = m
            .iter()
            .enumerate()
            .map(|(r, (c, g))| ValueAllocator::new(c.clone(), g.prefix(), r as u32))
            .collect();
        let start = std::sync::Barrier::new(n as usize);
        let mut got: Vec<u32> = std::thread::scope(|sc| {
            let handles: Vec<_> = allocators
                .iter()
                .map(|a| {
                    let start = &start;
                    sc.spawn(move || {
                        start.wait();
                        a.alloc(n, T).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        got.sort();
        assert_eq!(got, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn values_of_a_dead_rank_are_taken_back_when_none_is_free() {
        let s = server();
        let mut m = members(&s, "o", 2);
        let (c1, g1) = m.pop().unwrap();
        let a = ValueAllocator::new(m[0].0.clone(), m[0].1.prefix(), 0);
        let b = ValueAllocator::new(c1.clone(), g1.prefix(), 1);
        assert_eq!(b.alloc(2, T).unwrap(), 0);
        assert_eq!(a.alloc(2, T).unwrap(), 1);
        assert_eq!(a.alloc(2, T).unwrap_err().code(), -2002);
        drop((b, g1, c1));
        // Rank 1's alive key goes with its connection, a moment later.
        let deadline = Instant::now() + T;
        let v = loop {
            match a.alloc(2, T) {
                Ok(v) => break v,
                Err(e) if e.code() == -2002 && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(v, 0);
        assert_eq!(a.held(), vec![0, 1]);
    }

    static SEEN: AtomicI32 = AtomicI32::new(i32::MIN);

    #[test]
    fn a_global_exit_runs_every_registered_function_with_its_status() {
        let s = server();
        let m = members(&s, "o", 3);
        let exits: Vec<GlobalExit> = m
            .iter()
            .enumerate()
            .map(|(r, (c, g))| GlobalExit::new(c.clone(), g.prefix(), r as u32))
            .collect();
        let seen: Arc<Mutex<Vec<(usize, i32)>>> = Arc::default();
        for (r, e) in exits.iter().enumerate().take(2) {
            let seen = seen.clone();
            e.register(Arc::new(move |status| lock(&seen).push((r, status))), T)
                .unwrap();
        }
        let again = exits[0].register(Arc::new(|_| {}), T).unwrap_err();
        assert_eq!(again.code(), -2005, "{again}");
        // Rank 2 registered nothing: it publishes, and returns without waiting for anyone.
        exits[2].publish(-7, T).unwrap().wait().unwrap();
        let deadline = Instant::now() + T;
        while lock(&seen).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut got = lock(&seen).clone();
        got.sort();
        assert_eq!(got, vec![(0, -7), (1, -7)]);
        // A rank registering after the exit runs its function at once; publishing waits for
        // the publisher's own function.
        exits[2]
            .register(
                Arc::new(|status| {
                    std::thread::sleep(Duration::from_millis(100));
                    SEEN.store(status, Ordering::SeqCst);
                }),
                T,
            )
            .unwrap();
        exits[2].publish(-7, T).unwrap().wait().unwrap();
        assert_eq!(SEEN.load(Ordering::SeqCst), -7);
    }

    #[test]
    fn stopping_the_watch_ends_its_thread_promptly_and_runs_nothing() {
        let s = server();
        let m = members(&s, "o", 1);
        let exit = GlobalExit::new(m[0].0.clone(), m[0].1.prefix(), 0);
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        exit.register(Arc::new(move |_| r.store(true, Ordering::SeqCst)), T)
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(exit);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let other = GlobalExit::new(m[0].0.clone(), m[0].1.prefix(), 0);
        other.publish(1, T).unwrap().wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ran.load(Ordering::SeqCst));
    }
    // ---- tests of defects found in review (each failed before its fix) ----------------------

    /// Restarts the store at its address (empty, as a restarted store is).
    fn restart(s: StoreServer) -> StoreServer {
        let addr = s.local_addr();
        drop(s);
        std::thread::sleep(Duration::from_millis(100));
        StoreServer::start(addr, None).expect("server restarts")
    }

    /// What a connection blip does to the keys of `o/` that `gone` picks: they vanish, and
    /// come back as they were `gap` later (the holder's keeper publishes them again). The
    /// returned client holds them from then on.
    fn blip(
        s: &StoreServer,
        gone: impl Fn(&str) -> bool,
        gap: Duration,
    ) -> std::thread::JoinHandle<Arc<StoreClient>> {
        let probe = client(s);
        let keys: Vec<String> = probe
            .list("o/")
            .unwrap()
            .into_iter()
            .filter(|k| gone(k))
            .collect();
        assert!(!keys.is_empty());
        let values: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| probe.get(k).unwrap().unwrap())
            .collect();
        for k in &keys {
            probe.delete(k).unwrap();
        }
        std::thread::spawn(move || {
            std::thread::sleep(gap);
            for (k, v) in keys.iter().zip(&values) {
                probe.set_ephemeral(k, v).unwrap();
            }
            probe
        })
    }

    #[test]
    fn sub_groups_of_different_keys_do_not_hold_each_other_up() {
        // Process P waits in "a" and "b" on two threads; Q comes to "b" first, then "a".
        let s = server();
        let m = members(&s, "o", 2);
        let p = SubGroups::new(m[0].0.clone(), m[0].1.prefix(), 2);
        let q = SubGroups::new(m[1].0.clone(), m[1].1.prefix(), 2);
        let wait = Duration::from_secs(4);
        let t = Instant::now();
        std::thread::scope(|sc| {
            let pa = sc.spawn(|| p.barrier("a", 2, 0, wait));
            let pb = sc.spawn(|| p.barrier("b", 2, 0, wait));
            std::thread::sleep(Duration::from_millis(100));
            q.barrier("b", 2, 1, wait).unwrap();
            q.barrier("a", 2, 1, wait).unwrap();
            pa.join().unwrap().unwrap();
            pb.join().unwrap().unwrap();
        });
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[test]
    fn a_timed_out_sub_group_rendezvous_leaves_the_object_membership_alone() {
        let s = server();
        let m = members(&s, "o", 2);
        let sub = SubGroups::new(m[0].0.clone(), m[0].1.prefix(), 2);
        // A watcher of the object fails at once if any member's liveness key goes, even briefly.
        let probe = client(&s);
        std::thread::scope(|sc| {
            let watch = sc.spawn(|| {
                probe.wait(
                    &["o/never".to_string()],
                    Duration::from_secs(2),
                    Some(("o/alive/", 2)),
                )
            });
            std::thread::sleep(Duration::from_millis(50));
            for _ in 0..3 {
                let e = sub
                    .barrier("pair", 2, 0, Duration::from_millis(300))
                    .unwrap_err();
                assert_eq!(e.code(), -2004, "{e}");
            }
            let e = watch.join().unwrap().unwrap_err();
            assert_eq!(
                e.code(),
                -2004,
                "the object's membership was disturbed: {e}"
            );
        });
    }

    #[test]
    fn a_member_that_comes_back_does_not_pass_a_barrier_the_others_failed() {
        let s = server();
        // Rank 1 dies; rank 0's next barrier fails.
        let (_rank0, sub0) = pair_after_rank1_died(&s);
        let e = sub0.barrier("pair", 2, 0, T).unwrap_err();
        assert_eq!(e.code(), -3001, "{e}");
        // Rank 1 comes back (a new process). Rank 0 is at no barrier: it must not pass one.
        let c1 = client(&s);
        let g1 = Group::join_member(c1.clone(), "o", 2, Some(1)).unwrap();
        let sub1 = SubGroups::new(c1.clone(), g1.prefix(), 2);
        let e = sub1
            .barrier("pair", 2, 1, Duration::from_millis(500))
            .unwrap_err();
        assert_eq!(e.code(), -2004, "{e}");
        // When both come, they meet again.
        pair_barrier(&sub0, &sub1);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| sub1.all_gather("pair", 2, 1, b"1", T));
            assert_eq!(
                sub0.all_gather("pair", 2, 0, b"0", T).unwrap(),
                vec![b"0".to_vec(), b"1".to_vec()]
            );
            h.join().unwrap().unwrap();
        });
    }

    #[test]
    fn a_member_that_left_is_noticed_at_once_even_when_its_rank_was_taken_again() {
        let s = server();
        // Rank 1 dies, and a new process takes its sub-group rank before rank 0 waits again.
        let (_rank0, sub0) = pair_after_rank1_died(&s);
        let c1 = client(&s);
        let _g1 = Group::join_member(c1.clone(), "o", 2, Some(1)).unwrap();
        let deadline = Instant::now() + T;
        let _back = loop {
            match Group::enter(c1.clone(), "o.sub.pair", 2, 1) {
                Ok(g) => break g,
                Err(e) if e.code() == -2006 && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let t = Instant::now();
        let e = sub0
            .barrier("pair", 2, 0, Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(e.code(), -3001, "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn a_slow_sub_group_member_breaks_nothing() {
        let s = server();
        let m = members(&s, "o", 2);
        let sub0 = SubGroups::new(m[0].0.clone(), m[0].1.prefix(), 2);
        let sub1 = SubGroups::new(m[1].0.clone(), m[1].1.prefix(), 2);
        pair_barrier(&sub0, &sub1);
        // Rank 0 gives up on its second barrier; rank 1 comes to it late, and passes it (rank
        // 0 did reach it). Their next ones meet.
        let e = sub0
            .barrier("pair", 2, 0, Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(e.code(), -2004, "{e}");
        sub1.barrier("pair", 2, 1, T).unwrap();
        std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                sub1.barrier("pair", 2, 1, T).unwrap();
                sub1.all_gather("pair", 2, 1, b"1", T).unwrap()
            });
            sub0.barrier("pair", 2, 0, T).unwrap();
            let got = sub0.all_gather("pair", 2, 0, b"0", T).unwrap();
            assert_eq!(got, vec![b"0".to_vec(), b"1".to_vec()]);
            assert_eq!(h.join().unwrap(), got);
        });
    }

    #[test]
    fn values_held_before_a_store_restart_stay_held() {
        let s = server();
        let m = members(&s, "o", 2);
        let a = ValueAllocator::new(m[0].0.clone(), m[0].1.prefix(), 0);
        let b = ValueAllocator::new(m[1].0.clone(), m[1].1.prefix(), 1);
        assert_eq!(a.alloc(2, T).unwrap(), 0);
        assert_eq!(b.alloc(2, T).unwrap(), 1);
        let _s = restart(s);
        let e = a.alloc(2, T).unwrap_err();
        assert_eq!(e.code(), -2002, "{e}");
        assert_eq!(a.held(), vec![0]);
    }

    #[test]
    fn a_holder_whose_connection_blips_keeps_its_value() {
        let s = server();
        let m = members(&s, "o", 2);
        let a = ValueAllocator::new(m[0].0.clone(), m[0].1.prefix(), 0);
        let b = ValueAllocator::new(m[1].0.clone(), m[1].1.prefix(), 1);
        assert_eq!(a.alloc(2, T).unwrap(), 0);
        assert_eq!(b.alloc(2, T).unwrap(), 1);
        // Rank 1's records are gone until its keeper publishes them again.
        let back = blip(
            &s,
            |k| k == "o/alive/1" || k.starts_with("o/value-held/1/"),
            Duration::from_millis(300),
        );
        let e = a.alloc(2, T).unwrap_err();
        assert_eq!(e.code(), -2002, "{e}");
        assert_eq!(b.held(), vec![1]);
        drop(back.join().unwrap());
    }

    #[test]
    fn a_release_after_the_value_was_taken_back_erases_no_other_claim() {
        let s = server();
        let m = members(&s, "o", 2);
        let a = ValueAllocator::new(m[0].0.clone(), m[0].1.prefix(), 0);
        let b = ValueAllocator::new(m[1].0.clone(), m[1].1.prefix(), 1);
        assert_eq!(b.alloc(1, T).unwrap(), 0);
        // Rank 1 seems gone for good (its records were removed behind its back): rank 0 takes
        // its value back.
        let probe = client(&s);
        for k in probe.list("o/").unwrap() {
            if k == "o/alive/1" || k.starts_with("o/value-held/") {
                probe.delete(&k).unwrap();
            }
        }
        assert_eq!(a.alloc(1, T).unwrap(), 0);
        // Rank 1 releases what it believes it holds: rank 0's claim stays.
        let released = b.release(0, T);
        let e = b.alloc(1, T).unwrap_err();
        assert_eq!(e.code(), -2002, "{e}");
        assert_eq!(a.held(), vec![0]);
        let e = released.unwrap_err();
        assert_eq!(e.code(), -2007, "{e}");
        assert!(b.held().is_empty());
    }

    #[test]
    fn a_rank_is_never_given_a_value_it_holds() {
        let s = server();
        let m = members(&s, "o", 1);
        let a = ValueAllocator::new(m[0].0.clone(), m[0].1.prefix(), 0);
        assert_eq!(a.alloc(1, T).unwrap(), 0);
        // Its own records missing (as in a connection blip) do not make its value free to it.
        let probe = client(&s);
        for k in probe.list("o/").unwrap() {
            if k == "o/alive/0" || k.starts_with("o/value-held/") {
                probe.delete(&k).unwrap();
            }
        }
        let e = a.alloc(1, T).unwrap_err();
        assert_eq!(e.code(), -2002, "{e}");
        assert_eq!(a.held(), vec![0]);
    }

    #[test]
    fn stopping_waits_for_an_exit_function_in_progress_even_without_a_store() {
        let s = server();
        let m = members(&s, "o", 2);
        let exit0 = GlobalExit::new(m[0].0.clone(), m[0].1.prefix(), 0);
        let exit1 = GlobalExit::new(m[1].0.clone(), m[1].1.prefix(), 1);
        let started = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let (st, fi) = (started.clone(), finished.clone());
        exit0
            .register(
                Arc::new(move |_| {
                    st.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2500));
                    fi.store(true, Ordering::SeqCst);
                }),
                T,
            )
            .unwrap();
        exit1.publish(5, T).unwrap();
        let deadline = Instant::now() + T;
        while !started.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        // The store goes; stopping must still wait for the function that is running.
        drop(s);
        exit0.stop();
        assert!(
            finished.load(Ordering::SeqCst),
            "stop returned during the exit function"
        );
    }

    #[test]
    fn nothing_of_the_control_keys_stays_after_every_rank_left() {
        let s = server();
        let m = members(&s, "o", 2);
        let ranks: Vec<_> = m
            .iter()
            .enumerate()
            .map(|(r, (c, g))| {
                (
                    SubGroups::new(c.clone(), g.prefix(), 2),
                    ValueAllocator::new(c.clone(), g.prefix(), r as u32),
                    GlobalExit::new(c.clone(), g.prefix(), r as u32),
                )
            })
            .collect();
        std::thread::scope(|sc| {
            for (r, (sub, values, exit)) in ranks.iter().enumerate() {
                sc.spawn(move || {
                    sub.barrier("k", 2, r as u32, T).unwrap();
                    sub.barrier("k", 2, r as u32, T).unwrap();
                    sub.all_gather("k", 2, r as u32, b"x", T).unwrap();
                    values.alloc(4, T).unwrap();
                    let v = values.alloc(4, T).unwrap();
                    values.release(v, T).unwrap();
                    exit.register(Arc::new(|_| {}), T).unwrap();
                    if r == 1 {
                        exit.publish(3, T).unwrap().wait().unwrap();
                    }
                });
            }
        });
        for ((sub, values, exit), (_, g)) in ranks.iter().zip(&m) {
            leave_object(sub, values, exit, g);
        }
        let left: Vec<String> = client(&s)
            .list("o")
            .unwrap()
            .into_iter()
            .filter(|k| {
                k.starts_with("o.sub.") || k.starts_with("o/exit") || k.starts_with("o/value")
            })
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// What destroying the object does with its control parts, in order (see `ShareMemory`).
    fn leave_object(sub: &SubGroups, values: &ValueAllocator, exit: &GlobalExit, g: &Group) {
        exit.stop();
        sub.leave_all();
        values.release_all();
        let _ = g.leave();
        if g.live_members().unwrap() == 0 {
            forget_object(g.client(), g.prefix());
        }
    }
}
