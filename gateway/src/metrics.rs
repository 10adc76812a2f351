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
use std::time::Duration;

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::outcome::Outcome;
use crate::stats::{ShardedCounter, ShardedHistogram};
use crate::upstream::UpstreamMetrics;

/// Statuses the public service answers, in the order they are reported.
/// (400 and 431 come from the HTTP parser: `gateway_bad_requests_total`.)
const STATUSES: [u16; 6] = [200, 404, 405, 502, 503, 504];

/// The HTTP a request or connection spoke: the `protocol` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1 = 0,
    Http2 = 1,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];

    /// As ALPN names it.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2",
        }
    }
}

/// Answers of one protocol, by status.
struct ByStatus {
    known: [ShardedCounter; STATUSES.len()],
    other: ShardedCounter,
}

impl ByStatus {
    fn new() -> Self {
        Self {
            known: std::array::from_fn(|_| ShardedCounter::new()),
            other: ShardedCounter::new(),
        }
    }

    fn total(&self) -> u64 {
        self.known.iter().map(ShardedCounter::get).sum::<u64>() + self.other.get()
    }
}

/// Everything recorded about the public listener and the upstream.
pub struct Metrics {
    backend: &'static str,
    workers: usize,
    by_protocol: [ByStatus; Protocol::ALL.len()],
    bad_requests: ShardedCounter,
    /// Clients whose TLS handshake failed or timed out.
    tls_handshake_failures: ShardedCounter,
    upstream: &'static UpstreamMetrics,
    request_duration: ShardedHistogram,
    connections_open: GaugeByProtocol,
    upstream_open: Gauge,
}

/// A gauge read at scrape time from wherever it is kept.
pub type Gauge = Box<dyn Fn() -> usize + Send + Sync>;

/// A gauge per [`Protocol`], in the order of [`Protocol::ALL`].
pub type GaugeByProtocol = Box<dyn Fn() -> [usize; Protocol::ALL.len()] + Send + Sync>;

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
        upstream: &'static UpstreamMetrics,
        connections_open: GaugeByProtocol,
        upstream_open: Gauge,
    ) -> Self {
        Self {
            backend,
            workers,
            by_protocol: std::array::from_fn(|_| ByStatus::new()),
            bad_requests: ShardedCounter::new(),
            tls_handshake_failures: ShardedCounter::new(),
            upstream,
            request_duration: ShardedHistogram::new(),
            connections_open,
            upstream_open,
        }
    }

    /// A request over `protocol` the service answered with `status`,
    /// taking `duration`.
    #[inline]
    pub fn record_request(&self, protocol: Protocol, status: StatusCode, duration: Duration) {
        if cfg!(gateway_no_metrics) {
            return;
        }
        let answers = &self.by_protocol[protocol as usize];
        match STATUSES.iter().position(|&s| s == status.as_u16()) {
            Some(index) => answers.known[index].increment(),
            None => answers.other.increment(),
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

    /// A client's TLS handshake failed or did not finish in time.
    pub fn record_tls_handshake_failure(&self) {
        self.tls_handshake_failures.increment();
    }

    /// Requests the service has answered, all statuses.
    pub fn requests_total(&self) -> u64 {
        self.by_protocol.iter().map(ByStatus::total).sum()
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
        encode_requests(m, &mut encoder)?;
        Value(m.bad_requests.get()).encode(encoder.encode_descriptor(
            "gateway_bad_requests",
            "Requests the HTTP parser rejected before the service.",
            None,
            MetricType::Counter,
        )?)?;
        encode_tls_handshake_failures(m, &mut encoder)?;
        encode_upstream_outcomes(m.upstream, &mut encoder)?;
        encode_durations(m, &mut encoder)?;
        encode_open_connections(m, &mut encoder)?;
        encode_build(m, &mut encoder)
    }
}

/// `gateway_requests`: the public service's answers, by protocol and
/// status.
fn encode_requests(m: &Metrics, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "gateway_requests",
        "Requests answered by the service, by protocol (http/1.1, h2) and status.",
        None,
        MetricType::Counter,
    )?;
    for protocol in Protocol::ALL {
        let answers = &m.by_protocol[protocol as usize];
        let mut statuses: Vec<(Cow<'static, str>, u64)> = STATUSES
            .iter()
            .zip(&answers.known)
            .map(|(s, c)| (Cow::Owned(s.to_string()), c.get()))
            .collect();
        statuses.push((Cow::Borrowed("other"), answers.other.get()));
        for (status, value) in statuses {
            let labels = [
                ("protocol", Cow::Borrowed(protocol.label())),
                ("status", status),
            ];
            Value(value).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// `gateway_tls_handshake_failures`: the public listener's and the
/// upstream client's, one family told apart by `side`.
fn encode_tls_handshake_failures(
    m: &Metrics,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "gateway_tls_handshake_failures",
        "TLS handshakes that failed or timed out: side=\"public\", a client's; side=\"upstream\", the gateway's with an https upstream.",
        None,
        MetricType::Counter,
    )?;
    for (side, failures) in [
        ("public", m.tls_handshake_failures.get()),
        ("upstream", m.upstream.tls_failures()),
    ] {
        Value(failures).encode(family.encode_family(&[("side", side)])?)?;
    }
    Ok(())
}

/// `gateway_upstream_requests` and `gateway_upstream_visits`, by outcome.
fn encode_upstream_outcomes(
    upstream: &UpstreamMetrics,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    type Count = fn(&UpstreamMetrics, Outcome) -> u64;
    let families: [(&str, &str, Count); 2] = [
        (
            "gateway_upstream_requests",
            "Upstream POSTs, by outcome: ok, error (502), timeout (504), overloaded (503, never sent).",
            UpstreamMetrics::posts,
        ),
        (
            "gateway_upstream_visits",
            "Visits the upstream POSTs carried, by their POST's outcome (more than one a POST with batching).",
            UpstreamMetrics::visits,
        ),
    ];
    for (name, help, count) in families {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for outcome in Outcome::ALL {
            let labels = [("outcome", outcome.label())];
            Value(count(upstream, outcome)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// The two latency histograms: the public service's and the upstream's.
fn encode_durations(m: &Metrics, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    for (name, help, histogram) in [
        (
            "gateway_request_duration_seconds",
            "Time from a complete request head to the answer.",
            &m.request_duration,
        ),
        (
            "gateway_upstream_duration_seconds",
            "Upstream round trip of a POST, pool wait included.",
            m.upstream.duration(),
        ),
    ] {
        let (buckets, count, sum) = histogram.snapshot();
        encoder
            .encode_descriptor(name, help, None, MetricType::Histogram)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

/// The gauges of open connections, public and upstream.
fn encode_open_connections(
    m: &Metrics,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "gateway_connections_open",
        "Open connections on the public listener, by protocol (one counts as http/1.1 until it has chosen h2).",
        None,
        MetricType::Gauge,
    )?;
    for (protocol, open) in Protocol::ALL.iter().zip((m.connections_open)()) {
        family
            .encode_family(&[("protocol", protocol.label())])?
            .encode_gauge(&(open as i64))?;
    }
    encoder
        .encode_descriptor(
            "gateway_upstream_connections_open",
            "Open connections to the upstream, idle or busy.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&((m.upstream_open)() as i64))
}

/// `gateway_build`: what is running.
fn encode_build(m: &Metrics, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
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
        ])
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
