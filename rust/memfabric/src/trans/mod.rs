//! The Transfer Engine: point-to-point writes and reads between engines' registered memory.
//!
//! An engine is named by its session id `ip:port`: the ip is where peers reach it, the port is
//! its tcp data server. `initialize` publishes, under `mf/te/<session>` in the config store,
//! what peers need to pick a path (pid, host identity, data address, the fd of its
//! registration-generation page) and, under `.../regions`, its registered regions. Both keys
//! are ephemeral: they vanish when the engine's store connection closes, so a dead engine is
//! unknown at once, and one restarted under the same session id is found again.
//!
//! When `initialize` or `register` returns, peers can use what they published: no waiting.
//!
//! The path to each peer is chosen once, by [`crate::transport::select`] (overridable with
//! `MF_TRANSPORT=tcp|cma`), and reported by [`TransferEngine::transport_for`]. Same-host paths
//! copy without the peer's participation, so the initiator checks every descriptor against the
//! peer's published table, kept fresh by the generation page (see [`generation`]). The tcp
//! path checks on the initiator (early, precise errors, safe coalescing) and again in the
//! peer's data server, which alone decides what is touched.
//!
//! The data server serves only engines admitted by the same config store: `initialize` reads
//! (or, first, creates) the job secret in the store, and every tcp connection proves it both
//! ways (see [`crate::transport::auth`]); with the store's TLS on, connections also run mutual
//! TLS with the same certificates.

pub mod device_path;
pub mod generation;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::device::IpcHandle;
use crate::error::{Error, Result};
use crate::log::{INFO, WARN};
use crate::mem::regions::RegionTable;
use crate::mf_log;
use crate::store::{ClientOptions, StoreClient, StoreServer};
use crate::transport::auth::DataAuth;
use crate::transport::cma::{self, CmaTransport};
use crate::transport::local::LocalTransport;
use crate::transport::tcp::{TcpDataServer, TcpTransport};
use crate::transport::{select, CheckedOps, Kind, Op, PeerInfo, Transport};
use device_path::{IpcCache, PeerTable};
use generation::{GenerationPage, GenerationView};

/// Default deadline of one transfer call (sync, batch, or one async job).
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most descriptors in one batch registration (upstream's limit).
pub const MAX_BATCH_REGISTER: usize = 1 << 20;

/// The engine's role label. Any engine may reach any other; the role only names it and picks
/// which engine starts the config store (`store_server_role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            _ => Err(Error::InvalidParam(format!(
                "role {s:?} is neither \"Prefill\" nor \"Decode\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Prefill => "Prefill",
            Role::Decode => "Decode",
        }
    }
}

/// How an engine starts.
pub struct EngineConfig {
    pub store_url: String,
    /// `ip:port`, `[v6]:port`, `ip` or `ip:0` (the last two let the engine pick the port).
    pub session_id: String,
    pub role: Role,
    pub device_id: i32,
    /// Start a config store at `store_url` if this engine's role is this one (upstream's
    /// `store_server_role`); an address already served is used as is.
    pub store_server_role: Option<Role>,
    /// Deadline of each transfer call.
    pub transfer_timeout: Duration,
    /// Deadline of store calls (connect, publish, lookups).
    pub store_timeout: Duration,
    /// A listener reserved by `get_rpc_port` before initialize, adopted as the data server.
    pub reserved_listener: Option<std::net::TcpListener>,
}

/// Which side a transfer's bytes travel to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local buffer -> peer memory.
    Write,
    /// Peer memory -> local buffer.
    Read,
}

struct Peer {
    info: PeerInfo,
    kind: Kind,
    transport: Box<dyn Transport>,
    /// For same-host peers: their generation counter.
    generation: Option<GenerationView>,
    /// The peer's published regions and the generation they were read at.
    table: RwLock<(u64, Arc<PeerTable>)>,
}

/// A running Transfer Engine. Dropping it unpublishes it and stops its data server.
pub struct TransferEngine {
    session: String,
    role: Role,
    device_id: i32,
    store: Arc<StoreClient>,
    regions: Arc<RegionTable>,
    server: TcpDataServer,
    /// What tcp connections to peers prove, and what the data server demands.
    auth: Arc<DataAuth>,
    me: PeerInfo,
    generation: GenerationPage,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    /// Serializes changes of the region table with their publication, so the store never
    /// holds an older table than the last one published.
    publish: Mutex<()>,
    transfer_timeout: Duration,
    force: Option<String>,
    /// IPC handles of this engine's device regions, by region start (published with them).
    ipc: Mutex<HashMap<u64, IpcHandle>>,
    /// Regions unregistered while a same-host peer's copy into them outlived the wait: a
    /// second `unregister` of one waits again instead of reporting it unknown.
    draining: Mutex<HashSet<u64>>,
    /// Same-host peers' device memory mapped here.
    opened: IpcCache,
    /// A config store this engine started (store_server_role).
    _store_server: Option<StoreServer>,
}

fn info_key(session: &str) -> String {
    format!("mf/te/{session}")
}

fn regions_key(session: &str) -> String {
    format!("mf/te/{session}/regions")
}

/// Splits a session id into the address to listen on (port 0: pick one).
pub fn parse_session(s: &str) -> Result<SocketAddr> {
    let s = s.trim();
    let bad = |why: &str| {
        Error::InvalidParam(format!(
            "session id {s:?} is invalid: {why} (expected ip:port, [ipv6]:port or ip)"
        ))
    };
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 0));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let ip: IpAddr = inner.parse().map_err(|_| bad("not an IP address"))?;
        return Ok(SocketAddr::new(ip, 0));
    }
    crate::store::url::parse_host_port(s).map_err(|why| bad(&why))
}

fn format_session(addr: SocketAddr) -> String {
    addr.to_string()
}

fn encode_info(info: &PeerInfo, generation_fd: i32, role: Role) -> Vec<u8> {
    format!(
        "v1;pid={};host={};data={};genfd={};role={}",
        info.pid,
        info.host_id,
        info.data_addr,
        generation_fd,
        role.name()
    )
    .into_bytes()
}

fn decode_info(session: &str, raw: &[u8]) -> Result<(PeerInfo, i32)> {
    let bad =
        |why: String| Error::Protocol(format!("engine record of {session:?} is malformed: {why}"));
    let text = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8".into()))?;
    let mut fields = text.split(';');
    if fields.next() != Some("v1") {
        return Err(bad("unknown version".into()));
    }
    let (mut pid, mut host, mut data, mut genfd) = (None, None, None, None);
    for f in fields {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| bad(format!("field {f:?}")))?;
        match k {
            "pid" => pid = v.parse::<u32>().ok(),
            "host" => host = Some(v.to_string()),
            "data" => data = v.parse::<SocketAddr>().ok(),
            "genfd" => genfd = v.parse::<i32>().ok(),
            _ => {}
        }
    }
    match (pid, host, data, genfd) {
        (Some(pid), Some(host_id), Some(data_addr), Some(fd)) => Ok((
            PeerInfo {
                pid,
                host_id,
                data_addr,
            },
            fd,
        )),
        _ => Err(bad("missing fields".into())),
    }
}

impl TransferEngine {
    /// Starts the data server, connects to the store and publishes this engine.
    pub fn start(cfg: EngineConfig) -> Result<TransferEngine> {
        let bind = parse_session(&cfg.session_id)?;
        if bind.ip().is_unspecified() {
            return Err(Error::InvalidParam(format!(
                "session id {:?} must name the address peers reach this engine at, not a wildcard",
                cfg.session_id
            )));
        }
        let store_server = match cfg.store_server_role {
            Some(r) if r == cfg.role => StoreServer::start_if_free(&cfg.store_url)?,
            _ => None,
        };
        // One reading of the TLS setting for the store and the data plane, so both agree.
        let tls = crate::store::tls::current()?;
        let store = Arc::new(StoreClient::connect(
            &cfg.store_url,
            ClientOptions {
                timeout: cfg.store_timeout,
                tls: tls.as_ref().map(|m| m.client.clone()),
                force_plaintext: tls.is_none(),
            },
        )?);
        let auth = Arc::new(DataAuth::for_store(&store, tls.as_deref())?);
        let regions = Arc::new(RegionTable::new());
        let server = match cfg.reserved_listener {
            Some(l)
                if bind.port() == 0
                    || l.local_addr().map(|a| a.port()).ok() == Some(bind.port()) =>
            {
                TcpDataServer::adopt(l, regions.clone(), auth.clone())?
            }
            _ => TcpDataServer::start(bind, regions.clone(), auth.clone())?,
        };
        let data_addr = SocketAddr::new(bind.ip(), server.local_addr().port());
        let session = format_session(data_addr);
        let me = PeerInfo::this_process(data_addr);
        let generation = GenerationPage::create()?;
        if store.get(&info_key(&session))?.is_some() {
            return Err(Error::Duplicated(format!(
                "an engine with session id {session} is already registered in store {}",
                store.url()
            )));
        }
        store.set_ephemeral(
            &regions_key(&session),
            &crate::mem::regions::encode_list(&[]),
        )?;
        store.set_ephemeral(
            &info_key(&session),
            &encode_info(&me, generation.fd(), cfg.role),
        )?;
        // An engine that only serves makes no store calls; after a store restart its records
        // must still come back for peers to find it.
        crate::store::keep_alive(&store);
        let force = std::env::var("MF_TRANSPORT")
            .ok()
            .filter(|v| !v.trim().is_empty());
        mf_log!(
            INFO,
            "transfer engine {session} ({}) up; data server {}",
            cfg.role.name(),
            server.local_addr()
        );
        Ok(TransferEngine {
            session,
            role: cfg.role,
            device_id: cfg.device_id,
            store,
            regions,
            server,
            auth,
            me,
            generation,
            peers: Mutex::new(HashMap::new()),
            publish: Mutex::new(()),
            transfer_timeout: cfg.transfer_timeout,
            force,
            ipc: Mutex::new(HashMap::new()),
            draining: Mutex::new(HashSet::new()),
            opened: IpcCache::default(),
            _store_server: store_server,
        })
    }

    /// This engine's session id (`ip:port`, with the port actually listened on).
    pub fn session_id(&self) -> &str {
        &self.session
    }

    /// The port of the data server.
    pub fn rpc_port(&self) -> u16 {
        self.server.local_addr().port()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    pub fn transfer_timeout(&self) -> Duration {
        self.transfer_timeout
    }

    /// The config store client through which this engine publishes itself and finds peers.
    pub fn store(&self) -> &Arc<StoreClient> {
        &self.store
    }

    /// Moves this engine to the config store now at `store_url` (the store came back at
    /// another address): its records and region table are published there, and peers are
    /// looked up there from now on. Peers already known stay reachable meanwhile. On error
    /// nothing moved.
    pub fn update_store_url(&self, store_url: &str) -> Result<()> {
        self.store.retarget(store_url)
    }

    /// This engine's registered regions.
    pub fn regions(&self) -> &Arc<RegionTable> {
        &self.regions
    }

    fn lock_peers(&self) -> MutexGuard<'_, HashMap<String, Arc<Peer>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- registration -------------------------------------------------------------------

    /// Registers `[addr, addr+len)` for peers to read and write.
    pub fn register(&self, addr: u64, len: u64) -> Result<()> {
        self.register_batch(&[(addr, len)])
    }

    /// Registers several regions with one publication. All or nothing: on an error, the
    /// regions registered by this call are removed again.
    pub fn register_batch(&self, list: &[(u64, u64)]) -> Result<()> {
        if list.is_empty() {
            return Err(Error::InvalidParam("no regions given".into()));
        }
        if list.len() > MAX_BATCH_REGISTER {
            return Err(Error::InvalidParam(format!(
                "{} regions in one batch; at most {MAX_BATCH_REGISTER}",
                list.len()
            )));
        }
        let _g = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        for (i, &(addr, len)) in list.iter().enumerate() {
            if let Err(e) = self.register_one(addr, len) {
                for &(a, _) in &list[..i] {
                    self.unregister_one(a);
                }
                return Err(if list.len() > 1 { with_index(e, i) } else { e });
            }
        }
        if let Err(e) = self.publish_regions() {
            for &(a, _) in list {
                self.unregister_one(a);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Host memory is checked against the process's mappings; device memory (when an
    /// accelerator backend is loaded) against its allocation, and its IPC handle is kept for
    /// publishing.
    fn register_one(&self, addr: u64, len: u64) -> Result<()> {
        if crate::device::any_accelerator() {
            if let Some(found) = device_path::check_device_registration(addr, len) {
                let found = found?;
                self.regions.register_device(addr, len, found.ordinal)?;
                if let Some(h) = found.ipc {
                    self.lock_ipc().insert(addr, h);
                }
                return Ok(());
            }
        }
        self.regions.register(addr, len)
    }

    fn unregister_one(&self, addr: u64) {
        let _ = self.regions.unregister(addr);
        self.lock_ipc().remove(&addr);
    }

    fn lock_ipc(&self) -> MutexGuard<'_, HashMap<u64, IpcHandle>> {
        self.ipc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unregisters the region that starts at `addr`. When this returns `Ok`, peers see it gone
    /// and none of their copies reaches it any more. `Timeout` when a same-host peer's copy
    /// was still running at the transfer timeout: the region is unregistered, and calling this
    /// again waits for that copy once more.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        let _g = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let published = match self.regions.unregister(addr) {
            Ok(()) => {
                self.lock_ipc().remove(&addr);
                self.publish_regions()
            }
            Err(e) if !self.lock_draining().contains(&addr) => return Err(e),
            Err(_) => Ok(()),
        };
        // Retire even if publishing failed: same-host peers then refetch, and a failed refetch
        // fails their transfer instead of using the old table.
        match self
            .generation
            .retire(Instant::now() + self.transfer_timeout)
        {
            Ok(()) => {
                self.lock_draining().remove(&addr);
                published
            }
            Err(e) => {
                self.lock_draining().insert(addr);
                Err(e)
            }
        }
    }

    fn lock_draining(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.draining.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_regions(&self) -> Result<()> {
        let value = device_path::encode_published(&self.regions, &self.lock_ipc());
        self.store
            .set_ephemeral(&regions_key(&self.session), &value)
    }

    // ---- peers ----------------------------------------------------------------------------

    /// The path used to reach `dest` ("local", "cma" or "tcp").
    pub fn transport_for(&self, dest: &str) -> Result<&'static str> {
        Ok(self.peer(dest)?.transport.name())
    }

    fn peer(&self, dest: &str) -> Result<Arc<Peer>> {
        if let Some(p) = self.lock_peers().get(dest) {
            return Ok(p.clone());
        }
        let dest = dest.trim();
        if dest.is_empty() {
            return Err(Error::InvalidParam(
                "destination session id is empty".into(),
            ));
        }
        let raw = self.store.get(&info_key(dest))?.ok_or_else(|| {
            Error::InvalidParam(format!(
                "unknown peer session {dest:?}: no engine with this session id is registered in store {}",
                self.store.url()
            ))
        })?;
        let (info, genfd) = decode_info(dest, &raw)?;
        let table = Arc::new(self.fetch_table(dest)?);
        let peer = Arc::new(self.connect_peer(dest, info, genfd, table)?);
        self.lock_peers().insert(dest.to_string(), peer.clone());
        Ok(peer)
    }

    fn connect_peer(
        &self,
        dest: &str,
        info: PeerInfo,
        genfd: i32,
        table: Arc<PeerTable>,
    ) -> Result<Peer> {
        let tcp = |info: PeerInfo, table: Arc<PeerTable>| Peer {
            transport: Box::new(TcpTransport::new(info.data_addr, self.auth.clone())),
            info,
            kind: Kind::Tcp,
            generation: None,
            table: RwLock::new((0, table)),
        };
        let kind = select(&self.me, &info, self.force.as_deref());
        if kind == Kind::Tcp {
            return Ok(tcp(info, table));
        }
        let view = match GenerationView::open(info.pid, genfd) {
            Ok(v) => v,
            // Its record outlived it (the store drops it when the lease runs out): tcp would
            // only find the data server gone too.
            Err(Error::PeerGone(why)) => {
                return Err(Error::PeerGone(format!(
                    "peer {dest} (pid {}) has stopped: {why}",
                    info.pid
                )))
            }
            Err(e) => {
                mf_log!(WARN, "peer {dest} is on this host but its registration page cannot be mapped ({e}); using tcp");
                return Ok(tcp(info, table));
            }
        };
        let transport: Box<dyn Transport> = if kind == Kind::Local {
            Box::new(LocalTransport::new())
        } else {
            let host_region = table
                .regions
                .snapshot()
                .into_iter()
                .find(|&(a, _)| table.regions.device_at(a).is_none());
            if let Some((addr, _)) = host_region {
                if let Err(e) = cma::probe(info.pid, addr) {
                    if matches!(e, Error::PeerGone(_)) {
                        return Err(e);
                    }
                    mf_log!(
                        WARN,
                        "cma to peer {dest} (pid {}) does not work ({e}); using tcp",
                        info.pid
                    );
                    return Ok(tcp(info, table));
                }
            }
            Box::new(CmaTransport::new(info.pid)?)
        };
        let gen = view.get();
        // The table was read before the generation: if an unregister came in between, the
        // generation read now is newer than the table and the first transfer refetches.
        Ok(Peer {
            info,
            kind,
            transport,
            generation: Some(view),
            table: RwLock::new((gen.wrapping_sub(1), table)),
        })
    }

    fn fetch_table(&self, dest: &str) -> Result<PeerTable> {
        let raw = self
            .store
            .get(&regions_key(dest))?
            .ok_or_else(|| Error::PeerGone(format!("peer {dest} has left the store")))?;
        device_path::decode_published(&raw)
    }

    /// The peer's table, refetched first when it is older than generation `gen` (same-host
    /// peers: the generation a transfer pinned, or the current one).
    fn current_table(
        &self,
        dest: &str,
        peer: &Peer,
        gen: Option<u64>,
        force_refresh: bool,
    ) -> Result<Arc<PeerTable>> {
        {
            let t = peer.table.read().unwrap_or_else(|p| p.into_inner());
            if !force_refresh && gen.is_none_or(|g| g == t.0) {
                return Ok(t.1.clone());
            }
        }
        let fresh = Arc::new(self.fetch_table(dest)?);
        let old = {
            let mut t = peer.table.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *t, (gen.unwrap_or(0), fresh.clone())).1
        };
        if peer.kind == Kind::Cma {
            // Allocations the peer no longer lists are not kept mapped here.
            self.opened.forget_missing(&old, &fresh);
        }
        Ok(fresh)
    }

    /// Looks `dest` up and maps its same-host device regions now. A transfer queued on a
    /// device stream must do no device-synchronizing call when it runs (opening an IPC handle
    /// waits for every stream, the one holding the transfer included), so submitting onto a
    /// device stream prepares the peer first.
    pub fn prepare_peer(&self, dest: &str) -> Result<()> {
        let deadline = Instant::now() + self.transfer_timeout;
        crate::store::within(deadline, || {
            let peer = self.peer(dest)?;
            let gen = peer.generation.as_ref().map(|g| g.get());
            let table = self.current_table(dest, &peer, gen, false)?;
            if peer.kind == Kind::Cma {
                for (start, region) in &table.device {
                    self.opened.map(region, *start, *start)?;
                }
            }
            Ok(())
        })
    }

    /// Sessions of the peers this engine has looked up (for transfers or `prepare_peer`).
    pub fn known_peers(&self) -> Vec<String> {
        self.lock_peers().keys().cloned().collect()
    }

    /// Whether each of `sessions` is still published in `store`. An engine that stopped, or
    /// whose process died, is not: its record goes with its store session.
    pub fn published_in(store: &StoreClient, sessions: &[String]) -> Result<Vec<bool>> {
        let keys: Vec<String> = sessions.iter().map(|s| info_key(s)).collect();
        store.exists(&keys)
    }

    fn forget(&self, dest: &str) {
        self.lock_peers().remove(dest);
    }

    // ---- transfers ------------------------------------------------------------------------

    /// Moves `len` bytes between `local` (this process) and `remote` (in `dest`'s process).
    pub fn transfer(
        &self,
        dest: &str,
        dir: Direction,
        local: u64,
        remote: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidParam("length 0".into()));
        }
        self.transfer_batch(dest, dir, vec![Op::new(local, remote, len)])
    }

    /// Moves a batch; all descriptors or an error (naming the first failing descriptor).
    pub fn transfer_batch(&self, dest: &str, dir: Direction, ops: Vec<Op>) -> Result<()> {
        let deadline = Instant::now() + self.transfer_timeout;
        if ops.is_empty() {
            return Err(Error::InvalidParam("empty batch".into()));
        }
        if let Some(i) = ops.iter().position(|o| o.len == 0) {
            return Err(Error::InvalidParam(format!("descriptor {i} has length 0")));
        }
        // Looking the peer up is part of the call: it ends by the same deadline.
        crate::store::within(deadline, || self.transfer_until(dest, dir, ops, deadline))
    }

    fn transfer_until(
        &self,
        dest: &str,
        dir: Direction,
        ops: Vec<Op>,
        deadline: Instant,
    ) -> Result<()> {
        let mut stale: Option<Error> = None;
        // One retry after a stale peer (restarted under the same session id, or gone).
        for attempt in 0..2 {
            let peer = match (self.peer(dest), stale.take()) {
                (Ok(p), _) => p,
                // It failed under this call and has left the store since: it went away, which
                // is not the same as a session id nobody ever registered.
                (Err(Error::InvalidParam(_)), Some(first)) => {
                    return Err(Error::PeerGone(format!(
                        "peer {dest} went away during the transfer ({first}); it is no longer \
                         registered in store {}",
                        self.store.url()
                    )))
                }
                (Err(e), _) => return Err(e),
            };
            match self.transfer_on(dest, &peer, dir, ops.clone(), deadline) {
                Err(e) if attempt == 0 && is_stale_peer(&e) => {
                    mf_log!(INFO, "peer {dest} looks stale ({e}); looking it up again");
                    self.forget(dest);
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    stale = Some(e);
                }
                Err(e) => {
                    if is_stale_peer(&e) {
                        self.forget(dest);
                    }
                    return Err(e);
                }
                ok => return ok,
            }
        }
        Err(Error::PeerGone(format!("peer {dest} could not be reached")))
    }

    fn transfer_on(
        &self,
        dest: &str,
        peer: &Peer,
        dir: Direction,
        ops: Vec<Op>,
        deadline: Instant,
    ) -> Result<()> {
        // Same-host peers: counted in with the peer until the copies below have returned, so
        // its unregister waits for them (see `generation`).
        let pin = match &peer.generation {
            Some(view) => Some(view.pin(deadline)?),
            None => None,
        };
        let gen = pin.as_ref().map(|p| p.generation());
        let table = self.current_table(dest, peer, gen, false)?;
        let (checked, table) =
            match CheckedOps::new(ops.clone(), &self.regions, Some(&table.regions)) {
                Ok(c) => (c, table),
                Err(first) => {
                    // The cached table may predate a registration: refetch once before refusing.
                    let fresh = self.current_table(dest, peer, gen, true)?;
                    let c = CheckedOps::new(ops, &self.regions, Some(&fresh.regions))
                        .map_err(|_| first)?;
                    (c, fresh)
                }
            };
        let run = |checked: &CheckedOps| match dir {
            Direction::Write => peer.transport.write(checked, deadline),
            Direction::Read => peer.transport.read(checked, deadline),
        };
        let moved = if self.regions.has_device() || table.regions.has_device() {
            let (host, device) = device_path::split(&checked, &self.regions, &table)?;
            // SAFETY: a subset of descriptors checked above, unchanged.
            let host = unsafe { CheckedOps::assume_checked(host, true) };
            (if host.ops().is_empty() {
                Ok(())
            } else {
                run(&host)
            })
            .and_then(|_| {
                device_path::transfer(
                    peer.kind,
                    peer.transport.as_ref(),
                    &table,
                    &self.opened,
                    dir == Direction::Write,
                    device,
                    deadline,
                )
            })
        } else {
            run(&checked)
        };
        drop(pin);
        moved.map_err(|e| match e {
            Error::Timeout(m) => Error::Timeout(format!(
                "transfer to {dest} ({}, pid {}): {m}",
                peer.kind.name(),
                peer.info.pid
            )),
            e => e,
        })
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        // Best effort: the keys are ephemeral and vanish with the connection anyway, so a store
        // that is gone or hung must not hold up the teardown for the store timeout.
        let limit = Duration::from_secs(2);
        if self
            .store
            .delete_within(&info_key(&self.session), limit)
            .is_ok()
        {
            let _ = self.store.delete_within(&regions_key(&self.session), limit);
        }
        // Same-host peers' copies in flight end before the owner may free its memory; later
        // ones see the generation move, look the engine up and find it gone.
        if let Err(e) = self.generation.retire(Instant::now() + limit) {
            mf_log!(WARN, "transfer engine {} stopping: {e}", self.session);
        }
        mf_log!(INFO, "transfer engine {} stopped", self.session);
    }
}

fn is_stale_peer(e: &Error) -> bool {
    matches!(
        e,
        Error::PeerGone(_) | Error::NotConnected(_) | Error::Io { .. }
    )
}

fn with_index(e: Error, i: usize) -> Error {
    match e {
        Error::InvalidParam(m) => Error::InvalidParam(format!("region {i}: {m}")),
        Error::Duplicated(m) => Error::Duplicated(format!("region {i}: {m}")),
        other => other,
    }
}

/// Reserves a free port in [15000, 25000] before initialize (what SGLang does with
/// `get_rpc_port()`); the listener is adopted by the engine's data server.
pub fn reserve_rpc_port() -> Result<std::net::TcpListener> {
    let start = 15000 + (std::process::id() % 10000) as u16;
    for i in 0..10000u16 {
        let port = 15000 + (start - 15000 + i) % 10000;
        if let Ok(l) = std::net::TcpListener::bind(("0.0.0.0", port)) {
            return Ok(l);
        }
    }
    Err(Error::NoResources("no free port in [15000, 25000]".into()))
}
