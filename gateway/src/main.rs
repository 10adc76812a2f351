//! The `gateway` command: run the daemon, check a configuration, or serve
//! only the built-in counter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser as _;
use clap::{CommandFactory, Parser, Subcommand};
use gateway::config::{
    self, Backend, Config, ConfigError, CounterConfig, Named, Plan, RuntimeConfig, StoreKind,
};
use gateway::daemon::{self, Mode};
use gateway::startup_signals::StartupSignals;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "An HTTP gateway that registers every visit with an upstream counter, on tokio or smol."
)]
struct Cli {
    /// The configuration file [default: $GATEWAY_CONFIG, else ./config.toml]
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration, print a one-line summary, and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve only the built-in counter: POST /counter counts, GET /counter reads.
    Counter {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:3001")]
        listen: SocketAddr,
        /// Async runtime to run on.
        #[arg(long, value_parser = backend_parser(), default_value = "tokio")]
        backend: Backend,
        /// Worker threads, at most 1024; 0 = one per CPU this process may run on.
        #[arg(long, default_value_t = 0, value_parser = workers_parser())]
        workers: usize,
        /// Where the count is kept: a file synced before each answer, or
        /// memory (lost at exit).
        #[arg(long, value_enum, default_value = "file")]
        store: StoreKind,
        /// The state file of the file store [default: counter.state in the
        /// working directory].
        #[arg(long, value_name = "PATH")]
        path: Option<PathBuf>,
        /// The database of the postgres store, e.g.
        /// postgres://gateway@127.0.0.1/gateway.
        #[arg(long, value_name = "URL")]
        postgres_url: Option<String>,
    },
}

/// The allocator: mimalloc, which keeps blocks of one size together, so
/// that the few small objects a parked connection keeps do not pin the
/// pages its freed buffers were on, as they do with glibc's malloc. It is
/// told to give a page back to the system as soon as the page is free
/// ([`return_free_pages_at_once`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v2's `mimalloc.h`, which the sys
/// crate gives no name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc return free pages to the system at once. By default it
/// waits a few milliseconds and then purges only when the same thread
/// allocates again: after a crowd of connections has gone idle nothing
/// allocates, and the buffers they freed would stay in the RSS that the
/// operator and the OOM killer see.
fn return_free_pages_at_once() {
    // SAFETY: sets one of mimalloc's options to a value it documents
    // (0: purge at once); called first in `main`, before any thread is
    // started, since mimalloc's option setters are not thread safe.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

fn main() -> ExitCode {
    return_free_pages_at_once();
    // Before anything that can take time: a reload asked for now is acted
    // on once the daemon is up, not the end of it.
    let startup_signals = match StartupSignals::catch() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("gateway: cannot catch signals: {error}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    let loaded = match cli.command {
        Some(Command::Counter {
            listen,
            backend,
            workers,
            store,
            path,
            postgres_url,
        }) => {
            let counter = CounterConfig {
                listen,
                store,
                path,
                postgres_url,
            };
            if let Err((key, why)) = counter.check() {
                let flag = match key {
                    "counter.path" => "--path",
                    "counter.postgres_url" => "--postgres-url",
                    _ => "--store",
                };
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!("{flag}: {why}"),
                    )
                    .exit();
            }
            let config = Config {
                runtime: RuntimeConfig {
                    backend,
                    workers,
                    ..RuntimeConfig::default()
                },
                counter: Some(counter),
                ..Config::default()
            };
            Plan::from_config(config).map(|plan| (plan, Mode::CounterOnly))
        }
        None => load(cli.config).map(|plan| (plan, Mode::Gateway)),
    };
    let (plan, mode) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("gateway: configuration error: {error}");
            return ExitCode::from(78);
        }
    };
    if cli.check {
        println!("configuration ok: {}", plan.summary());
        if let Some(warning) = gateway::reload::certificate_out_of_date(&plan) {
            eprintln!("gateway: warning: {warning}");
        }
        return ExitCode::SUCCESS;
    }
    let log = gateway::logging::init(&plan.config.log.level);
    match daemon::run_plan(plan, mode, log, startup_signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("gateway: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// `--workers`: a number up to [`config::MAX_WORKERS`], as `runtime.workers`.
/// `--backend`: one of the backends' names, which `--help` lists.
fn backend_parser() -> impl clap::builder::TypedValueParser<Value = Backend> {
    clap::builder::PossibleValuesParser::new(Backend::NAMES)
        .try_map(|name: String| Backend::from_name(&name).ok_or("not a backend"))
}

fn workers_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(..=config::MAX_WORKERS as u64)
}

fn load(cli_path: Option<PathBuf>) -> Result<Plan, ConfigError> {
    let (path, reason) = config::locate(cli_path);
    if !path.exists() {
        let path = std::path::absolute(&path).unwrap_or(path);
        return Err(ConfigError::NotFound { path, reason });
    }
    Plan::load(&path)
}

#[cfg(test)]
mod tests {
    use super::return_free_pages_at_once;

    /// The process's resident memory, in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Buffers freed between small objects that stay (idle connections'
    /// buffers, between what each keeps) leave the RSS when they are
    /// freed, with nothing allocated after them.
    #[test]
    fn freed_buffers_leave_the_rss_at_once() {
        return_free_pages_at_once();
        const BUFFERS: usize = 4096;
        let mut kept = Vec::with_capacity(BUFFERS);
        let mut buffers = Vec::with_capacity(BUFFERS);
        for i in 0..BUFFERS {
            buffers.push(vec![i as u8; 16 * 1024]);
            kept.push(Box::new([i as u8; 256]));
        }
        let full = rss_kib();
        drop(buffers);
        let freed = full.saturating_sub(rss_kib());
        // 64 MiB of buffers; the kept objects and the two vectors' own
        // pages stay.
        assert!(freed >= 56 * 1024, "{freed} KiB of 64 MiB left the RSS");
        assert_eq!(
            kept.iter().map(|k| k[0] as usize).sum::<usize>(),
            (0..BUFFERS).map(|i| i % 256).sum()
        );
    }
}
