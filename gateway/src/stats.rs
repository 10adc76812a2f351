//! Counters and histograms bumped on the hot path by every worker thread
//! at once.
//!
//! One shared atomic would bounce its cache line between cores on every
//! request; a [`ShardedCounter`] gives each thread its own padded slot, and
//! a [`ShardedHistogram`] its own set of buckets, summed when read (a
//! `STATUS=` line, a scrape), which is rare.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Slots per counter: threads beyond this share slots (still correct).
pub const SHARDS: usize = 64;

/// A slot on its own cache line (128 bytes covers adjacent-line prefetch).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot(AtomicU64);

/// A counter that many threads increment and few read.
#[derive(Debug)]
pub struct ShardedCounter {
    slots: [Slot; SHARDS],
}

impl Default for ShardedCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// This thread's slot index.
pub fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

impl ShardedCounter {
    pub fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }

    pub fn add(&self, n: u64) {
        self.slots[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn increment(&self) {
        self.add(1);
    }

    /// The sum over all threads.
    pub fn get(&self) -> u64 {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// Histogram bucket upper bounds, in seconds (and `+Inf` after them).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with one set of buckets per thread.
#[derive(Debug)]
pub struct ShardedHistogram {
    bounds_ns: [u64; BUCKETS.len()],
    shards: Box<[HistogramShard]>,
}

#[repr(align(128))]
#[derive(Debug, Default)]
struct HistogramShard {
    /// One count per bucket, the last for `+Inf`.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for ShardedHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardedHistogram {
    pub fn new() -> Self {
        Self {
            bounds_ns: BUCKETS.map(|s| (s * 1e9) as u64),
            shards: (0..SHARDS).map(|_| HistogramShard::default()).collect(),
        }
    }

    pub fn observe(&self, duration: Duration) {
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self
            .bounds_ns
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKETS.len());
        let shard = &self.shards[shard()];
        shard.counts[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative), their total, and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .chain([&f64::INFINITY])
            .map(|&b| (b, 0))
            .collect();
        let mut sum_ns = 0u64;
        for shard in self.shards.iter() {
            for (bucket, count) in buckets.iter_mut().zip(&shard.counts) {
                bucket.1 += count.load(Ordering::Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (buckets, count, sum_ns as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_threads() {
        let counter = std::sync::Arc::new(ShardedCounter::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.increment();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(counter.get(), 8000);
    }

    #[test]
    fn histogram_sums_across_threads_into_buckets() {
        let histogram = std::sync::Arc::new(ShardedHistogram::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = histogram.clone();
                std::thread::spawn(move || {
                    h.observe(Duration::from_micros(300)); // ≤ 0.0005
                    h.observe(Duration::from_millis(20)); // ≤ 0.025
                    h.observe(Duration::from_secs(60)); // +Inf
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (buckets, count, sum) = histogram.snapshot();
        assert_eq!(count, 12);
        assert_eq!(buckets[0], (0.0005, 4));
        assert_eq!(buckets[5], (0.025, 4));
        assert_eq!(buckets[14], (f64::INFINITY, 4));
        assert!((sum - 4.0 * 60.0203).abs() < 1e-6, "{sum}");
    }
}
