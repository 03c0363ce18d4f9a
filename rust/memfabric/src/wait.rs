//! Waiting with a deadline where there is nothing to block on.

use std::time::Duration;

use crate::error::{Error, Result};

/// Polls `done` until it reports completion or `timeout` passes: for waits that have no
/// deadline of their own (a driver's blocking synchronize) or nothing to block on (a counter
/// in memory shared with another process). Yields at first (what is awaited often ends within
/// microseconds), then sleeps in growing steps up to 1 ms.
pub(crate) fn poll_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut nap = Duration::from_micros(10);
    loop {
        if done()? {
            return Ok(());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Error::Timeout(format!(
                "{what}: still running after {timeout:?}"
            )));
        }
        if waited < Duration::from_micros(50) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(nap.min(timeout - waited));
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_until_has_a_deadline() {
        let e = poll_until(Duration::from_millis(20), "x", || Ok(false)).unwrap_err();
        assert_eq!(e.code(), -2004);
        let mut n = 0;
        poll_until(Duration::from_secs(5), "x", || {
            n += 1;
            Ok(n > 3)
        })
        .unwrap();
        let e = poll_until(Duration::from_secs(5), "x", || {
            Err(Error::Failed("boom".into()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("boom"));
    }
}
