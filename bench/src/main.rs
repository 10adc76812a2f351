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
//! [`tls`]); with `--http2`, over HTTP/2, with h2load as the load
//! generator (see [`load::h2load`]). Outputs: a table on stdout,
//! `results.json` and `throughput.svg` in `--out`.

mod cpu;
mod layout;
mod load;
mod measure;
mod procs;
mod report;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use backends::{Backend, Named};
use clap::Parser;

use crate::layout::{Layout, available_cpus, cpu_model};
use crate::measure::{measure, measure_local};
use crate::report::Report;

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
    /// Measure every row over HTTP/2 with h2load (Debian's
    /// nghttp2-client) instead of the bench's own HTTP/1.1 generator:
    /// h2c with prior knowledge, or with --tls h2 by ALPN; rows are named
    /// `backend/h2` or `backend/h2-tls`.
    #[arg(long)]
    http2: bool,
    /// With --http2: concurrent streams on each connection (h2load's -m).
    #[arg(long, value_name = "M", default_value_t = 32, requires = "http2")]
    streams: usize,
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

/// The options' checks that clap's own do not make: an error names the
/// option and says what to give.
fn check(options: &Options) -> Result<(), String> {
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
    if options.http2 {
        if options.streams == 0 {
            return Err("--streams: give 1 or more streams a connection".to_owned());
        }
        // What h2load cannot do as the bench's own generator does: an
        // open loop corrected for coordinated omission, a connection per
        // request, clients beside the load; and wrk speaks HTTP/1.1.
        let unsupported = [
            (options.rate.is_some(), "--rate"),
            (options.new_connections, "--new-connections"),
            (options.stalled > 0, "--stalled"),
            (options.idle > 0, "--idle"),
            (options.wrk, "--wrk"),
        ];
        if let Some((_, option)) = unsupported.iter().find(|(given, _)| *given) {
            return Err(format!(
                "--http2: h2load drives the load, and {option} is the bench's own \
                 generator's (HTTP/1.1); not with --http2"
            ));
        }
    }
    if options.tls && options.target.is_some() {
        return Err(
            "--tls: only the servers the bench starts present its certificate; \
             not with --target"
                .to_owned(),
        );
    }
    Ok(())
}

fn run(options: &Options) -> Result<bool, String> {
    check(options)?;
    if options.http2 {
        // Missing, it should stop the run before any server starts.
        load::h2load::binary()?;
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
    // program would have. With --http2 it only makes the probe before a
    // server's rows, offering h2 alone, as h2load will: a server without
    // h2 fails there, with rustls's reason.
    let client = certificates
        .as_ref()
        .map(|c| c.client_config(!options.new_connections))
        .transpose()?
        .map(|config| {
            if !options.http2 {
                return config;
            }
            let mut config = (*config).clone();
            config.alpn_protocols = vec![b"h2".to_vec()];
            std::sync::Arc::new(config)
        });

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
        http2: options.http2,
        streams: options.http2.then_some(options.streams),
        new_connections: options.new_connections,
        stalled: options.stalled,
        idle: options.idle,
        rows,
    };
    print!("{}", report::table(&report));
    let json = out.join("results.json");
    let svg = out.join("throughput.svg");
    report::write_json(&report, &json)?;
    report::write_svg(&report, &command_line(), &svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(report.rows.iter().all(|r| r.count_ok != Some(false)))
}

/// How this run was started, as it could be typed again: the program's
/// name, then its arguments, each quoted where a shell would need it.
fn command_line() -> String {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .and_then(|path| {
            std::path::Path::new(&path)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "bench".to_owned());
    let mut line = program;
    for arg in args {
        let arg = arg.to_string_lossy();
        let plain = !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@%+".contains(c));
        line.push(' ');
        if plain {
            line.push_str(&arg);
        } else {
            line.push_str(&format!("'{}'", arg.replace('\'', "'\\''")));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(args: &[&str]) -> Result<(), String> {
        let options =
            Options::try_parse_from(["bench"].iter().chain(args)).map_err(|e| e.to_string())?;
        check(&options)
    }

    #[test]
    fn http2_takes_streams_and_refuses_what_only_the_own_generator_does() {
        assert_eq!(checked(&["--http2", "--tls", "--streams", "8"]), Ok(()));
        assert!(checked(&["--streams", "8"]).is_err(), "--streams alone");
        let zero = checked(&["--http2", "--streams", "0"]).unwrap_err();
        assert!(zero.starts_with("--streams"), "{zero}");
        for option in [
            &["--rate", "100"][..],
            &["--new-connections"],
            &["--idle", "3"],
            &["--wrk"],
        ] {
            let args: Vec<&str> = ["--http2"].iter().chain(option).copied().collect();
            let error = checked(&args).unwrap_err();
            assert!(error.contains(option[0]), "{error}");
        }
    }
}
