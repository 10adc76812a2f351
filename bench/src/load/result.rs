//! What a run measured: counts, the latency histogram, the first error,
//! and how each connection's results add up.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::Clock;

/// What one run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Answers completed inside the measured window.
    pub requests: u64,
    /// Of those, answers that were not 200, and failed connections.
    pub errors: u64,
    /// Every 200 seen, warm-up and drain included: what the counter's
    /// tally must have grown by.
    pub ok_total: u64,
    /// Every answer that was not 200 and every request whose outcome was
    /// lost (connection failed with it in flight), warm-up included.
    pub failed_total: u64,
    /// Latencies in microseconds of the answers in the window.
    pub latency: Histogram<u64>,
    pub window: Duration,
    /// Why the first connection or exchange that failed did, so that a
    /// row of errors says what went wrong (a refused connect, a
    /// certificate the client does not trust).
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }

    pub(super) fn merge(&mut self, other: LoadResult) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.ok_total += other.ok_total;
        self.failed_total += other.failed_total;
        let _ = self.latency.add(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 100 s at 3 significant figures.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant bounds are valid")
}

pub(super) fn empty_result(window: Duration) -> LoadResult {
    LoadResult {
        requests: 0,
        errors: 0,
        ok_total: 0,
        failed_total: 0,
        latency: new_histogram(),
        window,
        first_error: None,
    }
}

pub(super) fn note_error(result: &mut LoadResult, error: &std::io::Error) {
    if result.first_error.is_none() {
        result.first_error = Some(error.to_string());
    }
}

pub(super) fn count_error(result: &mut LoadResult, clock: &Clock, at: Instant) {
    if at >= clock.window_start && at < clock.stop {
        result.requests += 1;
        result.errors += 1;
    }
}
