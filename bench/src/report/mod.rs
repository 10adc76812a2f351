//! The bench's outputs: the table on stdout ([`table`]), `results.json`,
//! and `throughput.svg` ([`chart`]: requests/s, p99 and the server's CPU
//! per request against connections, one line per target).

mod chart;
mod table;

use std::path::Path;

use serde::Serialize;

use crate::cpu::Usage;
use crate::layout::{CpuList, Layout};

pub use self::chart::write_svg;
pub use self::table::table;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `tokio`, `smol` or `nginx`, with what sets the row apart
    /// (`tokio/shared/batch64`; last, `/tls` for HTTPS, `/h2` or
    /// `/h2-tls` for HTTP/2).
    pub target: String,
    pub workers: usize,
    pub connections: usize,
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub errors: u64,
    /// The counter's tally grew by exactly the number of 200s (`None`
    /// against an outside `--target`, which has no known counter).
    pub count_ok: Option<bool>,
    pub ok_total: u64,
    pub tally_delta: Option<u64>,
    /// wrk's requests/s on the same target and CPUs, with `--wrk`.
    pub wrk_requests_per_second: Option<f64>,
    /// Which of the `--rounds` this row was measured in, from 1.
    pub round: usize,
    /// CPU seconds each side used over the measured window.
    pub cpu: Usage,
    /// With `--tls`, what the server negotiated: protocol, cipher suite,
    /// key exchange, ALPN.
    pub tls: Option<String>,
}

impl Row {
    /// The server's CPU time per answered request, in microseconds.
    pub fn server_us_per_request(&self) -> Option<f64> {
        let seconds = self.cpu.server_s?;
        (self.requests > 0).then(|| seconds * 1e6 / self.requests as f64)
    }

    /// How busy each side kept its CPUs (0 to 1): server, counter, load.
    /// Where the counter and the load generator share CPUs, both get
    /// their joint figure, the only one that says whether those CPUs ran
    /// out.
    pub fn busy(&self, layout: &Layout) -> [Option<f64>; 3] {
        let server = self.cpu.busy(self.cpu.server_s, &layout.gateway);
        if layout
            .counter
            .0
            .iter()
            .any(|cpu| layout.load.0.contains(cpu))
        {
            let mut union = layout.counter.0.clone();
            union.extend(
                layout
                    .load
                    .0
                    .iter()
                    .filter(|cpu| !layout.counter.0.contains(cpu)),
            );
            let joint = self.cpu.counter_s.zip(self.cpu.load_s).map(|(c, l)| c + l);
            let joint = self.cpu.busy(joint, &CpuList(union));
            return [server, joint, joint];
        }
        [
            server,
            self.cpu.busy(self.cpu.counter_s, &layout.counter),
            self.cpu.busy(self.cpu.load_s, &layout.load),
        ]
    }

    /// In a closed loop, the server had CPU to spare while the counter or
    /// the load generator ran out: the row is a floor set by the load side.
    pub fn load_bound(&self, report: &Report) -> bool {
        if report.rate.is_some() || report.layout.gateway_shares() {
            return false;
        }
        match self.busy(&report.layout) {
            [Some(server), counter, load] => {
                server < SATURATED_SERVER
                    && [counter, load]
                        .into_iter()
                        .flatten()
                        .any(|side| side >= SATURATED_LOAD_SIDE)
            }
            _ => false,
        }
    }
}

/// Below this, a server's CPUs were not what limited it.
const SATURATED_SERVER: f64 = 0.85;
/// At or above this, the counter's or the load generator's CPUs were.
const SATURATED_LOAD_SIDE: f64 = 0.90;

/// Everything `results.json` holds.
#[derive(Debug, Serialize)]
pub struct Report {
    pub cpu_model: String,
    pub cpus: usize,
    pub layout: Layout,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Open-loop rate, if one was set.
    pub rate: Option<f64>,
    pub rounds: usize,
    /// Where the counter kept its count: "memory" or "file".
    pub counter_store: String,
    /// Every row over HTTPS (`--tls`).
    pub tls: bool,
    /// Every row over HTTP/2, by h2load (`--http2`).
    pub http2: bool,
    /// With `--http2`, concurrent streams per connection (`--streams`).
    pub streams: Option<usize>,
    /// A new connection for every request (`--new-connections`), instead
    /// of keep-alive ones.
    pub new_connections: bool,
    /// Clients held beside the load that never finish a request (`--stalled`).
    pub stalled: usize,
    /// Keep-alive connections held idle beside the load (`--idle`).
    pub idle: usize,
    /// Every measurement, of every round.
    pub rows: Vec<Row>,
}

/// The share of `--rate` a round must answer to count as keeping up.
const KEPT_RATE: f64 = 0.97;

/// One target at one concurrency level, over all its rounds.
pub struct Summary<'a> {
    /// The median round (the higher of the middle two for an even count):
    /// by requests/s in the closed loop; by p99 in the open loop, where
    /// requests/s is the rate asked for and latency is what is compared.
    pub median: &'a Row,
    /// The lowest and highest of that measure over the rounds
    /// (requests/s, or p99 in µs).
    pub lowest: f64,
    pub highest: f64,
    /// Over every round.
    pub errors: u64,
    /// Open loop: some round answered under [`KEPT_RATE`] of the rate
    /// asked for, so its latency is not latency at that rate.
    pub short_of_rate: bool,
    pub count_ok: Option<bool>,
}

impl Report {
    /// One summary per target and concurrency level, in the order first
    /// measured.
    pub fn summaries(&self) -> Vec<Summary<'_>> {
        let mut keys: Vec<(&str, usize)> = Vec::new();
        for row in &self.rows {
            let key = (row.target.as_str(), row.connections);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys.into_iter()
            .filter_map(|(target, connections)| {
                let mut rounds: Vec<&Row> = self
                    .rows
                    .iter()
                    .filter(|r| r.target == target && r.connections == connections)
                    .collect();
                let measure = |row: &Row| match self.rate {
                    Some(_) => row.p99_us as f64,
                    None => row.requests_per_second,
                };
                rounds.sort_by(|a, b| measure(a).total_cmp(&measure(b)));
                let count_ok = rounds
                    .iter()
                    .map(|r| r.count_ok)
                    .reduce(|a, b| Some(a? && b?))
                    .flatten();
                Some(Summary {
                    median: rounds[rounds.len() / 2],
                    lowest: measure(rounds.first()?),
                    highest: measure(rounds.last()?),
                    errors: rounds.iter().map(|r| r.errors).sum(),
                    short_of_rate: self.rate.is_some_and(|rate| {
                        rounds
                            .iter()
                            .any(|r| r.requests_per_second < rate * KEPT_RATE)
                    }),
                    count_ok,
                })
            })
            .collect()
    }
}

/// The reference row, over plain http or TLS (`nginx/tls`).
fn is_nginx(target: &str) -> bool {
    target.split('/').next() == Some("nginx")
}

/// How the load reached the servers, for the table's first line and the
/// chart's title; nothing for the default, plain keep-alive connections.
fn transport(report: &Report) -> Option<String> {
    if report.http2 {
        let streams = report
            .streams
            .map(|m| format!(", {m} streams per connection"))
            .unwrap_or_default();
        return Some(if report.tls {
            format!("HTTP/2 by h2load over HTTPS (TLS 1.3, ECDSA P-256, ALPN h2){streams}")
        } else {
            format!("HTTP/2 by h2load, h2c with prior knowledge{streams}")
        });
    }
    match (report.tls, report.new_connections) {
        (false, false) => None,
        (false, true) => Some("a new connection per request".to_owned()),
        (true, false) => Some("HTTPS (TLS 1.3, ECDSA P-256), keep-alive connections".to_owned()),
        (true, true) => Some(
            "HTTPS (TLS 1.3, ECDSA P-256), a new connection and a full handshake per request"
                .to_owned(),
        ),
    }
}

/// Where it ran: the host, and which CPUs each side had.
fn host(report: &Report) -> String {
    if report.rows.iter().all(|r| r.target == "target") {
        return format!(
            "host: {} ({} CPUs); load on CPUs {}",
            report.cpu_model, report.cpus, report.layout.load
        );
    }
    format!(
        "host: {} ({} CPUs); gateway/nginx on CPUs {}, counter on {}, load on {}{}",
        report.cpu_model,
        report.cpus,
        report.layout.gateway,
        report.layout.counter,
        report.layout.load,
        if report.layout.gateway_shares() {
            " (shared: the numbers include contention)"
        } else {
            ""
        }
    )
}

pub fn write_json(report: &Report, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn report(layout: &str, server_s: f64, counter_s: f64, load_s: f64) -> Report {
        let layout = Layout::for_cpus(&(0..16).collect::<Vec<_>>())
            .override_with(layout)
            .expect("a valid layout");
        let row = Row {
            target: "tokio".to_owned(),
            workers: 8,
            connections: 1024,
            requests: 1_000_000,
            requests_per_second: 250_000.0,
            p50_us: 1,
            p99_us: 1,
            p999_us: 1,
            errors: 0,
            count_ok: Some(true),
            ok_total: 1_000_000,
            tally_delta: Some(1_000_000),
            wrk_requests_per_second: None,
            round: 1,
            cpu: Usage {
                window_s: 4.0,
                server_s: Some(server_s),
                counter_s: Some(counter_s),
                load_s: Some(load_s),
            },
            tls: None,
        };
        Report {
            cpu_model: "test".to_owned(),
            cpus: 16,
            layout,
            duration_s: 4.0,
            warmup_s: 1.0,
            rate: None,
            rounds: 1,
            counter_store: "memory".to_owned(),
            tls: false,
            http2: false,
            streams: None,
            new_connections: false,
            stalled: 0,
            idle: 0,
            rows: vec![row],
        }
    }

    pub(super) const EIGHT: &str = "gateway=0-7 counter=8-9 load=10-15";
    #[test]
    fn a_server_with_cpu_to_spare_behind_a_saturated_load_side_is_flagged() {
        // Gateway 8 CPUs at 60%, counter 2 CPUs at 50%, load 6 CPUs at 97%.
        let report = report(EIGHT, 19.2, 4.0, 23.28);
        let row = &report.rows[0];
        let [server, counter, load] = row.busy(&report.layout);
        assert_eq!(server.map(|b| (b * 100.0).round()), Some(60.0));
        assert_eq!(counter.map(|b| (b * 100.0).round()), Some(50.0));
        assert_eq!(load.map(|b| (b * 100.0).round()), Some(97.0));
        assert!(row.load_bound(&report));
        assert!(table(&report).contains("*250000"), "{}", table(&report));
        assert_eq!(row.server_us_per_request(), Some(19.2));
    }

    #[test]
    fn a_saturated_server_or_an_idle_load_side_is_not_flagged() {
        // Gateway at 97%: the row measures it, whatever the load side did.
        let saturated = report(EIGHT, 31.0, 4.0, 23.28);
        assert!(!saturated.rows[0].load_bound(&saturated));
        // Gateway at 60%, load side at 50%: nothing ran out (a rate cap).
        let spare = report(EIGHT, 19.2, 4.0, 12.0);
        assert!(!spare.rows[0].load_bound(&spare));
        assert!(!table(&spare).contains('*'));
    }

    #[test]
    fn a_counter_and_load_generator_sharing_cpus_are_judged_together() {
        // Counter 45% + load 50% of the one CPU they share: 95% busy.
        let report = report("gateway=0 counter=1 load=1", 2.8, 1.8, 2.0);
        let [_, counter, load] = report.rows[0].busy(&report.layout);
        assert_eq!(counter, load);
        assert_eq!(counter.map(|b| (b * 100.0).round()), Some(95.0));
        assert!(report.rows[0].load_bound(&report));
    }
}
