//! Groups of ranks on a store: rank assignment, rendezvous, barrier, all_gather, liveness.
//!
//! Keys of group `g` (all under `g/`):
//! - `g/world` the agreed world size; `g/rank_seq` the counter behind auto-ranking;
//! - `g/alive/<r>` ephemeral, one per member: it vanishes when the member's connection dies
//!   (it is also the claim on an explicit rank);
//! - `g/b/<n>/count`, `g/b/<n>/done` for barrier number `n`;
//! - `g/ag/<n>/data` records `[rank u32][len u32][bytes]` appended by each member.
//!
//! Each member sends O(1) messages per barrier or all_gather (no O(N^2) traffic): an ADD on the
//! counter, a SET of `done` by the last one, and one WAIT that the server answers when `done`
//! exists, or aborts as soon as a member's `alive` key disappears.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{keep_alive, within, StoreClient, KEEP_EVERY};
use crate::error::{Error, Result};

/// Most ranks a group may have (the seed's limit).
pub const MAX_WORLD: u32 = 1024;
/// How long after its own reconnect a member gives the others to publish their liveness keys
/// in a restarted store (their keepers do within [`KEEP_EVERY`]) before it believes a key
/// missing there.
const MEMBER_GRACE: Duration = KEEP_EVERY.saturating_mul(4);

/// This process's membership in a group.
pub struct Group {
    client: Arc<StoreClient>,
    prefix: String,
    rank: u32,
    world: u32,
    barriers: AtomicU64,
    gathers: AtomicU64,
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
        let g = Self::claim(client, name, world, rank)?; // Rendezvous: a barrier that does not yet watch membership (not everybody is there).
        g.barrier_inner(timeout, false)?;
        Ok(g)
    }

    /// Checks the world size, takes a rank and publishes this member's liveness key.
    fn claim(client: Arc<StoreClient>, name: &str, world: u32, rank: Option<u32>) -> Result<Group> {
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
        let prefix = format!("{name}/");
        let agreed =
            client.compare_set(&format!("{prefix}world"), b"", world.to_string().as_bytes())?;
        if agreed != world.to_string().as_bytes() {
            return Err(Error::InvalidParam(format!(
                "world size {world} differs from the {} that group {name:?} was created with",
                String::from_utf8_lossy(&agreed)
            )));
        }
        let rank = match rank {
            Some(r) if r >= world => {
                return Err(Error::InvalidParam(format!(
                    "rank {r} is outside [0, {world}) for group {name:?}"
                )))
            }
            Some(r) => {
                // The alive key is the claim: it vanishes with its holder, so a restarted rank
                // can take its id again.
                if client.exists(&[format!("{prefix}alive/{r}")])?[0] {
                    return Err(Error::Duplicated(format!(
                        "rank {r} of group {name:?} is held by a live process"
                    )));
                }
                r
            }
            None => {
                let n = client.add(&format!("{prefix}rank_seq"), 1)?;
                if n < 1 || n > world as i64 {
                    return Err(Error::NoResources(format!(
                        "group {name:?} already has its {world} ranks (this would be rank {})",
                        n - 1
                    )));
                }
                (n - 1) as u32
            }
        };
        client.set_ephemeral(
            &format!("{prefix}alive/{rank}"),
            &std::process::id().to_le_bytes(),
        )?;
        // Members often sit idle between collectives; a restarted store must still learn that
        // they are alive before the next barrier watches for them.
        keep_alive(&client);
        Ok(Group {
            client,
            prefix,
            rank,
            world,
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
        Self::claim(client, name, world, rank)
    }

    /// Waits up to `timeout` until all `world` ranks are members (each one's liveness key
    /// exists), for a member that joined with [`join_member`](Self::join_member). Unlike the
    /// rendezvous of [`join`](Self::join) it counts nothing, so a member that gave up and left
    /// before the others came leaves no trace: it can join and wait again.
    pub fn wait_for_members(&self, timeout: Duration) -> Result<()> {
        let keys: Vec<String> = (0..self.world)
            .map(|r| format!("{}alive/{r}", self.prefix))
            .collect();
        self.client
            .wait(&keys, timeout, None)
            .map_err(|e| self.context(e, "waiting for the members"))
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
        let base = format!("{}b/{n}/", self.prefix);
        within(deadline, || {
            let arrived = self.client.add(&format!("{base}count"), 1)?;
            if arrived == self.world as i64 {
                self.client.set(&format!("{base}done"), b"")?;
                if n > 0 {
                    // Everyone has passed barrier n-1 (they are all in n): its keys can go.
                    let prev = format!("{}b/{}/", self.prefix, n - 1);
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
        let alive = format!("{}alive/", self.prefix);
        let watch = watch_members.then_some((alive.as_str(), self.world as u64));
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        match self.client.wait(&[key.to_string()], left(), watch) {
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
        }
    }

    /// Gathers `data` from every rank; returns the pieces in rank order.
    pub fn all_gather(&self, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let n = self.gathers.fetch_add(1, Ordering::Relaxed);
        let base = format!("{}ag/{n}/", self.prefix);
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

    /// Leaves the group: others' waits that watch membership fail from now on.
    pub fn leave(&self) -> Result<()> {
        // Short deadline: leaving happens at teardown, possibly after the store has gone.
        self.client.delete_within(
            &format!("{}alive/{}", self.prefix, self.rank),
            Duration::from_secs(2),
        )?;
        Ok(())
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
