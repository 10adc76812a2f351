//! What the gateway has done, as Prometheus metrics (README, "Health and metrics").
//!
//! Recording happens on the hot path of every worker at once, so every
//! counter and histogram is sharded per thread ([`ShardedCounter`],
//! [`ShardedHistogram`]) and summed only when `/metrics` is scraped or the
//! systemd status line is refreshed. `prometheus-client` writes the
//! OpenMetrics text through a [`Collector`] that reads the shards.
//!
//! Building with `RUSTFLAGS="--cfg gateway_no_metrics"` compiles the
//! recording calls out; it exists only to measure what recording costs.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::server::Connections;
use crate::stats::{SHARDS, ShardedCounter, shard};
use crate::upstream::Outcome;

/// Statuses the public service answers, in the order they are reported.
/// (400 and 431 come from the HTTP parser: `gateway_bad_requests_total`.)
const STATUSES: [u16; 6] = [200, 404, 405, 502, 503, 504];
const OUTCOMES: [(Outcome, &str); 4] = [
    (Outcome::Counted, "ok"),
    (Outcome::Failed, "error"),
    (Outcome::TimedOut, "timeout"),
    (Outcome::Overloaded, "overloaded"),
];

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

/// Everything recorded about the public listener and the upstream.
pub struct Metrics {
    backend: &'static str,
    workers: usize,
    by_status: [ShardedCounter; STATUSES.len()],
    other_status: ShardedCounter,
    bad_requests: ShardedCounter,
    upstream_outcomes: [ShardedCounter; OUTCOMES.len()],
    request_duration: ShardedHistogram,
    upstream_duration: ShardedHistogram,
    connections: &'static Connections,
    upstream_open: Box<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(
        backend: &'static str,
        workers: usize,
        connections: &'static Connections,
        upstream_open: Box<dyn Fn() -> usize + Send + Sync>,
    ) -> Self {
        Self {
            backend,
            workers,
            by_status: std::array::from_fn(|_| ShardedCounter::new()),
            other_status: ShardedCounter::new(),
            bad_requests: ShardedCounter::new(),
            upstream_outcomes: std::array::from_fn(|_| ShardedCounter::new()),
            request_duration: ShardedHistogram::new(),
            upstream_duration: ShardedHistogram::new(),
            connections,
            upstream_open,
        }
    }

    /// A request the service answered with `status`, taking `duration`.
    #[inline]
    pub fn record_request(&self, status: StatusCode, duration: Duration) {
        if cfg!(gateway_no_metrics) {
            return;
        }
        match STATUSES.iter().position(|&s| s == status.as_u16()) {
            Some(index) => self.by_status[index].increment(),
            None => self.other_status.increment(),
        }
        self.request_duration.observe(duration);
    }

    /// A request the HTTP parser rejected before the service saw it.
    pub fn record_bad_request(&self) {
        if cfg!(gateway_no_metrics) {
            return;
        }
        self.bad_requests.increment();
    }

    /// How one visit's upstream exchange ended, and how long it took.
    #[inline]
    pub fn record_upstream(&self, outcome: Outcome, duration: Duration) {
        if cfg!(gateway_no_metrics) {
            return;
        }
        if let Some(index) = OUTCOMES.iter().position(|(o, _)| *o == outcome) {
            self.upstream_outcomes[index].increment();
        }
        self.upstream_duration.observe(duration);
    }

    /// Requests the service has answered, all statuses.
    pub fn requests_total(&self) -> u64 {
        self.by_status.iter().map(ShardedCounter::get).sum::<u64>() + self.other_status.get()
    }

    /// A registry whose only collector reads these metrics at scrape time.
    pub fn registry(metrics: &'static Metrics) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(MetricsCollector(metrics)));
        registry
    }
}

#[derive(Debug)]
struct MetricsCollector(&'static Metrics);

/// A counter value read at scrape time.
#[derive(Debug)]
struct Value<T>(T);

impl EncodeMetric for Value<u64> {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.0, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.0;
        {
            let mut family = encoder.encode_descriptor(
                "gateway_requests",
                "Requests answered by the service, by status.",
                None,
                MetricType::Counter,
            )?;
            let mut statuses: Vec<(Cow<'static, str>, u64)> = STATUSES
                .iter()
                .zip(&m.by_status)
                .map(|(s, c)| (Cow::Owned(s.to_string()), c.get()))
                .collect();
            statuses.push((Cow::Borrowed("other"), m.other_status.get()));
            for (status, value) in statuses {
                let labels = [("status", status)];
                Value(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Value(m.bad_requests.get()).encode(encoder.encode_descriptor(
            "gateway_bad_requests",
            "Requests the HTTP parser rejected before the service.",
            None,
            MetricType::Counter,
        )?)?;
        {
            let mut family = encoder.encode_descriptor(
                "gateway_upstream_requests",
                "Upstream exchanges, by outcome: ok, error (502), timeout (504), overloaded (503, never sent).",
                None,
                MetricType::Counter,
            )?;
            for ((_, outcome), counter) in OUTCOMES.iter().zip(&m.upstream_outcomes) {
                let labels = [("outcome", *outcome)];
                Value(counter.get()).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, histogram) in [
            (
                "gateway_request_duration_seconds",
                "Time from a complete request head to the answer.",
                &m.request_duration,
            ),
            (
                "gateway_upstream_duration_seconds",
                "Upstream round trip of a visit, pool wait included.",
                &m.upstream_duration,
            ),
        ] {
            let (buckets, count, sum) = histogram.snapshot();
            encoder
                .encode_descriptor(name, help, None, MetricType::Histogram)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        encoder
            .encode_descriptor(
                "gateway_connections_open",
                "Open connections on the public listener.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(m.connections.open() as i64))?;
        encoder
            .encode_descriptor(
                "gateway_upstream_connections_open",
                "Open connections to the upstream, idle or busy.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&((m.upstream_open)() as i64))?;
        let workers = m.workers.to_string();
        encoder
            .encode_descriptor(
                "gateway_build",
                "Version, backend and workers.",
                None,
                MetricType::Info,
            )?
            .encode_info(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("backend", m.backend),
                ("workers", workers.as_str()),
            ])?;
        Ok(())
    }
}

/// The OpenMetrics text of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a collector error would leave a
    // partial page, which Prometheus rejects visibly.
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        tracing::warn!("encoding metrics failed");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

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
