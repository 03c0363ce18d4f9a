//! mf-bench: benchmarks of the memfabric core, without Python in the way.
//!
//! ```text
//! mf-bench te [--seconds 1] [--sizes 4096,65536,...] [--batches 1,256,4096]
//!             [--max-batch-bytes 16777216] [--paths local,same-host] [--json FILE]
//! ```
//!
//! `te` sweeps the Transfer Engine's sync write and read over block size, batch size and path,
//! and prints p50/p99 latency and GB/s beside single-thread memcpy of the same block:
//! - `local`: initiator and target are two engines in this process (the local path, memcpy);
//! - `same-host`: the target is this binary re-executed with the hidden `--target` argument,
//!   so the engine picks its same-host path (cma, or whatever `MF_TRANSPORT` forces).
//!
//! A batch of B descriptors of N bytes is one call whose peer addresses are a shuffled
//! permutation of the target's slots, so nothing can be coalesced. Latency is per call; GB/s is
//! bytes per call over the mean call time. Data is verified (written, read back, compared)
//! before each path's sweep. It also times `register` of 1 GiB. Mooncake and the cross-host
//! path are measured by `python -m memfabric_hybrid.bench te`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use memfabric::store::StoreServer;
use memfabric::trans::{Direction, EngineConfig, Role, TransferEngine, DEFAULT_TRANSFER_TIMEOUT};
use memfabric::transport::Op;
use memfabric::{Error, Result};

const USAGE: &str = "usage: mf-bench te [--seconds S] [--sizes N,..] [--batches B,..] \
[--max-batch-bytes N] [--paths local,same-host] [--json FILE]";
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The issue's "batch of 256 x 16 KiB" cell, always measured.
const GOAL_BATCH: (u64, u64) = (16 * KIB, 256);

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidParam(msg.into())
}

struct Args {
    seconds: f64,
    sizes: Vec<u64>,
    batches: Vec<u64>,
    max_batch_bytes: u64,
    paths: Vec<String>,
    json: Option<String>,
}

fn parse_list(name: &str, v: &str) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = v
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(format!("{name}: {s:?} is not a positive integer")))
        })
        .collect::<Result<_>>()?;
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(bad(format!("{name} is empty")));
    }
    Ok(out)
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        seconds: 1.0,
        sizes: vec![4 * KIB, 64 * KIB, MIB, 16 * MIB, 64 * MIB],
        batches: vec![1, 256, 4096],
        max_batch_bytes: 16 * MIB,
        paths: vec!["local".into(), "same-host".into()],
        json: None,
    };
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| bad(format!("{arg} needs a value\n{USAGE}")))
        };
        match arg.as_str() {
            "--seconds" => {
                let v = value()?;
                a.seconds = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| bad(format!("--seconds {v:?}")))?;
            }
            "--sizes" => a.sizes = parse_list("--sizes", &value()?)?,
            "--batches" => a.batches = parse_list("--batches", &value()?)?,
            "--max-batch-bytes" => {
                let v = value()?;
                a.max_batch_bytes = v
                    .parse()
                    .map_err(|_| bad(format!("--max-batch-bytes {v:?}")))?;
            }
            "--paths" => {
                a.paths = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                if let Some(p) = a.paths.iter().find(|p| *p != "local" && *p != "same-host") {
                    return Err(bad(format!("unknown path {p:?}; known: local, same-host")));
                }
            }
            "--json" => a.json = Some(value()?),
            other => return Err(bad(format!("unknown argument {other:?}\n{USAGE}"))),
        }
    }
    Ok(a)
}

// ---- buffers and engines --------------------------------------------------------------------

/// A heap buffer whose pages are touched, so no page fault lands inside a measurement.
struct Buffer(Vec<u8>);

impl Buffer {
    fn new(len: u64, fill: u8) -> Buffer {
        Buffer(vec![fill; len as usize])
    }

    fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

fn start_engine(store_url: &str, role: Role) -> Result<TransferEngine> {
    TransferEngine::start(EngineConfig {
        store_url: store_url.to_string(),
        session_id: "127.0.0.1:0".into(),
        role,
        device_id: 0,
        store_server_role: None,
        transfer_timeout: DEFAULT_TRANSFER_TIMEOUT,
        store_timeout: Duration::from_secs(30),
        reserved_listener: None,
    })
}

/// The hidden `--target STORE_URL SIZE` mode: registers SIZE bytes, prints
/// `ready SESSION ADDR`, and serves until its stdin closes.
fn run_target(store_url: &str, size: &str) -> Result<()> {
    let size: u64 = size
        .parse()
        .map_err(|_| bad(format!("--target size {size:?}")))?;
    let engine = start_engine(store_url, Role::Decode)?;
    let buf = Buffer::new(size, 0x5a);
    engine.register(buf.addr(), size)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {} {}", engine.session_id(), buf.addr())
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("target stdout", e))?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(engine);
    drop(buf);
    Ok(())
}

/// A target in another process; killed when dropped if it has not exited.
struct TargetProcess {
    child: Child,
    session: String,
    addr: u64,
}

impl TargetProcess {
    fn spawn(store_url: &str, size: u64) -> Result<TargetProcess> {
        let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
        let mut child = Command::new(exe)
            .args(["--target", store_url, &size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("spawn the target process", e))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let mut fields = line.split_whitespace();
        match (read, fields.next(), fields.next(), fields.next()) {
            (Ok(_), Some("ready"), Some(session), Some(addr)) => {
                let addr = addr
                    .parse()
                    .map_err(|_| Error::Failed(format!("target said {line:?}")))?;
                Ok(TargetProcess {
                    session: session.to_string(),
                    addr,
                    child,
                })
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(Error::Failed(format!(
                    "the target process did not start (it said {line:?})"
                )))
            }
        }
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // EOF: the target stops
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- measuring ------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    gbps: f64,
    calls: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q / 100.0 * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1);
    sorted[i]
}

/// Calls `f` for a short warm-up, then until `seconds` passed and at least 3 calls were made.
fn time_calls(seconds: f64, bytes: u64, mut f: impl FnMut() -> Result<()>) -> Result<Figures> {
    let warm_end = Instant::now() + Duration::from_secs_f64((seconds / 5.0).min(0.2));
    let mut n = 0;
    while n < 2 || Instant::now() < warm_end {
        f()?;
        n += 1;
    }
    let mut lat = Vec::with_capacity(1 << 16);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    loop {
        let t0 = Instant::now();
        f()?;
        let t1 = Instant::now();
        lat.push((t1 - t0).as_secs_f64());
        if t1 >= end && lat.len() >= 3 {
            break;
        }
    }
    lat.sort_by(f64::total_cmp);
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    Ok(Figures {
        p50_us: percentile(&lat, 50.0) * 1e6,
        p99_us: percentile(&lat, 99.0) * 1e6,
        gbps: bytes as f64 / mean / 1e9,
        calls: lat.len(),
    })
}

/// A permutation of 0..n from a fixed seed (xorshift; no dependency needed).
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes, reads back and compares 1 MiB and a scattered batch of 256 x 16 KiB.
fn verify(e: &TransferEngine, dest: &str, buf: &mut Buffer, peer: u64) -> Result<()> {
    let n = MIB as usize;
    let base = buf.addr();
    let data = pattern(n, 1);
    buf.0[..n].copy_from_slice(&data);
    e.transfer(dest, Direction::Write, base, peer, n as u64)?;
    buf.0[n..2 * n].fill(0);
    e.transfer(dest, Direction::Read, base + n as u64, peer, n as u64)?;
    if buf.0[n..2 * n] != data[..] {
        return Err(Error::Failed(
            "1 MiB read back differs from what was written".into(),
        ));
    }
    let (block, count) = GOAL_BATCH;
    let total = (block * count) as usize;
    let data = pattern(total, 3);
    buf.0[..total].copy_from_slice(&data);
    let order = shuffled(count, 2);
    let ops = |local: u64| -> Vec<Op> {
        (0..count)
            .map(|i| Op::new(local + i * block, peer + order[i as usize] * block, block))
            .collect()
    };
    e.transfer_batch(dest, Direction::Write, ops(base))?;
    buf.0[total..2 * total].fill(0);
    e.transfer_batch(dest, Direction::Read, ops(base + total as u64))?;
    if buf.0[total..2 * total] != data[..] {
        return Err(Error::Failed(
            "scattered batch read back differs from what was written".into(),
        ));
    }
    Ok(())
}

struct Cell {
    path: String,
    transport: String,
    op: &'static str,
    size: u64,
    batch: u64,
    result: std::result::Result<Figures, String>,
}

#[allow(clippy::too_many_arguments)]
fn sweep(
    path: &str,
    e: &TransferEngine,
    dest: &str,
    buf: &mut Buffer,
    peer: u64,
    cells: &[(u64, u64)],
    seconds: f64,
    out: &mut Vec<Cell>,
) -> Result<()> {
    let transport = e.transport_for(dest)?.to_string();
    verify(e, dest, buf, peer)
        .map_err(|err| Error::Failed(format!("{path}: data verification failed: {err}")))?;
    let base = buf.addr();
    for &(size, batch) in cells {
        let order = shuffled(batch, size * batch);
        let ops: Vec<Op> = (0..batch)
            .map(|i| Op::new(base + i * size, peer + order[i as usize] * size, size))
            .collect();
        for (op, dir) in [("write", Direction::Write), ("read", Direction::Read)] {
            let result = if batch == 1 {
                time_calls(seconds, size, || e.transfer(dest, dir, base, peer, size))
            } else {
                time_calls(seconds, size * batch, || {
                    e.transfer_batch(dest, dir, ops.clone())
                })
            };
            out.push(Cell {
                path: path.to_string(),
                transport: transport.clone(),
                op,
                size,
                batch,
                result: result.map_err(|err| format!("{} ({})", err, err.code())),
            });
        }
        eprintln!("  measured {path} {} x{batch}", human(size));
    }
    Ok(())
}

fn memcpy_limits(sizes: &[u64], seconds: f64) -> Vec<(u64, Figures)> {
    // At least 64 MiB each, so both come from mmap, as the engines' buffers do: two small heap
    // blocks a few bytes apart make memcpy measure an aliasing stall rather than copying.
    let n = sizes.iter().copied().max().unwrap_or(MIB).max(64 * MIB);
    let src = Buffer::new(n, 1);
    let mut dst = Buffer::new(n, 2);
    sizes
        .iter()
        .map(|&size| {
            let s = size as usize;
            let f = time_calls(seconds, size, || {
                dst.0[..s].copy_from_slice(&src.0[..s]);
                std::hint::black_box(&mut dst.0);
                Ok(())
            })
            .unwrap_or_default();
            (size, f)
        })
        .collect()
}

/// Times `register` of 1 GiB of touched memory (unregistered in between): (min, median) ms.
fn register_1g(e: &TransferEngine) -> Result<(f64, f64)> {
    let buf = Buffer::new(GIB, 1);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        e.register(buf.addr(), GIB)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        e.unregister(buf.addr())?;
    }
    times.sort_by(f64::total_cmp);
    Ok((times[0], times[times.len() / 2]))
}

// ---- report ---------------------------------------------------------------------------------

fn human(n: u64) -> String {
    for (unit, size) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut s = line(headers.to_vec());
    s.push('\n');
    let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    s += &line(dashes.iter().map(String::as_str).collect());
    for r in rows {
        s.push('\n');
        s += &line(r.iter().map(String::as_str).collect());
    }
    s
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn figures_json(f: &Figures) -> String {
    format!(
        "\"p50_us\": {}, \"p99_us\": {}, \"gbps\": {}, \"calls\": {}",
        json_num(f.p50_us),
        json_num(f.p99_us),
        json_num(f.gbps),
        f.calls
    )
}

fn to_json(
    a: &Args,
    cells: &[Cell],
    memcpy: &[(u64, Figures)],
    reg: &std::result::Result<(f64, f64), String>,
    errors: &[String],
) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"seconds\": {},", json_num(a.seconds));
    s += "  \"cells\": [\n";
    for (i, c) in cells.iter().enumerate() {
        let body = match &c.result {
            Ok(f) => figures_json(f),
            Err(e) => format!("\"error\": {}", json_str(e)),
        };
        let _ = write!(
            s,
            "    {{\"path\": {}, \"transport\": {}, \"op\": \"{}\", \"size\": {}, \"batch\": {}, {body}}}",
            json_str(&c.path),
            json_str(&c.transport),
            c.op,
            c.size,
            c.batch
        );
        s += if i + 1 < cells.len() { ",\n" } else { "\n" };
    }
    s += "  ],\n  \"memcpy\": [\n";
    for (i, (size, f)) in memcpy.iter().enumerate() {
        let _ = write!(s, "    {{\"size\": {size}, {}}}", figures_json(f));
        s += if i + 1 < memcpy.len() { ",\n" } else { "\n" };
    }
    s += "  ],\n";
    match reg {
        Ok((min, med)) => {
            let _ = writeln!(
                s,
                "  \"register_1g\": {{\"min_ms\": {}, \"median_ms\": {}}},",
                json_num(*min),
                json_num(*med)
            );
        }
        Err(e) => {
            let _ = writeln!(s, "  \"register_1g\": {{\"error\": {}}},", json_str(e));
        }
    }
    let errs: Vec<String> = errors.iter().map(|e| json_str(e)).collect();
    let _ = writeln!(s, "  \"errors\": [{}]", errs.join(", "));
    s += "}\n";
    s
}

fn run_te(a: Args) -> Result<bool> {
    let mut cells: Vec<(u64, u64)> = a
        .sizes
        .iter()
        .flat_map(|&s| a.batches.iter().map(move |&b| (s, b)))
        .filter(|&(s, b)| b == 1 || s * b <= a.max_batch_bytes)
        .collect();
    if !cells.contains(&GOAL_BATCH) {
        cells.push(GOAL_BATCH);
    }
    cells.sort_unstable();
    let region = cells
        .iter()
        .map(|&(s, b)| s * b)
        .max()
        .unwrap_or(0)
        .max(2 * GOAL_BATCH.0 * GOAL_BATCH.1)
        .max(2 * MIB);

    let server = StoreServer::start("127.0.0.1:0".parse().expect("a socket address"), None)?;
    let url = server.url();
    let initiator = start_engine(&url, Role::Prefill)?;
    let mut buf = Buffer::new(region, 0xa5);
    initiator.register(buf.addr(), region)?;

    let memcpy = memcpy_limits(&a.sizes, a.seconds);
    eprintln!("  measured memcpy");
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for path in &a.paths {
        let res = if path == "local" {
            start_engine(&url, Role::Decode).and_then(|target| {
                let tbuf = Buffer::new(region, 0x5a);
                target.register(tbuf.addr(), region)?;
                let r = sweep(
                    path,
                    &initiator,
                    target.session_id(),
                    &mut buf,
                    tbuf.addr(),
                    &cells,
                    a.seconds,
                    &mut out,
                );
                drop(target);
                r
            })
        } else {
            TargetProcess::spawn(&url, region).and_then(|t| {
                sweep(
                    path, &initiator, &t.session, &mut buf, t.addr, &cells, a.seconds, &mut out,
                )
            })
        };
        if let Err(e) = res {
            errors.push(format!("{path}: {e}"));
        }
    }
    let reg = register_1g(&initiator).map_err(|e| e.to_string());

    let memcpy_of = |size: u64| {
        memcpy
            .iter()
            .find(|(s, _)| *s == size)
            .map(|(_, f)| f.gbps)
            .unwrap_or(f64::NAN)
    };
    let rows: Vec<Vec<String>> = out
        .iter()
        .map(|c| {
            let (p50, p99, gbps, err) = match &c.result {
                Ok(f) => (f.p50_us, f.p99_us, f.gbps, String::new()),
                Err(e) => (f64::NAN, f64::NAN, f64::NAN, e.clone()),
            };
            let mc = if c.batch == 1 {
                memcpy_of(c.size)
            } else {
                f64::NAN
            };
            vec![
                c.path.clone(),
                c.transport.clone(),
                c.op.to_string(),
                human(c.size),
                c.batch.to_string(),
                num(p50),
                num(p99),
                num(gbps),
                num(mc),
                num(gbps / mc),
                err,
            ]
        })
        .collect();
    println!();
    println!(
        "{}",
        table(
            &[
                "path",
                "transport",
                "op",
                "block",
                "batch",
                "p50 us",
                "p99 us",
                "GB/s",
                "memcpy GB/s",
                "vs memcpy",
                "error",
            ],
            &rows
        )
    );
    match &reg {
        Ok((min, med)) => println!("\nregister 1 GiB: min {min:.3} ms, median {med:.3} ms"),
        Err(e) => println!("\nregister 1 GiB failed: {e}"),
    }
    for e in &errors {
        println!("error: {e}");
    }
    if let Some(path) = &a.json {
        std::fs::write(path, to_json(&a, &out, &memcpy, &reg, &errors))
            .map_err(|e| Error::io("write the --json file", e))?;
        println!("figures written to {path}");
    }
    drop(initiator);
    drop(server);
    Ok(errors.is_empty() && out.iter().all(|c| c.result.is_ok()) && reg.is_ok())
}

fn run() -> Result<bool> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("te") => run_te(parse_args(args)?),
        Some("--target") => {
            let (url, size) = (args.next(), args.next());
            match (url, size) {
                (Some(url), Some(size)) => run_target(&url, &size).map(|_| true),
                _ => Err(bad("--target needs STORE_URL SIZE")),
            }
        }
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(true)
        }
        _ => Err(bad(USAGE)),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mf-bench: {e}");
            ExitCode::from(2)
        }
    }
}
