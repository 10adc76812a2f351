//! `cargo run --release -p bench`: the gateway's throughput on each
//! backend, side by side in one run, with nginx as an outside yardstick.
//!
//! It starts `gateway counter` as the upstream, then for each target (each
//! backend, then nginx) starts it with identical settings and drives
//! load at each concurrency level (keep-alive connections, or with
//! `--new-connections` one per request), checking every answer and
//! that the counter's tally grew by exactly the 200s seen. Processes are
//! pinned to disjoint CPU sets (see [`layout`]). With `--tls` every
//! server is reached over HTTPS on a certificate the bench makes (see
//! [`tls`]). Outputs: a table on stdout, `results.json` and
//! `throughput.svg` in `--out`.

mod cpu;
mod layout;
mod load;
mod procs;
mod report;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use backends::{Backend, Named};
use clap::Parser;
use rustls::ClientConfig;

use crate::layout::{Layout, available_cpus, cpu_model};
use crate::load::LoadSpec;
use crate::report::{Report, Row};

#[derive(Debug, Parser)]
#[command(about = "Compare the gateway's throughput across backends (and nginx) on this host.")]
struct Options {
    /// Backends to measure, in order; a bare name runs the gateway's
    /// default threading (per-core), `backend/shared` or
    /// `backend/per-core` names it, and a last `/batchN` sets
    /// `upstream.batch_max = N`, e.g. `tokio,tokio/shared,smol/batch64`;
    /// `--backends ''` with `--reference nginx` measures nginx alone.
    #[arg(long, value_delimiter = ',', default_values_t = Backend::NAMES.iter().map(|&name| name.to_owned()))]
    backends: Vec<String>,
    /// Also measure each backend with `upstream.batch_max = N`: a
    /// `backend/batchN` row after each one in --backends that names none.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Concurrency levels: keep-alive connections held open by the load
    /// generator (with --new-connections: requests in flight, each on a
    /// connection of its own).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024")]
    connections: Vec<usize>,
    /// Open a new connection for every request (sent with `connection:
    /// close`) instead of keeping connections alive; with --tls, each makes
    /// a full handshake (no session resumption).
    #[arg(long)]
    new_connections: bool,
    /// Serve every row over HTTPS, TLS 1.3, on an ECDSA P-256 certificate
    /// the bench makes at start (PEM files in --out/tls); rows are named
    /// `backend/tls`. The upstream side stays plain http.
    #[arg(long)]
    tls: bool,
    /// Hold this many clients beside the load that open a connection,
    /// send the first bytes of a request (with --tls, of a ClientHello) and
    /// never finish it, reconnecting when the server closes them at its
    /// header-read timeout: to see whether they move the others' latency.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// Hold this many keep-alive connections beside the load, each idle
    /// after one request (made over the warm-up): to see whether a crowd
    /// of idle connections slows the busy ones. The bench and the server
    /// each need a descriptor per connection (`ulimit -n`).
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Measured time per level.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before measuring, per level (excluded from the numbers).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Gateway worker threads (and nginx workers) [default: the gateway's CPUs].
    #[arg(long)]
    workers: Option<usize>,
    /// CPU layout override, e.g. "gateway=0-3 counter=4-7 load=8-15".
    #[arg(long)]
    cpus: Option<String>,
    /// Open loop at this many requests/s (latency corrected for coordinated
    /// omission); without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Repeat every measurement this many times, the targets in a rotated
    /// order each round; the table shows each row's median round. On a
    /// shared, noisy host one round can move a row by 20%.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Add a reference row: `nginx`.
    #[arg(long)]
    reference: Option<String>,
    /// Also run wrk on each target with the same connections and CPUs, to
    /// check the load generator is not the bottleneck.
    #[arg(long)]
    wrk: bool,
    /// Measure an already running server at this address instead (no
    /// counter check); with --wrk, to compare the load generator with wrk.
    #[arg(long)]
    target: Option<SocketAddr>,
    /// The gateway binary to run [default: the `gateway` installed beside
    /// this program, else the workspace's release build, built if
    /// missing]; e.g. to compare two builds.
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Where results.json and throughput.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Where the counter keeps its count: `memory` (a reference upstream
    /// that measures the gateway alone), `file` (the shipped default,
    /// synced before each 200; its state file starts fresh in --out), or
    /// `postgres` (committed before each 200, in --postgres-url).
    #[arg(long, default_value = "memory", value_parser = ["memory", "file", "postgres"])]
    counter_store: String,
    /// The database of `--counter-store postgres` (a server you run; its
    /// CPU is not pinned or measured).
    #[arg(long, value_name = "URL", required_if_eq("counter_store", "postgres"))]
    postgres_url: Option<String>,
}

fn main() -> ExitCode {
    let options = Options::parse();
    match run(&options) {
        Ok(all_counted) => {
            if all_counted {
                ExitCode::SUCCESS
            } else {
                eprintln!("bench: the counter's tally did not match the 200s seen (count ok = NO)");
                ExitCode::from(3)
            }
        }
        Err(message) => {
            eprintln!("bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> Result<bool, String> {
    if options.batch.is_some_and(|n| n < 2) {
        return Err("--batch: give 2 or more visits a POST (1 is the unbatched row)".to_owned());
    }
    for target in options.backends.iter().filter(|t| !t.is_empty()) {
        procs::GatewayTarget::parse(target).map_err(|e| format!("--backends: {e}"))?;
    }
    if options.backends.iter().all(|t| t.is_empty()) && options.reference.is_none() {
        return Err("--backends: none given, and no --reference to measure".to_owned());
    }
    if options.connections.is_empty() || options.connections.contains(&0) {
        return Err("--connections: give one or more counts above 0".to_owned());
    }
    if let Some(reference) = &options.reference {
        if reference != "nginx" {
            return Err(format!("--reference: `{reference}` is not nginx"));
        }
    }
    if options.rounds == 0 {
        return Err("--rounds must be 1 or more".to_owned());
    }
    if options.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err("--rate must be above 0".to_owned());
    }
    if options.tls && options.target.is_some() {
        return Err(
            "--tls: only the servers the bench starts present its certificate; \
             not with --target"
                .to_owned(),
        );
    }
    let cpus = available_cpus();
    let mut layout = Layout::for_cpus(&cpus);
    if let Some(spec) = &options.cpus {
        layout = layout
            .override_with(spec)
            .map_err(|e| format!("--cpus: {e}"))?;
    }
    let workers = options.workers.unwrap_or(layout.gateway.len()).max(1);
    std::fs::create_dir_all(&options.out).map_err(|e| format!("{}: {e}", options.out.display()))?;
    let out = options
        .out
        .canonicalize()
        .map_err(|e| format!("{}: {e}", options.out.display()))?;
    let certificates = options.tls.then(|| tls::generate(&out)).transpose()?;
    // One configuration for every connection of every row, as one client
    // program would have.
    let client = certificates
        .as_ref()
        .map(|c| c.client_config(!options.new_connections))
        .transpose()?;

    let mut rows = Vec::new();
    if let Some(target) = options.target {
        // An already running server: no counter to check against.
        eprintln!(
            "bench: {} ({} CPUs): load on CPUs {} against {target}",
            cpu_model(),
            cpus.len(),
            layout.load
        );
        for (index, &connections) in options.connections.iter().enumerate() {
            let progress = format!("[{}/{}] {target}", index + 1, options.connections.len());
            rows.push(measure(
                options,
                &layout,
                "target",
                workers,
                target,
                None,
                None,
                None,
                connections,
                &progress,
            )?);
        }
    } else {
        let https = certificates.as_ref().zip(client.as_ref());
        rows = measure_local(options, &layout, workers, &cpus, &out, https)?;
    }

    let report = Report {
        cpu_model: cpu_model(),
        cpus: cpus.len(),
        layout,
        duration_s: options.duration.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        rate: options.rate,
        rounds: options.rounds,
        counter_store: options.counter_store.clone(),
        tls: options.tls,
        new_connections: options.new_connections,
        stalled: options.stalled,
        idle: options.idle,
        rows,
    };
    print!("{}", report::table(&report));
    let json = out.join("results.json");
    let svg = out.join("throughput.svg");
    report::write_json(&report, &json)?;
    report::write_svg(&report, &svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(report.rows.iter().all(|r| r.count_ok != Some(false)))
}

/// Starts the counter, then each backend's gateway (and nginx), and
/// measures each at every concurrency level; with `https`, each server
/// serves those certificates and the load connects with that client.
fn measure_local(
    options: &Options,
    layout: &Layout,
    workers: usize,
    cpus: &[usize],
    out: &std::path::Path,
    https: Option<(&tls::Certificates, &Arc<ClientConfig>)>,
) -> Result<Vec<Row>, String> {
    let binary = match &options.gateway {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => return Err(format!("--gateway: no file at {}", path.display())),
        None => procs::gateway_binary()?,
    };
    let nginx = match options.reference.as_deref() {
        Some("nginx") => match procs::nginx_binary() {
            Some(path) => Some(path),
            None => {
                eprintln!("bench: nginx is not installed; no reference row");
                None
            }
        },
        _ => None,
    };
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
    let certificates = https.map(|(certificates, _)| certificates);
    if let Some(files) = certificates {
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

    let mut targets: Vec<String> = Vec::new();
    for target in options.backends.iter().filter(|t| !t.is_empty()) {
        targets.push(target.clone());
        if let Some(batch) = options.batch {
            if !target.contains("/batch") {
                targets.push(format!("{target}/batch{batch}"));
            }
        }
    }
    if nginx.is_some() {
        targets.push("nginx".to_owned());
    }
    if targets.is_empty() {
        return Err("nothing to measure: no backend, and nginx is not installed".to_owned());
    }
    let total_runs = options.rounds * targets.len() * options.connections.len();
    let mut run_index = 0;
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        // Rotated, so that no target always runs first (or last) in a
        // round while the host's load drifts.
        let mut order = targets.clone();
        order.rotate_left((round - 1) % targets.len());
        for target in &order {
            let server = match (target.as_str(), &nginx) {
                ("nginx", Some(nginx)) => procs::start_nginx(
                    nginx,
                    &layout.gateway,
                    workers,
                    counter.addr,
                    out,
                    certificates,
                )?,
                _ => procs::start_gateway(
                    &binary,
                    &layout.gateway,
                    target,
                    workers,
                    counter.addr,
                    out,
                    certificates,
                )?,
            };
            // The row's name says it ran over TLS, as `/batchN` says what
            // else differs from a bare backend.
            let label = match https {
                Some(_) => format!("{target}/tls"),
                None => target.clone(),
            };
            // What the server negotiated, once per start; a server that
            // does not present the bench's certificate stops the run here.
            let negotiated = match https {
                Some((_, client)) => {
                    let negotiated = load::tls_probe(server.addr, Arc::clone(client))
                        .map_err(|e| format!("{label} at {}: {e}", server.addr))?;
                    eprintln!("      {label}: {negotiated}");
                    Some(negotiated)
                }
                None => None,
            };
            for &connections in &options.connections {
                run_index += 1;
                let progress = format!("[{run_index}/{total_runs}] {label}");
                let mut row = measure(
                    options,
                    layout,
                    &label,
                    workers,
                    server.addr,
                    Some(&server),
                    Some(&counter),
                    https.map(|(_, client)| client),
                    connections,
                    &progress,
                )?;
                row.round = round;
                row.tls = negotiated.clone();
                rows.push(row);
            }
            server.stop();
        }
    }
    counter.stop();
    Ok(rows)
}

/// One row: load at one concurrency level, checked against the counter's
/// tally when there is one, with each side's CPU time over the window, and
/// cross-checked with wrk when asked.
#[allow(clippy::too_many_arguments)]
fn measure(
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
    eprintln!(
        "{progress}, {connections} {}: {} warm-up, {} measured{}",
        if options.new_connections {
            "in flight, a new connection each"
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
    let before = counter_addr.map(procs::settled_tally).transpose()?;
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
    let (server_pid, counter_pid) = (server.map(|s| s.pid()), counter.map(|c| c.pid()));
    let (result, window_start, window_end) =
        load::run(&spec, || cpu::Sample::take(server_pid, counter_pid))
            .map_err(|e| format!("load generator: {e}"))?;
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
        wrk.map(|w| format!(", wrk {w:.0} requests/s"))
            .unwrap_or_default()
    );
    Ok(row)
}
