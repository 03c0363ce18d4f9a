//! mf-store: a standalone config store.
//!
//! ```text
//! mf-store --listen tcp://0.0.0.0:8570 [--tls "ca=..;cert=..;key=.."] [--log-level 0..3]
//! ```
//! Prints `mf-store listening on tcp://ADDR` when ready; stops cleanly on SIGINT or SIGTERM.
//! `MF_CONFIG_STORE_URL` is the default for `--listen` (upstream's variable).

use std::process::ExitCode;

use memfabric::store::{tls, url::parse_store_url, StoreServer};

const USAGE: &str = "usage: mf-store [--listen tcp://IP:PORT] [--tls ca=PATH;cert=PATH;key=PATH] [--log-level 0..3]";

fn run() -> memfabric::Result<()> {
    let mut listen =
        std::env::var("MF_CONFIG_STORE_URL").unwrap_or_else(|_| "tcp://0.0.0.0:8570".into());
    let mut tls_info = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next().ok_or_else(|| {
                memfabric::Error::InvalidParam(format!("{name} needs a value\n{USAGE}"))
            })
        };
        match a.as_str() {
            "--listen" => listen = value("--listen")?,
            "--tls" => tls_info = Some(value("--tls")?),
            "--log-level" => {
                let v = value("--log-level")?;
                let l = v
                    .parse()
                    .map_err(|_| memfabric::Error::InvalidParam(format!("bad log level {v:?}")))?;
                memfabric::log::set_level(l)?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => {
                return Err(memfabric::Error::InvalidParam(format!(
                    "unknown argument {other:?}\n{USAGE}"
                )))
            }
        }
    }
    if let Some(info) = &tls_info {
        tls::set_tls(true, info)?;
    }
    let addr = parse_store_url(&listen, true)?;
    let server_tls = tls::current()?.map(|m| m.server.clone());
    let server = StoreServer::start(addr, server_tls)?;
    println!(
        "mf-store listening on {}{}",
        server.url(),
        if tls_info.is_some() {
            " (mutual TLS)"
        } else {
            ""
        }
    );
    let rt = memfabric::runtime::runtime()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| memfabric::Error::io("SIGTERM handler", e))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, memfabric::Error>(())
    })?;
    drop(server);
    println!("mf-store stopped");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mf-store: {e}");
            ExitCode::from(2)
        }
    }
}
