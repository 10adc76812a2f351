//! Waiting for something that happens in time: a log line, a listener, a
//! reload, a count. Every such wait in the tests goes through
//! [`eventually`] (or, off the async runtime, [`eventually_blocking`]), so
//! that each has a deadline and says, when it passes, what it awaited and
//! what it saw last.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How long a probe rests before asking again.
const BETWEEN_PROBES: Duration = Duration::from_millis(20);

/// Asks `probe` until it answers `Ok`, for at most `timeout`; its value.
/// An `Err` carries what the probe saw, which the panic at the deadline
/// shows beside `what` (what was awaited).
pub async fn eventually<T, Seen: Debug>(
    what: &str,
    timeout: Duration,
    probe: impl AsyncFnMut() -> Result<T, Seen>,
) -> T {
    within(timeout, probe)
        .await
        .unwrap_or_else(|seen| gave_up(what, timeout, seen))
}

/// [`eventually`] for a plain thread (one that may not await, such as a
/// blocking wait for a child process).
pub fn eventually_blocking<T, Seen: Debug>(
    what: &str,
    timeout: Duration,
    probe: impl FnMut() -> Result<T, Seen>,
) -> T {
    within_blocking(timeout, probe).unwrap_or_else(|seen| gave_up(what, timeout, seen))
}

/// Asks `probe` until it answers `Ok`, for at most `timeout`: its value,
/// or what it saw last. For a test to which the timeout is an answer too.
pub async fn within<T, Seen>(
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, Seen>,
) -> Result<T, Seen> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = probe().await;
        if seen.is_ok() || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(BETWEEN_PROBES).await;
    }
}

/// [`within`] for a plain thread.
pub fn within_blocking<T, Seen>(
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, Seen>,
) -> Result<T, Seen> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = probe();
        if seen.is_ok() || Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(BETWEEN_PROBES);
    }
}

/// What a probe saw, shown as it is when the wait gives up: a log's lines
/// on lines of their own, not one escaped string.
pub struct Text(pub String);

impl Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `Ok(())` once `seen` has reached `wanted`, else `Err(seen)`: the probe
/// for a count that only grows.
pub fn at_least<N: PartialOrd + Debug>(seen: N, wanted: N) -> Result<(), N> {
    if seen >= wanted { Ok(()) } else { Err(seen) }
}

fn gave_up(what: &str, timeout: Duration, seen: impl Debug) -> ! {
    panic!("awaited {what} for {timeout:?} in vain; the last probe saw: {seen:?}")
}
