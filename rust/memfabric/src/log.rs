//! Level-filtered logging to stderr or to one external sink.
//!
//! Levels follow the seed: 0 debug, 1 info, 2 warn (default), 3 error. The level is read once
//! from `MF_LOG_LEVEL` (upstream's name) or `MEMFABRIC_LOG_LEVEL`. Messages below the level are
//! never formatted: callers use the `mf_log!` macro, which checks `enabled` first.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Once, RwLock};

use crate::error::{Error, Result};

pub const DEBUG: u8 = 0;
pub const INFO: u8 = 1;
pub const WARN: u8 = 2;
pub const ERROR: u8 = 3;

/// A sink receives (level, message). It must not panic; the binding layer catches Python errors.
pub type Sink = std::sync::Arc<dyn Fn(u8, &str) + Send + Sync>;

static LEVEL: AtomicU8 = AtomicU8::new(WARN);
static ENV_ONCE: Once = Once::new();
// A RwLock because messages are frequent and sink changes are rare.
static SINK: RwLock<Option<Sink>> = RwLock::new(None);

fn init_from_env() {
    ENV_ONCE.call_once(|| {
        for var in ["MF_LOG_LEVEL", "MEMFABRIC_LOG_LEVEL"] {
            if let Ok(v) = std::env::var(var) {
                match v.trim().parse::<u8>() {
                    Ok(l) if l <= ERROR => LEVEL.store(l, Ordering::Relaxed),
                    _ => eprintln!("[memfabric WARN] ignoring {var}={v:?}: expected 0..3"),
                }
            }
        }
    });
}

/// Sets the minimum level that is emitted (0..=3).
pub fn set_level(level: i64) -> Result<()> {
    init_from_env();
    if !(0..=ERROR as i64).contains(&level) {
        return Err(Error::InvalidParam(format!(
            "log level {level} is out of range: 0 debug, 1 info, 2 warn, 3 error"
        )));
    }
    LEVEL.store(level as u8, Ordering::Relaxed);
    Ok(())
}

/// The current minimum level.
pub fn level() -> u8 {
    init_from_env();
    LEVEL.load(Ordering::Relaxed)
}

/// Whether a message at `level` would be emitted.
#[inline]
pub fn enabled(level: u8) -> bool {
    level >= self::level()
}

/// Routes messages to `sink` (None: back to stderr).
pub fn set_sink(sink: Option<Sink>) {
    let mut guard = SINK.write().unwrap_or_else(|p| p.into_inner());
    *guard = sink;
}

/// Emits `msg` at `level` if enabled.
pub fn emit(level: u8, msg: &str) {
    if !enabled(level) {
        return;
    }
    // Clone the sink out of the lock: a sink may log or replace the sink itself.
    let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
    match sink {
        Some(sink) => sink(level, msg),
        None => {
            let name = ["DEBUG", "INFO", "WARN", "ERROR"][level.min(ERROR) as usize];
            eprintln!("[memfabric {name}] {msg}");
        }
    }
}

pub fn debug(msg: &str) {
    emit(DEBUG, msg)
}
pub fn info(msg: &str) {
    emit(INFO, msg)
}
pub fn warn(msg: &str) {
    emit(WARN, msg)
}
pub fn error(msg: &str) {
    emit(ERROR, msg)
}

/// `mf_log!(level, "fmt", args..)`: formats only when the level is enabled.
#[macro_export]
macro_rules! mf_log {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::enabled($lvl) {
            $crate::log::emit($lvl, &format!($($arg)*));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn sink_gets_messages_at_or_above_level() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        set_sink(Some(Arc::new(move |l, m| {
            g.lock().unwrap().push((l, m.to_string()))
        })));
        set_level(INFO as i64).unwrap();
        debug("hidden");
        info("shown");
        error("also");
        assert!(set_level(4).is_err());
        assert!(set_level(-1).is_err());
        set_sink(None);
        set_level(WARN as i64).unwrap();
        let got = got.lock().unwrap();
        let msgs: Vec<_> = got.iter().filter(|(_, m)| m != "hidden").collect();
        assert!(got.iter().all(|(_, m)| m != "hidden"));
        assert!(msgs.iter().any(|(l, m)| *l == INFO && m == "shown"));
        assert!(msgs.iter().any(|(l, m)| *l == ERROR && m == "also"));
    }
}
