//! `--http2`: the load driven by h2load (Debian's `nghttp2-client`), N
//! connections of M concurrent streams each, pinned to the load CPUs.
//!
//! h2load runs `-n` requests, not `-D` seconds: with `-D` it neither
//! counts the answers of its warm-up nor waits for the requests still out
//! when its time is up, which the server may already have passed on to
//! the counter, so the count check could not be exact. Instead, a row
//! runs h2load once or more for the warm-up (a first probe, then runs
//! sized from the rate seen, until `--warmup` is spent), then once more
//! with as many requests as that rate fills `--duration` with, and its
//! CPU, time, counts and latency log are the row's. The rate is read from
//! each run's log of every request, over the run's middle half, as a
//! short run's setup and tail would understate it. Every run's 2xx count
//! toward the check, the warm-up's too.

mod output;

use std::io::{BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::output::{Summary, record_log, steady_rate};
use super::LoadResult;
use super::result::empty_result;
use crate::layout::CpuList;

/// One row's load over HTTP/2.
#[derive(Debug, Clone)]
pub struct H2Spec {
    pub target: SocketAddr,
    pub connections: usize,
    /// Concurrent streams per connection (h2load's `-m`).
    pub streams: usize,
    pub cpus: CpuList,
    pub warmup: Duration,
    pub duration: Duration,
    /// h2 over TLS (ALPN), else h2c with prior knowledge.
    pub tls: bool,
    /// Where h2load writes the measured run's per-request log (removed
    /// once read).
    pub log: PathBuf,
}

/// h2load on the PATH, or an error saying what to install.
pub fn binary() -> Result<PathBuf, String> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|dir| dir.join("h2load"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "--http2 drives the load with h2load, which is not installed \
             (Debian: apt-get install nghttp2-client)"
                .to_owned()
        })
}

/// Most runs a warm-up makes before the measured one, however short
/// each came out.
const MOST_WARMUP_RUNS: usize = 20;
/// What the first run, sized before any rate is known, is planned to
/// take, for its time limit.
const PROBE_GUESS: Duration = Duration::from_secs(5);

/// Runs the warm-up, then the measured run, and returns what the
/// measured one measured (with every run's 2xx and failures in the
/// totals), with what `sample` returned as it started and as it ended.
pub fn run<S>(spec: &H2Spec, mut sample: impl FnMut() -> S) -> Result<(LoadResult, S, S), String> {
    let binary = binary()?;
    // Every stream at least two requests, so that each connection's
    // streams fill before it winds down.
    let least = (spec.connections * spec.streams * 2) as u64;
    let mut totals = empty_result(Duration::ZERO);
    let warmup_start = Instant::now();
    let mut requests = least;
    let mut planned = PROBE_GUESS;
    let mut rate;
    let mut runs = 0;
    loop {
        fresh_log(&spec.log)?;
        let child = spawn(&binary, spec, requests, &spec.log)?;
        let summary = finish(child, planned)?;
        add(&mut totals, &summary);
        refuse(spec, &summary)?;
        let whole_run = summary.total as f64 / summary.elapsed.as_secs_f64().max(1e-6);
        rate = steady_rate(open_log(&spec.log)?)?.unwrap_or(whole_run);
        runs += 1;
        let left = spec.warmup.saturating_sub(warmup_start.elapsed());
        // A tenth of the warm-up left is not worth a run of its own.
        if left <= spec.warmup / 10 || runs == MOST_WARMUP_RUNS {
            break;
        }
        requests = ((rate * left.as_secs_f64()) as u64).max(least);
        planned = left;
    }

    fresh_log(&spec.log)?;
    let requests = ((rate * spec.duration.as_secs_f64()) as u64).max(least);
    let child = spawn(&binary, spec, requests, &spec.log)?;
    let at_start = sample();
    let summary = finish(child, spec.duration)?;
    let at_end = sample();
    add(&mut totals, &summary);
    refuse(spec, &summary)?;
    if let Some(tls) = &summary.tls {
        // What h2load's OpenSSL negotiated, beside the bench's probe.
        eprintln!(
            "      h2load: {tls}, ALPN {}",
            summary.protocol.as_deref().unwrap_or("none")
        );
    }

    let mut result = empty_result(summary.elapsed);
    result.requests = summary.total;
    result.errors = summary.not_2xx();
    record_log(open_log(&spec.log)?, &mut result.latency)?;
    let _ = std::fs::remove_file(&spec.log);
    result.ok_total = totals.ok_total;
    result.failed_total = totals.failed_total;
    result.first_error = totals.first_error;
    Ok((result, at_start, at_end))
}

/// Removes the last run's log: h2load appends to its log, so a stale one
/// would be read as the next run's.
fn fresh_log(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("{}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

fn open_log(path: &Path) -> Result<BufReader<std::fs::File>, String> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|e| format!("h2load's log {}: {e}", path.display()))
}

/// Adds a run's 2xx and failures to the totals the counter is checked
/// against, and its failures' account if it is the first with any.
fn add(totals: &mut LoadResult, summary: &Summary) {
    totals.ok_total += summary.status[0];
    totals.failed_total += summary.not_2xx();
    if totals.first_error.is_none() && summary.not_2xx() > 0 {
        totals.first_error = Some(summary.failures());
    }
}

/// A run that measured something other than HTTP/2 to this server stops
/// the row: one over another protocol, or one where nothing was answered
/// 2xx (the server does not speak h2, or refused every connection).
fn refuse(spec: &H2Spec, summary: &Summary) -> Result<(), String> {
    let expected = if spec.tls { "h2" } else { "h2c" };
    if let Some(protocol) = summary.protocol.as_deref().filter(|&p| p != expected) {
        return Err(format!("the connections speak {protocol}, not {expected}"));
    }
    if summary.status[0] == 0 {
        return Err(format!("no request succeeded: {}", summary.failures()));
    }
    Ok(())
}

/// Starts `h2load -n requests` on the spec's CPUs, logging every request
/// to `log` (a `write` each; on the 2-CPU VM h2load's CPU per run was the
/// same with and without, within the runs' spread), its output piped to
/// threads that read it whole.
fn spawn(binary: &Path, spec: &H2Spec, requests: u64, log: &Path) -> Result<Running, String> {
    // One thread per load CPU, as the bench's own generator runs; h2load
    // refuses more threads than connections.
    let threads = spec.cpus.len().min(spec.connections).max(1);
    let mut command = Command::new("taskset");
    command
        .arg("-c")
        .arg(spec.cpus.to_string())
        .arg(binary)
        .arg(format!("--threads={threads}"))
        .arg(format!("--clients={}", spec.connections))
        .arg(format!("--max-concurrent-streams={}", spec.streams))
        .arg(format!("--requests={requests}"))
        // A connection silent this long is given up on (its requests
        // count as failed) rather than holding the bench forever.
        .arg("--connection-inactivity-timeout=10s");
    let scheme = if spec.tls {
        // h2 alone: h2load would fall back to HTTP/1.1 (pipelined) with a
        // server that does not offer it, and measure that. The TLS 1.3
        // suites in the order the bench's own client (rustls) offers
        // them, so that `/h2-tls` rows use the suite `/tls` rows do.
        command.args([
            "--npn-list=h2",
            "--tls13-ciphers=TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
        ]);
        "https"
    } else {
        // h2load's default for http:// already; named, as the rows are.
        command.arg("--no-tls-proto=h2c");
        "http"
    };
    command
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("{scheme}://{}/", spec.target))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start h2load (is taskset installed?): {e}"))?;
    let stdout = read_whole(child.stdout.take());
    let stderr = read_whole(child.stderr.take());
    Ok(Running {
        child,
        stdout,
        stderr,
    })
}

/// A running h2load and the threads reading its output.
struct Running {
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

fn read_whole(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Waits for h2load, planned to take about `planned`, and reads its
/// summary. It is killed if it runs far past that (a server that answers
/// now and then, too seldom for `-N`).
fn finish(mut running: Running, planned: Duration) -> Result<Summary, String> {
    let limit = planned * 4 + Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    let status = loop {
        match running.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                // Polled often, as the window's end is sampled when this
                // returns.
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None) => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                return Err(format!(
                    "still running after {}; killed",
                    humantime::format_duration(limit)
                ));
            }
            Err(e) => return Err(format!("waiting for h2load: {e}")),
        }
    };
    let stdout = running.stdout.join().unwrap_or_default();
    let stderr = running.stderr.join().unwrap_or_default();
    Summary::parse(&stdout).map_err(|e| {
        let stderr = stderr.trim();
        if stderr.is_empty() {
            format!("{e} (exit: {status})")
        } else {
            format!("{e} (exit: {status}; stderr: {stderr})")
        }
    })
}
