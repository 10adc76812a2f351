//! The daemon's first step, before the runtime starts: the counter's
//! store opened, the listeners bound (or the one systemd passed taken),
//! the server's TLS set up and the upstream pools built, so that a store
//! in use, a port taken or an upstream that does not resolve stops the
//! start before any thread does.

use std::net::{SocketAddr, TcpListener};

use backends::Runtime;

use super::{Fatal, Mode};
use crate::config::{Plan, UpstreamConfig, ms};
use crate::counter::Counter;
use crate::forever;
use crate::systemd;
use crate::tls::{ClientTls, ServerTls};
use crate::upstream::{Upstream, UpstreamMetrics};

/// Binds `addr` for the listener `name`; an error names both.
fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, Fatal> {
    backends::bind_listener(addr).map_err(|source| Fatal::Listen { name, addr, source })
}

/// What is bound and opened before the runtime starts: the store first,
/// so that a state file that is corrupt or in use by another process stops
/// the start before anything listens, then the listeners, the server's
/// TLS and the upstream pools.
pub(super) struct Bound<R: Runtime> {
    pub(super) counter: Option<(TcpListener, &'static Counter<R>)>,
    /// The gateway's own part: absent in `gateway counter`.
    pub(super) public: Option<Public<R>>,
}

/// The public listener and what serves beside it.
pub(super) struct Public<R: Runtime> {
    pub(super) listener: TcpListener,
    pub(super) tls: Option<&'static ServerTls>,
    pub(super) admin: Option<TcpListener>,
    pub(super) upstreams: UpstreamPools<R>,
}

impl<R: Runtime> Bound<R> {
    pub(super) fn bind(plan: &Plan, mode: Mode) -> Result<Self, Fatal> {
        let config = &plan.config;
        let counter = match &config.counter {
            Some(counter) => {
                // A batch's count must come as fast as the head before it.
                let body_timeout = ms(config.server.header_read_timeout_ms);
                let service = Counter::<R>::open(counter, &plan.state_base, body_timeout)
                    .map_err(Fatal::Store)?;
                Some((bind("counter", counter.listen)?, forever(service)))
            }
            None => None,
        };
        if mode == Mode::CounterOnly {
            return Ok(Self {
                counter,
                public: None,
            });
        }
        let listener = public_listener(config.server.listen)?;
        let tls = match &plan.tls.server {
            Some(certificate) => Some(forever(
                ServerTls::new(certificate.clone(), plan.config.server.http2)
                    .map_err(Fatal::ServerTls)?,
            )),
            None => None,
        };
        let admin = match &config.admin {
            Some(admin) => Some(bind("admin", admin.listen)?),
            None => None,
        };
        let upstreams = upstream_pools::<R>(plan)?;
        let public = Public {
            listener,
            tls,
            admin,
            upstreams,
        };
        Ok(Self {
            counter,
            public: Some(public),
        })
    }
}

/// The upstream pools, and what they record (for the metrics).
pub(super) type UpstreamPools<R> = (&'static [&'static Upstream<R>], &'static UpstreamMetrics);

/// The upstream pools, one per share of the plan's: each to the parsed
/// target at the addresses resolved here, once for all.
fn upstream_pools<R: Runtime>(plan: &Plan) -> Result<UpstreamPools<R>, Fatal> {
    let metrics = forever(UpstreamMetrics::default());
    // One TLS client for every pool: one session cache, so that any
    // worker's reconnect resumes a session another worker began.
    let tls = match &plan.tls.upstream_roots {
        Some(roots) => Some(forever(
            ClientTls::new(&plan.upstream.host, roots.clone()).map_err(Fatal::ClientTls)?,
        )),
        None => None,
    };
    let addrs = plan.upstream_addresses().map_err(|source| Fatal::Resolve {
        authority: plan.upstream.authority.clone(),
        source,
    })?;
    let workers_per_pool = plan.workers.div_ceil(plan.pool_shares.len().max(1));
    let pools = plan
        .pool_shares
        .iter()
        .map(|&max_connections| {
            let share = UpstreamConfig {
                max_connections,
                ..plan.config.upstream.clone()
            };
            let target = &plan.upstream;
            Upstream::<R>::new(&share, target, &addrs, workers_per_pool, tls, metrics).map(forever)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(Fatal::Upstream)?;
    Ok((pools.leak(), metrics))
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
