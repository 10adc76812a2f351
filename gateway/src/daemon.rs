//! Start-up and shutdown of the daemon.
//!
//! [`run_plan`] runs a resolved configuration ([`Plan`]) in named steps:
//! it binds the listeners and opens the store and the upstream pools
//! (`bind`: so "address in use" is reported before any thread starts),
//! hands the rest to `runtime.backend`'s runtime (`Backend::run` is
//! where a name becomes a runtime type), and on it starts the listeners
//! (`start`), handles signals until one says stop, and stops. On
//! SIGTERM/SIGINT the public listener stops accepting and drains first;
//! the built-in counter it may be forwarding to stops after it. SIGHUP reloads (the `reload` module says what);
//! SIGUSR1, SIGUSR2 and SIGALRM are logged and ignored. Those that came
//! while it started (`startup_signals`) are acted on once it is up.

mod bind;
mod start;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::{OnRuntime, Runtime, Signal};
use futures_lite::{Stream, StreamExt};

use self::bind::Bound;
use self::start::{Serving, Stages, StatusSource};
use crate::config::{Config, Escaped, Plan, ms};
use crate::logging::LogLevel;
use crate::reload::Reloader;
use crate::startup_signals::StartupSignals;
use crate::systemd;
use crate::tls::ClientTlsError;
use crate::upstream::UpstreamError;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The gateway, with its counter when `[counter]` is configured.
    Gateway,
    /// Only the counter listener (`gateway counter`).
    CounterOnly,
}

/// Why the daemon could not run; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr} ({name}): {source}")]
    Listen {
        name: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The message names the upstream as configured: escaped.
    #[error("{}", Escaped(.0))]
    Upstream(UpstreamError),
    #[error("cannot resolve upstream {}: {source}", Escaped(.authority))]
    Resolve {
        authority: String,
        source: std::io::Error,
    },
    #[error("cannot open the counter's store: {0}")]
    Store(std::io::Error),
    #[error("the socket passed by systemd (LISTEN_FDS) is not a usable TCP listener: {0}")]
    Activation(std::io::Error),
    #[error("cannot set up TLS: {0}")]
    ServerTls(rustls::Error),
    #[error("cannot set up TLS: {0}")]
    ClientTls(ClientTlsError),
    #[error("cannot start the {backend} runtime: {source}")]
    Runtime {
        backend: &'static str,
        source: std::io::Error,
    },
}

impl Fatal {
    /// The process exit status: 78 (EX_CONFIG) for configuration errors.
    pub fn exit_code(&self) -> u8 {
        match self {
            Fatal::Config(_) => 78,
            _ => 1,
        }
    }
}

/// Runs a configuration given in memory (its relative paths taken from
/// the working directory; nothing to reload): [`run_plan`] on its plan.
pub fn run(
    config: Config,
    mode: Mode,
    log: LogLevel,
    startup_signals: StartupSignals,
) -> Result<(), Fatal> {
    run_plan(Plan::from_config(config)?, mode, log, startup_signals)
}

/// Runs the daemon until SIGTERM/SIGINT, on the backend the plan names;
/// a reload sets `log`'s level. `startup_signals` were caught since the
/// process began: those that came are acted on once the daemon is up.
pub fn run_plan(
    plan: Plan,
    mode: Mode,
    log: LogLevel,
    startup_signals: StartupSignals,
) -> Result<(), Fatal> {
    struct Daemon(Plan, Mode, LogLevel, StartupSignals);
    impl OnRuntime for Daemon {
        type Output = Result<(), Fatal>;
        fn run<R: Runtime>(self) -> Self::Output {
            run_on::<R>(self.0, self.1, self.2, self.3)
        }
    }
    // The one place the daemon turns the configured name into a runtime.
    let backend = plan.config.runtime.backend;
    backend.run(Daemon(plan, mode, log, startup_signals))
}

/// The daemon on runtime `R`: bound before the runtime starts, then, on
/// it, the listeners started, signals handled until a stop, and stopped.
fn run_on<R: Runtime>(
    plan: Plan,
    mode: Mode,
    log: LogLevel,
    startup_signals: StartupSignals,
) -> Result<(), Fatal> {
    raise_open_file_limit(&plan.config, mode);
    let bound = Bound::<R>::bind(&plan, mode)?;
    let (workers, threading) = (plan.workers, plan.config.runtime.threading);
    tracing::info!(
        backend = R::NAME,
        workers,
        threading = threading.name(),
        version = env!("CARGO_PKG_VERSION"),
        "starting"
    );
    let main = async move {
        let signals = R::signals().map_err(|source| Fatal::Runtime {
            backend: R::NAME,
            source,
        })?;
        let during_startup = startup_signals.take();
        let server_tls = bound.public.as_ref().and_then(|public| public.tls);
        let serving = Serving::start::<R>(bound, &plan)?;
        // Every listener is up: tell systemd, and keep telling it that the
        // runtime is alive and what it has done.
        let status = Arc::new(status_line::<R>(serving.status_source, workers));
        systemd::ready(&status());
        let reported = status.clone();
        R::spawn(report_to_systemd::<R>(move || reported()));

        let shutdown_timeout = ms(plan.config.server.shutdown_timeout_ms);
        let reloader = Reloader::new(plan, server_tls, log);
        handle_signals(signals, during_startup, reloader, &*status).await;
        stop(&serving.stages, shutdown_timeout, &*status).await;
        Ok::<(), Fatal>(())
    };
    R::block_on(workers, threading, main).map_err(|source| Fatal::Runtime {
        backend: R::NAME,
        source,
    })?
}

/// The systemd status line: `source`'s requests and open connections.
fn status_line<R: Runtime>(
    source: Option<StatusSource>,
    workers: usize,
) -> impl Fn() -> String + Send + Sync + 'static {
    move || {
        let (requests, open) = source.as_ref().map_or((0, 0), |(connections, requests)| {
            (requests(), connections.open())
        });
        format!(
            "{} with {workers} workers: {requests} requests served, {open} connections open",
            R::NAME
        )
    }
}

/// Acts on the signals that came during the start, then on each as it
/// comes, until SIGTERM or SIGINT. SIGHUP reloads (and tells systemd).
async fn handle_signals(
    mut signals: impl Stream<Item = Signal> + Unpin,
    during_startup: Vec<Signal>,
    mut reloader: Reloader,
    status: &(impl Fn() -> String + Sync),
) {
    let mut on_signal = |signal, when| match signal {
        Signal::Terminate | Signal::Interrupt => Stopping::Yes,
        Signal::Hangup => {
            tracing::info!("SIGHUP{when}: reloading the configuration");
            systemd::reloading();
            reloader.reload();
            systemd::ready(&status());
            Stopping::No
        }
        // The write that raised it fails, and says so itself.
        Signal::FileSizeLimit => Stopping::No,
        other => {
            tracing::warn!(signal = other.name(), "signal{when} ignored");
            Stopping::No
        }
    };
    // Never a stop: SIGTERM and SIGINT end a start by their default action.
    for signal in during_startup {
        on_signal(signal, " during start-up");
    }
    while let Some(signal) = signals.next().await {
        if on_signal(signal, "") == Stopping::Yes {
            break;
        }
    }
}

/// The last step: every listener stopped, in order, within
/// `shutdown_timeout`, with systemd told.
async fn stop(stages: &Stages, shutdown_timeout: Duration, status: &impl Fn() -> String) {
    tracing::info!("shutdown signal received");
    systemd::stopping(&format!("stopping; {}", status()));
    stages.stop(shutdown_timeout).await;
    tracing::info!("stopped");
}

/// Whether a signal stops the daemon.
#[derive(PartialEq, Eq)]
enum Stopping {
    Yes,
    No,
}

/// Connections the admin listener holds at most: scrapes and health
/// checks are few, and they must not take descriptors from visitors.
pub(super) const ADMIN_MAX_CONNECTIONS: usize = 1024;

/// Pings the watchdog at half its timeout and refreshes `STATUS=` every
/// few seconds. It runs as a task on the runtime itself, so a stuck
/// executor stops the pings and systemd restarts the service.
async fn report_to_systemd<R: Runtime>(status: impl Fn() -> String + Send + 'static) {
    const STATUS_EVERY: Duration = Duration::from_secs(5);
    let watchdog = systemd::watchdog_interval();
    let tick = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    let mut last_status = Instant::now();
    loop {
        R::sleep_until(Instant::now() + tick).await;
        if watchdog.is_some() {
            systemd::watchdog();
        }
        if last_status.elapsed() >= STATUS_EVERY {
            systemd::status(&status());
            last_status = Instant::now();
        }
    }
}

/// Raises the open-file soft limit to the hard limit, and warns when even
/// that is short of what the configured connection caps need.
fn raise_open_file_limit(config: &Config, mode: Mode) {
    let needed = open_files_needed(config, mode);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what server.max_connections and upstream.max_connections need; raise LimitNOFILE / ulimit -n"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}

/// Descriptors the configured caps can hold open at once: every client
/// connection, every upstream connection (twice with the built-in counter
/// in this process: it holds the other end), the admin listener's cap, and
/// a few for listeners, the journal and the like. `gateway counter` has
/// none of those caps: its clients' connections are not capped.
fn open_files_needed(config: &Config, mode: Mode) -> u64 {
    const FEW: u64 = 64;
    if mode == Mode::CounterOnly {
        return FEW;
    }
    let upstream = config.upstream.max_connections as u64;
    let counter_ends = if config.counter.is_some() {
        upstream
    } else {
        0
    };
    let admin = if config.admin.is_some() {
        ADMIN_MAX_CONNECTIONS as u64
    } else {
        0
    };
    config.server.max_connections as u64 + upstream + counter_ends + admin + FEW
}

#[cfg(test)]
mod tests {
    use super::{Config, Mode, open_files_needed};

    #[test]
    fn open_files_needed_counts_every_listener_and_both_ends_of_the_counter() {
        let config = |text: &str| Config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let open_files_needed = |config| open_files_needed(&config, Mode::Gateway);
        let caps = "[server]\nmax_connections = 1000\n[upstream]\nmax_connections = 100\n";
        assert_eq!(open_files_needed(config(caps)), 1000 + 100 + 64);
        assert_eq!(
            open_files_needed(config(&format!("{caps}[counter]\n[admin]\n"))),
            1000 + 100 + 100 + 1024 + 64
        );
        // The largest caps the configuration allows add up without overflow.
        let most = format!(
            "[server]\nmax_connections = {max}\n[upstream]\nmax_connections = {max}\n[counter]\n[admin]\n",
            max = crate::config::MAX_CONNECTIONS
        );
        assert_eq!(open_files_needed(config(&most)), 3 * (1 << 31) + 1024 + 64);
    }
}
