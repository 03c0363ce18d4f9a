//! The config store on etcd: the same operations as the embedded store, on etcd's v3 API.
//!
//! - Keys live under the URL's prefix (`etcd://ip:port/jobs/42` stores `k` as `jobs/42/k`).
//! - set, get, delete, exists, multi_get, multi_set and list are puts, ranges and deletes (the
//!   multi-key ones one transaction per 128 keys, etcd's default `--max-txn-ops`).
//! - add, append and compare_set read the key, then write it in a transaction that compares
//!   its `mod_revision` with what was read, and go again when another writer came first. The
//!   same transaction records `<seq>.<attempt>` in a marker key that the call holds alone
//!   (one per call in flight, under the client's lease): when a member fails in mid-call, so
//!   that the outcome is unknown, the next read (key and marker in one snapshot) tells whether
//!   the write landed. Such calls are therefore repeated safely and never answer
//!   `SMEM_RECONNECTED`, unlike the embedded store's.
//! - get with a wait, multi_get with a wait and wait are watches started at the revision of a
//!   read, with the call's deadline; a wait that watches group members also watches their
//!   prefix for deletes and fails with `PeerGone` when fewer than the required number remain.
//! - Ephemeral keys are put under one lease per client with a [`LEASE_TTL`] time to live,
//!   kept alive every [`KEEPALIVE_EVERY`] and revoked when the client is dropped: a process
//!   that dies loses its keys within the TTL. A lease that expired anyway (a client paused
//!   longer than the TTL) is replaced and the keys are put again.
//! - Calls that fail for a reason that may pass (a member down, a leader election, a broken
//!   connection) are repeated, through whichever members answer, until their deadline; then
//!   they fail with `SMEM_TIMEOUT` naming the last error, e.g. that no leader exists.
//! - With `set_conf_store_tls` on, the channel uses TLS with the same CA, certificate and key.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    GetResponse, Identity, KvClient, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchClient, WatchFilterType, WatchOptions,
};

use super::backend::StoreBackend;
use super::client::ClientOptions;
use super::url::{parse_etcd_url, EtcdUrl};
use crate::error::{Error, Result};
use crate::log::{DEBUG, INFO, WARN};
use crate::mf_log;

/// Time to live of a client's lease: how long ephemeral keys outlive a process that died
/// without revoking it. Short, so that a dead member fails the others' waits quickly; three
/// keep-alives fit in it, so one lost keep-alive (a member failing over) does not expire it.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the lease is kept alive.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// Operations in one transaction (etcd's default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;
/// Largest answer accepted (etcd's own request limit is 1.5 MiB by default; a multi_get of
/// many values sums them).
const MAX_MESSAGE: usize = 256 << 20;
/// Where this library's own keys live: outside every prefix a URL can name.
const INTERNAL: &[u8] = b"\0mf/";
/// Longest a close waits to revoke the lease (teardown, perhaps with etcd gone).
const REVOKE_LIMIT: Duration = Duration::from_secs(2);
/// Values up to this size are remembered after a read-modify-write (see `written`).
const REMEMBER_MAX: usize = 4096;
/// Keys remembered so at most (the memory is cleared when full).
const REMEMBER_KEYS: usize = 1024;
/// Conflicts on one read-modify-write after which it pauses between attempts.
const EAGER_RETRIES: u32 = 32;
/// Longest wait, as the embedded server caps it.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// A client of an etcd cluster (see the module docs).
pub struct EtcdClient {
    url: String,
    endpoints: Vec<SocketAddr>,
    timeout: Duration,
    session: Arc<Session>,
    /// Marker keys are this followed by a slot number (see [`MarkerSlot`]).
    marker_base: Vec<u8>,
    /// Marker slots free for the next call.
    free_slots: Mutex<Vec<u32>>,
    /// What this client last wrote to small keys by read-modify-write, and at which revision:
    /// the first guess of the next one (a counter it keeps adding to needs no read then).
    written: Mutex<Written>,
    next_slot: AtomicU32,
    seq: AtomicU64,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

/// Keys with the value and mod_revision a client last wrote to them.
type Written = HashMap<Vec<u8>, (Vec<u8>, i64)>;

/// What the lease keeper shares with the calls.
struct Session {
    url: String,
    prefix: Vec<u8>,
    client: Client,
    kv: KvClient,
    watch: WatchClient,
    lease: AtomicI64,
    /// Held while an expired lease is replaced, so that it is replaced once.
    regrant: tokio::sync::Mutex<()>,
    /// Ephemeral keys (full etcd keys) and their values, put again under a new lease.
    ephemeral: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    reconnected: Mutex<Option<Instant>>,
}

/// What a read-modify-write does with the value it read.
enum Plan<R> {
    /// Nothing to write; the answer.
    Done(R),
    /// Write this value; the answer once written.
    Write(Vec<u8>, R),
}

impl EtcdClient {
    /// Connects to the cluster of `url` and takes a lease, retrying until `opts.timeout`.
    pub fn connect(url: &str, opts: ClientOptions) -> Result<EtcdClient> {
        let parsed: EtcdUrl = parse_etcd_url(url)?;
        let pem = if opts.force_plaintext {
            None
        } else {
            match super::tls::current_pem() {
                Some(p) => Some(p),
                None if opts.tls.is_some() => {
                    return Err(Error::Unsupported(format!(
                        "store {url}: TLS to etcd takes its identity from set_conf_store_tls, \
                         which is off"
                    )))
                }
                None => None,
            }
        };
        let scheme = if pem.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = parsed
            .endpoints
            .iter()
            .map(|a| format!("{scheme}://{a}"))
            .collect();
        let mut options = ConnectOptions::new()
            // A member that vanished without closing its connections is noticed within
            // seconds, and calls move to the others.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(opts.timeout.min(Duration::from_secs(2)))
            // A member cut off from the others refuses at once instead of answering from a
            // stale view or holding a watch that never fires.
            .with_require_leader(true);
        if let Some(p) = &pem {
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(&p.ca))
                    .identity(Identity::from_pem(&p.cert, &p.key)),
            );
        }
        let name = parsed.to_string();
        let deadline = Instant::now() + opts.timeout;
        let (session, marker) = block(async {
            let client = Client::connect(&endpoints, Some(options))
                .await
                .map_err(|e| Error::InvalidParam(format!("store {name}: {e}")))?;
            let kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
            let watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
            let session = Session {
                url: name.clone(),
                prefix: parsed.key_prefix().into_bytes(),
                client,
                kv,
                watch,
                lease: AtomicI64::new(0),
                regrant: tokio::sync::Mutex::new(()),
                ephemeral: Mutex::new(HashMap::new()),
                reconnected: Mutex::new(None),
            };
            // Granting the lease is the first call: it proves that a majority of the members
            // answers, so a wrong address fails here rather than at the first real call.
            let lease = retry(&name, "granting a lease", deadline, opts.timeout, || {
                session.grant()
            })
            .await
            .map_err(|e| match e {
                Error::Timeout(m) => {
                    Error::NotConnected(format!("cannot reach etcd cluster {name}: {m}"))
                }
                e => e,
            })?;
            session.lease.store(lease, Ordering::Relaxed);
            // Lease ids are unique in the cluster: a name no other client uses.
            let mut marker = INTERNAL.to_vec();
            marker.extend_from_slice(&session.prefix);
            marker.extend_from_slice(format!("op/{lease:x}/").as_bytes());
            Ok((Arc::new(session), marker))
        })?;
        let keeper = crate::runtime::runtime()?.spawn(keep_lease(Arc::downgrade(&session)));
        mf_log!(
            INFO,
            "connected to etcd store {name} (lease {:x}, ttl {LEASE_TTL:?})",
            session.lease.load(Ordering::Relaxed)
        );
        Ok(EtcdClient {
            url: name,
            endpoints: parsed.endpoints,
            timeout: opts.timeout,
            session,
            marker_base: marker,
            free_slots: Mutex::new(Vec::new()),
            written: Mutex::new(HashMap::new()),
            next_slot: AtomicU32::new(0),
            seq: AtomicU64::new(0),
            keeper: Some(keeper),
        })
    }

    /// The lease that holds this client's ephemeral keys now.
    pub fn lease_id(&self) -> i64 {
        self.session.lease.load(Ordering::Relaxed)
    }

    /// A marker key for one call, held by it alone.
    fn marker_slot(&self) -> MarkerSlot<'_> {
        let n = lock(&self.free_slots)
            .pop()
            .unwrap_or_else(|| self.next_slot.fetch_add(1, Ordering::Relaxed));
        let mut key = self.marker_base.clone();
        key.extend_from_slice(n.to_string().as_bytes());
        MarkerSlot {
            owner: self,
            n,
            key,
            reusable: false,
        }
    }

    fn key(&self, key: &str) -> Vec<u8> {
        let mut k = self.session.prefix.clone();
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The deadline of a call that may take `limit`, capped by [`super::client::within`].
    fn deadline(&self, limit: Duration) -> Instant {
        let d = Instant::now() + limit.min(MAX_WAIT);
        super::client::scope_deadline().map_or(d, |s| s.min(d))
    }

    /// Runs a call that is safe to repeat until it succeeds or `limit` passes.
    fn call<T, F, Fut>(&self, what: &str, limit: Duration, f: F) -> Result<T>
    where
        T: Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T>> + Send,
    {
        let deadline = self.deadline(limit);
        block(retry(&self.url, what, deadline, limit, f))
    }

    fn put_entries(&self, entries: Vec<(Vec<u8>, Vec<u8>)>, ephemeral: bool) -> Result<()> {
        let s = &self.session;
        self.call("put", self.timeout, || async {
            let lease = ephemeral.then(|| s.lease.load(Ordering::Relaxed));
            match s.put_all(&entries, lease).await {
                Err(e) if lease_gone(&e) => {
                    s.replace_lease(lease.unwrap_or_default()).await?;
                    Err(Error::NotConnected(format!("lease replaced: {e}")))
                }
                r => r,
            }
        })
    }

    /// Reads `key` and writes what `plan` makes of its value, exactly once (see the module
    /// docs). The first attempt goes without a read when this client wrote the key last (it
    /// guesses that nobody wrote since) or, with `assume_absent`, where the key is most likely
    /// new; a wrong guess costs one failed transaction, which returns the real value.
    fn read_modify_write<R, P>(
        &self,
        what: &str,
        key: &str,
        assume_absent: bool,
        plan: P,
    ) -> Result<R>
    where
        R: Clone + Send,
        P: Fn(Option<&[u8]>) -> Result<Plan<R>> + Send + Sync,
    {
        let key = self.key(key);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let deadline = self.deadline(self.timeout);
        let s = &self.session;
        let mut slot = self.marker_slot();
        let marker = &slot.key;
        let r = block(async move {
            let mut intended: Vec<R> = Vec::new();
            // (value, mod_revision, whether it was only assumed)
            let cached = lock(&self.written).get(&key).cloned();
            let mut known: Option<(Option<Vec<u8>>, i64, bool)> = match cached {
                Some((v, rev)) => Some((Some(v), rev, true)),
                None => assume_absent.then_some((None, 0, true)),
            };
            let mut backoff = Backoff::new();
            let mut last: Option<Error> = None;
            let mut conflicts = 0u32;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(gave_up(&s.url, what, self.timeout, last));
                }
                let (value, rev, assumed) = match known.take() {
                    Some(k) => k,
                    None => {
                        match tokio::time::timeout(left, s.read_with_marker(&key, marker)).await {
                            Err(_) => return Err(gave_up(&s.url, what, self.timeout, last)),
                            Ok(Err(e)) if e.is_temporary() => {
                                last = Some(e);
                                backoff.sleep(deadline).await;
                                continue;
                            }
                            Ok(Err(e)) => return Err(e),
                            Ok(Ok((kv, tag))) => {
                                if let Some(r) = landed(&tag, seq, &intended) {
                                    return Ok(r);
                                }
                                let (v, rev) = kv.map_or((None, 0), |(v, r)| (Some(v), r));
                                (v, rev, false)
                            }
                        }
                    }
                };
                let (new, answer) = match plan(value.as_deref())? {
                    Plan::Done(r) if !assumed => return Ok(r),
                    Plan::Done(_) => continue,
                    Plan::Write(new, r) => (new, r),
                };
                let attempt = intended.len();
                intended.push(answer);
                let lease = s.lease.load(Ordering::Relaxed);
                let remember = (new.len() <= REMEMBER_MAX).then(|| new.clone());
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                    .and_then([
                        TxnOp::put(key.clone(), new, None),
                        TxnOp::put(
                            marker.clone(),
                            format!("{seq}.{attempt}"),
                            Some(PutOptions::new().with_lease(lease)),
                        ),
                    ])
                    .or_else([
                        TxnOp::get(key.clone(), None),
                        TxnOp::get(marker.clone(), None),
                    ]);
                let mut kv = s.kv.clone();
                match tokio::time::timeout(left, kv.txn(txn)).await {
                    Err(_) => return Err(gave_up(&s.url, what, self.timeout, last)),
                    Ok(Ok(resp)) if resp.succeeded() => {
                        let mut written = lock(&self.written);
                        match (remember, resp.header().map(|h| h.revision())) {
                            (Some(v), Some(rev)) => {
                                if written.len() >= REMEMBER_KEYS {
                                    written.clear();
                                }
                                written.insert(key.clone(), (v, rev));
                            }
                            _ => {
                                written.remove(&key);
                            }
                        }
                        return Ok(intended[attempt].clone());
                    }
                    Ok(Ok(resp)) => {
                        // Another writer came first: go again from what the transaction saw.
                        let (kv, tag) = read_pair(&resp);
                        if let Some(r) = landed(&tag, seq, &intended) {
                            return Ok(r);
                        }
                        conflicts += 1;
                        let (v, rev) = kv.map_or((None, 0), |(v, r)| (Some(v), r));
                        if conflicts <= EAGER_RETRIES {
                            // Straight again with what the failed attempt saw: etcd batches
                            // the contenders' proposals, so each round costs one raft round
                            // trip and lets one writer through.
                            known = Some((v, rev, false));
                        } else {
                            // Very many writers on one key: every attempt is a raft proposal,
                            // failed or not, so spread them out, then read again (what the
                            // failed attempt saw is stale once the pause ends).
                            let cap =
                                Duration::from_micros(500 << (conflicts - EAGER_RETRIES).min(10));
                            let d = cap * (jitter_permille() as u32) / 1000;
                            tokio::time::sleep(
                                d.min(deadline.saturating_duration_since(Instant::now())),
                            )
                            .await;
                        }
                    }
                    Ok(Err(e)) => {
                        let e = to_error(&s.url, e);
                        if lease_gone(&e) {
                            // Refused as a whole: nothing was written.
                            s.replace_lease(lease).await.ok();
                        } else if !e.is_temporary() {
                            return Err(e);
                        }
                        last = Some(e);
                        backoff.sleep(deadline).await;
                    }
                }
            }
        });
        // After a timeout a transaction of this call may still be on its way: its marker is
        // not given to another call.
        slot.reusable = r.is_ok();
        r
    }

    /// Waits until all of `keys` (full keys) exist; see [`StoreBackend::wait`].
    async fn wait_until(
        &self,
        keys: &[Vec<u8>],
        watch: Option<(&str, u64)>,
        deadline: Instant,
        total: Duration,
        describe: &str,
    ) -> Result<()> {
        let s = &self.session;
        let members = watch.map(|(p, n)| (self.key(p), p, n));
        let mut backoff = Backoff::new();
        let mut last: Option<Error> = None;
        let timed_out = |last: Option<Error>| {
            let mut m = format!("waiting for {describe} in store {} for {total:?}", s.url);
            if let Some(e) = last {
                m.push_str(&format!(" (last error: {e})"));
            }
            Error::Timeout(m)
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(last));
            }
            let prefix = members.as_ref().map(|(k, _, _)| k.as_slice());
            let snap = match tokio::time::timeout(left, s.presence(keys, prefix)).await {
                Err(_) => return Err(timed_out(last)),
                Ok(Err(e)) if e.is_temporary() => {
                    last = Some(e);
                    backoff.sleep(deadline).await;
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(snap)) => snap,
            };
            let Some(missing) = snap.first_missing else {
                return Ok(());
            };
            if let (Some((_, p, min)), Some(alive)) = (&members, snap.alive) {
                if alive < *min {
                    return Err(Error::PeerGone(format!(
                        "a member left: {alive} of {min} members under {p:?} are alive"
                    )));
                }
            }
            let watched = s.watch_change(&keys[missing], prefix, snap.revision + 1);
            match tokio::time::timeout(left, watched).await {
                Err(_) => return Err(timed_out(last)),
                Ok(Ok(_)) => backoff = Backoff::new(),
                Ok(Err(e)) if e.is_temporary() => {
                    last = Some(e);
                    backoff.sleep(deadline).await;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}

impl Drop for EtcdClient {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        // Revoking deletes this client's ephemeral keys now rather than after the TTL.
        let s = self.session.clone();
        let lease = s.lease.load(Ordering::Relaxed);
        let r = block(async move {
            let mut c = s.client.lease_client();
            match tokio::time::timeout(REVOKE_LIMIT, c.revoke(lease)).await {
                Ok(r) => r.map(|_| ()).map_err(|e| to_error(&s.url, e)),
                Err(_) => Err(Error::Timeout(format!("revoking lease {lease:x}"))),
            }
        });
        if let Err(e) = r {
            mf_log!(
                DEBUG,
                "etcd store {}: lease {lease:x} not revoked ({e}); it expires within {LEASE_TTL:?}",
                self.url
            );
        }
    }
}

/// A marker key lent to one read-modify-write call; given back when the call ends with a
/// known outcome.
struct MarkerSlot<'a> {
    owner: &'a EtcdClient,
    n: u32,
    key: Vec<u8>,
    reusable: bool,
}

impl Drop for MarkerSlot<'_> {
    fn drop(&mut self) {
        if self.reusable {
            lock(&self.owner.free_slots).push(self.n);
        }
    }
}

/// What [`Session::presence`] saw.
struct Presence {
    first_missing: Option<usize>,
    /// Keys under the watched member prefix.
    alive: Option<u64>,
    /// Revision of the first read; watches start after it.
    revision: i64,
}

impl Session {
    async fn grant(&self) -> Result<i64> {
        let mut c = self.client.lease_client();
        let r = c
            .grant(LEASE_TTL.as_secs() as i64, None)
            .await
            .map_err(|e| to_error(&self.url, e))?;
        Ok(r.id())
    }

    /// Replaces lease `old` once it expired and puts the ephemeral keys again under the new
    /// one; returns the lease to use.
    async fn replace_lease(&self, old: i64) -> Result<i64> {
        let _held = self.regrant.lock().await;
        let current = self.lease.load(Ordering::Relaxed);
        if current != old {
            return Ok(current);
        }
        let new = self.grant().await?;
        self.lease.store(new, Ordering::Relaxed);
        let entries: Vec<(Vec<u8>, Vec<u8>)> = lock(&self.ephemeral)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.put_all(&entries, Some(new)).await?;
        *lock(&self.reconnected) = Some(Instant::now());
        mf_log!(
            WARN,
            "etcd store {}: lease {old:x} expired; {} ephemeral key(s) put again under lease {new:x}",
            self.url,
            entries.len()
        );
        Ok(new)
    }

    async fn put_all(&self, entries: &[(Vec<u8>, Vec<u8>)], lease: Option<i64>) -> Result<()> {
        let opts = || lease.map(|l| PutOptions::new().with_lease(l));
        let mut kv = self.kv.clone();
        if let [(k, v)] = entries {
            kv.put(k.clone(), v.clone(), opts())
                .await
                .map_err(|e| to_error(&self.url, e))?;
            return Ok(());
        }
        for chunk in entries.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| TxnOp::put(k.clone(), v.clone(), opts()))
                .collect();
            kv.txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| to_error(&self.url, e))?;
        }
        Ok(())
    }

    /// Runs read-only transactions of `ops` (at most [`MAX_TXN_OPS`] each); the range answers
    /// in order, and the revision of the first.
    async fn read_many(&self, ops: Vec<TxnOp>) -> Result<(Vec<GetResponse>, i64)> {
        let mut kv = self.kv.clone();
        let mut out = Vec::with_capacity(ops.len());
        let mut revision = 0;
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
            let resp = kv
                .txn(Txn::new().and_then(chunk))
                .await
                .map_err(|e| to_error(&self.url, e))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for r in resp.op_responses() {
                match r {
                    TxnOpResponse::Get(g) => out.push(g),
                    _ => return Err(Error::Protocol("etcd answered a read with a write".into())),
                }
            }
        }
        Ok((out, revision))
    }

    /// `key`'s value and mod_revision, and the marker's value, in one snapshot.
    async fn read_with_marker(&self, key: &[u8], marker: &[u8]) -> Result<KeyAndMarker> {
        let mut kv = self.kv.clone();
        let resp = kv
            .txn(Txn::new().and_then([
                TxnOp::get(key.to_vec(), None),
                TxnOp::get(marker.to_vec(), None),
            ]))
            .await
            .map_err(|e| to_error(&self.url, e))?;
        Ok(read_pair(&resp))
    }

    async fn presence(&self, keys: &[Vec<u8>], members: Option<&[u8]>) -> Result<Presence> {
        let count = || Some(GetOptions::new().with_count_only());
        let mut ops: Vec<TxnOp> = Vec::with_capacity(keys.len() + 1);
        if let Some(p) = members {
            ops.push(TxnOp::get(
                p.to_vec(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ));
        }
        ops.extend(keys.iter().map(|k| TxnOp::get(k.clone(), count())));
        let (answers, revision) = self.read_many(ops).await?;
        let (alive, present) = match members {
            Some(_) => (
                answers.first().map(|g| g.count().max(0) as u64),
                &answers[1..],
            ),
            None => (None, &answers[..]),
        };
        Ok(Presence {
            first_missing: present.iter().position(|g| g.count() == 0),
            alive,
            revision,
        })
    }

    /// Returns at the first put of `key` or delete under `members` from `revision` on: the
    /// value put, if that is what happened.
    async fn watch_change(
        &self,
        key: &[u8],
        members: Option<&[u8]>,
        revision: i64,
    ) -> Result<Option<Vec<u8>>> {
        let mut w = self.watch.clone();
        let err = |e| to_error(&self.url, e);
        let mut stream = w
            .watch(
                key.to_vec(),
                Some(
                    WatchOptions::new()
                        .with_start_revision(revision)
                        .with_filters([WatchFilterType::NoDelete]),
                ),
            )
            .await
            .map_err(err)?;
        if let Some(p) = members {
            stream
                .watch(
                    p.to_vec(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision)
                            .with_filters([WatchFilterType::NoPut]),
                    ),
                )
                .await
                .map_err(err)?;
        }
        loop {
            let Some(resp) = stream.message().await.map_err(err)? else {
                return Err(Error::NotConnected(format!(
                    "etcd store {}: watch stream closed",
                    self.url
                )));
            };
            if resp.canceled() {
                // Compacted past our revision, or the member lost its leader: read again.
                return Err(Error::NotConnected(format!(
                    "etcd store {}: watch canceled: {}",
                    self.url,
                    resp.cancel_reason()
                )));
            }
            if let Some(ev) = resp.events().first() {
                let put =
                    ev.event_type() == EventType::Put && ev.kv().is_some_and(|kv| kv.key() == key);
                return Ok(put.then(|| ev.kv().map(|kv| kv.value().to_vec())).flatten());
            }
        }
    }
}

/// Keeps the client's lease alive while the client lives; replaces it if it expired.
async fn keep_lease(session: std::sync::Weak<Session>) {
    loop {
        let Some(s) = session.upgrade() else { return };
        let id = s.lease.load(Ordering::Relaxed);
        let mut lc = s.client.lease_client();
        drop(s);
        if let Ok(Ok((mut keeper, mut stream))) =
            tokio::time::timeout(KEEPALIVE_EVERY * 2, lc.keep_alive(id)).await
        {
            loop {
                let beat = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(KEEPALIVE_EVERY * 2, beat).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => {
                        // TTL 0: the lease is gone (this process was stalled past it).
                        let Some(s) = session.upgrade() else { return };
                        if let Err(e) = s.replace_lease(id).await {
                            mf_log!(DEBUG, "etcd store {}: cannot replace lease: {e}", s.url);
                        }
                        break;
                    }
                    // The stream broke (its member went away): open another, which the
                    // channel sends to a member that answers.
                    _ => break,
                }
                tokio::time::sleep(KEEPALIVE_EVERY).await;
                if session.strong_count() == 0 {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl StoreBackend for EtcdClient {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn connection(&self) -> &'static str {
        "etcd"
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn local_ip(&self) -> Option<IpAddr> {
        // A connected UDP socket sends nothing but tells which interface routes there.
        let peer = *self.endpoints.first()?;
        let any: IpAddr = if peer.is_ipv4() {
            [0, 0, 0, 0].into()
        } else {
            [0u16; 8].into()
        };
        let sock = UdpSocket::bind((any, 0)).ok()?;
        sock.connect(peer).ok()?;
        sock.local_addr().ok().map(|a| a.ip())
    }

    fn reconnected_at(&self) -> Option<Instant> {
        *lock(&self.session.reconnected)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = self.key(key);
        // A plain set detaches the key from the lease, as the embedded store forgets its owner.
        lock(&self.session.ephemeral).remove(&k);
        self.put_entries(vec![(k, value.to_vec())], false)
    }

    fn set_ephemeral(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = self.key(key);
        // Recorded first, so that a lease replaced meanwhile puts it again too.
        lock(&self.session.ephemeral).insert(k.clone(), value.to_vec());
        self.put_entries(vec![(k, value.to_vec())], true)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let k = self.key(key);
        let s = &self.session;
        self.call("get", self.timeout, || async {
            let mut kv = s.kv.clone();
            let mut r = kv
                .get(k.clone(), None)
                .await
                .map_err(|e| to_error(&s.url, e))?;
            Ok(r.take_kvs()
                .into_iter()
                .next()
                .map(|kv| kv.into_key_value().1))
        })
    }

    fn get_wait(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let k = self.key(key);
        let s = &self.session;
        let deadline = self.deadline(timeout);
        let timed_out = |last: Option<Error>| {
            let mut m = format!(
                "key {key:?} did not appear in store {} within {timeout:?}",
                s.url
            );
            if let Some(e) = last {
                m.push_str(&format!(" (last error: {e})"));
            }
            Error::Timeout(m)
        };
        block(async {
            let mut backoff = Backoff::new();
            let mut last: Option<Error> = None;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out(last));
                }
                let mut kv = s.kv.clone();
                let read = match tokio::time::timeout(left, kv.get(k.clone(), None)).await {
                    Err(_) => return Err(timed_out(last)),
                    Ok(r) => r.map_err(|e| to_error(&s.url, e)),
                };
                let outcome = match read {
                    Ok(mut r) => {
                        let revision = r.header().map_or(0, |h| h.revision());
                        if let Some(kv) = r.take_kvs().into_iter().next() {
                            return Ok(kv.into_key_value().1);
                        }
                        match tokio::time::timeout(left, s.watch_change(&k, None, revision + 1))
                            .await
                        {
                            Err(_) => return Err(timed_out(last)),
                            Ok(Ok(Some(v))) => return Ok(v),
                            Ok(r) => r.map(|_| ()),
                        }
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(()) => {}
                    Err(e) if e.is_temporary() => {
                        last = Some(e);
                        backoff.sleep(deadline).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.read_modify_write("add", key, true, |v| {
            let current = match v {
                None => 0,
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| {
                        Error::InvalidParam(format!("value of {key:?} is not an integer counter"))
                    })?,
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| Error::InvalidParam(format!("counter {key:?} would overflow")))?;
            Ok(Plan::Write(next.to_string().into_bytes(), next))
        })
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        self.read_modify_write("compare_set", key, expected.is_empty(), |v| {
            let matches = match v {
                Some(v) => v == expected,
                None => expected.is_empty(),
            };
            Ok(if matches {
                Plan::Write(desired.to_vec(), desired.to_vec())
            } else {
                Plan::Done(v.map(<[u8]>::to_vec).unwrap_or_default())
            })
        })
    }

    fn delete(&self, key: &str) -> Result<bool> {
        self.delete_within(key, self.timeout)
    }

    fn delete_within(&self, key: &str, limit: Duration) -> Result<bool> {
        let k = self.key(key);
        lock(&self.session.ephemeral).remove(&k);
        lock(&self.written).remove(&k);
        let s = &self.session;
        self.call("delete", limit, || async {
            let mut kv = s.kv.clone();
            let r = kv
                .delete(k.clone(), None::<DeleteOptions>)
                .await
                .map_err(|e| to_error(&s.url, e))?;
            Ok(r.deleted() > 0)
        })
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<u64> {
        self.read_modify_write("append", key, true, |v| {
            let mut next = v.map(<[u8]>::to_vec).unwrap_or_default();
            next.extend_from_slice(value);
            let len = next.len() as u64;
            Ok(Plan::Write(next, len))
        })
    }

    fn exists(&self, keys: &[String]) -> Result<Vec<bool>> {
        let full: Vec<Vec<u8>> = keys.iter().map(|k| self.key(k)).collect();
        let s = &self.session;
        self.call("exists", self.timeout, || async {
            let ops = full
                .iter()
                .map(|k| TxnOp::get(k.clone(), Some(GetOptions::new().with_count_only())))
                .collect();
            let (answers, _) = s.read_many(ops).await?;
            Ok(answers.iter().map(|g| g.count() > 0).collect())
        })
    }

    fn multi_get(&self, keys: &[String], wait: Option<Duration>) -> Result<Vec<Vec<u8>>> {
        let full: Vec<Vec<u8>> = keys.iter().map(|k| self.key(k)).collect();
        if let Some(w) = wait {
            let deadline = self.deadline(w);
            block(self.wait_until(&full, None, deadline, w, &describe_keys(keys))).map_err(
                |e| match e {
                    Error::Timeout(_) => Error::Timeout(format!(
                        "keys did not all appear in store {} within {w:?}",
                        self.url
                    )),
                    e => e,
                },
            )?;
        }
        let s = &self.session;
        let values = self.call("multi_get", self.timeout, || async {
            let ops = full.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
            let (answers, _) = s.read_many(ops).await?;
            Ok(answers
                .into_iter()
                .map(|mut g| {
                    g.take_kvs()
                        .into_iter()
                        .next()
                        .map(|kv| kv.into_key_value().1)
                })
                .collect::<Vec<_>>())
        })?;
        keys.iter()
            .zip(values)
            .map(|(k, v)| {
                v.ok_or_else(|| Error::NotExist(format!("key {k:?} in store {}", self.url)))
            })
            .collect()
    }

    fn multi_set(&self, entries: &[(String, Vec<u8>)], ephemeral: bool) -> Result<()> {
        let full: Vec<(Vec<u8>, Vec<u8>)> = entries
            .iter()
            .map(|(k, v)| (self.key(k), v.clone()))
            .collect();
        {
            let mut eph = lock(&self.session.ephemeral);
            for (k, v) in &full {
                if ephemeral {
                    eph.insert(k.clone(), v.clone());
                } else {
                    eph.remove(k);
                }
            }
        }
        self.put_entries(full, ephemeral)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = self.key(prefix);
        let s = &self.session;
        let strip = s.prefix.len();
        self.call("list", self.timeout, || async {
            let mut kv = s.kv.clone();
            let r = kv
                .get(
                    p.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .map_err(|e| to_error(&s.url, e))?;
            Ok(r.kvs()
                .iter()
                .map(|kv| kv.key())
                .filter(|k| !k.starts_with(INTERNAL))
                .map(|k| String::from_utf8_lossy(&k[strip.min(k.len())..]).into_owned())
                .collect())
        })
    }

    fn wait(&self, keys: &[String], timeout: Duration, watch: Option<(&str, u64)>) -> Result<()> {
        let full: Vec<Vec<u8>> = keys.iter().map(|k| self.key(k)).collect();
        let deadline = self.deadline(timeout);
        block(self.wait_until(&full, watch, deadline, timeout, &describe_keys(keys)))
    }

    fn ping(&self) -> Result<Duration> {
        let t = Instant::now();
        let s = &self.session;
        let marker = &self.marker_base;
        self.call("ping", self.timeout, || async {
            let mut kv = s.kv.clone();
            kv.get(marker.clone(), Some(GetOptions::new().with_count_only()))
                .await
                .map_err(|e| to_error(&s.url, e))?;
            Ok(())
        })?;
        Ok(t.elapsed())
    }
}

/// Runs `fut` to completion on the shared runtime from a blocking caller (from a runtime
/// thread too, through a helper thread: blocking there would stall the runtime's own work).
fn block<T: Send>(fut: impl Future<Output = Result<T>> + Send) -> Result<T> {
    let rt = crate::runtime::runtime()?;
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(fut);
    }
    std::thread::scope(|s| {
        s.spawn(|| rt.block_on(fut))
            .join()
            .unwrap_or_else(|_| Err(Error::Failed("an etcd call panicked".into())))
    })
}

/// Repeats `f` while it fails for a reason that may pass, until `deadline`.
async fn retry<T, F, Fut>(
    url: &str,
    what: &str,
    deadline: Instant,
    limit: Duration,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::new();
    let mut last: Option<Error> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(gave_up(url, what, limit, last));
        }
        match tokio::time::timeout(left, f()).await {
            Err(_) => return Err(gave_up(url, what, limit, last)),
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if e.is_temporary() => {
                mf_log!(DEBUG, "etcd store {url}: {what}: {e}; trying again");
                last = Some(e);
                backoff.sleep(deadline).await;
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

fn gave_up(url: &str, what: &str, limit: Duration, last: Option<Error>) -> Error {
    Error::Timeout(match last {
        Some(e) => format!(
            "etcd store {url}: {what} did not complete within {limit:?}; last error: {e} \
             (are a majority of the etcd members up?)"
        ),
        None => format!("etcd store {url}: no answer to {what} within {limit:?}"),
    })
}

/// Jittered exponential backoff between attempts: 10 ms doubling to 250 ms.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(10))
    }

    async fn sleep(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = self.0 / 2 + self.0 / 2 * (jitter_permille() as u32) / 1000;
        tokio::time::sleep(d.min(left)).await;
        self.0 = (self.0 * 2).min(Duration::from_millis(250));
    }
}

fn jitter_permille() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() % 1000
}

/// Our error for an etcd client error: the ones that may pass (no leader, a member down, a
/// broken connection) are temporary ones, so that calls repeat them until their deadline.
fn to_error(url: &str, e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(st) => {
            let msg = format!("etcd store {url}: {}", st.message());
            match i32::from(st.code()) {
                // Cancelled, Unknown, DeadlineExceeded, Aborted, Internal, Unavailable.
                1 | 2 | 4 | 10 | 13 | 14 => Error::NotConnected(msg),
                5 => Error::NotExist(msg),
                7 | 16 => Error::Refused(msg),
                8 => Error::NoResources(msg),
                _ => Error::InvalidParam(msg),
            }
        }
        E::TransportError(t) => {
            use std::error::Error as _;
            let mut m = t.to_string();
            let mut src = t.source();
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            Error::NotConnected(format!("etcd store {url}: {m}"))
        }
        E::IoError(io) => Error::io(format!("etcd store {url}"), io),
        E::WatchError(m) | E::LeaseKeepAliveError(m) => {
            Error::NotConnected(format!("etcd store {url}: {m}"))
        }
        E::InvalidArgs(m) => Error::InvalidParam(format!("etcd store {url}: {m}")),
        other => Error::Failed(format!("etcd store {url}: {other}")),
    }
}

fn lease_gone(e: &Error) -> bool {
    matches!(e, Error::NotExist(m) if m.contains("lease not found"))
}

/// A key's value and mod_revision (if it exists) and a marker's value (if set).
type KeyAndMarker = (Option<(Vec<u8>, i64)>, Option<Vec<u8>>);

/// The key's value and mod_revision and the marker's value from a transaction whose answers
/// are a range of the key and one of the marker.
fn read_pair(resp: &TxnResponse) -> KeyAndMarker {
    let mut it = resp.op_responses().into_iter();
    let first = |r: Option<TxnOpResponse>| match r {
        Some(TxnOpResponse::Get(g)) => g
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    };
    let kv = first(it.next());
    let tag = first(it.next()).map(|(v, _)| v);
    (kv, tag)
}

/// The answer of the attempt the marker `tag` records, if it records one of call `seq`.
fn landed<R: Clone>(tag: &Option<Vec<u8>>, seq: u64, intended: &[R]) -> Option<R> {
    let tag = std::str::from_utf8(tag.as_deref()?).ok()?;
    let (s, a) = tag.split_once('.')?;
    if s.parse::<u64>().ok()? != seq {
        return None;
    }
    intended.get(a.parse::<usize>().ok()?).cloned()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn describe_keys(keys: &[String]) -> String {
    match keys {
        [] => "nothing".into(),
        [k] => format!("key {k:?}"),
        [k, rest @ ..] => format!("key {k:?} and {} more", rest.len()),
    }
}
