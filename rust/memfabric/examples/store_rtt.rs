//! Round-trip time of the config store from Rust (no Python): `cargo run --release --example store_rtt`.
use std::time::{Duration, Instant};

use memfabric::store::{ClientOptions, StoreClient, StoreServer};

fn main() {
    raw_tcp_rtt();
    let s = StoreServer::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let c = StoreClient::connect(&s.url(), ClientOptions::default()).unwrap();
    c.set("k", &[1u8; 64]).unwrap();
    for (name, f) in [
        (
            "ping",
            Box::new(|| {
                c.ping().unwrap();
            }) as Box<dyn Fn()>,
        ),
        (
            "add",
            Box::new(|| {
                c.add("n", 1).unwrap();
            }),
        ),
        ("get", Box::new(|| drop(c.get("k").unwrap()))),
        (
            "get_wait",
            Box::new(|| drop(c.get_wait("k", Duration::from_secs(30)).unwrap())),
        ),
    ] {
        let n = 20000;
        for _ in 0..1000 {
            f();
        }
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        let per = t.elapsed() / n;
        println!(
            "{name:>9}: {:>6.1} us/op  {:>8.0} ops/s",
            per.as_secs_f64() * 1e6,
            1.0 / per.as_secs_f64()
        );
    }
    let big = vec![7u8; 1 << 20];
    c.set("big", &big).unwrap();
    let t = Instant::now();
    for _ in 0..200 {
        c.get("big").unwrap();
    }
    let per = t.elapsed() / 200;
    println!(
        "  get 1MiB: {:>6.1} us/op  {:.2} GB/s",
        per.as_secs_f64() * 1e6,
        (1 << 20) as f64 / per.as_secs_f64() / 1e9
    );
    let t = Instant::now();
    for _ in 0..200 {
        c.set("big", &big).unwrap();
    }
    let per = t.elapsed() / 200;
    println!(
        "  set 1MiB: {:>6.1} us/op  {:.2} GB/s",
        per.as_secs_f64() * 1e6,
        (1 << 20) as f64 / per.as_secs_f64() / 1e9
    );
}

/// Physical floor: a blocking thread-per-connection echo of 16-byte messages.
#[allow(dead_code)]
fn raw_tcp_rtt() {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 16];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b).unwrap();
        }
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut b = [0u8; 16];
    let n = 20000;
    let t = Instant::now();
    for _ in 0..n {
        c.write_all(&b).unwrap();
        c.read_exact(&mut b).unwrap();
    }
    println!(
        "  raw tcp echo (thread per connection): {:.1} us/op",
        (t.elapsed() / n).as_secs_f64() * 1e6
    );
}
