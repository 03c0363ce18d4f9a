//! One behaviour suite over the data paths (local, cma to this very process, tcp and tcp with
//! TLS over loopback), plus the tcp server's defences: region checks, deadlines, dead and
//! hostile peers. Admission (job secret, certificates) has its own file, data_auth.rs.
//!
//! `cargo test --release -p memfabric --test transport -- --ignored --nocapture timing`
//! prints rough throughput and latency figures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memfabric::mem::RegionTable;
use memfabric::transport::auth::{DataAuth, NONCE_LEN, PROOF_LEN};
use memfabric::transport::cma::{self, CmaTransport};
use memfabric::transport::local::LocalTransport;
use memfabric::transport::tcp::{
    client_handshake, hello, TcpDataServer, TcpTransport, AUTH_OK, HELLO_LEN, PROTOCOL_VERSION,
};
use memfabric::transport::{CheckedOps, Op, Transport};
use memfabric::Error;

mod common;
use common::{checksum, job_auth, pattern, tls_auth, Pki};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn long() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn addr(v: &[u8]) -> u64 {
    v.as_ptr() as u64
}

/// A buffer whose middle is registered in a table and whose 64-byte edges are guards that no
/// transfer may touch.
struct Guarded {
    v: Vec<u8>,
    len: usize,
}

const GUARD: usize = 64;

impl Guarded {
    fn new(len: usize, table: &RegionTable) -> Self {
        let v = vec![0xEEu8; len + 2 * GUARD];
        let g = Guarded { v, len };
        table.register(g.start(), len as u64).unwrap();
        g
    }
    fn start(&self) -> u64 {
        addr(&self.v) + GUARD as u64
    }
    fn body(&self) -> &[u8] {
        &self.v[GUARD..GUARD + self.len]
    }
    fn guards_intact(&self) -> bool {
        self.v[..GUARD].iter().all(|&b| b == 0xEE)
            && self.v[GUARD + self.len..].iter().all(|&b| b == 0xEE)
    }
}

/// A path under test: the transport plus the tables of both ends. The "peer" memory lives in
/// this process for every path, which is what lets one process test all three.
struct Path {
    t: Box<dyn Transport>,
    local: RegionTable,
    remote: Arc<RegionTable>,
    _server: Option<TcpDataServer>,
}

impl Path {
    fn local() -> Self {
        Path {
            t: Box::new(LocalTransport::new()),
            local: RegionTable::new(),
            remote: Arc::new(RegionTable::new()),
            _server: None,
        }
    }
    fn cma() -> Self {
        Path {
            t: Box::new(CmaTransport::new(std::process::id()).unwrap()),
            local: RegionTable::new(),
            remote: Arc::new(RegionTable::new()),
            _server: None,
        }
    }
    fn tcp() -> Self {
        Self::tcp_with(job_auth())
    }
    fn tcp_with(auth: Arc<DataAuth>) -> Self {
        let remote = Arc::new(RegionTable::new());
        let server =
            TcpDataServer::start("127.0.0.1:0".parse().unwrap(), remote.clone(), auth.clone())
                .unwrap();
        Path {
            t: Box::new(TcpTransport::new(server.local_addr(), auth)),
            local: RegionTable::new(),
            remote,
            _server: Some(server),
        }
    }

    fn checked(&self, ops: Vec<Op>) -> CheckedOps {
        CheckedOps::new(ops, &self.local, Some(&self.remote)).unwrap()
    }

    fn write(&self, ops: Vec<Op>) -> memfabric::Result<()> {
        self.t.write(&self.checked(ops), long())
    }

    fn read(&self, ops: Vec<Op>) -> memfabric::Result<()> {
        self.t.read(&self.checked(ops), long())
    }
}

fn single_roundtrip(p: &Path, n: usize, seed: u64) {
    let src = pattern(seed, n);
    p.local.register(addr(&src), n as u64).unwrap();
    let dst = Guarded::new(n, &p.remote);
    p.write(vec![Op::new(addr(&src), dst.start(), n as u64)])
        .unwrap_or_else(|e| panic!("{} write of {n} bytes: {e}", p.t.name()));
    assert!(
        dst.body() == &src[..],
        "{}: {n}-byte write corrupted",
        p.t.name()
    );
    assert!(dst.guards_intact(), "{}: write of {n} spilled", p.t.name());

    let back = vec![0u8; n];
    p.local.register(addr(&back), n as u64).unwrap();
    p.read(vec![Op::new(addr(&back), dst.start(), n as u64)])
        .unwrap_or_else(|e| panic!("{} read of {n} bytes: {e}", p.t.name()));
    assert!(back == src, "{}: {n}-byte read corrupted", p.t.name());
    p.local.unregister(addr(&src)).unwrap();
    p.local.unregister(addr(&back)).unwrap();
    p.remote.unregister(dst.start()).unwrap();
}

/// 4096 blocks of 16 KiB. `stride == block`: contiguous on both sides, coalesced into one
/// descriptor; otherwise the remote blocks have gaps that must stay untouched.
fn batch_roundtrip(p: &Path, stride: usize) {
    let (count, block) = (4096usize, 16 * KIB);
    let src = pattern(stride as u64, count * block);
    p.local.register(addr(&src), src.len() as u64).unwrap();
    let dst = Guarded::new(count * stride, &p.remote);
    let ops: Vec<Op> = (0..count)
        .map(|i| {
            Op::new(
                addr(&src) + (i * block) as u64,
                dst.start() + (i * stride) as u64,
                block as u64,
            )
        })
        .collect();
    let checked = p.checked(ops.clone());
    let expect = if stride == block { 1 } else { count };
    assert_eq!(checked.ops().len(), expect, "coalescing");
    p.t.write(&checked, long())
        .unwrap_or_else(|e| panic!("{} batch write: {e}", p.t.name()));
    for i in 0..count {
        let got = &dst.body()[i * stride..i * stride + block];
        assert!(
            got == &src[i * block..(i + 1) * block],
            "{} block {i}",
            p.t.name()
        );
        if stride > block {
            let gap = &dst.body()[i * stride + block..(i + 1) * stride];
            assert!(gap.iter().all(|&b| b == 0xEE), "{} gap {i}", p.t.name());
        }
    }
    assert!(dst.guards_intact());

    let back = vec![0u8; src.len()];
    p.local.register(addr(&back), back.len() as u64).unwrap();
    let rops: Vec<Op> = ops
        .iter()
        .map(|o| Op::new(o.local - addr(&src) + addr(&back), o.remote, o.len))
        .collect();
    p.read(rops)
        .unwrap_or_else(|e| panic!("{} batch read: {e}", p.t.name()));
    assert!(back == src, "{} batch read corrupted", p.t.name());
    p.local.unregister(addr(&src)).unwrap();
    p.local.unregister(addr(&back)).unwrap();
    p.remote.unregister(dst.start()).unwrap();
}

fn suite(p: Path) {
    single_roundtrip(&p, 1, 1);
    single_roundtrip(&p, 4 * KIB, 2);
    single_roundtrip(&p, 64 * MIB, 3);
    // Not a multiple of any slice or page size, to catch off-by-one slicing.
    single_roundtrip(&p, 3 * MIB + 17, 4);
    batch_roundtrip(&p, 16 * KIB);
    batch_roundtrip(&p, 32 * KIB);
    // Zero-length descriptors are dropped; nothing to do is success.
    p.write(vec![Op::new(0, 0, 0)]).unwrap();
}

#[test]
fn local_suite() {
    suite(Path::local());
}

#[test]
fn cma_suite() {
    suite(Path::cma());
}

#[test]
fn tcp_suite() {
    suite(Path::tcp());
}

#[test]
fn tcp_tls_suite() {
    let pki = Pki::new("suite");
    suite(Path::tcp_with(tls_auth(&pki)));
}

#[test]
fn tcp_with_one_connection() {
    let mut p = Path::tcp();
    let addr = p._server.as_ref().unwrap().local_addr();
    p.t = Box::new(TcpTransport::with_connections(addr, 1, job_auth()));
    single_roundtrip(&p, 9 * MIB + 3, 5);
    batch_roundtrip(&p, 32 * KIB);
}

#[test]
fn tcp_tls_with_one_connection() {
    let pki = Pki::new("one");
    let auth = tls_auth(&pki);
    let mut p = Path::tcp_with(auth.clone());
    let addr = p._server.as_ref().unwrap().local_addr();
    p.t = Box::new(TcpTransport::with_connections(addr, 1, auth));
    single_roundtrip(&p, 9 * MIB + 3, 5);
    batch_roundtrip(&p, 32 * KIB);
}

#[test]
fn same_host_paths_require_a_checked_remote() {
    let local = RegionTable::new();
    let src = vec![1u8; 4096];
    let mut dst = vec![0u8; 4096];
    local.register(addr(&src), 4096).unwrap();
    let unchecked =
        CheckedOps::new(vec![Op::new(addr(&src), addr(&dst), 4096)], &local, None).unwrap();
    for t in [
        Box::new(LocalTransport::new()) as Box<dyn Transport>,
        Box::new(CmaTransport::new(std::process::id()).unwrap()),
    ] {
        let e = t.write(&unchecked, long()).unwrap_err();
        assert!(matches!(e, Error::InvalidParam(_)), "{}: {e}", t.name());
    }
    assert!(dst.iter().all(|&b| b == 0));
    // Past deadline: nothing moves.
    let remote = RegionTable::new();
    remote.register(addr(&dst), 4096).unwrap();
    let ok = CheckedOps::new(
        vec![Op::new(addr(&src), addr(&dst), 4096)],
        &local,
        Some(&remote),
    )
    .unwrap();
    let e = LocalTransport::new()
        .write(&ok, Instant::now() - Duration::from_millis(1))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    dst[0] = 0;
    assert!(dst.iter().all(|&b| b == 0));
}

#[test]
fn cma_probe() {
    let v = vec![7u8; 64];
    cma::probe(std::process::id(), addr(&v)).unwrap();
    let e = cma::probe(std::process::id(), 8).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds(_)), "{e}");
    // pid_max is at most 2^22, so this pid cannot exist.
    let e = cma::probe((1 << 22) + 12345, addr(&v)).unwrap_err();
    assert!(matches!(e, Error::PeerGone(_)), "{e}");
    assert!(CmaTransport::new(0).is_err());
}

/// Not a test on its own: the target process of `cma_to_another_process`. It publishes one
/// buffer, waits for its stdin to close, then prints the buffer's checksum.
#[test]
#[ignore]
fn cma_child_target() {
    if std::env::var_os("MF_TEST_CMA_CHILD").is_none() {
        return;
    }
    let buf = vec![0u8; 16 * MIB];
    println!("ADDR {} {}", addr(&buf), buf.len());
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    println!("SUM {}", checksum(&buf));
}

/// A target process; killed and reaped when dropped, whatever the test did.
struct Target {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    addr: u64,
    len: u64,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target {
    fn spawn() -> Target {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "cma_child_target",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MF_TEST_CMA_CHILD", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().map(std::io::BufReader::new);
        let mut t = Target {
            out: out.unwrap(),
            child,
            addr: 0,
            len: 0,
        };
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                t.out.read_line(&mut line).unwrap() > 0,
                "target exited early"
            );
            // The harness prints the test name on the same line first.
            if let Some((_, rest)) = line.trim().split_once("ADDR ") {
                let mut it = rest.split(' ').map(|w| w.parse::<u64>().unwrap());
                (t.addr, t.len) = (it.next().unwrap(), it.next().unwrap());
                return t;
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// CMA into a real other process, verified there; then into one that was killed.
#[test]
fn cma_to_another_process() {
    use std::io::BufRead;
    let mut target = Target::spawn();
    let (pid, raddr, n) = (target.pid(), target.addr, target.len);
    cma::probe(pid, raddr).unwrap();
    // What the target would publish in the store.
    let published = memfabric::mem::encode_list(&[(raddr, n)]);
    let remote = RegionTable::decode(&published).unwrap();
    let local = RegionTable::new();
    let src = pattern(21, n as usize);
    let back = vec![0u8; n as usize];
    local.register(addr(&src), n).unwrap();
    local.register(addr(&back), n).unwrap();
    let t = CmaTransport::new(pid).unwrap();
    let w = CheckedOps::new(vec![Op::new(addr(&src), raddr, n)], &local, Some(&remote)).unwrap();
    t.write(&w, long()).unwrap();
    let r = CheckedOps::new(vec![Op::new(addr(&back), raddr, n)], &local, Some(&remote)).unwrap();
    t.read(&r, long()).unwrap();
    assert!(back == src);
    // Past the published table: refused before any byte moves.
    let e = CheckedOps::new(
        vec![Op::new(addr(&src), raddr + n - 1, 2)],
        &local,
        Some(&remote),
    )
    .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds(_)), "{e}");
    drop(target.child.stdin.take());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            target.out.read_line(&mut line).unwrap() > 0,
            "target gave no checksum"
        );
        if let Some((_, sum)) = line.trim().split_once("SUM ") {
            assert_eq!(sum.parse::<u64>().unwrap(), checksum(&src));
            break;
        }
    }
    target.child.wait().unwrap();

    // A target that dies: the next transfer fails with peer-gone, at once.
    let mut target = Target::spawn();
    let (pid, raddr, n) = (target.pid(), target.addr, target.len);
    let remote = RegionTable::from_list(&[(raddr, n)]).unwrap();
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    let t = CmaTransport::new(pid).unwrap();
    let w = CheckedOps::new(vec![Op::new(addr(&src), raddr, n)], &local, Some(&remote)).unwrap();
    let t0 = Instant::now();
    let e = t.write(&w, long()).unwrap_err();
    assert!(matches!(e, Error::PeerGone(_)), "{e}");
    assert_within(t0, Duration::from_millis(100), "write to a dead pid");
    let e = cma::probe(pid, raddr).unwrap_err();
    assert!(matches!(e, Error::PeerGone(_)), "{e}");
}

/// Remote ranges the server did not register are refused by the SERVER (the initiator passes
/// no peer table here), and the memory around them is untouched.
#[test]
fn tcp_refuses_out_of_bounds() {
    refuses_out_of_bounds(Path::tcp());
}

#[test]
fn tcp_tls_refuses_out_of_bounds() {
    let pki = Pki::new("bounds");
    refuses_out_of_bounds(Path::tcp_with(tls_auth(&pki)));
}

fn refuses_out_of_bounds(p: Path) {
    let tcp = &p.t;
    let n = 8 * KIB;
    let dst = Guarded::new(n, &p.remote);
    let unregistered = vec![0x55u8; n];
    let src = pattern(9, 2 * n);
    p.local.register(addr(&src), src.len() as u64).unwrap();
    let unchecked = |ops: Vec<Op>| CheckedOps::new(ops, &p.local, None).unwrap();
    let cases = [
        // Runs past the end of the registration into the guard.
        Op::new(addr(&src), dst.start() + n as u64 - 100, 200),
        // Starts before it.
        Op::new(addr(&src), dst.start() - 1, 100),
        // Memory the server never registered.
        Op::new(addr(&src), addr(&unregistered), 100),
        // Larger than the whole region.
        Op::new(addr(&src), dst.start(), 2 * n as u64),
        Op::new(addr(&src), u64::MAX - 10, 100),
    ];
    for op in cases {
        let e = tcp.write(&unchecked(vec![op]), long()).unwrap_err();
        assert!(matches!(e, Error::OutOfBounds(_)), "write {op:?}: {e}");
        let e = tcp.read(&unchecked(vec![op]), long()).unwrap_err();
        assert!(matches!(e, Error::OutOfBounds(_)), "read {op:?}: {e}");
    }
    assert!(dst.body().iter().all(|&b| b == 0xEE));
    assert!(dst.guards_intact());
    assert!(unregistered.iter().all(|&b| b == 0x55));
    // A batch whose last op is bad fails as a whole, with the out-of-bounds error.
    let ops = vec![
        Op::new(addr(&src), dst.start(), 100),
        Op::new(addr(&src) + 100, addr(&unregistered), 100),
    ];
    let e = tcp.write(&unchecked(ops), long()).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds(_)), "{e}");
    assert!(unregistered.iter().all(|&b| b == 0x55));
    assert!(dst.guards_intact());
    // The transport is still usable afterwards.
    tcp.write(
        &unchecked(vec![Op::new(addr(&src), dst.start(), n as u64)]),
        long(),
    )
    .unwrap();
    assert!(dst.body() == &src[..n]);
    // With the peer's table the initiator refuses before sending anything.
    let e = CheckedOps::new(
        vec![Op::new(addr(&src), addr(&unregistered), 10)],
        &p.local,
        Some(&p.remote),
    )
    .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds(_)), "{e}");
}

/// Once `unregister` has returned, the server touches the region no more, even with writes
/// in the middle of their payloads: the owner may reuse the memory at once.
#[test]
fn tcp_unregister_is_a_barrier_for_the_server() {
    unregister_is_a_barrier(Path::tcp());
}

#[test]
fn tcp_tls_unregister_is_a_barrier_for_the_server() {
    let pki = Pki::new("barrier");
    unregister_is_a_barrier(Path::tcp_with(tls_auth(&pki)));
}

fn unregister_is_a_barrier(p: Path) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
    let n = 4 * MIB;
    let dst = vec![0u8; n];
    let at = addr(&dst);
    p.remote.register(at, n as u64).unwrap();
    let src = pattern(31, n);
    p.local.register(addr(&src), n as u64).unwrap();
    let (stop, landed, refused) = (AtomicBool::new(false), AtomicU32::new(0), AtomicU32::new(0));
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                while !stop.load(Relaxed) {
                    // No peer table: the server alone decides.
                    let op =
                        CheckedOps::new(vec![Op::new(addr(&src), at, n as u64)], &p.local, None);
                    match p.t.write(&op.unwrap(), long()) {
                        Ok(()) => landed.fetch_add(1, Relaxed),
                        Err(Error::OutOfBounds(_)) => refused.fetch_add(1, Relaxed),
                        Err(e) => panic!("a write failed otherwise than refused: {e}"),
                    };
                }
            });
        }
        let t0 = Instant::now();
        while landed.load(Relaxed) < 6 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        p.remote.unregister(at).unwrap();
        // The owner reuses its memory at once.
        // SAFETY: `dst` is this test's buffer; only a server copy that ignored the
        // unregistration could write it concurrently, which is what this test looks for.
        unsafe { std::ptr::write_bytes(at as *mut u8, 0xC3, n) };
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Relaxed);
    });
    assert!(
        refused.load(Relaxed) > 0,
        "no write was refused after unregister"
    );
    assert!(
        dst.iter().all(|&b| b == 0xC3),
        "a server write landed after unregister returned"
    );
}

fn assert_within(t0: Instant, limit: Duration, what: &str) {
    let took = t0.elapsed();
    assert!(took <= limit, "{what} took {took:?}, limit {limit:?}");
}

/// A listener that never accepts: connect succeeds from the backlog, the handshake never
/// comes back. The call must end at its deadline.
#[test]
fn tcp_deadline_with_silent_server() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let t = TcpTransport::new(l.local_addr().unwrap(), job_auth());
    let local = RegionTable::new();
    let src = vec![1u8; 4096];
    local.register(addr(&src), 4096).unwrap();
    let ops = CheckedOps::new(vec![Op::new(addr(&src), 0x1000, 4096)], &local, None).unwrap();
    let t0 = Instant::now();
    let e = t.write(&ops, t0 + Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert_within(t0, Duration::from_millis(600), "silent handshake");
}

/// A server that completes the handshake and then stops reading: the initiator fills the
/// socket buffers and must give up at its deadline.
#[test]
fn tcp_deadline_with_stalled_server() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = l.local_addr().unwrap();
    let stall = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        accept_handshake(&mut s, &job_auth());
        std::thread::sleep(Duration::from_secs(3));
    });
    let t = TcpTransport::with_connections(peer, 1, job_auth());
    let local = RegionTable::new();
    let src = vec![1u8; 64 * MIB];
    local.register(addr(&src), src.len() as u64).unwrap();
    let ops = CheckedOps::new(
        vec![Op::new(addr(&src), 0x1000, src.len() as u64)],
        &local,
        None,
    )
    .unwrap();
    let t0 = Instant::now();
    let e = t.write(&ops, t0 + Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert_within(t0, Duration::from_millis(800), "stalled server");
    stall.join().unwrap();
}

/// The server goes away in the middle of a stream of transfers: the call in progress fails
/// quickly with a peer-gone or I/O error, long before its deadline, and so do later calls.
#[test]
fn tcp_server_dropped_mid_transfer() {
    let p = Path::tcp();
    let n = 64 * MIB;
    let src = pattern(11, n);
    p.local.register(addr(&src), n as u64).unwrap();
    let dst = Guarded::new(n, &p.remote);
    let ops = p.checked(vec![Op::new(addr(&src), dst.start(), n as u64)]);
    let Path { t, _server, .. } = p;
    let server = _server.unwrap();
    let deadline_each = Duration::from_secs(5);
    let worker = std::thread::spawn(move || {
        let mut ok = 0u32;
        loop {
            let t0 = Instant::now();
            match t.write(&ops, t0 + deadline_each) {
                Ok(()) => ok += 1,
                Err(e) => return (ok, e, t0.elapsed(), Instant::now()),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let dropped_at = Instant::now();
    drop(server);
    let (ok, e, took, failed_at) = worker.join().unwrap();
    assert!(
        matches!(e, Error::PeerGone(_) | Error::Io { .. }),
        "after {ok} good transfers: {e}"
    );
    assert!(took < deadline_each, "{took:?}");
    let after_drop = failed_at.saturating_duration_since(dropped_at);
    assert!(
        after_drop < Duration::from_secs(1),
        "failed {after_drop:?} after the drop"
    );
    // Server tasks notice the shutdown at their next await; give the last one time to let go
    // of `dst` before it is freed (the contract: memory outlives its registration's users).
    std::thread::sleep(Duration::from_millis(200));
    drop(dst);
}

fn expect_closed(mut s: TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: server did not close the connection: {e}"),
        }
    }
}

fn raw(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).unwrap()
}

/// A raw connection that completed the handshake as a member of the test job.
fn authed(addr: SocketAddr) -> TcpStream {
    let mut s = raw(addr);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client_handshake(&mut s, &job_auth(), addr).unwrap();
    s
}

/// The server side of the handshake, done by hand for servers faked by the tests.
fn accept_handshake(s: &mut TcpStream, auth: &DataAuth) {
    let mut first = [0u8; HELLO_LEN + NONCE_LEN];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first[..4], b"MFTD");
    let mut cn = [0u8; NONCE_LEN];
    cn.copy_from_slice(&first[HELLO_LEN..]);
    let sn = [0x5Au8; NONCE_LEN];
    s.write_all(&hello(0)).unwrap();
    s.write_all(&sn).unwrap();
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof).unwrap();
    assert!(auth.verify_client(&sn, &cn, &proof));
    s.write_all(&[AUTH_OK]).unwrap();
    s.write_all(&auth.server_proof(&sn, &cn)).unwrap();
}

/// Garbage and malformed frames close that connection only; the server keeps serving.
#[test]
fn tcp_survives_garbage() {
    let p = Path::tcp();
    let server = p._server.as_ref().unwrap().local_addr();
    let n = 64 * KIB;
    let src = pattern(12, n);
    p.local.register(addr(&src), n as u64).unwrap();
    let dst = Guarded::new(n, &p.remote);
    // A pooled connection that exists before the garbage and is used after it.
    p.write(vec![Op::new(addr(&src), dst.start(), 10)]).unwrap();

    let mut s = raw(server);
    s.write_all(&pattern(13, 4096)).unwrap();
    expect_closed(s, "random bytes");

    let header = |f: &dyn Fn(&mut [u8; 32])| {
        let mut s = authed(server);
        let mut h = [0u8; 32];
        h[0] = PROTOCOL_VERSION;
        h[1] = 1;
        h[16..24].copy_from_slice(&dst.start().to_le_bytes());
        h[24..32].copy_from_slice(&16u64.to_le_bytes());
        f(&mut h);
        s.write_all(&h).unwrap();
        expect_closed(s, "malformed header");
    };
    header(&|h| h[0] = 9); // version
    header(&|h| h[1] = 7); // op
    header(&|h| h[5] = 1); // padding
    header(&|h| h[24..32].copy_from_slice(&u64::MAX.to_le_bytes())); // huge length
    header(&|h| h[24..32].copy_from_slice(&((64u64 << 20) + 1).to_le_bytes()));

    // Wrong protocol version in the hello: refused with a reply, then closed.
    let mut s = raw(server);
    let mut h = hello(0);
    h[4] = 200;
    s.write_all(&h).unwrap();
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[5], 1);
    expect_closed(s, "bad version");

    // A header cut short, then the client vanishes.
    let mut s = authed(server);
    s.write_all(&[PROTOCOL_VERSION, 1, 0]).unwrap();
    drop(s);

    // Nothing landed in memory, and good clients (old connection and new) are served.
    assert!(dst.body()[10..].iter().all(|&b| b == 0xEE));
    let fresh = TcpTransport::new(server, job_auth());
    let ops = p.checked(vec![Op::new(addr(&src), dst.start(), n as u64)]);
    fresh.write(&ops, long()).unwrap();
    p.t.write(&ops, long()).unwrap();
    assert!(dst.body() == &src[..]);
}

#[test]
fn tcp_concurrent_callers_share_a_transport() {
    let p = Arc::new(Path::tcp());
    let threads: Vec<_> = (0..4u64)
        .map(|k| {
            let p = p.clone();
            std::thread::spawn(move || {
                for round in 0..5u64 {
                    single_roundtrip(&p, 256 * KIB + k as usize, k * 100 + round);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn best_of<F: FnMut()>(n: usize, mut f: F) -> Duration {
    (0..n)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .min()
        .unwrap()
}

fn p50_us<F: FnMut()>(n: usize, mut f: F) -> f64 {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .collect();
    v.sort();
    v[n / 2].as_secs_f64() * 1e6
}

/// Rough figures; run in release (see the file header).
#[test]
#[ignore]
fn timing() {
    let n = 64 * MIB;
    let src = pattern(1, n);
    let mut dst = vec![0u8; n];
    let t = best_of(5, || dst.copy_from_slice(&src));
    println!("memcpy 64 MiB, one thread: {:.2} GB/s", gbps(n, t));

    let pki = Pki::new("timing");
    let paths = [
        (Path::local(), ""),
        (Path::cma(), ""),
        (Path::tcp(), ""),
        (Path::tcp_with(tls_auth(&pki)), "+tls"),
    ];
    for (p, tag) in paths {
        let name = format!("{}{tag}", p.t.name());
        p.local.register(addr(&src), n as u64).unwrap();
        p.remote.register(addr(&dst), n as u64).unwrap();
        let big = p.checked(vec![Op::new(addr(&src), addr(&dst), n as u64)]);
        let t = best_of(5, || p.t.write(&big, long()).unwrap());
        println!("{name}: 64 MiB write {:.2} GB/s", gbps(n, t));
        let back = vec![0u8; n];
        p.local.register(addr(&back), n as u64).unwrap();
        let rbig = p.checked(vec![Op::new(addr(&back), addr(&dst), n as u64)]);
        let t = best_of(5, || p.t.read(&rbig, long()).unwrap());
        println!("{name}: 64 MiB read  {:.2} GB/s", gbps(n, t));
        let small = p.checked(vec![Op::new(addr(&src), addr(&dst), 4096)]);
        let lat = p50_us(2000, || p.t.write(&small, long()).unwrap());
        println!("{name}: 4 KiB write p50 {lat:.1} us");
        let rsmall = p.checked(vec![Op::new(addr(&back), addr(&dst), 4096)]);
        let lat = p50_us(2000, || p.t.read(&rsmall, long()).unwrap());
        println!("{name}: 4 KiB read  p50 {lat:.1} us");
        // 256 x 16 KiB, remote blocks 2 apart so nothing coalesces.
        let ops: Vec<Op> = (0..256u64)
            .map(|i| Op::new(addr(&src) + i * 16384, addr(&dst) + i * 32768, 16384))
            .collect();
        let batch = p.checked(ops);
        let t = best_of(20, || p.t.write(&batch, long()).unwrap());
        println!(
            "{name}: 256 x 16 KiB write {:.0} us ({:.2} GB/s)",
            t.as_secs_f64() * 1e6,
            gbps(256 * 16384, t)
        );
        let ops: Vec<Op> = (0..4096u64)
            .map(|i| Op::new(addr(&src) + i * 8192, addr(&dst) + i * 16384, 8192))
            .collect();
        let batch = p.checked(ops);
        let t = best_of(5, || p.t.write(&batch, long()).unwrap());
        println!(
            "{name}: 4096 x 8 KiB write {:.2} ms ({:.2} GB/s)",
            t.as_secs_f64() * 1e3,
            gbps(4096 * 8192, t)
        );
    }
    // What admission costs: a fresh connection (TCP connect, TLS, hello, proofs) and its first
    // 4 KiB write, against the same write on a pooled connection above.
    for (name, auth) in [("tcp", job_auth()), ("tcp+tls", tls_auth(&pki))] {
        let remote = Arc::new(RegionTable::new());
        remote.register(addr(&dst), 4096).unwrap();
        let server =
            TcpDataServer::start("127.0.0.1:0".parse().unwrap(), remote.clone(), auth.clone())
                .unwrap();
        let local = RegionTable::new();
        local.register(addr(&src), 4096).unwrap();
        let op = vec![Op::new(addr(&src), addr(&dst), 4096)];
        let ops = CheckedOps::new(op, &local, Some(&remote)).unwrap();
        let lat = p50_us(200, || {
            TcpTransport::with_connections(server.local_addr(), 1, auth.clone())
                .write(&ops, long())
                .unwrap()
        });
        println!("{name}: new connection + 4 KiB write p50 {lat:.0} us");
    }
    // CMA into another process (the same-host engine-to-engine case).
    let target = Target::spawn();
    let (raddr, rn) = (target.addr, target.len);
    let remote = RegionTable::from_list(&[(raddr, rn)]).unwrap();
    let local = RegionTable::new();
    local.register(addr(&src), n as u64).unwrap();
    let t = CmaTransport::new(target.pid()).unwrap();
    let big = CheckedOps::new(vec![Op::new(addr(&src), raddr, rn)], &local, Some(&remote)).unwrap();
    let d = best_of(10, || t.write(&big, long()).unwrap());
    println!(
        "cma to another process: 16 MiB write {:.2} GB/s",
        gbps(rn as usize, d)
    );
    let small = CheckedOps::new(
        vec![Op::new(addr(&src), raddr, 4096)],
        &local,
        Some(&remote),
    )
    .unwrap();
    let lat = p50_us(5000, || t.write(&small, long()).unwrap());
    println!("cma to another process: 4 KiB write p50 {lat:.1} us");
    drop(target);

    let table = RegionTable::new();
    let t = best_of(20, || {
        table.register(addr(&src), n as u64).unwrap();
        table.unregister(addr(&src)).unwrap();
    });
    println!(
        "register + unregister 64 MiB: {:.1} us",
        t.as_secs_f64() * 1e6
    );
}
