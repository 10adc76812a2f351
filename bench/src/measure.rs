//! The measuring loop: the counter, then each target's server started in
//! turn, round after round, and load at each concurrency level against
//! it, each row checked against the counter's tally and with each side's
//! CPU time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;

use crate::Options;
use crate::cpu;
use crate::layout::{Layout, cpu_model};
use crate::load::h2load::H2Spec;
use crate::load::{self, LoadSpec};
use crate::procs;
use crate::report::Row;
use crate::tls;

/// Starts the counter, then each backend's gateway (and nginx), and
/// measures each at every concurrency level; with `https`, each server
/// serves those certificates and the load connects with that client.
pub fn measure_local(
    options: &Options,
    layout: &Layout,
    workers: usize,
    cpus: &[usize],
    out: &Path,
    https: Option<(&tls::Certificates, &Arc<ClientConfig>)>,
) -> Result<Vec<Row>, String> {
    let binary = match &options.gateway {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => return Err(format!("--gateway: no file at {}", path.display())),
        None => procs::gateway_binary()?,
    };
    let nginx = reference_nginx(options);
    eprintln!(
        "bench: {} ({} CPUs): gateway on CPUs {} ({} workers), counter ({} store) on {}, load on {}",
        cpu_model(),
        cpus.len(),
        layout.gateway,
        workers,
        options.counter_store,
        layout.counter,
        layout.load
    );
    if let Some((files, _)) = https {
        eprintln!(
            "bench: HTTPS on {} and {} (CA {})",
            files.chain.display(),
            files.key.display(),
            files.ca.display()
        );
    }
    let counter = procs::start_counter(
        &binary,
        &layout.counter,
        &options.counter_store,
        options.postgres_url.as_deref(),
        out,
    )?;
    let targets = targets(options, nginx.is_some())?;
    let local = Local {
        options,
        layout,
        workers,
        out,
        https,
        binary,
        nginx,
        counter,
    };
    let mut runs = Runs {
        done: 0,
        total: options.rounds * targets.len() * options.connections.len(),
    };
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        // Rotated, so that no target always runs first (or last) in a
        // round while the host's load drifts.
        let mut order = targets.clone();
        order.rotate_left((round - 1) % targets.len());
        for target in &order {
            rows.extend(local.measure_target(target, round, &mut runs)?);
        }
    }
    local.counter.stop();
    Ok(rows)
}

/// nginx, where `--reference nginx` asks for it and it is installed.
fn reference_nginx(options: &Options) -> Option<PathBuf> {
    match options.reference.as_deref() {
        Some("nginx") => match procs::nginx_binary() {
            Some(path) => Some(path),
            None => {
                eprintln!("bench: nginx is not installed; no reference row");
                None
            }
        },
        _ => None,
    }
}

/// The targets of a round, in order: each of `--backends`, each followed
/// by its `--batch` row, then nginx.
fn targets(options: &Options, with_nginx: bool) -> Result<Vec<String>, String> {
    let mut targets: Vec<String> = Vec::new();
    for target in options.backends.iter().filter(|t| !t.is_empty()) {
        targets.push(target.clone());
        if let Some(batch) = options.batch {
            if !target.contains("/batch") {
                targets.push(format!("{target}/batch{batch}"));
            }
        }
    }
    if with_nginx {
        targets.push("nginx".to_owned());
    }
    if targets.is_empty() {
        return Err("nothing to measure: no backend, and nginx is not installed".to_owned());
    }
    Ok(targets)
}

/// How far through all its runs (a target at a concurrency level, in a
/// round) the bench is, for the progress lines.
struct Runs {
    done: usize,
    total: usize,
}

/// What every target measured on this host shares: the options, the CPUs,
/// the binaries, HTTPS, and the running counter.
struct Local<'a> {
    options: &'a Options,
    layout: &'a Layout,
    workers: usize,
    out: &'a Path,
    https: Option<(&'a tls::Certificates, &'a Arc<ClientConfig>)>,
    binary: PathBuf,
    nginx: Option<PathBuf>,
    counter: procs::Running,
}

impl Local<'_> {
    /// Starts `target`'s server, measures it at every concurrency level,
    /// and stops it.
    fn measure_target(
        &self,
        target: &str,
        round: usize,
        runs: &mut Runs,
    ) -> Result<Vec<Row>, String> {
        let server = self.start(target)?;
        // The row's name says it ran over TLS or HTTP/2, as `/batchN`
        // says what else differs from a bare backend.
        let label = match (self.options.http2, self.https.is_some()) {
            (false, false) => target.to_owned(),
            (false, true) => format!("{target}/tls"),
            (true, false) => format!("{target}/h2"),
            (true, true) => format!("{target}/h2-tls"),
        };
        // What the server negotiated, once per start; a server that
        // does not present the bench's certificate stops the run here.
        let negotiated = match self.https {
            Some((_, client)) => {
                let negotiated = load::tls_probe(server.addr, Arc::clone(client)).map_err(|e| {
                    let offered = if self.options.http2 {
                        " (--http2 offers ALPN h2 alone)"
                    } else {
                        ""
                    };
                    format!("{label} at {}: {e}{offered}", server.addr)
                })?;
                eprintln!("      {label}: {negotiated}");
                Some(negotiated)
            }
            None => None,
        };
        let mut rows = Vec::new();
        for &connections in &self.options.connections {
            runs.done += 1;
            let progress = format!("[{}/{}] {label}", runs.done, runs.total);
            let mut row = measure(
                self.options,
                self.layout,
                &label,
                self.workers,
                server.addr,
                Some(&server),
                Some(&self.counter),
                self.https.map(|(_, client)| client),
                connections,
                &progress,
            )?;
            row.round = round;
            row.tls = negotiated.clone();
            rows.push(row);
        }
        server.stop();
        Ok(rows)
    }

    /// `target`'s server: nginx, or the gateway with the row's settings.
    fn start(&self, target: &str) -> Result<procs::Running, String> {
        let certificates = self.https.map(|(certificates, _)| certificates);
        match (target, &self.nginx) {
            ("nginx", Some(nginx)) => procs::start_nginx(
                nginx,
                &self.layout.gateway,
                self.workers,
                self.counter.addr,
                self.out,
                certificates,
                self.options.http2,
            ),
            _ => procs::start_gateway(
                &self.binary,
                &self.layout.gateway,
                target,
                self.workers,
                self.counter.addr,
                self.out,
                certificates,
            ),
        }
    }
}

/// One row: load at one concurrency level, checked against the counter's
/// tally when there is one, with each side's CPU time over the window, and
/// cross-checked with wrk when asked.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    options: &Options,
    layout: &Layout,
    target: &str,
    workers: usize,
    addr: SocketAddr,
    server: Option<&procs::Running>,
    counter: Option<&procs::Running>,
    tls: Option<&Arc<ClientConfig>>,
    connections: usize,
    progress: &str,
) -> Result<Row, String> {
    let counter_addr = counter.map(|c| c.addr);
    announce(options, connections, progress);
    let before = counter_addr.map(procs::settled_tally).transpose()?;
    let (server_pid, counter_pid) = (server.map(|s| s.pid()), counter.map(|c| c.pid()));
    let sample = || cpu::Sample::take(server_pid, counter_pid);
    let (result, window_start, window_end) = if options.http2 {
        let spec = H2Spec {
            target: addr,
            connections,
            streams: options.streams,
            cpus: layout.load.clone(),
            warmup: options.warmup,
            duration: options.duration,
            tls: tls.is_some(),
            log: options.out.join("h2load-requests.log"),
        };
        load::h2load::run(&spec, sample).map_err(|e| format!("{target} at {addr}: h2load: {e}"))?
    } else {
        let spec = LoadSpec {
            target: addr,
            connections,
            cpus: layout.load.clone(),
            warmup: options.warmup,
            duration: options.duration,
            rate: options.rate,
            new_connections: options.new_connections,
            tls: tls.cloned(),
            stalled: options.stalled,
            idle: options.idle,
        };
        load::run(&spec, sample).map_err(|e| format!("load generator: {e}"))?
    };
    let cpu = cpu::Usage::between(&window_start, &window_end);
    let after = counter_addr.map(procs::settled_tally).transpose()?;
    let tally_delta = before.zip(after).map(|(before, after)| after - before);
    if let Some(error) = &result.first_error {
        // A row with no 200 at all measured nothing but the failure.
        if result.ok_total == 0 {
            return Err(format!("{target} at {addr}: no request succeeded: {error}"));
        }
        eprintln!("      first error: {error}");
    }
    let wrk = if options.wrk {
        procs::wrk(
            &layout.load,
            addr,
            connections,
            options.duration,
            tls.is_some(),
            options.new_connections,
        )
    } else {
        None
    };
    let row = Row {
        target: target.to_owned(),
        workers,
        connections,
        requests: result.requests,
        requests_per_second: result.requests_per_second(),
        p50_us: result.latency.value_at_quantile(0.50),
        p99_us: result.latency.value_at_quantile(0.99),
        p999_us: result.latency.value_at_quantile(0.999),
        errors: result.errors,
        count_ok: tally_delta.map(|delta| delta == result.ok_total),
        ok_total: result.ok_total,
        tally_delta,
        wrk_requests_per_second: wrk,
        round: 1,
        cpu,
        tls: None,
    };
    print_row(&row);
    Ok(row)
}

/// The progress line before a row's load starts.
fn announce(options: &Options, connections: usize, progress: &str) {
    let streams = format!("connections of {} streams (h2load)", options.streams);
    eprintln!(
        "{progress}, {connections} {}: {} warm-up, {} measured{}",
        if options.new_connections {
            "in flight, a new connection each"
        } else if options.http2 {
            &streams
        } else {
            "connections"
        },
        humantime::format_duration(options.warmup),
        humantime::format_duration(options.duration),
        options
            .rate
            .map(|r| format!(", open loop at {r:.0}/s"))
            .unwrap_or_default()
    );
}

/// What a row measured, in one line after its load.
fn print_row(row: &Row) {
    eprintln!(
        "      {:.0} requests/s, p99 {:.2}ms, {} errors, count {}{}",
        row.requests_per_second,
        row.p99_us as f64 / 1000.0,
        row.errors,
        match row.count_ok {
            Some(true) => "ok",
            Some(false) => "MISMATCH",
            None => "not checked",
        },
        row.wrk_requests_per_second
            .map(|w| format!(", wrk {w:.0} requests/s"))
            .unwrap_or_default()
    );
}
