//! The mf-store binary: prints its address when ready, serves, stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use memfabric::store::{ClientOptions, StoreClient};

#[test]
fn serves_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mf-store"))
        .args(["--listen", "tcp://127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mf-store starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first
        .strip_prefix("mf-store listening on ")
        .expect(&first)
        .trim()
        .to_string();
    let c = StoreClient::connect(
        &url,
        ClientOptions {
            timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k").unwrap().unwrap(), b"v");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap();
    assert!(code.success(), "{code:?}");
    assert_eq!(lines.next().unwrap().unwrap(), "mf-store stopped");
}

#[test]
fn bad_arguments_exit_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_mf-store"))
        .args(["--listen", "tcp://nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("store url"));
    let out = Command::new(env!("CARGO_BIN_EXE_mf-store"))
        .args(["--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
