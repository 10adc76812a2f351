//! Start-up and shutdown of the daemon.
//!
//! [`run`] binds the listeners (so "address in use" is reported before any
//! thread starts), picks the runtime from `runtime.backend` — the only
//! place in the gateway that names a backend type — and runs everything
//! else generically over it. On SIGTERM/SIGINT the public listener stops
//! accepting and drains first; the built-in counter it may be forwarding to
//! stops after it. SIGHUP reloads (the `reload` module says what);
//! SIGUSR1, SIGUSR2 and SIGALRM are logged and ignored. Those that came
//! while it started (`startup_signals`) are acted on once it is up.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::{OnRuntime, Runtime, Signal};
use futures_lite::StreamExt;

use crate::admin::Admin;
use crate::config::{Config, Escaped, Threading, ms};
use crate::counter::Counter;
use crate::forever;
use crate::forward::Forward;
use crate::logging::LogLevel;
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::reload::Reloader;
use crate::server::{Connections, ServerSettings, serve, spawn_with_latch};
use crate::service::Service;
use crate::shutdown::{Latch, Stop};
use crate::startup_signals::StartupSignals;
use crate::systemd;
use crate::tls::{ClientTls, ServerTls};
use crate::upstream::Upstream;

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
    Upstream(String),
    #[error("cannot open the counter's store: {0}")]
    Store(std::io::Error),
    #[error("the socket passed by systemd (LISTEN_FDS) is not a usable TCP listener: {0}")]
    Activation(std::io::Error),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
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

/// Runs the daemon until SIGTERM/SIGINT, on the backend the config names;
/// a reload sets `log`'s level. `startup_signals` were caught since the
/// process began: those that came are acted on once the daemon is up.
pub fn run(
    config: Config,
    mode: Mode,
    log: LogLevel,
    startup_signals: StartupSignals,
) -> Result<(), Fatal> {
    struct Daemon(Config, Mode, LogLevel, StartupSignals);
    impl OnRuntime for Daemon {
        type Output = Result<(), Fatal>;
        fn run<R: Runtime>(self) -> Self::Output {
            run_on::<R>(self.0, self.1, self.2, self.3)
        }
    }
    // The one place the daemon turns the configured name into a runtime.
    let backend = config.runtime.backend;
    backend.run(Daemon(config, mode, log, startup_signals))
}

fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, Fatal> {
    backends::bind_listener(addr).map_err(|source| Fatal::Listen { name, addr, source })
}

fn adopt<R: Runtime>(
    name: &'static str,
    listener: TcpListener,
) -> Result<(R::Listener, SocketAddr), Fatal> {
    let addr = listener.local_addr().map_err(|source| Fatal::Listen {
        name,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let listener =
        R::adopt_listener(listener).map_err(|source| Fatal::Listen { name, addr, source })?;
    tracing::info!("listening on {addr} ({name})");
    Ok((listener, addr))
}

fn run_on<R: Runtime>(
    config: Config,
    mode: Mode,
    log: LogLevel,
    startup_signals: StartupSignals,
) -> Result<(), Fatal> {
    raise_open_file_limit(&config, mode);
    let workers = config.runtime.worker_count();
    // The store first: a state file that is corrupt or in use by another
    // process stops the start before anything listens.
    let counter_listener = match &config.counter {
        Some(counter) => {
            // A batch's count must come as fast as the head before it.
            let body_timeout = ms(config.server.header_read_timeout_ms);
            let service = Counter::<R>::open(counter, &config.state_base, body_timeout)
                .map_err(Fatal::Store)?;
            Some((bind("counter", counter.listen)?, forever(service)))
        }
        None => None,
    };
    let public_listener = match mode {
        Mode::Gateway => Some(public_listener(config.server.listen)?),
        Mode::CounterOnly => None,
    };
    let server_tls = match (&config.tls.server, mode) {
        (Some(certificate), Mode::Gateway) => Some(forever(
            ServerTls::new(certificate.clone()).map_err(|e| Fatal::Tls(e.to_string()))?,
        )),
        _ => None,
    };
    let admin_listener = match (&config.admin, mode) {
        (Some(admin), Mode::Gateway) => Some(bind("admin", admin.listen)?),
        _ => None,
    };
    let threading = config.runtime.threading;
    // Per core, every worker keeps an upstream pool of its own and serves
    // the public connections handed to it; shared, one pool serves all.
    let shards = match threading {
        Threading::Shared => 1,
        Threading::PerCore => workers,
    };
    let upstreams = match mode {
        Mode::Gateway => Some(upstream_pools::<R>(&config, workers, shards)?),
        Mode::CounterOnly => None,
    };
    tracing::info!(
        backend = R::NAME,
        workers,
        threading = threading.name(),
        version = env!("CARGO_PKG_VERSION"),
        "starting"
    );

    let main = async move {
        let mut signals = R::signals().map_err(|source| Fatal::Runtime {
            backend: R::NAME,
            source,
        })?;
        let during_startup = startup_signals.take();
        let server = &config.server;
        let settings = |name, idle_timeout_ms, metrics, tls| {
            forever(ServerSettings {
                name,
                header_read_timeout: ms(server.header_read_timeout_ms),
                idle_timeout: ms(idle_timeout_ms),
                max_header_bytes: server.max_header_bytes,
                access_log: config.log.access,
                metrics,
                tls,
            })
        };
        // What the systemd status line reports: the public listener's
        // requests, or the counter's in `gateway counter`.
        let mut status_source: Option<(&'static Connections, RequestCount)> = None;

        let mut counter = Stage::new();
        if let Some((listener, service)) = counter_listener {
            let (listener, _) = adopt::<R>("counter", listener)?;
            // Upstream clients keep idle connections for a while; the
            // counter keeps them longer, so it is never the one to close
            // a connection a client is about to reuse.
            let counter_settings =
                settings("counter", server.idle_timeout_ms.max(120_000), None, None);
            let connections = forever(Connections::new(usize::MAX >> 4));
            status_source = Some((connections, Box::new(|| service.count())));
            // Per core, the same counter on every worker: the connections
            // are spread over them like the public ones.
            let services = std::iter::repeat_n(service, shards);
            counter.serve::<R, _>(listener, services, counter_settings, connections);
        }

        let mut public = Stage::new();
        let mut admin = Stage::new();
        if let (Some(listener), Some((upstreams, upstream_metrics))) = (public_listener, upstreams)
        {
            let connections = forever(Connections::new(server.max_connections));
            let metrics = forever(Metrics::new(
                R::NAME,
                workers,
                upstream_metrics,
                Box::new(|| connections.open()),
                Box::new(|| upstreams.iter().map(|u| u.open_connections()).sum()),
            ));
            status_source = Some((connections, Box::new(|| metrics.requests_total())));
            let public_settings =
                settings("public", server.idle_timeout_ms, Some(metrics), server_tls);
            let (listener, _) = adopt::<R>("public", listener)?;
            // Per core, one service per worker, each on its worker's own
            // upstream pool (or, under a cap smaller than the worker
            // count, on one of the pools they share).
            let forwards: Vec<&'static Forward<R>> = upstreams
                .iter()
                .map(|&upstream| forever(Forward::new(upstream, &config.responses)))
                .collect();
            for (worker, &upstream) in upstreams.iter().enumerate() {
                R::spawn_on(worker, upstream.reap_idle());
            }
            let services = (0..shards).map(|worker| forwards[worker % forwards.len()]);
            public.serve::<R, _>(listener, services, public_settings, connections);
            if let Some(listener) = admin_listener {
                let (listener, _) = adopt::<R>("admin", listener)?;
                let admin_settings = settings("admin", server.idle_timeout_ms, None, None);
                let connections = forever(Connections::new(ADMIN_MAX_CONNECTIONS));
                let service = forever(Admin::new(metrics));
                admin.serve::<R, _>(listener, [service], admin_settings, connections);
            }
        }

        // Every listener is up: tell systemd, and keep telling it that the
        // runtime is alive and what it has done.
        let status = move || {
            let (requests, open) = status_source
                .as_ref()
                .map_or((0, 0), |(connections, requests)| {
                    (requests(), connections.open())
                });
            format!(
                "{} with {workers} workers: {requests} requests served, {open} connections open",
                R::NAME
            )
        };
        systemd::ready(&status());
        let status = Arc::new(status);
        let reported = status.clone();
        R::spawn(report_to_systemd::<R>(move || reported()));

        let mut reloader = Reloader::new(config.clone(), server_tls, log);
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
        tracing::info!("shutdown signal received");
        systemd::stopping(&format!("stopping; {}", status()));
        // The public listener drains first; health and metrics stay up
        // while it does, and the counter it may forward to stops last.
        // One deadline for all three: the whole stop takes at most
        // `shutdown_timeout_ms`, which the unit's TimeoutStopSec allows.
        let deadline = Instant::now() + ms(config.server.shutdown_timeout_ms);
        public.finish(deadline).await;
        admin.finish(deadline).await;
        counter.finish(deadline).await;
        tracing::info!("stopped");
        Ok::<(), Fatal>(())
    };
    R::block_on(workers, threading, main).map_err(|source| Fatal::Runtime {
        backend: R::NAME,
        source,
    })?
}

/// Whether a signal stops the daemon.
#[derive(PartialEq, Eq)]
enum Stopping {
    Yes,
    No,
}

/// Connections the admin listener holds at most: scrapes and health
/// checks are few, and they must not take descriptors from visitors.
const ADMIN_MAX_CONNECTIONS: usize = 1024;

/// Reads a listener's requests served, for the status line.
type RequestCount = Box<dyn Fn() -> u64 + Send + Sync>;

/// One listener's server task and the latches that stop it and report it
/// stopped. A stage never started counts as finished.
struct Stage {
    stop: &'static Stop,
    done: &'static Latch,
    started: bool,
}

impl Stage {
    fn new() -> Self {
        Self {
            stop: forever(Stop::new()),
            done: forever(Latch::new()),
            started: false,
        }
    }

    /// Serves `listener` on a task of its own (per core, on the worker
    /// running `main`) until [`Stage::finish`].
    fn serve<R: Runtime, S: Service>(
        &mut self,
        listener: R::Listener,
        services: impl IntoIterator<Item = &'static S>,
        settings: &'static ServerSettings,
        connections: &'static Connections,
    ) {
        self.started = true;
        let server = serve::<R, S>(listener, services, settings, connections, self.stop);
        spawn_with_latch::<R>(server, self.done);
    }

    /// Stops the listener and waits until it has drained, or until
    /// `deadline`, when it closes the connections left.
    async fn finish(&self, deadline: Instant) {
        self.stop.set(deadline);
        if self.started {
            self.done.wait().await;
        }
    }
}

/// The upstream pools: one, or one per worker (fewer under a cap below
/// the worker count), each with its share of `upstream.max_connections`.
/// The upstream pools, and what they record (for the metrics).
type UpstreamPools<R> = (&'static [&'static Upstream<R>], &'static UpstreamMetrics);

fn upstream_pools<R: Runtime>(
    config: &Config,
    workers: usize,
    shards: usize,
) -> Result<UpstreamPools<R>, Fatal> {
    let metrics = forever(UpstreamMetrics::default());
    // One TLS client for every pool: one session cache, so that any
    // worker's reconnect resumes a session another worker began.
    let tls = match &config.tls.upstream_roots {
        Some(roots) => {
            let target = crate::config::UpstreamTarget::parse(&config.upstream.url)
                .map_err(Fatal::Upstream)?;
            Some(forever(
                ClientTls::new(&target.host, roots.clone()).map_err(Fatal::Tls)?,
            ))
        }
        None => None,
    };
    let shares = pool_shares(config.upstream.max_connections, shards);
    let workers_per_pool = workers.div_ceil(shares.len().max(1));
    let pools = shares
        .into_iter()
        .map(|max_connections| {
            let mut share = config.upstream.clone();
            share.max_connections = max_connections;
            Upstream::<R>::new(&share, workers_per_pool, tls, metrics).map(forever)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(Fatal::Upstream)?;
    Ok((pools.leak(), metrics))
}

/// Splits `max_connections` over up to `shards` pools, so that together
/// they never exceed it: a cap below the worker count gives fewer pools
/// than workers (workers share them), never a pool of zero or one over.
fn pool_shares(max_connections: usize, shards: usize) -> Vec<usize> {
    let pools = shards.min(max_connections).max(1);
    (0..pools)
        .map(|pool| max_connections / pools + usize::from(pool < max_connections % pools))
        .collect()
}

/// The public listener: the socket systemd passed (socket activation), or
/// one bound to `server.listen`.
fn public_listener(listen: SocketAddr) -> Result<TcpListener, Fatal> {
    match systemd::passed_listener() {
        Ok(Some(listener)) => {
            tracing::info!("serving the socket passed by systemd; server.listen is not used");
            Ok(listener)
        }
        Ok(None) => bind("public", listen),
        Err(source) => Err(Fatal::Activation(source)),
    }
}

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
    use super::{Config, Mode, open_files_needed, pool_shares};

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

    #[test]
    fn pool_shares_add_up_to_the_cap_and_none_is_empty() {
        assert_eq!(pool_shares(256, 1), [256]);
        assert_eq!(pool_shares(256, 16), [16; 16]);
        assert_eq!(pool_shares(10, 4), [3, 3, 2, 2]);
        assert_eq!(pool_shares(2, 16), [1, 1]);
        assert_eq!(pool_shares(1, 2), [1]);
        for cap in 1..40 {
            for workers in 1..20 {
                let shares = pool_shares(cap, workers);
                assert_eq!(shares.iter().sum::<usize>(), cap);
                assert!(shares.iter().all(|&share| share > 0));
                assert!(shares.len() <= workers);
            }
        }
    }
}
