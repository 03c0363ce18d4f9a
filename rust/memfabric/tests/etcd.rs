//! The config store on a real etcd (one member on a loopback port). Built with the `etcd`
//! feature (`cargo test -p memfabric --features etcd --test etcd`); each test passes without
//! doing anything where no etcd binary is installed (Debian's etcd-server), saying so.
#![cfg(feature = "etcd")]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memfabric::store::{ClientOptions, Group, StoreClient};

struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("MF_ETCD_BIN")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/etcd")))
        .filter(|p| p.exists())
}

impl Etcd {
    fn start() -> Option<Etcd> {
        let Some(bin) = etcd_binary() else {
            eprintln!("no etcd binary (install etcd-server or set MF_ETCD_BIN): test skipped");
            return None;
        };
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("mf-etcd-rs-{}-{}", std::process::id(), free_port()));
        let mut e = Etcd {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        e.spawn(&bin);
        Some(e)
    }

    fn spawn(&mut self, bin: &PathBuf) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(bin)
            .args(["--name", "m0", "--data-dir"])
            .arg(self.dir.join("m0"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("m0={peer}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
    }

    fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.client_port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect(url: &str, timeout: Duration) -> StoreClient {
    StoreClient::connect(
        url,
        ClientOptions {
            timeout,
            force_plaintext: true,
            ..Default::default()
        },
    )
    .expect("client connects")
}

#[test]
fn operations_leases_groups_and_an_outage() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let url = etcd.url("rs/ops");
    // The member needs a moment to elect itself: connect waits for that within its timeout.
    let c = connect(&url, Duration::from_secs(20));
    c.set("a", b"1").unwrap();
    assert_eq!(c.get("a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(c.get("missing").unwrap(), None);
    assert_eq!(c.add("n", 5).unwrap(), 5);
    assert_eq!(c.add("n", -2).unwrap(), 3);
    c.set("text", b"abc").unwrap();
    assert_eq!(c.add("text", 1).unwrap_err().code(), -2000);
    assert_eq!(c.compare_set("cas", b"", b"x").unwrap(), b"x");
    assert_eq!(c.compare_set("cas", b"wrong", b"y").unwrap(), b"x");
    assert_eq!(c.compare_set("cas", b"x", b"y").unwrap(), b"y");
    assert_eq!(c.append("log", b"ab").unwrap(), 2);
    assert_eq!(c.append("log", b"c").unwrap(), 3);
    let keys: Vec<String> = (0..300).map(|i| format!("m/{i:03}")).collect();
    let entries: Vec<(String, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.clone(), k.as_bytes().to_vec()))
        .collect();
    c.multi_set(&entries, false).unwrap(); // more keys than one transaction takes
    let values = c.multi_get(&keys, None).unwrap();
    assert!(values.iter().zip(&keys).all(|(v, k)| v == k.as_bytes()));
    assert_eq!(c.list("m/").unwrap(), keys);
    assert_eq!(
        c.exists(&["a".into(), "zz".into()]).unwrap(),
        vec![true, false]
    );
    assert!(c.delete("a").unwrap() && !c.delete("a").unwrap());
    assert_eq!(
        c.get_wait("never", Duration::from_millis(200))
            .unwrap_err()
            .code(),
        -2004
    );

    // A waiter wakes when another client sets the key.
    let c = Arc::new(c);
    let setter = {
        let url = url.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            connect(&url, Duration::from_secs(5))
                .set("late", b"v")
                .unwrap();
        })
    };
    assert_eq!(c.get_wait("late", Duration::from_secs(10)).unwrap(), b"v");
    setter.join().unwrap();

    // Ephemeral keys go with their client.
    let other = connect(&url, Duration::from_secs(5));
    other.set_ephemeral("eph", b"1").unwrap();
    assert!(c.exists(&["eph".into()]).unwrap()[0]);
    drop(other);
    assert!(!c.exists(&["eph".into()]).unwrap()[0]);

    // A group of three ranks on threads: rendezvous, barrier, all_gather.
    let ranks: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let cl = Arc::new(connect(&url, Duration::from_secs(20)));
                let g = Group::join(cl, "g", 3, None, Duration::from_secs(20)).unwrap();
                g.barrier(Duration::from_secs(20)).unwrap();
                let all = g
                    .all_gather(&[g.rank() as u8], Duration::from_secs(20))
                    .unwrap();
                assert_eq!(all, vec![vec![0u8], vec![1], vec![2]]);
                g.leave().unwrap();
            })
        })
        .collect();
    for r in ranks {
        r.join().unwrap();
    }

    // With etcd down, calls fail within their deadline, then work again once it is back.
    let short = connect(&url, Duration::from_secs(2));
    etcd.kill();
    let t = Instant::now();
    let e = short.set("down", b"1").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(e.code(), -2004, "{e}");
    let bin = etcd_binary().unwrap();
    etcd.spawn(&bin);
    let t = Instant::now();
    loop {
        match short.set("up", b"1") {
            Ok(()) => break,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(20), "{e}"),
        }
    }
    assert_eq!(short.get("n").unwrap().as_deref(), Some(&b"3"[..]));
}
