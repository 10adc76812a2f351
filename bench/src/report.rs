//! The bench's outputs: the table on stdout, `results.json`, and
//! `throughput.svg` (requests/s and p99 against connections, one line per
//! target).

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::layout::Layout;

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `tokio`, `smol` or `nginx`.
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
}

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
    /// Every measurement, of every round.
    pub rows: Vec<Row>,
}

/// One target at one concurrency level, over all its rounds.
pub struct Summary<'a> {
    /// The round with the median requests/s (the higher of the middle two
    /// for an even count of rounds).
    pub median: &'a Row,
    pub lowest: f64,
    pub highest: f64,
    /// Over every round.
    pub errors: u64,
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
                rounds.sort_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second));
                let count_ok = rounds
                    .iter()
                    .map(|r| r.count_ok)
                    .reduce(|a, b| Some(a? && b?))
                    .flatten();
                Some(Summary {
                    median: rounds[rounds.len() / 2],
                    lowest: rounds.first()?.requests_per_second,
                    highest: rounds.last()?.requests_per_second,
                    errors: rounds.iter().map(|r| r.errors).sum(),
                    count_ok,
                })
            })
            .collect()
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

/// The table, as printed at the end.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let with_wrk = report
        .rows
        .iter()
        .any(|r| r.wrk_requests_per_second.is_some());
    let with_nginx = report.rows.iter().any(|r| r.target == "nginx");
    let with_rounds = report.rounds > 1;
    // Wide enough for `tokio/per-core`; `backend` otherwise.
    let name_width = report
        .rows
        .iter()
        .map(|r| r.target.len())
        .chain([7])
        .max()
        .unwrap_or(7);
    out.push_str(&format!(
        "{:<name_width$} {:>7} {:>11} {:>12}{}{} {:>9} {:>9} {:>9} {:>7} {:>8}{}\n",
        "backend",
        "workers",
        "connections",
        "requests/s",
        if with_nginx { " vs nginx" } else { "" },
        if with_rounds { "   rounds' range" } else { "" },
        "p50",
        "p99",
        "p99.9",
        "errors",
        "count ok",
        if with_wrk { "     wrk req/s" } else { "" }
    ));
    let summaries = report.summaries();
    let nginx_at = |connections| {
        summaries
            .iter()
            .find(|s| s.median.target == "nginx" && s.median.connections == connections)
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
        let range = if with_rounds {
            format!(
                " {:>15}",
                format!("{:.0}-{:.0}", summary.lowest, summary.highest)
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{:<name_width$} {:>7} {:>11} {:>12.0}{}{} {:>9} {:>9} {:>9} {:>7} {:>8}{}\n",
            row.target,
            row.workers,
            row.connections,
            row.requests_per_second,
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
            wrk,
        ));
    }
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
            "gateway throughput — {} ({} CPUs)",
            report.cpu_model, report.cpus
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
