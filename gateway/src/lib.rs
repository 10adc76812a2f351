//! `gateway`: for every visit to `/`, register it with an upstream counter
//! and tell the visitor whether that worked, on tokio or smol.
//!
//! How the crate is laid out:
//!
//! - [`config`]: `config.toml`, its defaults, and errors that point at a line.
//! - [`daemon`]: start-up and shutdown; the one place a backend is picked.
//! - [`server`]: the HTTP/1.1 accept loop and per-connection task (hyper),
//!   timeouts, connection cap, drain, idle connections parked;
//!   [`request_rules`], what it refuses that hyper lets through.
//! - [`service`]: the `Request` → `Response` seam the server drives.
//! - [`forward`]: the gateway's service, visits forwarded to the counter.
//! - [`upstream`]: the pooled HTTP/1.1 client to the counter, and
//!   [`upstream::exchange`], one request and answer on one of its connections;
//!   [`outcome`], how a visit's exchange ended and what that answers;
//!   [`batch_protocol`], a batched POST on the wire.
//! - [`tls`]: HTTPS on the public listener and to https upstreams (rustls),
//!   once for both runtimes.
//! - [`reload`]: what SIGHUP re-reads and applies in place.
//! - [`counter`]: the built-in counter, the reference upstream, and
//!   [`store`], its durable count (a group commit to a file or PostgreSQL).
//! - [`admin`], [`metrics`]: `/healthz` and `/metrics` on the admin listener.
//! - [`systemd`]: socket activation and `sd_notify`; [`logging`], stderr
//!   at a level a reload can change; [`startup_signals`], the signals
//!   noted before the runtime catches them.
//! - [`stats`]: per-thread counters and histograms summed when read;
//!   [`escaped`], outside text made safe to print on one line.
//! - [`shutdown`], [`time`]: small primitives over the runtime trait.
//!
//! The runtime itself lives in the `backends` crate; nothing here uses
//! tokio or smol directly.
#![forbid(unsafe_code)]

pub mod admin;
pub mod batch_protocol;
pub mod config;
pub mod counter;
pub mod daemon;
pub mod escaped;
pub mod forward;
pub mod logging;
pub mod metrics;
pub mod outcome;
pub mod reload;
pub mod request_rules;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod startup_signals;
pub mod stats;
pub mod store;
pub mod systemd;
pub mod time;
pub mod tls;
pub mod upstream;

/// Leaks `value` for the rest of the process: services, settings and
/// latches live that long anyway, and every task shares them without
/// reference counting. (A `Vec` or `String` is leaked with its own
/// `leak()`, which keeps no box around the slice nobody points at: the
/// fuzz targets' leak checker would report that box.)
pub(crate) fn forever<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}
