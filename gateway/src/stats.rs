//! Counters bumped on the hot path by every worker thread at once.
//!
//! One shared atomic would bounce its cache line between cores on every
//! request; a [`ShardedCounter`] gives each thread its own padded slot and
//! sums them when read (a `STATUS=` line, a scrape), which is rare.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
}
