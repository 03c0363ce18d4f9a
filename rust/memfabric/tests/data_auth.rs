//! Admission to the tcp data plane: only clients that prove the job secret (and, with TLS, hold
//! a certificate from the job's CA) may read or write a data server's registered memory.
//! Every refusal leaves that memory as it was.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memfabric::mem::RegionTable;
use memfabric::store::tls::TlsMaterial;
use memfabric::store::{ClientOptions, StoreClient, StoreServer};
use memfabric::transport::auth::{
    job_secret, DataAuth, HOLDER_PREFIX, NONCE_LEN, PROOF_LEN, SECRET_KEY,
};
use memfabric::transport::tcp::{
    hello, TcpDataServer, TcpTransport, AUTH_OK, AUTH_REFUSED, HELLO_LEN, PROTOCOL_VERSION,
};
use memfabric::transport::{CheckedOps, Op, Transport};
use memfabric::Error;

mod common;
use common::{job_auth, tls_auth, Pki, JOB_SECRET};

const N: usize = 64 << 10;

fn long() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

fn addr(v: &[u8]) -> u64 {
    v.as_ptr() as u64
}

/// A data server with one registered buffer of N bytes of 0xEE, and a local source buffer.
struct Target {
    server: TcpDataServer,
    remote: Arc<RegionTable>,
    mem: Vec<u8>,
    local: RegionTable,
    src: Vec<u8>,
}

impl Target {
    fn new(auth: Arc<DataAuth>) -> Self {
        let remote = Arc::new(RegionTable::new());
        let mem = vec![0xEEu8; N];
        remote.register(addr(&mem), N as u64).unwrap();
        let server =
            TcpDataServer::start("127.0.0.1:0".parse().unwrap(), remote.clone(), auth).unwrap();
        let local = RegionTable::new();
        let src = vec![0x11u8; N];
        local.register(addr(&src), N as u64).unwrap();
        Target {
            server,
            remote,
            mem,
            local,
            src,
        }
    }

    fn at(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn write_op(&self) -> CheckedOps {
        CheckedOps::new(
            vec![Op::new(addr(&self.src), addr(&self.mem), N as u64)],
            &self.local,
            Some(&self.remote),
        )
        .unwrap()
    }

    fn untouched(&self) -> bool {
        self.mem.iter().all(|&b| b == 0xEE)
    }

    /// A client with `auth` writes and reads; both must fail, with the memory on both sides
    /// unchanged. Returns the write's error.
    fn refuses(&self, auth: Arc<DataAuth>) -> Error {
        let t = TcpTransport::new(self.at(), auth);
        let e = t.write(&self.write_op(), long()).unwrap_err();
        let back = vec![0x22u8; N];
        self.local.register(addr(&back), N as u64).unwrap();
        let r = CheckedOps::new(
            vec![Op::new(addr(&back), addr(&self.mem), N as u64)],
            &self.local,
            Some(&self.remote),
        )
        .unwrap();
        assert!(t.read(&r, long()).is_err());
        assert!(
            back.iter().all(|&b| b == 0x22),
            "a refused read delivered data"
        );
        self.local.unregister(addr(&back)).unwrap();
        assert!(
            self.untouched(),
            "a refused client changed the server's memory"
        );
        e
    }

    /// A member of the job can still write.
    fn serves(&self, auth: Arc<DataAuth>) {
        TcpTransport::new(self.at(), auth)
            .write(&self.write_op(), long())
            .unwrap();
        assert!(self.mem.iter().all(|&b| b == 0x11));
    }
}

/// A WRITE frame of `len` bytes to `to`, with its payload.
fn write_frame(to: u64, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 32];
    f[0] = PROTOCOL_VERSION;
    f[1] = 1;
    f[8..16].copy_from_slice(&1u64.to_le_bytes());
    f[16..24].copy_from_slice(&to.to_le_bytes());
    f[24..32].copy_from_slice(&(len as u64).to_le_bytes());
    f.extend(std::iter::repeat_n(0x66u8, len));
    f
}

/// Reads until the server closes; returns what it sent. Panics if it does not close in time.
fn read_to_close(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

#[test]
fn right_secret_is_served() {
    let t = Target::new(job_auth());
    t.serves(job_auth());
}

#[test]
fn wrong_secret_is_refused_and_memory_unchanged() {
    let t = Target::new(job_auth());
    let e = t.refuses(Arc::new(DataAuth::new(&[8u8; 32])));
    assert!(matches!(e, Error::Refused(_)), "{e}");
    assert_eq!(e.code(), -3003);
    let msg = e.to_string();
    assert!(msg.contains(&t.at().to_string()), "{msg}");
    assert!(
        msg.contains("not admitted by the same config store"),
        "{msg}"
    );
    t.serves(job_auth());
}

/// Requests sent in place of, or without, the handshake are never executed.
#[test]
fn requests_without_the_handshake_are_dropped() {
    let t = Target::new(job_auth());
    let to = addr(&t.mem);

    // A bare WRITE frame: not a hello.
    let mut s = TcpStream::connect(t.at()).unwrap();
    s.write_all(&write_frame(to, 4096)).unwrap();
    read_to_close(&mut s, Duration::from_secs(5));

    // A hello of the protocol before admission existed, then a WRITE.
    let mut s = TcpStream::connect(t.at()).unwrap();
    let mut h = hello(0);
    h[4] = 1;
    s.write_all(&h).unwrap();
    let _ = s.write_all(&write_frame(to, 4096));
    let got = read_to_close(&mut s, Duration::from_secs(5));
    assert_eq!(got.len(), HELLO_LEN, "{got:?}");
    assert_eq!(got[5], 1, "version refused");

    // The right hello and nonce, then a WRITE frame where the proof belongs.
    let mut s = TcpStream::connect(t.at()).unwrap();
    s.write_all(&hello(0)).unwrap();
    s.write_all(&[3u8; NONCE_LEN]).unwrap();
    let mut reply = [0u8; HELLO_LEN + NONCE_LEN];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[5], 0);
    let _ = s.write_all(&write_frame(to, 4096));
    let got = read_to_close(&mut s, Duration::from_secs(5));
    assert_eq!(got, vec![AUTH_REFUSED]);

    // A proof made with another secret, then a WRITE frame.
    let mut s = TcpStream::connect(t.at()).unwrap();
    s.write_all(&hello(0)).unwrap();
    let cn = [4u8; NONCE_LEN];
    s.write_all(&cn).unwrap();
    s.read_exact(&mut reply).unwrap();
    let mut sn = [0u8; NONCE_LEN];
    sn.copy_from_slice(&reply[HELLO_LEN..]);
    let other = DataAuth::new(&[9u8; 32]);
    s.write_all(&other.client_proof(&sn, &cn)).unwrap();
    let _ = s.write_all(&write_frame(to, 4096));
    let got = read_to_close(&mut s, Duration::from_secs(5));
    assert_eq!(got, vec![AUTH_REFUSED]);

    // Give the server's tasks a moment, then check: nothing landed, members are served.
    std::thread::sleep(Duration::from_millis(100));
    assert!(t.untouched());
    t.serves(job_auth());
}

/// A client that connects and says nothing, or stops half way, is dropped at the deadline.
#[test]
fn silent_client_is_dropped_after_the_deadline() {
    let limit = Duration::from_millis(400);
    let t = Target::new(Arc::new(
        DataAuth::new(&JOB_SECRET).with_handshake_timeout(limit),
    ));
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(t.at()).unwrap();
    let mut halfway = TcpStream::connect(t.at()).unwrap();
    halfway.write_all(&hello(0)).unwrap();
    halfway.write_all(&[5u8; NONCE_LEN]).unwrap();
    assert!(read_to_close(&mut silent, Duration::from_secs(5)).is_empty());
    let got = read_to_close(&mut halfway, Duration::from_secs(5));
    assert_eq!(
        got.len(),
        HELLO_LEN + NONCE_LEN,
        "hello and nonce, then nothing"
    );
    let took = t0.elapsed();
    assert!(
        took >= limit - Duration::from_millis(50),
        "closed too early: {took:?}"
    );
    assert!(
        took < limit + Duration::from_secs(2),
        "closed too late: {took:?}"
    );
    t.serves(job_auth());
}

/// A server that cannot prove the secret gets no request: the client stops after its proof.
#[test]
fn server_that_cannot_prove_the_secret_gets_nothing() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = l.local_addr().unwrap();
    let impostor = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut first = [0u8; HELLO_LEN + NONCE_LEN];
        s.read_exact(&mut first).unwrap();
        s.write_all(&hello(0)).unwrap();
        s.write_all(&[1u8; NONCE_LEN]).unwrap();
        let mut proof = [0u8; PROOF_LEN];
        s.read_exact(&mut proof).unwrap();
        s.write_all(&[AUTH_OK]).unwrap();
        s.write_all(&[0u8; PROOF_LEN]).unwrap();
        read_to_close(&mut s, Duration::from_secs(5))
    });
    let local = RegionTable::new();
    let src = vec![0x33u8; 4096];
    local.register(addr(&src), 4096).unwrap();
    let ops = CheckedOps::new(vec![Op::new(addr(&src), 0x1000, 4096)], &local, None).unwrap();
    let e = TcpTransport::with_connections(at, 1, job_auth())
        .write(&ops, long())
        .unwrap_err();
    assert!(matches!(e, Error::Refused(_)), "{e}");
    assert!(e.to_string().contains("could not prove"), "{e}");
    let after_proof = impostor.join().unwrap();
    assert!(
        after_proof.is_empty(),
        "{} bytes sent to an impostor",
        after_proof.len()
    );
}

#[test]
fn tls_member_is_served() {
    let pki = Pki::new("member");
    let t = Target::new(tls_auth(&pki));
    t.serves(tls_auth(&pki));
}

#[test]
fn tls_certificate_from_another_ca_is_refused() {
    let job = Pki::new("job");
    let other = Pki::new("other");
    let t = Target::new(tls_auth(&job));
    // Our CA does not know the server's certificate: refused on the client side.
    let e = t.refuses(tls_auth(&other));
    assert!(matches!(e, Error::Tls(_)), "{e}");
    assert_eq!(e.code(), -3004);

    // The server does not know the client's certificate, though the client trusts the server.
    let t2 = Target::new(tls_auth(&job));
    let m = TlsMaterial {
        server: job.material().server,
        client: client_trusting(&job, &other),
    };
    let e = t2.refuses(Arc::new(DataAuth::new(&JOB_SECRET).with_tls(&m)));
    assert!(matches!(e, Error::Tls(_)), "{e}");
    t2.serves(tls_auth(&job));
}

/// A client config that trusts `ca`'s CA and presents `me`'s certificate.
fn client_trusting(ca: &Pki, me: &Pki) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(me.path("cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(me.path("key.pem")).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    Arc::new(cfg)
}

#[test]
fn tls_and_plaintext_do_not_mix() {
    let pki = Pki::new("mix");
    let tls_server = Target::new(tls_auth(&pki));
    let e = tls_server.refuses(job_auth());
    assert!(matches!(e, Error::Tls(_)), "{e}");
    assert!(e.to_string().contains("set_conf_store_tls"), "{e}");

    let plain_server = Target::new(job_auth());
    let e = plain_server.refuses(tls_auth(&pki));
    assert!(matches!(e, Error::Tls(_)), "{e}");
}

/// TLS alone is not enough: the proof runs inside it, so a member of another job with a
/// certificate from the same CA is refused too.
#[test]
fn tls_with_another_job_secret_is_refused() {
    let pki = Pki::new("secret");
    let t = Target::new(tls_auth(&pki));
    let other = Arc::new(DataAuth::new(&[1u8; 32]).with_tls(&pki.material()));
    let e = t.refuses(other);
    assert!(matches!(e, Error::Refused(_)), "{e}");
}

fn client(url: &str) -> StoreClient {
    StoreClient::connect(
        url,
        ClientOptions {
            timeout: Duration::from_secs(10),
            tls: None,
            force_plaintext: true,
        },
    )
    .unwrap()
}

/// One secret per store, created once however many engines race for it; engines of one store
/// reach each other, engines of another store do not.
#[test]
fn job_secret_comes_from_the_store() {
    let s1 = StoreServer::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let s2 = StoreServer::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let url1 = s1.url();
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let url = url1.clone();
            std::thread::spawn(move || job_secret(&client(&url)).unwrap())
        })
        .collect();
    let secrets: Vec<_> = racers.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(secrets.iter().all(|s| *s == secrets[0]));
    let c1 = client(&url1);
    assert_eq!(c1.get(SECRET_KEY).unwrap().unwrap(), secrets[0].to_vec());
    let c2 = client(&s2.url());
    assert_ne!(job_secret(&c2).unwrap(), secrets[0]);

    let t = Target::new(Arc::new(DataAuth::for_store(&c1, None).unwrap()));
    let e = t.refuses(Arc::new(DataAuth::for_store(&c2, None).unwrap()));
    assert!(matches!(e, Error::Refused(_)), "{e}");
    t.serves(Arc::new(DataAuth::for_store(&client(&url1), None).unwrap()));

    // A value that is not a secret is an error, not a weak key.
    c2.set(SECRET_KEY, b"short").unwrap();
    let e = job_secret(&c2).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
}

/// A store restarted without its data gets the job secret back from the engines that live on:
/// an engine that starts afterwards reaches them.
#[test]
fn job_secret_survives_a_store_restart() {
    let s = StoreServer::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let at = s.local_addr();
    let url = s.url();
    let old = client(&url);
    let old_auth = Arc::new(DataAuth::for_store(&old, None).unwrap());
    assert_eq!(old.list(HOLDER_PREFIX).unwrap().len(), 1);
    let t = Target::new(old_auth.clone());
    drop(s);
    std::thread::sleep(Duration::from_millis(100));
    let s2 = StoreServer::start(at, None).unwrap();
    // Any call reconnects the old engine's client, which publishes what it held again.
    assert_eq!(old.get(SECRET_KEY).unwrap(), None);
    let new = client(&url);
    let new_auth = Arc::new(DataAuth::for_store(&new, None).unwrap());
    t.serves(new_auth);
    assert_eq!(new.list(HOLDER_PREFIX).unwrap().len(), 2);
    drop(s2);
}
