//! The bench's outputs: the table on stdout, `results.json`, and
//! `throughput.svg` (requests/s and p99 against connections, one line per
//! target).

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::cpu::Usage;
use crate::layout::{CpuList, Layout};

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `tokio`, `smol` or `nginx`, with what sets the row apart
    /// (`tokio/shared/batch64`; `/tls` last for HTTPS).
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

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

/// The reference row, over plain http or TLS (`nginx/tls`).
fn is_nginx(target: &str) -> bool {
    target.split('/').next() == Some("nginx")
}

/// How the load reached the servers, for the table's first line and the
/// chart's title; nothing for the default, plain keep-alive connections.
fn transport(report: &Report) -> Option<&'static str> {
    match (report.tls, report.new_connections) {
        (false, false) => None,
        (false, true) => Some("a new connection per request"),
        (true, false) => Some("HTTPS (TLS 1.3, ECDSA P-256), keep-alive connections"),
        (true, true) => {
            Some("HTTPS (TLS 1.3, ECDSA P-256), a new connection and a full handshake per request")
        }
    }
}

/// The table, as printed at the end.
pub fn table(report: &Report) -> String {
    let mut out = format!("counter store: {}", report.counter_store);
    if let Some(transport) = transport(report) {
        out.push_str(&format!("; {transport}"));
    }
    if report.stalled > 0 {
        out.push_str(&format!(
            "; {} stalled clients beside the load (never finishing a request)",
            report.stalled
        ));
    }
    if report.idle > 0 {
        out.push_str(&format!(
            "; {} idle keep-alive connections beside the load (one request each)",
            report.idle
        ));
    }
    out.push('\n');
    let with_wrk = report
        .rows
        .iter()
        .any(|r| r.wrk_requests_per_second.is_some());
    let with_nginx = report.rows.iter().any(|r| is_nginx(&r.target));
    let with_rounds = report.rounds > 1;
    let mut any_load_bound = false;
    let mut any_short_of_rate = false;
    // Wide enough for `tokio/per-core`; `backend` otherwise.
    let name_width = report
        .rows
        .iter()
        .map(|r| r.target.len())
        .chain([7])
        .max()
        .unwrap_or(7);
    out.push_str(&format!(
        "{:<name_width$} {:>7} {:>11} {:>12}{}{} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>13}{}\n",
        "backend",
        "workers",
        "connections",
        "requests/s",
        if with_nginx { " vs nginx" } else { "" },
        match (with_rounds, report.rate) {
            (false, _) => "",
            (true, None) => "   rounds' range",
            (true, Some(_)) => "  p99 over rounds",
        },
        "p50",
        "p99",
        "p99.9",
        "errors",
        "count ok",
        "CPU/req",
        "busy% s/c/l",
        if with_wrk { "     wrk req/s" } else { "" }
    ));
    let summaries = report.summaries();
    let nginx_at = |connections| {
        summaries
            .iter()
            .find(|s| is_nginx(&s.median.target) && s.median.connections == connections)
            .map(|s| s.median.requests_per_second)
    };
    for summary in &summaries {
        let row = summary.median;
        let wrk = match (with_wrk, row.wrk_requests_per_second) {
            (true, Some(rps)) => format!(" {rps:>13.0}"),
            (true, None) => format!(" {:>13}", "-"),
            (false, _) => String::new(),
        };
        let vs_nginx = match (with_nginx, nginx_at(row.connections)) {
            (true, Some(nginx)) => format!(" {:>8.2}x", row.requests_per_second / nginx),
            (true, None) => format!(" {:>9}", "-"),
            (false, _) => String::new(),
        };
        let range = match (with_rounds, report.rate) {
            (false, _) => String::new(),
            (true, None) => format!(
                " {:>15}",
                format!("{:.0}-{:.0}", summary.lowest, summary.highest)
            ),
            (true, Some(_)) => format!(
                " {:>16}",
                format!(
                    "{:.2}-{:.2}ms",
                    summary.lowest / 1000.0,
                    summary.highest / 1000.0
                )
            ),
        };
        let percent = |fraction: Option<f64>| {
            fraction.map_or("-".to_owned(), |f| format!("{:.0}", f * 100.0))
        };
        let [server, counter, load] = row.busy(&report.layout);
        let load_bound = row.load_bound(report);
        any_load_bound |= load_bound;
        any_short_of_rate |= summary.short_of_rate;
        out.push_str(&format!(
            "{:<name_width$} {:>7} {:>11} {:>12}{}{} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>13}{}\n",
            row.target,
            row.workers,
            row.connections,
            format!(
                "{}{}{:.0}",
                if load_bound { "*" } else { "" },
                if summary.short_of_rate { "!" } else { "" },
                row.requests_per_second
            ),
            vs_nginx,
            range,
            ms(row.p50_us),
            ms(row.p99_us),
            ms(row.p999_us),
            summary.errors,
            match summary.count_ok {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            },
            row.server_us_per_request()
                .map_or("-".to_owned(), |us| format!("{us:.1}µs")),
            format!("{}/{}/{}", percent(server), percent(counter), percent(load)),
            wrk,
        ));
    }
    if any_load_bound {
        out.push_str(&format!(
            "* the server's CPUs were under {:.0}% busy while the counter's or the load \
             generator's were at {:.0}% or more: that row is a floor set by the load side, \
             and ranks nothing\n",
            SATURATED_SERVER * 100.0,
            SATURATED_LOAD_SIDE * 100.0
        ));
    }
    if any_short_of_rate {
        out.push_str(&format!(
            "! a round answered under {:.0}% of --rate: the server (or the load side) did not \
             keep up, so that row's latency is not latency at that rate\n",
            KEPT_RATE * 100.0
        ));
    }
    out.push_str(
        "CPU/req: the server's CPU time (user + system, nginx's workers included) per answered \
         request; busy%: how busy the server (s), counter (c) and load generator (l) kept \
         their CPUs over the window\n",
    );
    if report.rows.iter().all(|r| r.target == "target") {
        out.push_str(&format!(
            "host: {} ({} CPUs); load on CPUs {}\n",
            report.cpu_model, report.cpus, report.layout.load
        ));
        return out;
    }
    out.push_str(&format!(
        "host: {} ({} CPUs); gateway/nginx on CPUs {}, counter on {}, load on {}{}\n",
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
    ));
    out
}

pub fn write_json(report: &Report, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Requests/s (top) and p99 latency (bottom) against connections.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), String> {
    draw(report, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn draw(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let connections = report.rows.iter().map(|r| r.connections as f64);
    let min_c = connections.clone().fold(f64::INFINITY, f64::min);
    let max_c = connections.fold(1.0, f64::max);
    let x_range = if min_c >= max_c {
        (max_c / 2.0, max_c * 2.0)
    } else {
        (min_c, max_c)
    };
    let root = SVGBackend::new(path, (900, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    panel(
        &top,
        report,
        &format!(
            "gateway throughput — {} ({} CPUs){}",
            report.cpu_model,
            report.cpus,
            transport(report)
                .map(|t| format!("; {t}"))
                .unwrap_or_default()
        ),
        "requests/s",
        x_range,
        |row| row.requests_per_second,
        &|v| format!("{:.0}k", v / 1000.0),
        SeriesLabelPosition::LowerRight,
    )?;
    panel(
        &bottom,
        report,
        "p99 latency",
        "p99 (ms)",
        x_range,
        |row| row.p99_us as f64 / 1000.0,
        &|v| format!("{v:.1}"),
        SeriesLabelPosition::UpperLeft,
    )?;
    root.present()?;
    Ok(())
}

/// One chart: `value` of each row against connections (log scale), one
/// line per target.
#[allow(clippy::too_many_arguments)]
fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    report: &Report,
    caption: &str,
    y_desc: &str,
    (min_c, max_c): (f64, f64),
    value: fn(&Row) -> f64,
    y_format: &dyn Fn(&f64) -> String,
    legend: SeriesLabelPosition,
) -> Result<(), Box<dyn std::error::Error>> {
    let medians: Vec<&Row> = report.summaries().into_iter().map(|s| s.median).collect();
    let mut targets: Vec<&str> = Vec::new();
    for row in &medians {
        if !targets.contains(&row.target.as_str()) {
            targets.push(&row.target);
        }
    }
    let y_max = medians.iter().map(|r| value(r)).fold(0.001, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((min_c..max_c).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(y_desc)
        .x_label_formatter(&|c| format!("{c:.0}"))
        .y_label_formatter(y_format)
        .draw()?;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, target) in targets.iter().enumerate() {
        let color = palette[i % palette.len()];
        let points: Vec<(f64, f64)> = medians
            .iter()
            .filter(|r| r.target == *target)
            .map(|r| (r.connections as f64, value(r)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*target)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(legend)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(layout: &str, server_s: f64, counter_s: f64, load_s: f64) -> Report {
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
            new_connections: false,
            stalled: 0,
            idle: 0,
            rows: vec![row],
        }
    }

    #[test]
    fn an_open_loop_summary_is_the_median_p99_with_its_range() {
        let mut report = report(EIGHT, 19.2, 4.0, 12.0);
        report.rate = Some(250_000.0);
        report.rounds = 3;
        let first = report.rows[0].clone();
        report.rows = [(2_100, 250_000.0), (9_000, 249_990.0), (2_500, 250_010.0)]
            .into_iter()
            .enumerate()
            .map(|(round, (p99_us, requests_per_second))| Row {
                p99_us,
                requests_per_second,
                round: round + 1,
                ..first.clone()
            })
            .collect();
        let summaries = report.summaries();
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].median.p99_us, 2_500);
        assert_eq!(
            (summaries[0].lowest, summaries[0].highest),
            (2_100.0, 9_000.0)
        );
        let printed = table(&report);
        assert!(printed.contains("p99 over rounds"), "{printed}");
        assert!(printed.contains("2.10-9.00ms"), "{printed}");
        assert!(!summaries[0].short_of_rate && !printed.contains('!'));
        // A round well under the rate is called out.
        report.rows[1].requests_per_second = 200_000.0;
        assert!(report.summaries()[0].short_of_rate);
        assert!(table(&report).contains("!250"), "{}", table(&report));
        report.rows[1].requests_per_second = 249_990.0;
        // Closed loop: the median by requests/s, its range in requests/s.
        report.rate = None;
        assert_eq!(report.summaries()[0].median.p99_us, 2_100);
        assert!(table(&report).contains("249990-250010"));
    }

    const EIGHT: &str = "gateway=0-7 counter=8-9 load=10-15";

    #[test]
    fn tls_rows_are_compared_with_nginx_over_tls_and_the_header_says_how() {
        let mut report = report(EIGHT, 31.0, 4.0, 12.0);
        assert_eq!(table(&report).lines().next(), Some("counter store: memory"));
        report.tls = true;
        report.new_connections = true;
        let first = report.rows[0].clone();
        report.rows = [("tokio/tls", 3_000.0), ("nginx/tls", 2_000.0)]
            .into_iter()
            .map(|(target, requests_per_second)| Row {
                target: target.to_owned(),
                requests_per_second,
                ..first.clone()
            })
            .collect();
        let printed = table(&report);
        assert!(
            printed.starts_with(
                "counter store: memory; HTTPS (TLS 1.3, ECDSA P-256), a new connection \
                 and a full handshake per request\n"
            ),
            "{printed}"
        );
        let line = |name: &str| {
            printed
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("tokio/tls").contains(" 3000     1.50x "), "{printed}");
        assert!(line("nginx/tls").contains(" 2000     1.00x "), "{printed}");
    }

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
