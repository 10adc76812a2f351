//! What the upstream client records, per POST, for `/metrics`: read there
//! (the `gateway_upstream_*` families) when it is scraped.

use std::time::Duration;

use crate::outcome::Outcome;
use crate::stats::{ShardedCounter, ShardedHistogram};

/// What the upstream client records, per POST: a POST's outcome, how long
/// it took, and how many visits it carried (one, unless batching is on),
/// so that visits over POSTs is the batching factor.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    posts: [ShardedCounter; Outcome::ALL.len()],
    visits: [ShardedCounter; Outcome::ALL.len()],
    duration: ShardedHistogram,
    /// Connections to an https upstream whose handshake failed.
    tls_failures: ShardedCounter,
}

impl UpstreamMetrics {
    /// A POST (or the attempt at one) that carried `visits` and ended with
    /// `outcome` after `duration`.
    #[inline]
    pub fn record(&self, outcome: Outcome, visits: u64, duration: Duration) {
        if cfg!(gateway_no_metrics) {
            return;
        }
        self.posts[outcome.index()].increment();
        self.visits[outcome.index()].add(visits);
        self.duration.observe(duration);
    }

    /// A TLS handshake with the upstream failed (its certificate did not
    /// verify, say).
    pub fn record_tls_failure(&self) {
        self.tls_failures.increment();
    }

    /// POSTs that ended with `outcome`.
    pub fn posts(&self, outcome: Outcome) -> u64 {
        self.posts[outcome.index()].get()
    }

    /// Visits carried by the POSTs that ended with `outcome`.
    pub fn visits(&self, outcome: Outcome) -> u64 {
        self.visits[outcome.index()].get()
    }

    /// How long the POSTs took, pool wait included.
    pub fn duration(&self) -> &ShardedHistogram {
        &self.duration
    }

    /// Handshakes with an https upstream that failed.
    pub fn tls_failures(&self) -> u64 {
        self.tls_failures.get()
    }
}
