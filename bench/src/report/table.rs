//! The table printed at the end of a run: one line per target and
//! concurrency level (its median round), with the notes that say how to
//! read it and where it ran.

use super::{
    KEPT_RATE, Report, SATURATED_LOAD_SIDE, SATURATED_SERVER, Summary, host, is_nginx, transport,
};

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

/// The table, as printed at the end.
pub fn table(report: &Report) -> String {
    let mut out = preamble(report);
    let columns = Columns::of(report);
    out.push_str(&columns.heading(report));
    let summaries = report.summaries();
    let mut any_load_bound = false;
    let mut any_short_of_rate = false;
    for summary in &summaries {
        let load_bound = summary.median.load_bound(report);
        any_load_bound |= load_bound;
        any_short_of_rate |= summary.short_of_rate;
        out.push_str(&columns.line(report, &summaries, summary, load_bound));
    }
    out.push_str(&notes(report, any_load_bound, any_short_of_rate));
    out
}

/// The first line: the counter's store, and how the load reached the
/// servers and what else it held beside it.
fn preamble(report: &Report) -> String {
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
    out
}

/// Which of the optional columns the table has, and how wide its names are.
struct Columns {
    with_wrk: bool,
    with_nginx: bool,
    with_rounds: bool,
    name_width: usize,
}

impl Columns {
    fn of(report: &Report) -> Self {
        Self {
            with_wrk: report
                .rows
                .iter()
                .any(|r| r.wrk_requests_per_second.is_some()),
            with_nginx: report.rows.iter().any(|r| is_nginx(&r.target)),
            with_rounds: report.rounds > 1,
            // Wide enough for `tokio/per-core`; `backend` otherwise.
            name_width: report
                .rows
                .iter()
                .map(|r| r.target.len())
                .chain([7])
                .max()
                .unwrap_or(7),
        }
    }

    fn heading(&self, report: &Report) -> String {
        let name_width = self.name_width;
        format!(
            "{:<name_width$} {:>7} {:>11} {:>12}{}{} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>13}{}\n",
            "backend",
            "workers",
            "connections",
            "requests/s",
            if self.with_nginx { " vs nginx" } else { "" },
            match (self.with_rounds, report.rate) {
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
            if self.with_wrk { "     wrk req/s" } else { "" }
        )
    }

    /// `summary`'s line; `summaries` for nginx's row at the same level.
    fn line(
        &self,
        report: &Report,
        summaries: &[Summary<'_>],
        summary: &Summary<'_>,
        load_bound: bool,
    ) -> String {
        let row = summary.median;
        let wrk = match (self.with_wrk, row.wrk_requests_per_second) {
            (true, Some(rps)) => format!(" {rps:>13.0}"),
            (true, None) => format!(" {:>13}", "-"),
            (false, _) => String::new(),
        };
        let nginx = summaries
            .iter()
            .find(|s| is_nginx(&s.median.target) && s.median.connections == row.connections)
            .map(|s| s.median.requests_per_second);
        let vs_nginx = match (self.with_nginx, nginx) {
            (true, Some(nginx)) => format!(" {:>8.2}x", row.requests_per_second / nginx),
            (true, None) => format!(" {:>9}", "-"),
            (false, _) => String::new(),
        };
        let range = match (self.with_rounds, report.rate) {
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
        let name_width = self.name_width;
        format!(
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
        )
    }
}

/// What the marks mean, what the CPU columns measure, and the host.
fn notes(report: &Report, any_load_bound: bool, any_short_of_rate: bool) -> String {
    let mut out = String::new();
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
    if report.http2 {
        out.push_str(
            "HTTP/2: each row is one h2load run of as many requests as the warm-up's rate \
             fills the duration with, its connections' setup included; the load generator \
             (l) is h2load; latency from its log of every request\n",
        );
    }
    out.push_str(&host(report));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{EIGHT, report};
    use super::super::{Report, Row};
    use super::table;

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

    /// Replaces `report`'s rows with copies of its first, one per
    /// (target, requests/s).
    fn rows_named<const N: usize>(report: &mut Report, rows: [(&str, f64); N]) {
        let first = report.rows[0].clone();
        report.rows = rows
            .into_iter()
            .map(|(target, requests_per_second)| Row {
                target: target.to_owned(),
                requests_per_second,
                ..first.clone()
            })
            .collect();
    }

    #[test]
    fn tls_rows_are_compared_with_nginx_over_tls_and_the_header_says_how() {
        let mut report = report(EIGHT, 31.0, 4.0, 12.0);
        assert_eq!(table(&report).lines().next(), Some("counter store: memory"));
        report.tls = true;
        report.new_connections = true;
        rows_named(
            &mut report,
            [("tokio/tls", 3_000.0), ("nginx/tls", 2_000.0)],
        );
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
    fn http2_rows_are_compared_with_nginx_over_http2_and_the_header_says_how() {
        let mut report = report(EIGHT, 31.0, 4.0, 12.0);
        report.tls = true;
        report.http2 = true;
        report.streams = Some(32);
        rows_named(
            &mut report,
            [("tokio/h2-tls", 3_000.0), ("nginx/h2-tls", 2_000.0)],
        );
        let printed = table(&report);
        assert!(
            printed.starts_with(
                "counter store: memory; HTTP/2 by h2load over HTTPS (TLS 1.3, ECDSA P-256, \
                 ALPN h2), 32 streams per connection\n"
            ),
            "{printed}"
        );
        assert!(
            printed.contains("\nHTTP/2: each row is one h2load run"),
            "{printed}"
        );
        let line = |name: &str| {
            printed
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            line("tokio/h2-tls").contains(" 3000     1.50x "),
            "{printed}"
        );
        report.tls = false;
        assert!(
            table(&report).starts_with(
                "counter store: memory; HTTP/2 by h2load, h2c with prior knowledge, \
                 32 streams per connection\n"
            ),
            "{}",
            table(&report)
        );
    }
}
