//! Symmetric memory: the one mechanism under Share Memory and Big Memory.
//!
//! Every rank of an object contributes a memfd segment of the same size. The ranks agree on a
//! global virtual address range (see [`crate::mem::gva`]) and each maps its own segment, and
//! the segments of its same-host peers, into their parts of it: a GVA there is an ordinary
//! pointer in every process. Parts of ranks on other hosts stay unmapped; `copy` reaches them
//! through a Transfer Engine whose registered region is the rank's own part, at the same
//! address in every process, so a GVA is also the address to give the peer's data server.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::mem::gva::{self, Gva, Segment};
use crate::store::{ClientOptions, Group, StoreClient, StoreServer};
use crate::trans::{Direction, EngineConfig, Role, TransferEngine};
use crate::transport::{host_id, Op};

/// How a rank's part can be reached from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// This rank's own part.
    Own,
    /// Mapped here (same host): plain loads and stores.
    Mapped,
    /// Another host: copies go over the network path to this engine session.
    Remote(String),
}

/// Data operation bits reported by `query_support_data_operation` / `topology_can_reach`.
pub mod ops {
    /// Direct load/store through the GVA (the role MTE plays on Ascend).
    pub const LOAD_STORE: u32 = 1;
    /// Same-host copy engine (the role SDMA plays): memcpy between mapped parts.
    pub const SAME_HOST_COPY: u32 = 2;
    /// Network copy (the role RDMA plays): tcp to the peer's data server.
    pub const NETWORK: u32 = 4;
}

/// What a rank contributes to object `name`.
#[derive(Clone, Debug)]
pub struct ObjectSpec {
    /// Group name of the object in the store (unique per object).
    pub name: String,
    pub world: u32,
    pub rank: u32,
    /// Bytes this rank contributes (the same on every rank).
    pub local_size: u64,
    /// Members come and go (`world` is the most there may be): no collective creation; peers
    /// are found when first used and watched for arrivals and departures.
    pub dynamic: bool,
}

/// One object's symmetric memory in this process.
pub struct SymmetricMemory {
    group: Group,
    gva: Gva,
    /// Per rank: how it is reached (None: not resolved yet) and whether it is a member now.
    peers: Arc<RwLock<Vec<PeerSlot>>>,
    /// Present for objects whose members come and go.
    dynamic: Option<Dynamic>,
    local_size: u64,
    /// Present when some rank is on another host.
    engine: Option<TransferEngine>,
    /// Caller memory registered with the object: same-host copies from or to it skip the
    /// kernel-checked path and run as (parallel) memcpy, since registration proved it mapped.
    registered: crate::mem::RegionTable,
    timeout: Duration,
    // Mapped segments must outlive nothing: the mappings keep the memfds alive. The own
    // segment is kept so its fd stays open for peers that have not opened it yet.
    _own: Segment,
}

impl SymmetricMemory {
    /// Joins object `name` as `rank` of `world`, contributes `local_size` bytes and maps what
    /// can be mapped. Returns when every rank has done the same.
    ///
    /// `advertise_ip` is the address remote ranks reach this one at (its data server).
    pub fn create(
        client: Arc<StoreClient>,
        store_url: &str,
        spec: &ObjectSpec,
        advertise_ip: std::net::IpAddr,
        timeout: Duration,
    ) -> Result<SymmetricMemory> {
        let ObjectSpec {
            name,
            world,
            rank,
            local_size,
            ..
        } = spec;
        let (name, world, rank, local_size) = (name.as_str(), *world, *rank, *local_size);
        if local_size == 0 {
            return Err(Error::InvalidParam("local memory size 0".into()));
        }
        if spec.dynamic {
            return Self::create_dynamic(client, store_url, spec, advertise_ip, timeout);
        }
        let deadline = Instant::now() + timeout;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let group = Group::join(client, name, world, Some(rank), left())?;
        let own = Segment::create(local_size, name)?;
        let gva = gva::negotiate(&group, local_size, left())?;
        gva.map_part(rank, &own)?;

        // Who is where: pid, segment fd, host identity.
        let me = format!("{};{};{}", std::process::id(), own.fd(), host_id());
        let infos = group.all_gather(me.as_bytes(), left())?;
        // MF_TRANSPORT=tcp: treat every other rank as remote (tests of the network path on
        // one machine, e.g. across network namespaces).
        let force_network = force_network();
        let mut reach = Vec::with_capacity(world as usize);
        let mut remote_needed = false;
        for (r, raw) in infos.iter().enumerate() {
            let r = r as u32;
            if r == rank {
                reach.push(Reach::Own);
                continue;
            }
            let text = String::from_utf8_lossy(raw);
            let mut f = text.splitn(3, ';');
            let (pid, fd, host) = match (f.next(), f.next(), f.next()) {
                (Some(p), Some(d), Some(h)) => {
                    (p.parse::<u32>().ok(), d.parse::<i32>().ok(), h.to_string())
                }
                _ => (None, None, String::new()),
            };
            let (Some(pid), Some(fd)) = (pid, fd) else {
                return Err(Error::Protocol(format!(
                    "rank {r}'s segment record {text:?} is malformed"
                )));
            };
            if !host.is_empty() && host == host_id() && !force_network {
                let seg = Segment::open_peer(pid, fd, local_size)?;
                gva.map_part(r, &seg)?;
                reach.push(Reach::Mapped);
            } else {
                remote_needed = true;
                reach.push(Reach::Remote(String::new()));
            }
        }

        // Remote ranks: every rank that has one runs an engine serving its own part; sessions
        // are exchanged by all ranks (an all_gather needs everybody) even when all are local.
        let any_remote = group
            .all_gather(&[remote_needed as u8], left())?
            .iter()
            .any(|v| v.first() == Some(&1));
        let engine = if any_remote {
            let e = serve_part(
                store_url,
                advertise_ip,
                &gva,
                rank,
                local_size,
                timeout,
                left(),
            )?;
            let sessions = group.all_gather(e.session_id().as_bytes(), left())?;
            for (r, s) in sessions.into_iter().enumerate() {
                if let Reach::Remote(slot) = &mut reach[r] {
                    *slot = String::from_utf8_lossy(&s).into_owned();
                }
            }
            Some(e)
        } else {
            None
        };
        // Everyone has mapped (and registered) before anyone uses the memory.
        group.barrier(left())?;
        let peers = reach
            .into_iter()
            .map(|r| PeerSlot {
                reach: Some(r),
                live: true,
            })
            .collect();
        Ok(SymmetricMemory {
            group,
            gva,
            peers: Arc::new(RwLock::new(peers)),
            dynamic: None,
            local_size,
            engine,
            timeout,
            registered: crate::mem::RegionTable::new(),
            _own: own,
        })
    }

    pub fn rank(&self) -> u32 {
        self.group.rank()
    }
    pub fn world(&self) -> u32 {
        self.group.world()
    }
    pub fn group(&self) -> &Group {
        &self.group
    }
    pub fn base(&self) -> u64 {
        self.gva.base()
    }
    pub fn stride(&self) -> u64 {
        self.gva.stride()
    }
    pub fn local_size(&self) -> u64 {
        self.local_size
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The engine serving this rank's part to other hosts (present when some rank is remote).
    pub fn engine(&self) -> Option<&TransferEngine> {
        self.engine.as_ref()
    }

    /// The GVA of rank `r`'s part.
    pub fn part(&self, r: u32) -> Result<u64> {
        if r >= self.world() {
            return Err(Error::InvalidParam(format!(
                "rank {r} is outside [0, {})",
                self.world()
            )));
        }
        Ok(self.gva.part(r))
    }

    /// How rank `r` is reached; for a dynamic object, looks the rank up (and maps its part)
    /// the first time. `PeerGone` for a rank that is not a member now.
    pub fn reach(&self, r: u32) -> Result<Reach> {
        {
            let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
            let slot = peers.get(r as usize).ok_or_else(|| {
                Error::InvalidParam(format!("rank {r} is outside [0, {})", self.world()))
            })?;
            if let (true, Some(reach)) = (slot.live, &slot.reach) {
                return Ok(reach.clone());
            }
            if self.dynamic.is_none() {
                return Err(Error::PeerGone(format!("rank {r} is not reachable")));
            }
        }
        self.resolve(r)
    }

    /// Reads rank `r`'s member record and maps (same host) or records (remote) its part.
    fn resolve(&self, r: u32) -> Result<Reach> {
        let d = self
            .dynamic
            .as_ref()
            .ok_or_else(|| Error::PeerGone(format!("rank {r} is not reachable")))?;
        let gone = || {
            Error::PeerGone(format!(
                "rank {r} is not a member of {:?} now (not joined yet, or left)",
                d.prefix
            ))
        };
        let Some(raw) = d.client.get(&format!("{}member/{r}", d.prefix))? else {
            self.set_slot(r, None, false);
            return Err(gone());
        };
        let text = String::from_utf8_lossy(&raw).into_owned();
        let f: Vec<&str> = text.splitn(4, ';').collect();
        let (pid, fd) = match (
            f.first().and_then(|p| p.parse::<u32>().ok()),
            f.get(1).and_then(|d| d.parse::<i32>().ok()),
        ) {
            (Some(p), Some(d)) if f.len() == 4 => (p, d),
            _ => {
                return Err(Error::Protocol(format!(
                    "member record of rank {r} is malformed: {text:?}"
                )))
            }
        };
        let reach = if f[2] == host_id() && !force_network() {
            let seg = Segment::open_peer(pid, fd, self.local_size)?;
            self.gva.map_part(r, &seg)?;
            Reach::Mapped
        } else {
            Reach::Remote(f[3].to_string())
        };
        self.set_slot(r, Some(reach.clone()), true);
        Ok(reach)
    }

    fn set_slot(&self, r: u32, reach: Option<Reach>, live: bool) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = peers.get_mut(r as usize) {
            *slot = PeerSlot { reach, live };
        }
    }

    /// Ranks that are members now (dynamic objects: as last seen by the watcher).
    pub fn members(&self) -> Vec<u32> {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        (0..peers.len() as u32)
            .filter(|&r| peers[r as usize].live)
            .collect()
    }

    /// Calls `handler(rank, joined)` when a rank joins or leaves (dynamic objects).
    pub fn set_event_handler(&self, handler: Option<GroupEventHandler>) -> Result<()> {
        let d = self.dynamic.as_ref().ok_or_else(|| {
            Error::Unsupported("group events need an object created with dynamic_world_size".into())
        })?;
        *d.handler.lock().unwrap_or_else(|p| p.into_inner()) = handler;
        Ok(())
    }

    pub fn is_dynamic(&self) -> bool {
        self.dynamic.is_some()
    }

    /// Bits of [`ops`] that reach rank `r` from here.
    pub fn can_reach(&self, r: u32) -> Result<u32> {
        Ok(match self.reach(r)? {
            Reach::Own | Reach::Mapped => ops::LOAD_STORE | ops::SAME_HOST_COPY,
            Reach::Remote(_) => ops::NETWORK,
        })
    }

    /// Bits of [`ops`] this object can use at all.
    pub fn supported_ops(&self) -> u32 {
        let mut bits = ops::LOAD_STORE | ops::SAME_HOST_COPY;
        if self.engine.is_some() {
            bits |= ops::NETWORK;
        }
        bits
    }

    /// The rank whose part holds `[gva, gva+len)`, refusing ranges that leave the part's
    /// contributed bytes or cross into another rank's part.
    pub fn locate(&self, gva: u64, len: u64) -> Result<u32> {
        let r = self.gva.rank_of(gva).ok_or_else(|| {
            Error::OutOfBounds(format!(
                "{gva:#x} is outside the global address space [{:#x}, +{:#x})",
                self.base(),
                self.gva.len()
            ))
        })?;
        let start = gva - self.gva.part(r);
        if len == 0
            || start
                .checked_add(len)
                .is_none_or(|end| end > self.local_size)
        {
            return Err(Error::OutOfBounds(format!(
                "[{gva:#x}, +{len}) leaves rank {r}'s {} bytes (or crosses into the next rank)",
                self.local_size
            )));
        }
        Ok(r)
    }

    /// Copies `len` bytes between a GVA and memory of this process (`local`), or between two
    /// GVAs. `to_gva`: local -> gva. Mapped parts use memcpy; remote parts the network path.
    pub fn copy_with_gva(&self, gva: u64, local: u64, len: u64, to_gva: bool) -> Result<()> {
        let r = self.locate(gva, len)?;
        match self.reach(r)? {
            Reach::Own | Reach::Mapped => {
                let (src, dst) = if to_gva { (local, gva) } else { (gva, local) };
                self.copy_mapped(src, dst, len, local)
            }
            Reach::Remote(session) => {
                let engine = self
                    .engine
                    .as_ref()
                    .ok_or_else(|| Error::NotInit("no network engine".into()))?;
                let dir = if to_gva {
                    Direction::Write
                } else {
                    Direction::Read
                };
                engine.transfer_batch(&session, dir, vec![Op::new(local, gva, len)])
            }
        }
    }

    /// Registers caller memory that network copies may use as their local side.
    pub fn register_local(&self, addr: u64, len: u64) -> Result<()> {
        match crate::trans::device_path::check_device_registration(addr, len) {
            Some(found) => self.registered.register_device(addr, len, found?.ordinal)?,
            None => self.registered.register(addr, len)?,
        }
        if let Some(e) = &self.engine {
            if let Err(err) = e.register(addr, len) {
                let _ = self.registered.unregister(addr);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Whether `[addr, addr+len)` lies in memory registered with [`Self::register_local`].
    pub fn is_registered(&self, addr: u64, len: u64) -> bool {
        self.registered.check(addr, len).is_ok()
    }

    /// Undoes [`register_local`](Self::register_local). A region whose unregister timed out
    /// waiting for a same-host peer's copy (see `TransferEngine::unregister`) is no longer
    /// registered here, but a second call still waits for that copy.
    pub fn unregister_local(&self, addr: u64) -> Result<()> {
        let here = self.registered.unregister(addr);
        let Some(engine) = &self.engine else {
            return here;
        };
        match (here, engine.unregister(addr)) {
            (Ok(()), there) => there,
            (Err(_), Ok(())) => Ok(()),
            (Err(here), Err(Error::NotExist(_))) => Err(here),
            (Err(_), Err(there)) => Err(there),
        }
    }

    /// Copies between a mapped part and this process: memcpy when the local side is
    /// registered, else through the kernel so that a bad address is an error, not a crash.
    fn copy_mapped(&self, src: u64, dst: u64, len: u64, local: u64) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        if self.registered.check(local, len).is_ok() {
            use crate::transport::{local::LocalTransport, CheckedOps, Transport};
            // SAFETY: the GVA side lies in a part mapped in this process (checked by locate);
            // the local side lies in a registered region, which registration found mapped
            // read-write and which the caller keeps mapped until it unregisters.
            let ops = unsafe { CheckedOps::assume_checked(vec![Op::new(src, dst, len)], true) };
            return LocalTransport::new().write(&ops, deadline);
        }
        copy_in_process(src, dst, len, deadline)
    }
}

/// Copies within this process through the kernel (CMA to our own pid) rather than memcpy: the
/// caller's address is an unchecked int, and the kernel answers EFAULT for a bad one where a
/// memcpy would crash the process.
pub fn copy_in_process(src: u64, dst: u64, len: u64, deadline: Instant) -> Result<()> {
    use crate::transport::{cma::CmaTransport, CheckedOps, Transport};
    if src == 0 || dst == 0 {
        return Err(Error::InvalidParam("null address".into()));
    }
    let me = CmaTransport::new(std::process::id())?;
    // SAFETY: no byte is touched by us: the kernel validates both ranges and fails with
    // EFAULT (reported as OutOfBounds) when either is not mapped with the needed access.
    let ops = unsafe { CheckedOps::assume_checked(vec![Op::new(src, dst, len)], true) };
    me.write(&ops, deadline)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the BM and SHM runtimes share: this process's store connection, the store it may
/// host, its membership in the product's process group, and the object ids in use.
pub struct Runtime {
    store: Arc<StoreClient>,
    /// The store's URL now (objects' engines connect to it); see [`Runtime::move_store`].
    store_url: Mutex<String>,
    /// The store clients of the objects' engines, moved with the runtime's own.
    engine_stores: Mutex<Vec<Weak<StoreClient>>>,
    group: Option<Group>,
    /// Object id -> (alive now, how many times this process created it).
    ids: Mutex<HashMap<u32, (bool, u32)>>,
    server: Option<StoreServer>,
    /// How long a store-hosting process waits at exit for the other members to leave.
    linger: Duration,
    object_prefix: &'static str,
    /// Members come and go: no rendezvous at start, objects created without a collective.
    dynamic: bool,
}

/// How a product runtime joins.
pub struct RuntimeSpec<'a> {
    pub store_url: &'a str,
    /// Host the store here (when its address is free on this host).
    pub host_store: bool,
    /// Process group (name, world, rank or None for auto-ranking); None: store only.
    pub group: Option<(&'a str, u32, Option<u32>)>,
    pub timeout: Duration,
    pub linger: Duration,
    /// Objects are named `<object_prefix><id>` in the store.
    pub object_prefix: &'static str,
    /// Members come and go (`group`'s world is the most there may be).
    pub dynamic: bool,
}

impl Runtime {
    pub fn start(spec: RuntimeSpec<'_>) -> Result<Runtime> {
        let server = if spec.host_store {
            StoreServer::start_if_free(spec.store_url)?
        } else {
            None
        };
        let store = Arc::new(StoreClient::connect(
            spec.store_url,
            ClientOptions {
                timeout: spec.timeout,
                ..Default::default()
            },
        )?);
        let group = match spec.group {
            Some((name, world, rank)) if spec.dynamic => {
                Some(Group::join_member(store.clone(), name, world, rank)?)
            }
            Some((name, world, rank)) => {
                Some(Group::join(store.clone(), name, world, rank, spec.timeout)?)
            }
            None => None,
        };
        Ok(Runtime {
            store,
            store_url: Mutex::new(spec.store_url.to_string()),
            engine_stores: Mutex::new(Vec::new()),
            group,
            ids: Mutex::new(HashMap::new()),
            server,
            linger: spec.linger,
            object_prefix: spec.object_prefix,
            dynamic: spec.dynamic,
        })
    }

    pub fn store(&self) -> &Arc<StoreClient> {
        &self.store
    }

    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    pub fn hosts_store(&self) -> bool {
        self.server.is_some()
    }

    fn ids(&self) -> MutexGuard<'_, HashMap<u32, (bool, u32)>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates object `id` (unique in this process while it lives; release it with
    /// [`release`](Self::release)).
    pub fn create_object(
        &self,
        id: u32,
        world: u32,
        rank: u32,
        local_size: u64,
        timeout: Duration,
    ) -> Result<SymmetricMemory> {
        // Each creation of an id gets a store namespace of its own ("<prefix><id>.<n>"), so an
        // object destroyed and created again never meets the keys of its predecessor. Ranks
        // create objects collectively, so they agree on n.
        let generation = {
            let mut ids = self.ids();
            let slot = ids.entry(id).or_insert((false, 0));
            if slot.0 {
                return Err(Error::Duplicated(format!(
                    "object {id} already exists in this process"
                )));
            }
            *slot = (true, slot.1 + 1);
            slot.1
        };
        let ip = self
            .store
            .local_ip()
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let spec = ObjectSpec {
            name: format!("{}{id}.{generation}", self.object_prefix),
            world,
            rank,
            local_size,
            dynamic: self.dynamic,
        };
        let store_url = lock(&self.store_url).clone();
        let object = SymmetricMemory::create(self.store.clone(), &store_url, &spec, ip, timeout)
            .inspect_err(|_| self.release(id))?;
        if let Some(e) = object.engine() {
            {
                let mut stores = lock(&self.engine_stores);
                stores.retain(|w| w.strong_count() > 0);
                stores.push(Arc::downgrade(e.store()));
            }
            // The store moved while the object was being created: its engine follows.
            let now = lock(&self.store_url).clone();
            if now != store_url {
                e.store().retarget(&now).inspect_err(|_| self.release(id))?;
            }
        }
        Ok(object)
    }

    /// Moves this process to the config store at `url` (the store was restarted at another
    /// address): the runtime's client and those of its objects' engines connect there and
    /// publish their ephemeral records again, and objects created later use it. When the
    /// runtime's own client cannot move, nothing moved. When it moved but an engine's client
    /// could not (the store stopped answering meanwhile), the others still move and the error
    /// says so: calling again with the same URL finishes the move.
    pub fn move_store(&self, url: &str) -> Result<()> {
        // No lock is held across the network: creating an object meanwhile is not held up
        // (create_object moves an engine it made while the URL changed).
        self.store.retarget(url)?;
        let store_url = self.store.url();
        *lock(&self.store_url) = store_url.clone();
        let engines: Vec<Arc<StoreClient>> = {
            let mut stores = lock(&self.engine_stores);
            stores.retain(|w| w.strong_count() > 0);
            stores.iter().filter_map(Weak::upgrade).collect()
        };
        let total = engines.len();
        let mut failed = Vec::new();
        for client in engines {
            if client.url() != store_url {
                if let Err(e) = client.retarget(url) {
                    failed.push(e);
                }
            }
        }
        match failed.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(Error::NotConnected(format!(
                "this rank moved to store {store_url}, but not every one of its {total} object \
                 engine(s) did (call again to finish): {first}"
            ))),
        }
    }

    /// Marks object `id` destroyed in this process.
    pub fn release(&self, id: u32) {
        if let Some(slot) = self.ids().get_mut(&id) {
            slot.0 = false;
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(g) = &self.group {
            if self.server.is_some() {
                // The store lives in this process: keep it until the other members have left.
                g.wait_others_left(self.linger);
            }
            let _ = g.leave();
        }
    }
}

/// `handler(rank, joined)`: a member appeared (true) or left (false).
pub type GroupEventHandler = Arc<dyn Fn(u32, bool) + Send + Sync>;

#[derive(Clone, Default)]
struct PeerSlot {
    reach: Option<Reach>,
    live: bool,
}

/// MF_TRANSPORT=tcp: treat every other rank as remote (tests of the network path on one
/// machine, e.g. across network namespaces).
fn force_network() -> bool {
    std::env::var("MF_TRANSPORT").is_ok_and(|v| v.trim().eq_ignore_ascii_case("tcp"))
}

/// Membership watching of a dynamic object: a thread lists the member records every
/// [`WATCH_PERIOD`], so arrivals and departures are seen within it, and reports them.
struct Dynamic {
    client: Arc<StoreClient>,
    prefix: String,
    rank: u32,
    handler: Arc<Mutex<Option<GroupEventHandler>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WATCH_PERIOD: Duration = Duration::from_millis(100);

impl Drop for Dynamic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Dropped from its own event handler (which destroyed the object): the thread
            // ends by itself once the handler returns; joining itself would fail.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        let _ = self.client.delete_within(
            &format!("{}member/{}", self.prefix, self.rank),
            Duration::from_secs(2),
        );
    }
}

impl SymmetricMemory {
    fn create_dynamic(
        client: Arc<StoreClient>,
        store_url: &str,
        spec: &ObjectSpec,
        advertise_ip: std::net::IpAddr,
        timeout: Duration,
    ) -> Result<SymmetricMemory> {
        let (world, rank, local_size) = (spec.world, spec.rank, spec.local_size);
        let group = Group::join_member(client.clone(), &spec.name, world, Some(rank))?;
        let prefix = group.prefix().to_string();
        let own = Segment::create(local_size, &spec.name)?;
        let gva = gva::claim(&client, &format!("{prefix}gva"), local_size, world)?;
        gva.map_part(rank, &own)?;
        // Members may arrive from other hosts at any time: always serve our part.
        let engine = serve_part(
            store_url,
            advertise_ip,
            &gva,
            rank,
            local_size,
            timeout,
            timeout,
        )?;
        let record = format!(
            "{};{};{};{}",
            std::process::id(),
            own.fd(),
            host_id(),
            engine.session_id()
        );
        client.set_ephemeral(&format!("{prefix}member/{rank}"), record.as_bytes())?;

        let mut slots = vec![PeerSlot::default(); world as usize];
        slots[rank as usize] = PeerSlot {
            reach: Some(Reach::Own),
            live: true,
        };
        let peers = Arc::new(RwLock::new(slots));
        let handler: Arc<Mutex<Option<GroupEventHandler>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (client, peers, handler, stop, prefix) = (
                client.clone(),
                peers.clone(),
                handler.clone(),
                stop.clone(),
                prefix.clone(),
            );
            std::thread::Builder::new()
                .name("mf-members".into())
                .spawn(move || watch_members(&client, &prefix, rank, &peers, &handler, &stop))
                .map_err(|e| {
                    Error::NoResources(format!("cannot start the membership watcher: {e}"))
                })?
        };
        Ok(SymmetricMemory {
            group,
            gva,
            peers,
            dynamic: Some(Dynamic {
                client,
                prefix,
                rank,
                handler,
                stop,
                thread: Some(thread),
            }),
            local_size,
            engine: Some(engine),
            timeout,
            registered: crate::mem::RegionTable::new(),
            _own: own,
        })
    }
}

fn watch_members(
    client: &StoreClient,
    prefix: &str,
    me: u32,
    peers: &RwLock<Vec<PeerSlot>>,
    handler: &Mutex<Option<GroupEventHandler>>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let members = format!("{prefix}member/");
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        if let Ok(keys) = client.list(&members) {
            let now: HashSet<u32> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&members)?.parse().ok())
                .collect();
            let mut events = Vec::new();
            {
                let mut slots = peers.write().unwrap_or_else(|p| p.into_inner());
                for (r, slot) in slots.iter_mut().enumerate() {
                    let r = r as u32;
                    let present = now.contains(&r);
                    if r == me || present == slot.live {
                        continue;
                    }
                    slot.live = present;
                    if !present {
                        // Forget how it was reached: a rank that comes back is looked up anew.
                        // Its old part stays mapped (no copy in flight can fault).
                        slot.reach = None;
                    }
                    events.push((r, present));
                }
            }
            let h = handler.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(h) = h {
                for (r, joined) in events {
                    h(r, joined);
                }
            }
        }
        std::thread::sleep(WATCH_PERIOD);
    }
}

/// Starts the engine through which ranks on other hosts reach this rank's part: its one
/// registered region is the part itself, at the same address in every process.
fn serve_part(
    store_url: &str,
    advertise_ip: std::net::IpAddr,
    gva: &Gva,
    rank: u32,
    local_size: u64,
    transfer_timeout: Duration,
    store_timeout: Duration,
) -> Result<TransferEngine> {
    let engine = TransferEngine::start(EngineConfig {
        store_url: store_url.to_string(),
        session_id: advertise_ip.to_string(),
        role: Role::Decode,
        device_id: 0,
        store_server_role: None,
        transfer_timeout,
        store_timeout,
        reserved_listener: None,
    })?;
    engine.register(gva.part(rank), local_size)?;
    Ok(engine)
}
