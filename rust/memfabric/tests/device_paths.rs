//! The Transfer Engine's device paths, run on the host backend (`MF_DEVICE_BACKEND=host`) so
//! that they run on every machine: device buffers on both sides, over each path (local, cma
//! between two processes through IPC handles, tcp through the staging buffers and the data
//! server's device copies), every direction, mixed batches, several staging chunks and a
//! ragged tail, verified byte for byte on the side that received them; then the refusals.
//!
//! `MF_DEVICE_PATHS_TIMING=1 cargo test --release -p memfabric --test device_paths` prints
//! rough figures of each kind of side over cma and tcp instead. `MF_TEST_DEVICE_BACKEND=cuda`
//! runs all of it on a GPU (`scripts/gpu_check.sh run` does).
//!
//! Its own harness (`harness = false`): the backend is chosen once per process, from the
//! environment, so each role runs in a process started with the environment it needs.
//! `MF_TEST_DEVICE_ROLE` picks the role of a child: `target` (serves its buffers, reports
//! their checksums when its stdin closes) or `initiator` (moves bytes to and from a target).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use memfabric::device::{self, Device};
use memfabric::store::StoreServer;
use memfabric::trans::{Direction, EngineConfig, Role, TransferEngine};
use memfabric::transport::Op;
use memfabric::Error;

mod common;
use common::{checksum, pattern};

const MIB: usize = 1 << 20;
/// Three staging chunks, the last a ragged one.
const N: usize = 2 * device::staging::STAGE_BYTES + 4097;
const ROLE: &str = "MF_TEST_DEVICE_ROLE";
const STORE: &str = "MF_TEST_DEVICE_STORE";
const PEER: &str = "MF_TEST_DEVICE_PEER";

fn engine(store: &str, role: Role) -> TransferEngine {
    TransferEngine::start(EngineConfig {
        store_url: store.to_string(),
        session_id: "127.0.0.1:0".into(),
        role,
        device_id: 0,
        store_server_role: None,
        transfer_timeout: Duration::from_secs(60),
        store_timeout: Duration::from_secs(30),
        reserved_listener: None,
    })
    .expect("engine starts")
}

/// `n` bytes of device memory of the chosen backend, freed on drop. They start `LEAD` bytes
/// into their allocation, so that a region's offset inside its allocation is taken into
/// account wherever it matters (IPC handles).
struct DevBuf {
    dev: std::sync::Arc<dyn Device>,
    addr: u64,
    n: usize,
}

const LEAD: usize = 12288;

impl DevBuf {
    fn new(n: usize, fill: &[u8]) -> DevBuf {
        let dev = device::select().expect("a device backend");
        let addr = dev.alloc(0, LEAD + n).expect("device alloc") + LEAD as u64;
        assert_eq!(fill.len(), n);
        // SAFETY: `addr` holds `n` bytes of this backend's memory; `fill` is `n` host bytes.
        unsafe {
            dev.copy(
                device::Direction::HostToDevice,
                addr,
                fill.as_ptr() as u64,
                n,
            )
        }
        .expect("fill device buffer");
        DevBuf { dev, addr, n }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.n];
        // SAFETY: as in `new`, the other way round.
        unsafe {
            self.dev.copy(
                device::Direction::DeviceToHost,
                out.as_mut_ptr() as u64,
                self.addr,
                self.n,
            )
        }
        .expect("read device buffer");
        out
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let _ = self.dev.free(self.addr - LEAD as u64);
    }
}

/// What the target holds: one device buffer (seed 1) and one host buffer (seed 2).
struct TargetBuffers {
    dev: DevBuf,
    host: Vec<u8>,
}

impl TargetBuffers {
    fn new() -> TargetBuffers {
        TargetBuffers {
            dev: DevBuf::new(N, &pattern(1, N)),
            host: pattern(2, N),
        }
    }

    fn register(&self, e: &TransferEngine) {
        e.register(self.dev.addr, N as u64)
            .expect("register device");
        e.register(self.host.as_ptr() as u64, N as u64)
            .expect("register host");
    }
}

/// The target's buffers after `initiate`, from the initiator's seeds (3 device, 4 host).
fn expected_target() -> (Vec<u8>, Vec<u8>) {
    let (d, h) = (pattern(3, N), pattern(4, N));
    let half = N / 2;
    // Device <- device for the first half, device <- host (shifted by 5) for the rest.
    let mut dev = d[..half].to_vec();
    dev.extend_from_slice(&h[5..5 + (N - half)]);
    // Host <- device, shifted by 3, whole; then a mixed batch rewrites its first MiB.
    let mut host = pattern(2, N);
    host[..N - 3].copy_from_slice(&d[3..]);
    host[..MIB].copy_from_slice(&h[..MIB]);
    (dev, host)
}

/// Moves bytes to and from the target's buffers at `peer_dev`/`peer_host` (each N bytes),
/// checking every read here and what it wrote through read-backs.
fn initiate(e: &TransferEngine, peer: &str, peer_dev: u64, peer_host: u64) {
    let d = DevBuf::new(N, &pattern(3, N));
    let h = pattern(4, N);
    let back_dev = DevBuf::new(N, &vec![0u8; N]);
    let mut back_host = vec![0u8; N];
    e.register(d.addr, N as u64).unwrap();
    e.register(h.as_ptr() as u64, N as u64).unwrap();
    e.register(back_dev.addr, N as u64).unwrap();
    e.register(back_host.as_ptr() as u64, N as u64).unwrap();
    let bh = back_host.as_mut_ptr() as u64;
    let path = e.transport_for(peer).unwrap();
    let want = std::env::var("MF_TRANSPORT").unwrap_or_else(|_| "local".into());
    assert_eq!(path, want, "the path taken");

    // Reads, every kind of side: device <- device, device <- host, host <- device.
    e.transfer(peer, Direction::Read, back_dev.addr, peer_dev, N as u64)
        .unwrap();
    assert!(
        back_dev.bytes() == pattern(1, N),
        "{path}: read device <- device"
    );
    e.transfer(
        peer,
        Direction::Read,
        back_dev.addr + 7,
        peer_host,
        (N - 7) as u64,
    )
    .unwrap();
    let got = back_dev.bytes();
    assert!(
        got[7..] == pattern(2, N)[..N - 7],
        "{path}: read device <- host"
    );
    e.transfer(peer, Direction::Read, bh, peer_dev + 11, (N - 11) as u64)
        .unwrap();
    assert!(
        back_host[..N - 11] == pattern(1, N)[11..],
        "{path}: read host <- device"
    );

    // Writes: device -> device, host -> device, device -> host.
    let half = N / 2;
    e.transfer(peer, Direction::Write, d.addr, peer_dev, half as u64)
        .unwrap();
    e.transfer(
        peer,
        Direction::Write,
        h.as_ptr() as u64 + 5,
        peer_dev + half as u64,
        (N - half) as u64,
    )
    .unwrap();
    e.transfer(
        peer,
        Direction::Write,
        d.addr + 3,
        peer_host,
        (N - 3) as u64,
    )
    .unwrap();
    // A batch mixing host and device descriptors: host -> host, device -> device (the same
    // bytes the device already holds, so the expected state does not change).
    e.transfer_batch(
        peer,
        Direction::Write,
        vec![
            Op::new(h.as_ptr() as u64, peer_host, MIB as u64),
            Op::new(d.addr + 64, peer_dev + 64, 4096),
        ],
    )
    .unwrap();

    // Read everything back, into device memory here, and compare with what must be there.
    let (want_dev, want_host) = expected_target();
    e.transfer_batch(
        peer,
        Direction::Read,
        vec![Op::new(back_dev.addr, peer_dev, N as u64)],
    )
    .unwrap();
    assert!(back_dev.bytes() == want_dev, "{path}: device after writes");
    e.transfer(peer, Direction::Read, back_dev.addr, peer_host, N as u64)
        .unwrap();
    assert!(back_dev.bytes() == want_host, "{path}: host after writes");

    // Refusals: past the end of the peer's device region, and of a local device buffer.
    let err = e
        .transfer(peer, Direction::Write, d.addr, peer_dev + 1, N as u64)
        .unwrap_err();
    assert!(matches!(err, Error::OutOfBounds(_)), "{path}: {err}");
    let err = e
        .transfer(peer, Direction::Read, d.addr + 1, peer_dev, N as u64)
        .unwrap_err();
    assert!(matches!(err, Error::OutOfBounds(_)), "{path}: {err}");
    // Nothing moved by the refused calls.
    e.transfer(peer, Direction::Read, back_dev.addr, peer_dev, N as u64)
        .unwrap();
    assert!(
        back_dev.bytes() == want_dev,
        "{path}: a refused call changed bytes"
    );
    for a in [d.addr, h.as_ptr() as u64, back_dev.addr, bh] {
        e.unregister(a).unwrap();
    }
}

/// Starts a target engine with its buffers registered and prints `READY session dev host`.
fn serve_buffers(store: &str) -> (TransferEngine, TargetBuffers) {
    let e = engine(store, Role::Decode);
    let b = TargetBuffers::new();
    b.register(&e);
    let (dev, host) = (b.dev.addr, b.host.as_ptr() as u64);
    println!("READY {} {dev} {host}", e.session_id());
    std::io::stdout().flush().unwrap();
    (e, b)
}

/// The target named by `MF_TEST_DEVICE_PEER`: session, device buffer, host buffer.
fn peer_from_env() -> (String, u64, u64) {
    let p = std::env::var(PEER).expect("the peer");
    let w: Vec<&str> = p.split(' ').collect();
    (
        w[0].to_string(),
        w[1].parse().unwrap(),
        w[2].parse().unwrap(),
    )
}

/// Child role: a target process. Prints `READY session dev host`, serves until stdin closes,
/// then prints `SUM dev host`.
fn run_target(store: &str) {
    let (_e, b) = serve_buffers(store);
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    println!("SUM {} {}", checksum(&b.dev.bytes()), checksum(&b.host));
}

/// Child role: an initiator process moving bytes to the target named in `MF_TEST_DEVICE_PEER`
/// ("session dev host"), or to one it starts in this process when there is none.
fn run_initiator(store: &str) {
    let e = engine(store, Role::Prefill);
    match std::env::var_os(PEER) {
        Some(_) => {
            let (peer, dev, host) = peer_from_env();
            initiate(&e, &peer, dev, host);
        }
        None => {
            let target = engine(store, Role::Decode);
            let b = TargetBuffers::new();
            b.register(&target);
            initiate(&e, target.session_id(), b.dev.addr, b.host.as_ptr() as u64);
            let (dev, host) = expected_target();
            assert!(
                b.dev.bytes() == dev && b.host == host,
                "local: target bytes"
            );
        }
    }
    println!("INITIATOR OK");
}

/// Child role: a target that unregisters its buffers while an initiator writes into them,
/// then reuses them at once: the host buffer is refilled in place, the device buffer is freed
/// and new memory put in its place (likely at the same address). It checks that no write
/// reached either: `unregister` waits for the data server's copies into the region and for
/// same-host peers' copies in flight, and none starts after it. Prints `READY session dev
/// host`, waits for `GO`, prints `CANARY ok`.
fn run_teardown_target(store: &str) {
    let (e, mut b) = serve_buffers(store);
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GO");
    // Writes are on their way now, some in the middle of their payload.
    std::thread::sleep(Duration::from_millis(30));
    let (dev_at, host_at) = (b.dev.addr, b.host.as_ptr() as u64);
    e.unregister(dev_at).unwrap();
    e.unregister(host_at).unwrap();
    b.host.fill(0xab);
    drop(b.dev);
    let dev = DevBuf::new(N, &vec![0xcd; N]);
    eprintln!(
        "teardown: new device memory {} the old address",
        if dev.addr == dev_at {
            "reuses"
        } else {
            "avoids"
        }
    );
    std::thread::sleep(Duration::from_millis(400));
    let host_intact = b.host.iter().all(|&x| x == 0xab);
    let dev_intact = dev.bytes().iter().all(|&x| x == 0xcd);
    println!(
        "CANARY {}",
        match (dev_intact, host_intact) {
            (true, true) => "ok",
            (false, true) => "device overwritten",
            (true, false) => "host overwritten",
            (false, false) => "device and host overwritten",
        }
    );
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

/// An initiator engine, the target from the environment, and registered sources: a device
/// buffer (seed 5) and a host one (seed 6).
fn initiator_with_sources(store: &str) -> (TransferEngine, String, u64, u64, DevBuf, Vec<u8>) {
    let e = engine(store, Role::Prefill);
    let (peer, peer_dev, peer_host) = peer_from_env();
    let d = DevBuf::new(N, &pattern(5, N));
    let h = pattern(6, N);
    e.register(d.addr, N as u64).unwrap();
    e.register(h.as_ptr() as u64, N as u64).unwrap();
    (e, peer, peer_dev, peer_host, d, h)
}

/// Child role: writes into the target's buffers without pause until its writes have been
/// refused for a while; prints `STARTED` after the first ones landed.
fn run_hammer(store: &str) {
    let (e, peer, peer_dev, peer_host, d, h) = initiator_with_sources(store);
    let peer = peer.as_str();
    // Three writers at once, so that some payload is always on its way when the target
    // unregisters: device -> device, host -> host, host -> device.
    let pairs = [
        (d.addr, peer_dev),
        (h.as_ptr() as u64, peer_host),
        (h.as_ptr() as u64, peer_dev),
    ];
    let landed = std::sync::atomic::AtomicU32::new(0);
    let t0 = Instant::now();
    let refused: u32 = std::thread::scope(|s| {
        let writers: Vec<_> = pairs
            .iter()
            .map(|&(src, dst)| {
                let (e, landed) = (&e, &landed);
                s.spawn(move || {
                    let mut refused = 0u32;
                    while refused < 10 && t0.elapsed() < Duration::from_secs(20) {
                        match e.transfer(peer, Direction::Write, src, dst, N as u64) {
                            Ok(()) => {
                                if landed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 5 {
                                    println!("STARTED");
                                    std::io::stdout().flush().unwrap();
                                }
                            }
                            Err(Error::OutOfBounds(_) | Error::PeerGone(_)) => refused += 1,
                            Err(err) => panic!("a write failed otherwise than refused: {err}"),
                        }
                    }
                    refused
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let landed = landed.into_inner();
    assert!(
        refused >= 30,
        "writes were still accepted after the target unregistered"
    );
    println!("INITIATOR OK landed {landed} refused {refused}");
}

/// Unregistering while a peer writes over `path`: the target's new memory stays untouched
/// and the target lives.
fn teardown_under_writes(store: &str, path: &str) {
    let t0 = Instant::now();
    let mut target = Reaped(child("teardown", store, &[]).spawn().unwrap());
    let mut out = BufReader::new(target.0.stdout.take().unwrap());
    let peer = line_with(&mut out, "READY");
    let mut hammer = child("hammer", store, &[("MF_TRANSPORT", path), (PEER, &peer)])
        .spawn()
        .unwrap();
    let mut hout = BufReader::new(hammer.stdout.take().unwrap());
    line_with(&mut hout, "STARTED");
    let mut stdin = target.0.stdin.take().unwrap();
    writeln!(stdin, "GO").unwrap();
    assert_eq!(
        line_with(&mut out, "CANARY"),
        "ok",
        "{path}: a write landed after unregister"
    );
    let rest = line_with(&mut hout, "INITIATOR OK");
    assert!(hammer.wait().unwrap().success(), "the writer failed");
    drop(stdin);
    let status = target.0.wait().unwrap();
    assert!(status.success(), "the target died: {status:?}");
    eprintln!(
        "teardown under writes over {path}: ok ({rest}) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The device backend of the children: `MF_TEST_DEVICE_BACKEND`, else the host backend (a
/// GPU machine runs the same paths with `cuda`).
fn backend() -> String {
    std::env::var("MF_TEST_DEVICE_BACKEND").unwrap_or_else(|_| "host".into())
}

fn child(role: &str, store: &str, extra: &[(&str, &str)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.env(device::BACKEND_ENV, backend())
        .env(ROLE, role)
        .env(STORE, store)
        .env_remove("MF_TRANSPORT")
        .env_remove(PEER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

/// Kills and reaps a child however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn line_with(out: &mut BufReader<ChildStdout>, tag: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child exited before {tag}"
        );
        if let Some(rest) = line.trim().strip_prefix(tag) {
            return rest.trim().to_string();
        }
    }
}

fn finish(c: Child, what: &str, t0: Instant) {
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("INITIATOR OK"),
        "{what}: initiator failed ({:?}):\n{text}",
        out.status
    );
    eprintln!("{what}: ok in {:.1} s", t0.elapsed().as_secs_f64());
}

/// One path between two processes: a target, an initiator with `MF_TRANSPORT=path`, and the
/// target's checksums afterwards.
fn across_processes(store: &str, path: &str) {
    let t0 = Instant::now();
    let mut target = Reaped(child("target", store, &[]).spawn().unwrap());
    let mut out = BufReader::new(target.0.stdout.take().unwrap());
    let peer = line_with(&mut out, "READY");
    let init = child("initiator", store, &[("MF_TRANSPORT", path), (PEER, &peer)])
        .spawn()
        .unwrap();
    finish(init, path, t0);
    drop(target.0.stdin.take());
    let sums = line_with(&mut out, "SUM");
    let (dev, host) = expected_target();
    assert_eq!(
        sums,
        format!("{} {}", checksum(&dev), checksum(&host)),
        "{path}: the target's bytes"
    );
}

/// Child role: prints rough figures of each kind of side over the path in `MF_TRANSPORT`.
fn run_timer(store: &str) {
    let (e, peer, peer_dev, peer_host, d, h) = initiator_with_sources(store);
    let peer = peer.as_str();
    let path = e.transport_for(peer).unwrap();
    let sides = [
        ("host -> host", h.as_ptr() as u64, peer_host),
        ("device -> device", d.addr, peer_dev),
        ("host -> device", h.as_ptr() as u64, peer_dev),
        ("device -> host", d.addr, peer_host),
    ];
    for size in [4096usize, 1 << 20, 8 << 20] {
        for (what, local, remote) in sides {
            for dir in [Direction::Write, Direction::Read] {
                let mut times = Vec::new();
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_millis(400) || times.len() < 5 {
                    let t = Instant::now();
                    e.transfer(peer, dir, local, remote, size as u64).unwrap();
                    times.push(t.elapsed());
                }
                times.sort();
                let p50 = times[times.len() / 2];
                let total: Duration = times.iter().sum();
                let gbs = (size * times.len()) as f64 / total.as_secs_f64() / 1e9;
                println!(
                    "{path} {:>5} KiB {:<16} {:<5}  {gbs:6.2} GB/s  p50 {:8.1} us",
                    size >> 10,
                    what,
                    if dir == Direction::Write {
                        "write"
                    } else {
                        "read"
                    },
                    p50.as_secs_f64() * 1e6
                );
            }
        }
    }
    println!("INITIATOR OK");
}

/// Child role (with `MF_TRANSPORT=cma`): a target engine in this process frees and registers
/// device memory anew, cycle after cycle, while an initiator engine writes into each new
/// buffer through IPC mappings; every write lands, and the mappings of freed buffers do not
/// pile up (the initiator lets go of those its peer no longer lists).
fn run_reregister(store: &str) {
    let target = engine(store, Role::Decode);
    let e = engine(store, Role::Prefill);
    let src = pattern(8, N);
    e.register(src.as_ptr() as u64, N as u64).unwrap();
    // Mappings of host-backend device memory in this process (allocations and IPC opens).
    let mapped = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains("mf-host-device"))
            .count()
    };
    let mut after_first = 0;
    for cycle in 0..6 {
        let buf = DevBuf::new(N, &vec![0u8; N]);
        target.register(buf.addr, N as u64).unwrap();
        let peer = target.session_id();
        e.transfer(
            peer,
            Direction::Write,
            src.as_ptr() as u64,
            buf.addr,
            N as u64,
        )
        .unwrap();
        assert_eq!(e.transport_for(peer).unwrap(), "cma");
        assert!(buf.bytes() == src, "cycle {cycle}: the write did not land");
        target.unregister(buf.addr).unwrap();
        drop(buf);
        if cycle == 0 {
            after_first = mapped();
        }
    }
    // The next transfer refetches the table and lets the last freed buffer's mapping go; a
    // mapping is closed once nothing uses it.
    let buf = DevBuf::new(N, &vec![0u8; N]);
    target.register(buf.addr, N as u64).unwrap();
    e.transfer(
        target.session_id(),
        Direction::Write,
        src.as_ptr() as u64,
        buf.addr,
        4096,
    )
    .unwrap();
    let now = mapped();
    assert!(
        now <= after_first + 1,
        "mappings of freed peer memory piled up: {after_first} after one cycle, {now} after seven"
    );
    println!("INITIATOR OK mappings {after_first} -> {now}");
}

/// `MF_DEVICE_PATHS_TIMING=1`: figures instead of checks (build with --release).
fn timing(store: &str) {
    for path in ["cma", "tcp"] {
        let mut target = Reaped(child("target", store, &[]).spawn().unwrap());
        let mut out = BufReader::new(target.0.stdout.take().unwrap());
        let peer = line_with(&mut out, "READY");
        let timer = child("timer", store, &[("MF_TRANSPORT", path), (PEER, &peer)])
            .stdout(Stdio::inherit())
            .spawn()
            .unwrap();
        assert!(timer.wait_with_output().unwrap().status.success());
    }
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let store = std::env::var(STORE).expect("store url");
        match role.as_str() {
            "target" => run_target(&store),
            "initiator" => run_initiator(&store),
            "teardown" => run_teardown_target(&store),
            "hammer" => run_hammer(&store),
            "timer" => run_timer(&store),
            "reregister" => run_reregister(&store),
            r => panic!("unknown role {r}"),
        }
        return;
    }
    // The chosen backend of this process is the default one; only children use the host's.
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let url = server.url();
    if std::env::var_os("MF_DEVICE_PATHS_TIMING").is_some() {
        return timing(&url);
    }
    let t0 = Instant::now();
    finish(child("initiator", &url, &[]).spawn().unwrap(), "local", t0);
    for path in ["cma", "tcp"] {
        across_processes(&url, path);
    }
    for path in ["tcp", "cma"] {
        teardown_under_writes(&url, path);
    }
    if backend() == "host" {
        let t0 = Instant::now();
        let mut rereg = child("reregister", &url, &[("MF_TRANSPORT", "cma")]);
        finish(
            rereg.spawn().unwrap(),
            "re-registering under IPC mappings",
            t0,
        );
    } else {
        // The check opens IPC handles of its own process, which CUDA refuses.
        eprintln!("re-registering under IPC mappings: host backend only, skipped");
    }
    println!(
        "device paths on the {} backend: local, cma, tcp, teardown under writes, re-registering ok",
        backend()
    );
}
