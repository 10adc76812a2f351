//! What h2load says about a run: its summary on stdout (requests, status
//! classes, time, what it negotiated) and its `--log-file` (a latency
//! per request).
//!
//! The formats are nghttp2 1.52's (`src/h2load.cc`); the tests read
//! outputs captured from it.

use std::io::BufRead;
use std::time::Duration;

use hdrhistogram::Histogram;

/// h2load's summary of one run (`-n` requests).
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Requests asked for (`-n`).
    pub total: u64,
    /// Not answered 2xx or 3xx: answered otherwise, reset, or never sent
    /// (h2load adds the requests a failed connection never sent here).
    pub failed: u64,
    /// Of those, reset or never sent: no answer at all.
    pub errored: u64,
    /// Of those, given up on by `-N` (the connection fell silent).
    pub timeout: u64,
    /// Answers by status class: 2xx, 3xx, 4xx, 5xx.
    pub status: [u64; 4],
    /// The run's wall time, its connections' setup included.
    pub elapsed: Duration,
    /// What the connections speak (`Application protocol:`): `h2`, `h2c`,
    /// or, where none came up, `None`.
    pub protocol: Option<String>,
    /// Over TLS: protocol, cipher suite and key exchange, as h2load's
    /// OpenSSL named them.
    pub tls: Option<String>,
}

impl Summary {
    /// Reads h2load's stdout; an output without its summary lines (h2load
    /// refused its arguments, or died) is an error quoting it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let line = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::trim)
        };
        let missing = |what: &str| {
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "no `{what}` line in h2load's output: {:?}",
                tail.join(" / ")
            )
        };
        let requests = counts(line("requests:").ok_or_else(|| missing("requests:"))?)?;
        let status = counts(line("status codes:").ok_or_else(|| missing("status codes:"))?)?;
        let finished = line("finished in").ok_or_else(|| missing("finished in"))?;
        let elapsed = finished
            .split(',')
            .next()
            .and_then(duration)
            .ok_or_else(|| format!("h2load's `finished in {finished}`: no duration"))?;
        let count = |list: &[(String, u64)], name: &str| {
            list.iter()
                .find(|(label, _)| label == name)
                .map(|&(_, n)| n)
                .ok_or_else(|| format!("h2load's summary has no `{name}` count"))
        };
        let tls = line("TLS Protocol:").map(|protocol| {
            [Some(protocol), line("Cipher:"), line("Server Temp Key:")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ")
        });
        Ok(Self {
            total: count(&requests, "total")?,
            failed: count(&requests, "failed")?,
            errored: count(&requests, "errored")?,
            timeout: count(&requests, "timeout")?,
            status: [
                count(&status, "2xx")?,
                count(&status, "3xx")?,
                count(&status, "4xx")?,
                count(&status, "5xx")?,
            ],
            elapsed,
            protocol: line("Application protocol:").map(str::to_owned),
            tls,
        })
    }

    /// Requests not answered 2xx, however they ended: what the bench
    /// counts as errors. h2load counts a 3xx as a success, and a 200
    /// whose stream was then reset both as a 2xx and as failed, so the
    /// larger of the two readings.
    pub fn not_2xx(&self) -> u64 {
        self.total.saturating_sub(self.status[0]).max(self.failed)
    }

    /// Why the requests that were not answered 2xx were not, in a line.
    pub fn failures(&self) -> String {
        let [_, s3, s4, s5] = self.status;
        let mut parts: Vec<String> = [(s3, "3xx"), (s4, "4xx"), (s5, "5xx")]
            .into_iter()
            .filter(|&(n, _)| n > 0)
            .map(|(n, class)| format!("{n} answered {class}"))
            .collect();
        if self.errored > 0 {
            parts.push(format!(
                "{} with no answer (a refused connection, a failed TLS handshake, a server \
                 that does not speak HTTP/2, or a reset stream{})",
                self.errored,
                if self.timeout > 0 {
                    format!("; {} timed out", self.timeout)
                } else {
                    String::new()
                }
            ));
        }
        format!(
            "{} of {} requests not answered 2xx: {}",
            self.not_2xx(),
            self.total,
            parts.join(", ")
        )
    }
}

/// `4000 total, 4000 started, 0 failed` as (label, count) pairs.
fn counts(list: &str) -> Result<Vec<(String, u64)>, String> {
    list.split(',')
        .map(|part| {
            let (count, label) = part
                .trim()
                .split_once(' ')
                .ok_or_else(|| format!("h2load's `{list}`: `{part}` is not COUNT LABEL"))?;
            let count = count
                .parse()
                .map_err(|_| format!("h2load's `{list}`: `{count}` is not a count"))?;
            Ok((label.trim().to_owned(), count))
        })
        .collect()
}

/// h2load's durations: `686us`, `357.65ms`, `7.68s`.
fn duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Records the latency of every answered request in h2load's
/// `--log-file` (tab-separated: start in µs since the epoch, status or
/// `-1` for a stream that failed, µs until the end of the answer) into
/// `latency`, as the bench's own generator records every answer's;
/// returns how many it recorded.
pub fn record_log(log: impl BufRead, latency: &mut Histogram<u64>) -> Result<u64, String> {
    let mut answers = 0;
    for (index, line) in log.lines().enumerate() {
        let line = line.map_err(|e| format!("h2load's log: {e}"))?;
        let bad = || format!("h2load's log, line {}: {line:?}", index + 1);
        let mut fields = line.split('\t');
        let (Some(_start), Some(status), Some(micros)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad());
        };
        if status == "-1" {
            continue;
        }
        status.parse::<u16>().map_err(|_| bad())?;
        let micros: u64 = micros.parse().map_err(|_| bad())?;
        let _ = latency.record(micros.max(1));
        answers += 1;
    }
    Ok(answers)
}

/// The rate at which answers came in over the middle half of a run, from
/// h2load's `--log-file`: what the run ran at once its connections were
/// up and before they wound down, where its whole time, setup and tail
/// included, would understate it (at 64 connections of 32 streams over
/// TLS, a run of under half a second by about half). `None` where too
/// few answers came in to tell.
pub fn steady_rate(log: impl BufRead) -> Result<Option<f64>, String> {
    let mut ends = Vec::new();
    let mut first_start = u64::MAX;
    for (index, line) in log.lines().enumerate() {
        let line = line.map_err(|e| format!("h2load's log: {e}"))?;
        let bad = || format!("h2load's log, line {}: {line:?}", index + 1);
        let mut fields = line.split('\t');
        let (Some(start), Some(status), Some(micros)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad());
        };
        let start: u64 = start.parse().map_err(|_| bad())?;
        first_start = first_start.min(start);
        if status != "-1" {
            ends.push(start + micros.parse::<u64>().map_err(|_| bad())?);
        }
    }
    let Some(&last_end) = ends.iter().max() else {
        return Ok(None);
    };
    let span = last_end.saturating_sub(first_start);
    let (from, to) = (first_start + span / 4, last_end - span / 4);
    let answers = ends.iter().filter(|&&end| end >= from && end < to).count();
    // Fewer than this in the middle, and the rate is mostly chance.
    if answers < 16 || to <= from {
        return Ok(None);
    }
    Ok(Some(answers as f64 * 1e6 / (to - from) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs of h2load 1.52 (Debian's nghttp2-client) against nginx
    /// 1.22: over TLS and h2c, answering 200; answering 503; an h2c run
    /// against an HTTP/1.1-only listener; and a TLS run (`--npn-list=h2`)
    /// against a listener without h2 in its ALPN.
    const TLS: &str = include_str!("fixtures/h2-tls.txt");
    const H2C: &str = include_str!("fixtures/h2c.txt");
    const ALL_5XX: &str = include_str!("fixtures/5xx.txt");
    const H2C_TO_HTTP1: &str = include_str!("fixtures/h2c-to-http1.txt");
    const NO_H2_IN_ALPN: &str = include_str!("fixtures/no-h2-in-alpn.txt");

    #[test]
    fn a_tls_run_gives_its_counts_time_and_negotiation() {
        let summary = Summary::parse(TLS).unwrap();
        assert_eq!(
            summary,
            Summary {
                total: 4000,
                failed: 0,
                errored: 0,
                timeout: 0,
                status: [4000, 0, 0, 0],
                elapsed: Duration::from_micros(357_650),
                protocol: Some("h2".to_owned()),
                tls: Some("TLSv1.3, TLS_AES_256_GCM_SHA384, X25519 253 bits".to_owned()),
            }
        );
        assert_eq!(summary.not_2xx(), 0);
    }

    #[test]
    fn an_h2c_run_has_no_tls_line() {
        let summary = Summary::parse(H2C).unwrap();
        assert_eq!(summary.protocol.as_deref(), Some("h2c"));
        assert_eq!(summary.tls, None);
        assert_eq!(summary.status, [20000, 0, 0, 0]);
        assert_eq!(summary.elapsed, Duration::from_micros(836_680));
    }

    #[test]
    fn non_2xx_answers_are_errors() {
        let summary = Summary::parse(ALL_5XX).unwrap();
        assert_eq!((summary.total, summary.failed), (1000, 1000));
        assert_eq!(summary.status, [0, 0, 0, 1000]);
        assert_eq!(summary.not_2xx(), 1000);
        assert_eq!(
            summary.failures(),
            "1000 of 1000 requests not answered 2xx: 1000 answered 5xx"
        );
    }

    #[test]
    fn requests_no_server_answered_are_errors() {
        let summary = Summary::parse(H2C_TO_HTTP1).unwrap();
        assert_eq!(summary.protocol.as_deref(), Some("h2c"));
        assert_eq!((summary.failed, summary.errored), (1000, 1000));
        assert_eq!(summary.elapsed, Duration::from_micros(686));
        assert_eq!(summary.not_2xx(), 1000);
        assert!(
            summary.failures().contains("1000 with no answer"),
            "{}",
            summary.failures()
        );
        // No connection came up at all: nothing negotiated.
        let summary = Summary::parse(NO_H2_IN_ALPN).unwrap();
        assert_eq!((&summary.protocol, &summary.tls), (&None, &None));
        assert_eq!(summary.not_2xx(), 100);
    }

    #[test]
    fn an_output_without_a_summary_is_an_error() {
        let error = Summary::parse("-c, -t: the number of clients must be greater than or equal to the number of threads.\n")
            .unwrap_err();
        assert!(error.contains("no `requests:` line"), "{error}");
        assert!(error.contains("number of clients"), "{error}");
    }

    #[test]
    fn durations_in_each_unit() {
        assert_eq!(duration("686us"), Some(Duration::from_micros(686)));
        assert_eq!(duration("357.65ms"), Some(Duration::from_micros(357_650)));
        assert_eq!(duration("7.68s"), Some(Duration::from_millis(7680)));
        assert_eq!(duration("7.68"), None);
        assert_eq!(duration("7m"), None);
    }

    #[test]
    fn the_log_gives_every_answer_latency() {
        // Lines captured from h2load's --log-file (200s, then 503s), and
        // a last one in the form its source writes for a failed stream.
        let log = include_str!("fixtures/requests.log");
        let mut latency = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).unwrap();
        assert_eq!(record_log(log.as_bytes(), &mut latency), Ok(8));
        assert_eq!(latency.len(), 8);
        assert_eq!(latency.min(), 113);
        assert_eq!(latency.max(), 495);
        assert!(record_log("1\t200\n".as_bytes(), &mut latency).is_err());
        assert!(record_log("1\tOK\t5\n".as_bytes(), &mut latency).is_err());
    }

    #[test]
    fn the_steady_rate_is_the_middle_half_of_the_run() {
        // A slow start (connections coming up) and a slow tail around 100
        // answers a millisecond, one every 10 µs, from 1,000 µs to 2,000.
        let mut log = String::new();
        log.push_str("0\t200\t900\n");
        for i in 0..100 {
            log.push_str(&format!("{}\t200\t50\n", 950 + i * 10));
        }
        log.push_str("1000\t-1\t5\n2500\t200\t500\n");
        // From 0 to 3,000 µs: the middle half is 750 to 2,250, holding
        // the 900 and the 100 (1,000 to 1,990).
        let rate = steady_rate(log.as_bytes()).unwrap().unwrap();
        assert!((rate - 101.0 / 1500e-6).abs() < 1.0, "{rate}");
        assert_eq!(steady_rate("5\t200\t1\n".as_bytes()), Ok(None));
        assert_eq!(steady_rate("".as_bytes()), Ok(None));
        assert!(steady_rate("x\t200\t1\n".as_bytes()).is_err());
        // The captured log parses too (too short a run for a rate).
        let captured = include_str!("fixtures/requests.log");
        assert_eq!(steady_rate(captured.as_bytes()), Ok(None));
    }
}
