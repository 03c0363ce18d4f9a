//! Groups of ranks on a store: rank assignment, rendezvous, barrier, all_gather, liveness.
//!
//! Keys of group `g` (all under `g/`):
//! - `g/world` the agreed world size; `g/rank_seq` the counter behind auto-ranking;
//! - `g/claim/<r>/<random>` ephemeral: a process's claim on explicit rank `r` (see
//!   [`Group::join`]); `g/alive/<r>` ephemeral, one per member, holding its member id
//!   (`<world>:<random>`): both vanish when the member's connection dies;
//! - `g/b/<n>/count`, `g/b/<n>/done` for barrier number `n`;
//! - `g/ag/<n>/data` records `[rank u32][len u32][bytes]` appended by each member.
//!
//! A group that meets later ([`Group::enter`], then [`Group::meet`]) keeps no `world` key, and
//! its barriers and gathers are numbered per meeting, under `g/m/<meeting>/`, where each
//! member also keeps an ephemeral `g/m/<meeting>/in/<r>` while it is in that meeting.
//!
//! Each member sends O(1) messages per barrier or all_gather (no O(N^2) traffic): an ADD on the
//! counter, a SET of `done` by the last one, and one WAIT that the server answers when `done`
//! exists, or aborts as soon as a member's `alive` key disappears.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::client::{keep_alive, scope_deadline, within, StoreClient, KEEP_EVERY};
use crate::error::{Error, Result};

/// Most ranks a group may have (the seed's limit).
pub const MAX_WORLD: u32 = 1024;
/// How long a key that vanished with its holder's connection may stay away before it is
/// believed gone: after a connection blip or a store restart the holder's keeper publishes
/// its ephemeral keys again within [`KEEP_EVERY`]. Also how long after its own reconnect a
/// member gives the others to do so before it believes a key missing there.
pub(crate) const MEMBER_GRACE: Duration = KEEP_EVERY.saturating_mul(4);
/// Longest leaving may take (teardown, possibly after the store has gone).
const LEAVE_LIMIT: Duration = Duration::from_secs(2);

/// This process's membership in a group.
pub struct Group {
    client: Arc<StoreClient>,
    prefix: String,
    rank: u32,
    world: u32,
    /// This membership's id (`<world>:<random>`), the value of its `alive` key.
    id: String,
    /// The claim on an explicit rank, deleted when leaving.
    claim: Option<String>,
    /// Set by [`meet`](Self::meet): where this group's barriers and gathers keep their keys.
    meeting: OnceLock<Meeting>,
    barriers: AtomicU64,
    gathers: AtomicU64,
}

/// The members a group met with ([`Group::meet`]).
struct Meeting {
    /// `<group>/m/<id>/`, where `id` is a digest of every member's id.
    prefix: String,
    /// Every member's id, in rank order.
    members: Vec<String>,
    /// Set once a barrier or gather of the meeting passed here: every member has published
    /// its key under `in/` by then (each does before its first one), so waits watch those.
    settled: AtomicBool,
}

/// A random number, different in every process and every call (the standard library's
/// hasher keys come from the operating system's random source).
fn random_u64() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let salt = CALLS.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
    std::collections::hash_map::RandomState::new().hash_one(salt)
}

/// The world size a member id (`<world>:<random>`) was made for.
fn id_world(id: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(id).ok()?;
    text.split_once(':')?.0.parse().ok()
}

/// What is left of [`MEMBER_GRACE`] after `client` last reconnected (a store restart or a
/// connection blip): until then, keys of other members may be missing only because their
/// keepers have not yet published them again.
pub(crate) fn reconnect_grace_left(client: &StoreClient) -> Option<Duration> {
    let since = client.reconnected_at()?.elapsed();
    MEMBER_GRACE.checked_sub(since).filter(|d| !d.is_zero())
}

/// The order in which a member lists the `world` liveness keys it waits for. The store
/// rescans a waiter's keys from the first each time the first missing one appears; in a random
/// order that happens O(log N) times whatever order the members come in (a key is rescanned
/// from only when it comes after every key before it in the list), so each waiter costs the
/// store O(N log N) instead of the O(N^2) of waiting in rank order while ranks come in order.
fn wait_order(world: u32) -> Vec<u32> {
    let hasher = std::collections::hash_map::RandomState::new();
    let mut order: Vec<u32> = (0..world).collect();
    order.sort_by_cached_key(|r| hasher.hash_one(r));
    order
}

impl Group {
    /// Joins group `name` of `world` ranks as `rank` (`None`: the next free rank), then waits
    /// up to `timeout` for all `world` ranks to join.
    pub fn join(
        client: Arc<StoreClient>,
        name: &str,
        world: u32,
        rank: Option<u32>,
        timeout: Duration,
    ) -> Result<Group> {
        let g = Self::claim(client, name, world, rank, true)?;
        // Rendezvous: a barrier that does not yet watch membership (not everybody is there).
        g.barrier_inner(timeout, false)?;
        Ok(g)
    }

    /// Checks the world size, takes a rank and publishes this member's liveness key. `agree`:
    /// record the world size in `g/world` (a group that meets later checks it at its meeting
    /// instead, see [`enter`](Self::enter)).
    fn claim(
        client: Arc<StoreClient>,
        name: &str,
        world: u32,
        rank: Option<u32>,
        agree: bool,
    ) -> Result<Group> {
        if world == 0 || world > MAX_WORLD {
            return Err(Error::InvalidParam(format!(
                "world size {world} is outside [1, {MAX_WORLD}]"
            )));
        }
        if name.is_empty() || name.contains('/') {
            return Err(Error::InvalidParam(format!(
                "group name {name:?} must be non-empty and contain no '/'"
            )));
        }
        if let Some(r) = rank.filter(|r| *r >= world) {
            return Err(Error::InvalidParam(format!(
                "rank {r} is outside [0, {world}) for group {name:?}"
            )));
        }
        let prefix = format!("{name}/");
        if agree {
            let agreed =
                client.compare_set(&format!("{prefix}world"), b"", world.to_string().as_bytes())?;
            if agreed != world.to_string().as_bytes() {
                return Err(Error::InvalidParam(format!(
                    "world size {world} differs from the {} that group {name:?} was created with",
                    String::from_utf8_lossy(&agreed)
                )));
            }
        } else {
            check_live_worlds(&client, &prefix, name, world)?;
        }
        let nonce = format!("{:016x}", random_u64());
        let id = format!("{world}:{nonce}");
        let (rank, claim) = match rank {
            Some(r) => (r, Some(claim_rank(&client, &prefix, name, r, &nonce)?)),
            None => {
                let n = client.add(&format!("{prefix}rank_seq"), 1)?;
                if n < 1 || n > world as i64 {
                    return Err(Error::NoResources(format!(
                        "group {name:?} already has its {world} ranks (this would be rank {})",
                        n - 1
                    )));
                }
                ((n - 1) as u32, None)
            }
        };
        if let Err(e) = client.set_ephemeral(&format!("{prefix}alive/{rank}"), id.as_bytes()) {
            if let Some(c) = &claim {
                let _ = client.delete(c);
            }
            return Err(e);
        }
        // Members often sit idle between collectives; a restarted store must still learn that
        // they are alive before the next barrier watches for them.
        keep_alive(&client);
        Ok(Group {
            client,
            prefix,
            rank,
            world,
            id,
            claim,
            meeting: OnceLock::new(),
            barriers: AtomicU64::new(0),
            gathers: AtomicU64::new(0),
        })
    }

    /// Joins like [`join`](Self::join) but without waiting for the others: for groups whose
    /// members come and go (`world` is then the most ranks there may be).
    pub fn join_member(
        client: Arc<StoreClient>,
        name: &str,
        world: u32,
        rank: Option<u32>,
    ) -> Result<Group> {
        Self::claim(client, name, world, rank, true)
    }

    /// Takes rank `rank` of group `name` of `world` ranks, to [`meet`](Self::meet) the others
    /// later. Such a group keeps nothing in the store once its members have left: no `world`
    /// key (a member whose world size differs from that of the live members is refused here,
    /// or at the meeting when both came at the same moment).
    pub fn enter(client: Arc<StoreClient>, name: &str, world: u32, rank: u32) -> Result<Group> {
        Self::claim(client, name, world, Some(rank), false)
    }

    /// Waits up to `timeout` until all `world` ranks are members, for a member that came with
    /// [`enter`](Self::enter); once per membership. It counts nothing, so a member that gave up
    /// and left before the others came leaves no trace. The members met are those whose
    /// liveness keys were all there at one moment: the barriers and gathers of this
    /// membership are numbered from 0 under keys of that meeting, which no other meeting
    /// shares, so a member that left (and perhaps came back) meets no count of the old one.
    ///
    /// The wait is not capped by [`within`] (see [`wait_done`](Self::wait_done)): call it
    /// outside any.
    pub fn meet(&self, timeout: Duration) -> Result<()> {
        if self.meeting.get().is_some() {
            return Err(Error::RepeatInvoke(format!(
                "rank {} of group {:?} has met the others already",
                self.rank,
                self.name()
            )));
        }
        let deadline = Instant::now() + timeout;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let keys: Vec<String> = (0..self.world)
            .map(|r| format!("{}alive/{r}", self.prefix))
            .collect();
        let waited: Vec<String> = wait_order(self.world)
            .into_iter()
            .map(|r| keys[r as usize].clone())
            .collect();
        let members = loop {
            self.client
                .wait(&waited, left(), None)
                .map_err(|e| self.context(e, "waiting for the members"))?;
            // All at one moment: a member that left since is missing here, and is waited for
            // again.
            match within(deadline, || self.client.multi_get(&keys, None)) {
                Ok(ids) => break ids,
                Err(Error::NotExist(_)) if Instant::now() < deadline => continue,
                Err(Error::NotExist(m)) => {
                    return Err(self.context(Error::Timeout(m), "waiting for the members"))
                }
                Err(e) => return Err(e),
            }
        };
        let mut ids = Vec::with_capacity(members.len());
        for (r, raw) in members.into_iter().enumerate() {
            match id_world(&raw) {
                Some(w) if w == self.world => {}
                Some(w) => {
                    return Err(Error::InvalidParam(format!(
                        "world size {} differs from the {w} that rank {r} of group {:?} came with",
                        self.world,
                        self.name()
                    )))
                }
                None => {
                    return Err(Error::Protocol(format!(
                        "rank {r} of group {:?} has no member id: {:?}",
                        self.name(),
                        String::from_utf8_lossy(&raw)
                    )))
                }
            }
            ids.push(String::from_utf8_lossy(&raw).into_owned());
        }
        if ids[self.rank as usize] != self.id {
            return Err(Error::Duplicated(format!(
                "rank {} of group {:?} is held by another process now (this one's connection \
                 was lost long enough for it to take the rank)",
                self.rank,
                self.name()
            )));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, ids.join("\n").as_bytes());
        let tag: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let prefix = format!("{}m/{tag}/", self.prefix);
        // This member's presence in the meeting: a member that leaves takes its key away for
        // good (if it comes back it meets anew), so the others' waits can tell even when its
        // rank is taken again, which the liveness keys cannot.
        within(deadline, || {
            self.client
                .set_ephemeral(&format!("{prefix}in/{}", self.rank), b"")
        })?;
        let _ = self.meeting.set(Meeting {
            prefix,
            members: ids,
            settled: AtomicBool::new(false),
        });
        Ok(())
    }

    fn name(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    /// Where barriers and gathers keep their keys: the meeting's, or the group's own.
    fn rounds(&self) -> &str {
        self.meeting.get().map_or(&self.prefix, |m| &m.prefix)
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    pub fn client(&self) -> &Arc<StoreClient> {
        &self.client
    }

    /// The key prefix of this group (for products that keep their own keys beside it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Waits until every rank has reached the barrier; fails with [`Error::PeerGone`] as soon as
    /// a member dies, or [`Error::Timeout`] after `timeout`.
    pub fn barrier(&self, timeout: Duration) -> Result<()> {
        self.barrier_inner(timeout, true)
    }

    fn barrier_inner(&self, timeout: Duration, watch_members: bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        let base = format!("{}b/{n}/", self.rounds());
        within(deadline, || {
            let arrived = self.client.add(&format!("{base}count"), 1)?;
            if arrived == self.world as i64 {
                self.client.set(&format!("{base}done"), b"")?;
                if n > 0 {
                    // Everyone has passed barrier n-1 (they are all in n): its keys can go.
                    let prev = format!("{}b/{}/", self.rounds(), n - 1);
                    self.client.delete(&format!("{prev}count"))?;
                    self.client.delete(&format!("{prev}done"))?;
                }
            }
            Ok(())
        })
        .and_then(|()| self.wait_done(&format!("{base}done"), deadline, watch_members))
        .map_err(|e| self.context(e, &format!("barrier {n}")))
    }

    /// Waits for `key` until `deadline`. The wait itself is not capped by [`within`]: the
    /// server answers it at the deadline, and the client allows the answer time to arrive
    /// rather than drop the connection (and with it this member's liveness key).
    fn wait_done(&self, key: &str, deadline: Instant, watch_members: bool) -> Result<()> {
        let members = self.watched();
        let watch = watch_members.then_some((members.as_str(), self.world as u64));
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let waited = match self.client.wait(&[key.to_string()], left(), watch) {
            Err(Error::PeerGone(m)) if watch_members => {
                // Right after a store restart a missing member may only not have been heard
                // from yet: look again once everyone's keeper has had its turn.
                let since = self.client.reconnected_at().map(|t| t.elapsed());
                match since {
                    Some(s)
                        if s < MEMBER_GRACE && Instant::now() + (MEMBER_GRACE - s) < deadline =>
                    {
                        std::thread::sleep(MEMBER_GRACE - s);
                        self.client.wait(&[key.to_string()], left(), watch)
                    }
                    _ => Err(Error::PeerGone(m)),
                }
            }
            r => r,
        };
        if let (Ok(()), Some(m)) = (&waited, self.meeting.get()) {
            m.settled.store(true, Ordering::Release);
        }
        waited
    }

    /// The keys whose count a wait watches: every member's liveness key, or once the meeting
    /// settled, the meeting's own (see [`Meeting::settled`]).
    fn watched(&self) -> String {
        match self.meeting.get() {
            Some(m) if m.settled.load(Ordering::Acquire) => format!("{}in/", m.prefix),
            _ => format!("{}alive/", self.prefix),
        }
    }

    /// Gathers `data` from every rank; returns the pieces in rank order.
    pub fn all_gather(&self, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let n = self.gathers.fetch_add(1, Ordering::Relaxed);
        let base = format!("{}ag/{n}/", self.rounds());
        let mut record = Vec::with_capacity(8 + data.len());
        record.extend_from_slice(&self.rank.to_be_bytes());
        record.extend_from_slice(&(data.len() as u32).to_be_bytes());
        record.extend_from_slice(data);
        let deadline = Instant::now() + timeout;
        within(deadline, || {
            self.client.append(&format!("{base}data"), &record)?;
            let arrived = self.client.add(&format!("{base}count"), 1)?;
            if arrived == self.world as i64 {
                self.client.set(&format!("{base}done"), b"")?;
            }
            Ok(())
        })
        .and_then(|()| self.wait_done(&format!("{base}done"), deadline, true))
        .map_err(|e| self.context(e, &format!("all_gather {n}")))?;
        let blob = self.client.get(&format!("{base}data"))?.ok_or_else(|| {
            Error::NotExist(format!("all_gather {n} data vanished from the store"))
        })?;
        let pieces = parse_records(&blob, self.world)?;
        // The last rank to read cleans up: a second counter tells who that is.
        if self.client.add(&format!("{base}read"), 1)? == self.world as i64 {
            for k in ["data", "count", "done", "read"] {
                self.client.delete(&format!("{base}{k}"))?;
            }
        }
        Ok(pieces)
    }

    fn context(&self, e: Error, what: &str) -> Error {
        let who = format!(
            "rank {} of {} in group {:?}",
            self.rank,
            self.world,
            self.prefix.trim_end_matches('/')
        );
        match e {
            Error::PeerGone(m) => Error::PeerGone(format!("{what} of {who}: {m}")),
            Error::Timeout(m) => Error::Timeout(format!("{what} of {who}: {m}")),
            other => other,
        }
    }

    /// Leaves the group: others' waits that watch membership fail from now on. The last member
    /// of a meeting to leave removes the meeting's keys (no one else can use them: a member that
    /// comes back meets anew).
    pub fn leave(&self) -> Result<()> {
        // Short deadline: leaving happens at teardown, possibly after the store has gone. Each
        // delete is tried even when one before failed: the client forgets the key either way
        // (so it is not published again after a reconnect).
        within(Instant::now() + LEAVE_LIMIT, || {
            let alive = self
                .client
                .delete(&format!("{}alive/{}", self.prefix, self.rank));
            let claim = self.claim.as_ref().map(|c| self.client.delete(c));
            let present = self
                .meeting
                .get()
                .map(|m| self.client.delete(&format!("{}in/{}", m.prefix, self.rank)));
            alive?;
            claim.transpose()?;
            present.transpose()?;
            match self.meeting.get() {
                Some(meeting) => self.forget_meeting(meeting),
                None => Ok(()),
            }
        })
    }

    /// Removes the keys of `meeting` when none of its members is left in it (each takes its
    /// `in/` key away when it leaves or dies). Of members leaving at the same moment at least
    /// the last to look finds none.
    fn forget_meeting(&self, meeting: &Meeting) -> Result<()> {
        if self
            .client
            .list(&format!("{}in/", meeting.prefix))?
            .is_empty()
        {
            for key in self.client.list(&meeting.prefix)? {
                self.client.delete(&key)?;
            }
        }
        Ok(())
    }

    /// Whether every member of this group's meeting (see [`meet`](Self::meet)) is still
    /// there, with the membership it met with: false once one left, even if its rank was taken
    /// again since (that one meets anew, under other keys).
    pub fn meeting_intact(&self) -> Result<bool> {
        let Some(meeting) = self.meeting.get() else {
            return Ok(false);
        };
        let keys: Vec<String> = (0..self.world)
            .map(|r| format!("{}alive/{r}", self.prefix))
            .collect();
        match self.client.multi_get(&keys, None) {
            Ok(ids) => Ok(ids
                .iter()
                .zip(&meeting.members)
                .all(|(now, met)| now.as_slice() == met.as_bytes())),
            Err(Error::NotExist(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How many members are alive now (this one included until it left).
    pub fn live_members(&self) -> Result<usize> {
        Ok(self.client.list(&format!("{}alive/", self.prefix))?.len())
    }

    /// Waits up to `limit` until no other member is alive (used by the process that hosts the
    /// store, so that it does not take the store away from ranks still finishing).
    pub fn wait_others_left(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mine = format!("{}alive/{}", self.prefix, self.rank);
        while std::time::Instant::now() < deadline {
            match self.client.list(&format!("{}alive/", self.prefix)) {
                Ok(keys) if keys.iter().all(|k| *k == mine) => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return,
            }
        }
    }
}

/// Refuses world size `world` for group `name` when a live member came with another (a group
/// that keeps no `world` key: see [`Group::enter`]).
fn check_live_worlds(client: &StoreClient, prefix: &str, name: &str, world: u32) -> Result<()> {
    let alive = client.list(&format!("{prefix}alive/"))?;
    if alive.is_empty() {
        return Ok(());
    }
    let ids = match client.multi_get(&alive, None) {
        Ok(ids) => ids,
        // One left meanwhile: the meeting checks the sizes again.
        Err(Error::NotExist(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    match ids
        .iter()
        .filter_map(|id| id_world(id))
        .find(|w| *w != world)
    {
        Some(w) => Err(Error::InvalidParam(format!(
            "world size {world} differs from the {w} of the live members of group {name:?}"
        ))),
        None => Ok(()),
    }
}

/// Claims explicit rank `r` of the group at `prefix` for this process, atomically: two
/// processes that claim it at the same moment do not both get it. Each publishes an ephemeral
/// key of its own under `claim/<r>/`, then lists them, and holds the rank when its key is the
/// only one. Each publishes before it lists, so when one's listing missed the other's key, the
/// other's listing came later still and sees the first's: at most one is alone (both may see
/// each other, and both are refused). The key vanishes with its holder's connection, so a
/// restarted rank takes its id again. Returns the claim key.
fn claim_rank(
    client: &StoreClient,
    prefix: &str,
    name: &str,
    r: u32,
    nonce: &str,
) -> Result<String> {
    // Right after a store restart, a holder's claim may not have been published again yet.
    if let Some(rest) = reconnect_grace_left(client) {
        let rest = scope_deadline().map_or(rest, |d| {
            rest.min(d.saturating_duration_since(Instant::now()))
        });
        std::thread::sleep(rest);
    }
    let mine = format!("{prefix}claim/{r}/{nonce}");
    client.set_ephemeral(&mine, b"")?;
    let claims = client.list(&format!("{prefix}claim/{r}/"));
    match claims {
        Ok(claims) if claims.iter().all(|k| *k == mine) => Ok(mine),
        Ok(_) => {
            let _ = client.delete(&mine);
            Err(Error::Duplicated(format!(
                "rank {r} of group {name:?} is held by a live process (or another claimed it at \
                 the same moment)"
            )))
        }
        Err(e) => {
            let _ = client.delete(&mine);
            Err(e)
        }
    }
}

fn parse_records(blob: &[u8], world: u32) -> Result<Vec<Vec<u8>>> {
    let mut out: Vec<Option<Vec<u8>>> = vec![None; world as usize];
    let mut rest = blob;
    while !rest.is_empty() {
        if rest.len() < 8 {
            return Err(Error::Protocol("all_gather record header cut short".into()));
        }
        let rank = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        if rest.len() < 8 + len || rank >= out.len() {
            return Err(Error::Protocol(format!(
                "all_gather record of rank {rank} is malformed"
            )));
        }
        out[rank] = Some(rest[8..8 + len].to_vec());
        rest = &rest[8 + len..];
    }
    out.into_iter()
        .enumerate()
        .map(|(r, v)| {
            v.ok_or_else(|| Error::Protocol(format!("all_gather lacks the piece of rank {r}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{client, server};

    #[test]
    fn group_ranks_claimed_at_the_same_moment_go_to_one_process_at_most() {
        let s = server();
        let n = 6;
        let mut won_somewhere = false;
        for round in 0..10 {
            let name = format!("g{round}");
            let clients: Vec<_> = (0..n).map(|_| client(&s)).collect();
            let start = std::sync::Barrier::new(n);
            let joined: Vec<Result<Group>> = std::thread::scope(|sc| {
                let handles: Vec<_> = clients
                    .iter()
                    .map(|c| {
                        let (c, name, start) = (c.clone(), &name, &start);
                        sc.spawn(move || {
                            start.wait();
                            Group::join_member(c, name, 2, Some(0))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let won = joined.iter().filter(|j| j.is_ok()).count();
            assert!(won <= 1, "round {round}: {won} processes hold rank 0");
            won_somewhere |= won == 1;
            for e in joined.iter().filter_map(|j| j.as_ref().err()) {
                assert_eq!(e.code(), -2006, "{e}");
            }
            // Once the winner is gone (its connection closed), the rank can be taken again.
            drop((joined, clients));
            let c = client(&s);
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = Group::join_member(c.clone(), &name, 2, Some(0)) {
                assert!(Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(won_somewhere, "no round had a winner");
    }

    /// What the store does for one waiter on `order`'s keys while they appear in `arrival`
    /// order: each time the first missing key appears, it scans the list from the start (twice:
    /// before and after arming its wake-ups). The keys it steps over.
    fn store_scans(order: &[u32], arrival: &[u32]) -> u64 {
        let mut present = vec![false; order.len()];
        let first_missing = |present: &[bool]| order.iter().position(|k| !present[*k as usize]);
        let mut steps = 0u64;
        let mut waiting_on = first_missing(&present);
        for &k in arrival {
            present[k as usize] = true;
            if waiting_on.map(|i| order[i]) == Some(k) {
                waiting_on = first_missing(&present);
                steps += 2 * waiting_on.map_or(order.len(), |i| i + 1) as u64;
            }
        }
        steps
    }

    #[test]
    fn a_rendezvous_costs_the_store_n_log_n_per_waiter_in_any_arrival_order() {
        let n = 1024u32;
        let in_order: Vec<u32> = (0..n).collect();
        let reversed: Vec<u32> = (0..n).rev().collect();
        let bound = 40 * u64::from(n);
        for arrival in [&in_order, &reversed] {
            for _ in 0..5 {
                let steps = store_scans(&wait_order(n), arrival);
                assert!(steps <= bound, "{steps} steps");
            }
        }
        // Waiting in rank order while ranks come in order is what cost O(N^2) per waiter.
        assert!(store_scans(&in_order, &in_order) >= u64::from(n * n) / 2);
        let mut order = wait_order(n);
        order.sort_unstable();
        assert_eq!(order, in_order, "a permutation of the ranks");
    }

    #[test]
    fn a_group_that_meets_later_checks_sizes_and_keeps_nothing_once_left() {
        let s = server();
        let t = Duration::from_secs(5);
        let a = Group::enter(client(&s), "m", 2, 0).unwrap();
        let e = Group::enter(client(&s), "m", 3, 1).err().unwrap();
        assert_eq!(e.code(), -2000, "{e}");
        assert!(e.to_string().contains("differs"), "{e}");
        let e = Group::enter(client(&s), "m", 2, 0).err().unwrap();
        assert_eq!(e.code(), -2006, "{e}");
        let b = Group::enter(client(&s), "m", 2, 1).unwrap();
        std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                b.meet(t).unwrap();
                b.barrier(t).unwrap();
                b.all_gather(b"b", t).unwrap()
            });
            a.meet(t).unwrap();
            a.barrier(t).unwrap();
            assert_eq!(
                a.all_gather(b"a", t).unwrap(),
                vec![b"a".to_vec(), b"b".to_vec()]
            );
            h.join().unwrap();
        });
        assert_eq!(a.meet(t).unwrap_err().code(), -2005);
        a.leave().unwrap();
        b.leave().unwrap();
        assert_eq!(client(&s).list("m").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn meeting_with_members_of_another_size_is_refused() {
        // Both came at the same moment (so neither saw the other when it took its rank).
        let s = server();
        let t = Duration::from_secs(5);
        let a = Group::enter(client(&s), "m", 2, 0).unwrap();
        let b = Group::enter(client(&s), "x", 3, 1).unwrap();
        // Put b's member id where a member of "m" would be, as if it had entered "m" then.
        let c = client(&s);
        c.set_ephemeral("m/alive/1", b.id.as_bytes()).unwrap();
        let e = a.meet(t).unwrap_err();
        assert_eq!(e.code(), -2000, "{e}");
        assert!(e.to_string().contains("differs from the 3"), "{e}");
    }
}
