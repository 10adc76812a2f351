//! The daemon's second step, on the runtime: every listener that was
//! bound served on a task of its own ([`Stage`]), with its settings and
//! services, and what the systemd status line reports.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use backends::Runtime;

use super::bind::{Bound, Public};
use super::{ADMIN_MAX_CONNECTIONS, Fatal};
use crate::admin::Admin;
use crate::config::{Plan, ms};
use crate::counter::Counter;
use crate::forever;
use crate::forward::Forward;
use crate::metrics::Metrics;
use crate::server::{Connections, Http2Limits, ServerSettings, serve, spawn_with_latch};
use crate::service::Service;
use crate::shutdown::{Latch, Stop};
use crate::tls::ServerTls;

/// Hands a bound listener to runtime `R`, and logs where it listens.
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

/// The listeners' stages, and what the systemd status line reports: the
/// public listener's requests, or the counter's in `gateway counter`.
pub(super) struct Serving {
    pub(super) stages: Stages,
    pub(super) status_source: Option<StatusSource>,
}

impl Serving {
    /// Serves every listener `bound` holds, each on a task of its own.
    pub(super) fn start<R: Runtime>(bound: Bound<R>, plan: &Plan) -> Result<Self, Fatal> {
        let mut serving = Serving {
            stages: Stages {
                public: Stage::new(),
                admin: Stage::new(),
                counter: Stage::new(),
            },
            status_source: None,
        };
        if let Some((listener, service)) = bound.counter {
            let counter = &mut serving.stages.counter;
            serving.status_source = Some(start_counter::<R>(counter, listener, service, plan)?);
        }
        if let Some(public) = bound.public {
            serving.status_source = Some(start_public::<R>(&mut serving.stages, public, plan)?);
        }
        Ok(serving)
    }
}

/// A listener's connections, and its requests served.
pub(super) type StatusSource = (&'static Connections, RequestCount);

/// The settings of the listener `name`, from the `[server]` section.
fn server_settings(
    plan: &Plan,
    name: &'static str,
    idle_timeout_ms: u64,
    metrics: Option<&'static Metrics>,
    tls: Option<&'static ServerTls>,
) -> &'static ServerSettings {
    let server = &plan.config.server;
    // Only visitors are offered HTTP/2: the counter's clients and the
    // admin listener's scrapers speak HTTP/1.1.
    let http2 = (metrics.is_some() && server.http2).then_some(Http2Limits {
        max_streams: server.http2_max_streams,
        stream_window: server.http2_stream_window_bytes,
        connection_window: server.http2_connection_window_bytes,
    });
    forever(ServerSettings {
        name,
        header_read_timeout: ms(server.header_read_timeout_ms),
        idle_timeout: ms(idle_timeout_ms),
        max_header_bytes: server.max_header_bytes,
        access_log: plan.config.log.access,
        metrics,
        tls,
        http2,
    })
}

/// Serves the built-in counter on `stage`.
fn start_counter<R: Runtime>(
    stage: &mut Stage,
    listener: TcpListener,
    service: &'static Counter<R>,
    plan: &Plan,
) -> Result<StatusSource, Fatal> {
    let (listener, _) = adopt::<R>("counter", listener)?;
    // Upstream clients keep idle connections for a while; the counter
    // keeps them longer, so it is never the one to close a connection a
    // client is about to reuse.
    let idle_timeout_ms = plan.config.server.idle_timeout_ms.max(120_000);
    let settings = server_settings(plan, "counter", idle_timeout_ms, None, None);
    let connections = forever(Connections::new(usize::MAX >> 4));
    // Per core, the same counter on every worker: the connections are
    // spread over them like the public ones.
    let services = std::iter::repeat_n(service, plan.shards);
    stage.serve::<R, _>(listener, services, settings, connections);
    Ok((connections, Box::new(|| service.count())))
}

/// Serves the public listener, and the admin listener when configured.
fn start_public<R: Runtime>(
    stages: &mut Stages,
    public: Public<R>,
    plan: &Plan,
) -> Result<StatusSource, Fatal> {
    let (upstreams, upstream_metrics) = public.upstreams;
    let server = &plan.config.server;
    let connections = forever(Connections::new(server.max_connections));
    let metrics = forever(Metrics::new(
        R::NAME,
        plan.workers,
        upstream_metrics,
        Box::new(|| connections.open_by_protocol()),
        Box::new(|| upstreams.iter().map(|u| u.open_connections()).sum()),
    ));
    let settings = server_settings(
        plan,
        "public",
        server.idle_timeout_ms,
        Some(metrics),
        public.tls,
    );
    let (listener, _) = adopt::<R>("public", public.listener)?;
    // Per core, one service per worker, each on its worker's own upstream
    // pool (or, under a cap smaller than the worker count, on one of the
    // pools they share).
    let forwards: Vec<&'static Forward<R>> = upstreams
        .iter()
        .map(|&upstream| forever(Forward::new(upstream, &plan.config.responses)))
        .collect();
    for (worker, &upstream) in upstreams.iter().enumerate() {
        R::spawn_on(worker, upstream.reap_idle());
    }
    let services = (0..plan.shards).map(|worker| forwards[worker % forwards.len()]);
    stages
        .public
        .serve::<R, _>(listener, services, settings, connections);
    if let Some(listener) = public.admin {
        let (listener, _) = adopt::<R>("admin", listener)?;
        let settings = server_settings(plan, "admin", server.idle_timeout_ms, None, None);
        let connections = forever(Connections::new(ADMIN_MAX_CONNECTIONS));
        let service = forever(Admin::new(metrics));
        stages
            .admin
            .serve::<R, _>(listener, [service], settings, connections);
    }
    Ok((connections, Box::new(|| metrics.requests_total())))
}

/// Reads a listener's requests served, for the status line.
pub(super) type RequestCount = Box<dyn Fn() -> u64 + Send + Sync>;

/// Every listener's stage.
pub(super) struct Stages {
    public: Stage,
    admin: Stage,
    counter: Stage,
}

impl Stages {
    /// The public listener drains first; health and metrics stay up while
    /// it does, and the counter it may forward to stops last. One deadline
    /// for all three: the whole stop takes at most `shutdown_timeout`
    /// (`server.shutdown_timeout_ms`), which the unit's TimeoutStopSec
    /// allows.
    pub(super) async fn stop(&self, shutdown_timeout: Duration) {
        let deadline = Instant::now() + shutdown_timeout;
        self.public.finish(deadline).await;
        self.admin.finish(deadline).await;
        self.counter.finish(deadline).await;
    }
}

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
