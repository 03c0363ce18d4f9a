//! Config store: server, client and group behaviour against a real server on an ephemeral port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memfabric::store::{ClientOptions, Group, StoreClient, StoreServer};

fn server() -> StoreServer {
    StoreServer::start("127.0.0.1:0".parse().unwrap(), None).expect("server starts")
}

fn opts(timeout_ms: u64) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_millis(timeout_ms),
        force_plaintext: true,
        ..Default::default()
    }
}

fn client(s: &StoreServer) -> StoreClient {
    StoreClient::connect(&s.url(), opts(5000)).expect("client connects")
}

#[test]
fn basic_operations() {
    let s = server();
    let c = client(&s);
    c.set("a", b"1").unwrap();
    assert_eq!(c.get("a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(c.get("missing").unwrap(), None);
    assert_eq!(c.add("n", 5).unwrap(), 5);
    assert_eq!(c.add("n", -2).unwrap(), 3);
    assert_eq!(c.get("n").unwrap().as_deref(), Some(&b"3"[..]));
    // add on a non-counter is a clear error, the connection survives.
    c.set("text", b"abc").unwrap();
    assert_eq!(c.add("text", 1).unwrap_err().code(), -2000);
    assert_eq!(c.compare_set("cas", b"", b"x").unwrap(), b"x");
    assert_eq!(c.compare_set("cas", b"wrong", b"y").unwrap(), b"x");
    assert_eq!(c.compare_set("cas", b"x", b"y").unwrap(), b"y");
    assert_eq!(c.append("log", b"ab").unwrap(), 2);
    assert_eq!(c.append("log", b"cd").unwrap(), 4);
    assert_eq!(c.get("log").unwrap().unwrap(), b"abcd");
    assert_eq!(
        c.exists(&["a".into(), "zz".into()]).unwrap(),
        vec![true, false]
    );
    c.multi_set(&[("m/1".into(), vec![1]), ("m/2".into(), vec![2])], false)
        .unwrap();
    assert_eq!(
        c.multi_get(&["m/1".into(), "m/2".into()], None).unwrap(),
        vec![vec![1], vec![2]]
    );
    assert_eq!(
        c.multi_get(&["m/1".into(), "m/3".into()], None)
            .unwrap_err()
            .code(),
        -2007
    );
    assert_eq!(
        c.list("m/").unwrap(),
        vec!["m/1".to_string(), "m/2".to_string()]
    );
    assert!(c.delete("a").unwrap());
    assert!(!c.delete("a").unwrap());
    let big = vec![7u8; 8 << 20];
    c.set("big", &big).unwrap();
    assert_eq!(c.get("big").unwrap().unwrap(), big);
}

#[test]
fn get_wait_and_timeout() {
    let s = server();
    let url = s.url();
    let c = client(&s);
    let t = Instant::now();
    let e = c.get_wait("later", Duration::from_millis(200)).unwrap_err();
    assert_eq!(e.code(), -2004, "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        StoreClient::connect(&url, opts(2000))
            .unwrap()
            .set("later", b"v")
            .unwrap();
    });
    assert_eq!(c.get_wait("later", Duration::from_secs(5)).unwrap(), b"v");
    setter.join().unwrap();
    // multi_get waits for all keys.
    let e = c
        .multi_get(
            &["later".into(), "never".into()],
            Some(Duration::from_millis(100)),
        )
        .unwrap_err();
    assert_eq!(e.code(), -2004);
}

#[test]
fn ephemeral_keys_vanish_with_their_session_and_abort_watchers() {
    let s = server();
    let watcher = client(&s);
    let member = client(&s);
    member.set_ephemeral("g/alive/1", b"").unwrap();
    watcher.set("g/alive/0", b"").unwrap();
    let t = Instant::now();
    let handle = std::thread::spawn(move || {
        watcher.wait(
            &["never".into()],
            Duration::from_secs(20),
            Some(("g/alive/", 2)),
        )
    });
    std::thread::sleep(Duration::from_millis(100));
    drop(member);
    let e = handle.join().unwrap().unwrap_err();
    assert_eq!(e.code(), -3001, "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    let c = client(&s);
    assert_eq!(c.get("g/alive/1").unwrap(), None);
}

#[test]
fn server_survives_malformed_frames() {
    let s = server();
    let addr: SocketAddr = s.local_addr();
    let garbage: Vec<Vec<u8>> = vec![
        vec![0x40, 0, 0, 0, 1, 2],                      // 1 GiB length prefix
        vec![0, 0, 0, 2, 99, 1],                        // unknown version
        vec![0, 0, 0, 3, 1, 200, 0],                    // unknown kind
        vec![0, 0, 0, 6, 1, 2, 0xff, 0xff, 0xff, 0xff], // forged key length
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ];
    for g in garbage {
        let mut t = TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        t.write_all(&g).unwrap();
        let mut buf = [0u8; 16];
        // The server closes the connection (EOF) instead of answering or crashing.
        let n = t.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "server answered garbage {g:?}");
    }
    // A half frame followed by a hang-up is fine too.
    let mut t = TcpStream::connect(addr).unwrap();
    t.write_all(&[0, 0, 0, 50, 1]).unwrap();
    drop(t);
    let c = client(&s);
    c.set("still", b"alive").unwrap();
    assert_eq!(c.get("still").unwrap().unwrap(), b"alive");
}

#[test]
fn client_reconnects_after_store_restart() {
    let s = server();
    let addr = s.local_addr();
    let c = StoreClient::connect(&s.url(), opts(10_000)).unwrap();
    c.set_ephemeral("alive/me", b"1").unwrap();
    c.set("x", b"1").unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(100));
    let restarted = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // Same port: SO_REUSEADDR lets the new server bind while old sockets linger.
        StoreServer::start(addr, None).unwrap()
    });
    // Idempotent calls are retried transparently across the restart.
    c.set("y", b"2").unwrap();
    let s2 = restarted.join().unwrap();
    assert_eq!(c.get("y").unwrap().unwrap(), b"2");
    // The in-memory store starts empty, but our liveness key was published again.
    assert_eq!(c.get("x").unwrap(), None);
    assert_eq!(c.get("alive/me").unwrap().unwrap(), b"1");
    drop(s2);
}

#[test]
fn kept_client_republishes_after_restart_without_calls() {
    let s = server();
    let addr = s.local_addr();
    let c = Arc::new(StoreClient::connect(&s.url(), opts(10_000)).unwrap());
    c.set_ephemeral("alive/idle", b"1").unwrap();
    memfabric::store::keep_alive(&c);
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    let s2 = StoreServer::start(addr, None).unwrap();
    // `c` makes no call: only the keeper can bring its key back.
    let probe = client(&s2);
    let t = Instant::now();
    while probe.get("alive/idle").unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the idle client's key did not come back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.reconnected_at().is_some());
}

#[test]
fn client_moves_to_a_store_at_another_address() {
    let old = server();
    let c = Arc::new(StoreClient::connect(&old.url(), opts(600)).unwrap());
    c.set_ephemeral("alive/mover", b"1").unwrap();
    c.set("only/old", b"1").unwrap();
    memfabric::store::keep_alive(&c);

    // Refusals change nothing: the client keeps its store and its key stays there.
    let e = c.retarget("tcp://nonsense").unwrap_err();
    assert_eq!(e.code(), -2000, "{e}");
    let e = c.retarget("etcd://127.0.0.1:2379").unwrap_err();
    assert_eq!(e.code(), -2000, "{e}");
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let t = Instant::now();
    let e = c.retarget(&format!("tcp://{nobody}")).unwrap_err();
    assert_eq!(e.code(), -2014, "{e}");
    assert!(e.to_string().contains(&old.url()), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Something that accepts but is not a store.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = c
        .retarget(&format!("tcp://{}", mute.local_addr().unwrap()))
        .unwrap_err();
    assert_eq!(e.code(), -2014, "{e}");
    assert_eq!(c.url(), old.url());
    assert_eq!(client(&old).get("alive/mover").unwrap().unwrap(), b"1");

    // The store comes back empty at another address: the client moves there with its
    // ephemeral key, calls go there, and the old store learns the client left.
    let new = server();
    c.retarget(&new.url()).unwrap();
    assert_eq!(c.url(), new.url());
    let probe = client(&new);
    assert_eq!(probe.get("alive/mover").unwrap().unwrap(), b"1");
    assert_eq!(c.get("only/old").unwrap(), None);
    c.set("only/new", b"2").unwrap();
    assert_eq!(probe.get("only/new").unwrap().unwrap(), b"2");
    let watcher = client(&old);
    let t = Instant::now();
    while watcher.get("alive/mover").unwrap().is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "old store kept the key"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(watcher.get("only/new").unwrap(), None);

    // The keeper revives the connection at the new address, not the old one.
    let addr = new.local_addr();
    drop((probe, new));
    std::thread::sleep(Duration::from_millis(300));
    let again = StoreServer::start(addr, None).unwrap();
    let probe = client(&again);
    let t = Instant::now();
    while probe.get("alive/mover").unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(3), "key not republished");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(watcher.get("alive/mover").unwrap().is_none());
}

#[test]
fn calls_end_by_the_deadline_of_their_scope() {
    let s = server();
    let c = StoreClient::connect(&s.url(), opts(30_000)).unwrap();
    c.set_ephemeral("alive/scoped", b"1").unwrap();
    let deadline = Instant::now() + Duration::from_millis(300);
    let e = memfabric::store::within(deadline, || c.get_wait("never", Duration::from_secs(20)))
        .unwrap_err();
    assert_eq!(e.code(), -2004, "{e}");
    assert!(Instant::now() < deadline + Duration::from_millis(500));
    // A scope whose deadline has passed fails before sending and keeps the connection (and
    // the ephemeral key with it).
    let e = memfabric::store::within(Instant::now(), || c.get("x")).unwrap_err();
    assert_eq!(e.code(), -2004, "{e}");
    let other = client(&s);
    assert_eq!(other.get("alive/scoped").unwrap().unwrap(), b"1");
    // With the store gone, a waiting get gives up at its own timeout, not that plus the grace
    // it allows an answer to arrive.
    drop(s);
    let t = Instant::now();
    let e = c.get_wait("k", Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e.code(), -2014 | -2004), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_call_waiting_behind_another_gives_up_at_its_deadline_and_keeps_the_connection() {
    let s = server();
    let c = Arc::new(StoreClient::connect(&s.url(), opts(30_000)).unwrap());
    c.set_ephemeral("alive/busy", b"1").unwrap();
    let waiter = {
        let c = c.clone();
        std::thread::spawn(move || c.get_wait("later", Duration::from_secs(3)))
    };
    std::thread::sleep(Duration::from_millis(200));
    // The other thread holds the client for its wait: this call gives up at its own deadline
    // without sending, so the session and its ephemeral key stay.
    let t = Instant::now();
    let deadline = t + Duration::from_millis(300);
    let e = memfabric::store::within(deadline, || c.set("x", b"1")).unwrap_err();
    assert_eq!(e.code(), -2004, "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let other = client(&s);
    other.set("later", b"now").unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), b"now");
    assert_eq!(
        other.get("alive/busy").unwrap().unwrap(),
        b"1",
        "the session survived"
    );
    assert_eq!(c.get("x").unwrap(), None, "the refused call sent nothing");
}

#[test]
fn connect_to_missing_store_fails_within_deadline() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let t = Instant::now();
    let e = StoreClient::connect(&format!("tcp://{addr}"), opts(400))
        .err()
        .unwrap();
    assert_eq!(e.code(), -2014, "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(
        StoreClient::connect("tcp://nonsense", opts(400))
            .err()
            .unwrap()
            .code(),
        -2000
    );
}

#[test]
fn group_rendezvous_barrier_all_gather() {
    let s = server();
    let url = s.url();
    let world = 16u32;
    let handles: Vec<_> = (0..world)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let c = Arc::new(StoreClient::connect(&url, opts(10_000)).unwrap());
                let g = Group::join(c, "job", world, None, Duration::from_secs(10)).unwrap();
                for _ in 0..3 {
                    g.barrier(Duration::from_secs(10)).unwrap();
                }
                let me = format!("rank-{}", g.rank()).into_bytes();
                let all = g.all_gather(&me, Duration::from_secs(10)).unwrap();
                let again = g
                    .all_gather(&[g.rank() as u8], Duration::from_secs(10))
                    .unwrap();
                (g.rank(), all, again)
            })
        })
        .collect();
    let mut ranks = Vec::new();
    for h in handles {
        let (rank, all, again) = h.join().unwrap();
        ranks.push(rank);
        assert_eq!(all.len(), world as usize);
        for (r, piece) in all.iter().enumerate() {
            assert_eq!(piece, format!("rank-{r}").as_bytes());
        }
        assert_eq!(again, (0..world).map(|r| vec![r as u8]).collect::<Vec<_>>());
    }
    ranks.sort();
    assert_eq!(ranks, (0..world).collect::<Vec<_>>());
    // Barrier keys of finished barriers were cleaned up, all_gather keys too.
    let c = client(&s);
    assert!(c.list("job/ag/").unwrap().is_empty());
    assert!(c.list("job/b/").unwrap().len() <= 4);
}

#[test]
fn group_rejects_bad_membership() {
    let s = server();
    let c = Arc::new(client(&s));
    let e = Group::join(c.clone(), "g", 0, None, Duration::from_secs(1))
        .err()
        .unwrap();
    assert_eq!(e.code(), -2000);
    let e = Group::join(c.clone(), "g", 2000, None, Duration::from_secs(1))
        .err()
        .unwrap();
    assert_eq!(e.code(), -2000);
    let e = Group::join(c.clone(), "g", 2, Some(5), Duration::from_secs(1))
        .err()
        .unwrap();
    assert_eq!(e.code(), -2000);
    // World sizes must agree.
    let one = Group::join(c.clone(), "solo", 1, Some(0), Duration::from_secs(1)).unwrap();
    assert_eq!(one.rank(), 0);
    let other = Arc::new(client(&s));
    let e = Group::join(other.clone(), "solo", 2, Some(1), Duration::from_secs(1))
        .err()
        .unwrap();
    assert_eq!(e.code(), -2000, "{e}");
    // A live rank cannot be claimed twice.
    let e = Group::join(other, "solo", 1, Some(0), Duration::from_secs(1))
        .err()
        .unwrap();
    assert_eq!(e.code(), -2006, "{e}");
    // A full auto-ranked group refuses more members.
    let g = Group::join(c.clone(), "full", 1, None, Duration::from_secs(1)).unwrap();
    assert_eq!(g.rank(), 0);
    let e = Group::join(
        Arc::new(client(&s)),
        "full",
        1,
        None,
        Duration::from_secs(1),
    )
    .err()
    .unwrap();
    assert_eq!(e.code(), -2002, "{e}");
}

#[test]
fn dead_member_fails_barrier_quickly() {
    let s = server();
    let url = s.url();
    let survivor_url = url.clone();
    let survivor = std::thread::spawn(move || {
        let c = Arc::new(StoreClient::connect(&survivor_url, opts(10_000)).unwrap());
        let g = Group::join(c, "d", 2, Some(0), Duration::from_secs(10)).unwrap();
        let t = Instant::now();
        let e = g.barrier(Duration::from_secs(30)).unwrap_err();
        (e, t.elapsed())
    });
    let c = Arc::new(StoreClient::connect(&url, opts(10_000)).unwrap());
    let g = Group::join(c, "d", 2, Some(1), Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(g); // the member's connection closes: its alive key goes
    let (e, took) = survivor.join().unwrap();
    assert_eq!(e.code(), -3001, "{e}");
    assert!(e.to_string().contains("barrier"), "{e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

mod tls {
    use super::*;
    use memfabric::store::tls::{material_from, KeyOverride, TlsInfo};

    struct Pki {
        dir: std::path::PathBuf,
    }

    fn pki(tag: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("mf-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Pki { dir }
    }

    impl Pki {
        fn info(&self) -> TlsInfo {
            let p = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
            TlsInfo {
                ca: p("ca.pem"),
                cert: p("cert.pem"),
                key: p("key.pem"),
                key_password: None,
            }
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn mutual_tls_accepts_members_and_refuses_others() {
        let job = pki("job");
        let m = material_from(&job.info(), None).unwrap();
        let s = StoreServer::start("127.0.0.1:0".parse().unwrap(), Some(m.server.clone())).unwrap();
        let good = StoreClient::connect(
            &s.url(),
            ClientOptions {
                timeout: Duration::from_secs(5),
                tls: Some(m.client.clone()),
                force_plaintext: false,
            },
        )
        .unwrap();
        good.set("k", b"v").unwrap();
        // A TLS store is reached over TCP only: no local socket beside it.
        assert_eq!(good.connection(), "tls");
        assert_eq!(good.get("k").unwrap().unwrap(), b"v");

        // Plaintext: the server never answers a store frame; the call fails, nothing is stored.
        let t = Instant::now();
        let plain = StoreClient::connect(&s.url(), opts(1500));
        let refused = match plain {
            Err(_) => true,
            Ok(c) => c.set("intruder", b"x").is_err(),
        };
        assert!(refused);
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(good.get("intruder").unwrap(), None);

        // A certificate from another CA is refused during the handshake.
        let other = pki("other");
        let om = material_from(&other.info(), None).unwrap();
        let e = StoreClient::connect(
            &s.url(),
            ClientOptions {
                timeout: Duration::from_millis(1500),
                tls: Some(om.client.clone()),
                force_plaintext: false,
            },
        )
        .err()
        .unwrap();
        assert!(matches!(e.code(), -3004 | -2014), "{e}");
    }

    #[test]
    fn key_override_accepts_pem_text_and_rejects_garbage() {
        let job = pki("override");
        let info = job.info();
        let pem = std::fs::read_to_string(&info.key).unwrap();
        let k = KeyOverride {
            key: pem,
            password: None,
        };
        assert!(material_from(
            &TlsInfo {
                key: String::new(),
                ..info.clone()
            },
            Some(&k)
        )
        .is_ok());
        let bad = KeyOverride {
            key: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
            password: None,
        };
        assert_eq!(
            material_from(&info, Some(&bad)).err().unwrap().code(),
            -3004
        );
    }
}

#[test]
fn same_host_clients_use_the_local_socket_and_keep_every_semantic() {
    let s = server();
    let a = client(&s);
    assert_eq!(a.connection(), "local socket");
    assert_eq!(a.local_ip(), Some("127.0.0.1".parse().unwrap()));
    // An ephemeral key of a local-socket session goes with it, seen by a TCP client.
    a.set_ephemeral("eph", b"1").unwrap();
    // The TCP listener still serves (clients of other hosts).
    drop(TcpStream::connect(s.local_addr()).unwrap());
    let b = client(&s);
    assert_eq!(b.get("eph").unwrap().as_deref(), Some(&b"1"[..]));
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get("eph").unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the ephemeral key outlived its session"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A server bound to the wildcard address is found through a local address too.
    let any = StoreServer::start("0.0.0.0:0".parse().unwrap(), None).unwrap();
    let url = format!("tcp://127.0.0.1:{}", any.local_addr().port());
    let c = StoreClient::connect(&url, opts(5000)).unwrap();
    assert_eq!(c.connection(), "local socket");
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k").unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn a_busy_local_client_moves_to_shared_memory_and_keeps_every_semantic() {
    let s = server();
    let a = client(&s);
    let b = client(&s);
    for i in 0..memfabric::store::shm_channel::CALLS_BEFORE_CHANNEL {
        assert_eq!(a.add("n", 1).unwrap(), i as i64 + 1);
    }
    assert_eq!(a.connection(), "shared memory");
    assert_eq!(b.connection(), "local socket");
    // Everything a channel serves, seen by a socket client and back.
    a.set("k", b"v").unwrap();
    assert_eq!(b.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    b.set("k", b"w").unwrap();
    assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"w"[..]));
    assert_eq!(a.compare_set("k", b"w", b"x").unwrap(), b"x");
    assert_eq!(a.compare_set("k", b"w", b"y").unwrap(), b"x");
    assert_eq!(a.append("k", b"z").unwrap(), 2);
    assert_eq!(
        a.exists(&["k".into(), "nope".into()]).unwrap(),
        vec![true, false]
    );
    a.multi_set(&[("m/1".into(), vec![1]), ("m/2".into(), vec![2])], false)
        .unwrap();
    assert_eq!(
        a.multi_get(&["m/1".into(), "m/2".into()], None).unwrap(),
        vec![vec![1], vec![2]]
    );
    assert_eq!(a.list("m/").unwrap(), vec!["m/1".to_string(), "m/2".into()]);
    assert!(a.delete("m/1").unwrap());
    assert_eq!(b.get("m/1").unwrap(), None);
    assert_eq!(a.add("k", 1).unwrap_err().code(), -2000);
    // Larger than a channel: over the socket, on the same session.
    let big = vec![5u8; 1 << 20];
    a.set("big", &big).unwrap();
    assert_eq!(a.get("big").unwrap().unwrap(), big);
    // A wait is served by the socket while another client writes.
    let writer = std::thread::spawn({
        let url = s.url();
        move || {
            std::thread::sleep(Duration::from_millis(50));
            let c = StoreClient::connect(&url, opts(5000)).unwrap();
            c.set("late", b"1").unwrap();
        }
    });
    assert_eq!(
        a.get_wait("late", Duration::from_secs(5)).unwrap(),
        b"1".to_vec()
    );
    writer.join().unwrap();
    // Ephemeral keys still belong to the session: gone when the client goes.
    a.set_ephemeral("eph", b"1").unwrap();
    assert_eq!(a.connection(), "shared memory");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get("eph").unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the ephemeral key outlived its session"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One `add` over a raw TCP connection (the path of a client on another host).
fn raw_tcp_add(sock: &mut TcpStream, key: &str) -> i64 {
    use memfabric::store::proto::{split_frame, Request, Response};
    let mut frame = Vec::new();
    Request::Add {
        key: key.into(),
        delta: 1,
    }
    .encode(&mut frame)
    .unwrap();
    sock.write_all(&frame).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        if let Some((kind, body, _)) = split_frame(&buf).unwrap() {
            match Response::decode(kind, body).unwrap() {
                Response::Int(v) => return v,
                r => panic!("unexpected answer {r:?}"),
            }
        }
        let n = sock.read(&mut chunk).unwrap();
        assert!(n > 0, "store closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn counters_stay_exact_with_channel_and_tcp_clients_racing() {
    let s = server();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let url = s.url();
            let addr = s.local_addr();
            std::thread::spawn(move || {
                if t % 2 == 0 {
                    let c = StoreClient::connect(&url, opts(10_000)).unwrap();
                    for _ in 0..2000 {
                        c.add("shared", 1).unwrap();
                    }
                    assert_eq!(c.connection(), "shared memory");
                } else {
                    let mut sock = TcpStream::connect(addr).unwrap();
                    for _ in 0..2000 {
                        raw_tcp_add(&mut sock, "shared");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let c = client(&s);
    assert_eq!(c.get("shared").unwrap().as_deref(), Some(&b"8000"[..]));
}

#[test]
fn a_client_on_shared_memory_learns_that_the_store_stopped() {
    let s = server();
    let c = StoreClient::connect(&s.url(), opts(1000)).unwrap();
    for _ in 0..memfabric::store::shm_channel::CALLS_BEFORE_CHANNEL + 1 {
        c.add("n", 1).unwrap();
    }
    assert_eq!(c.connection(), "shared memory");
    drop(s);
    let t = Instant::now();
    assert!(c.add("n", 1).is_err());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}
