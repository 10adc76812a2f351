//! The `gateway` command: run the daemon, check a configuration, or serve
//! only the built-in counter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use gateway::config::{
    self, Backend, Config, ConfigError, CounterConfig, RuntimeConfig, StoreKind,
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
        #[arg(long, value_enum, default_value = "tokio")]
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

fn main() -> ExitCode {
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
    let (config, mode) = match cli.command {
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
            (config, Mode::CounterOnly)
        }
        None => match load(cli.config) {
            Ok(config) => (config, Mode::Gateway),
            Err(error) => {
                eprintln!("gateway: configuration error: {error}");
                return ExitCode::from(78);
            }
        },
    };
    if cli.check {
        println!("configuration ok: {}", config.summary());
        if let Some(warning) = gateway::reload::certificate_out_of_date(&config) {
            eprintln!("gateway: warning: {warning}");
        }
        return ExitCode::SUCCESS;
    }
    let log = gateway::logging::init(&config.log.level);
    match daemon::run(config, mode, log, startup_signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("gateway: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// `--workers`: a number up to [`config::MAX_WORKERS`], as `runtime.workers`.
fn workers_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(..=config::MAX_WORKERS as u64)
}

fn load(cli_path: Option<PathBuf>) -> Result<Config, ConfigError> {
    let (path, reason) = config::locate(cli_path);
    if !path.exists() {
        let path = std::path::absolute(&path).unwrap_or(path);
        return Err(ConfigError::NotFound { path, reason });
    }
    Config::load(&path)
}
