//! The HTTP server (HTTP/1.1, and HTTP/2 where a listener offers it),
//! written once over the runtime trait, in these parts:
//! - the [`listener`] accepts connections up to the listener's cap and
//!   hands each to a worker;
//! - the [`connection`] driver serves one with hyper on its own task,
//!   enforcing its phase's timeout and parking it while it idles; one
//!   that speaks HTTP/2 is served by the [`http2`] driver instead;
//! - the service [`wrapper`] does what every request gets around the
//!   [`Service`] that answers it;
//! - the [`drain`] lets connections finish on shutdown, up to a deadline.
//!
//! The timeouts are kept here rather than by hyper: each connection tracks
//! its [`Phase`](phase::Phase), and one resettable timer per connection,
//! re-armed lazily, enforces the phase's deadline (the `phase` module says
//! why).
//!
//! A keep-alive connection left idle is parked: hyper's connection, with
//! its buffers, is taken apart, and the task waits on the socket alone
//! until the next bytes come, when a new one takes over. Most of a public
//! gateway's connections are idle; parked, each costs the socket's
//! registration, its timer, its stop listener and a small task.

mod alarm;
mod connection;
mod drain;
mod handshake;
mod http2;
mod listener;
mod phase;
mod wrapper;

use std::future::Future;
use std::time::Duration;

use backends::Runtime;
use hyper::server::conn::http1;

use self::connection::Listening;
use self::listener::Listener;
use crate::forever;
use crate::metrics::Metrics;
use crate::service::Service;
use crate::shutdown::{Latch, Stop};
use crate::tls::ServerTls;

pub use self::drain::Connections;

/// How one listener serves its connections.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Shown in logs: "public", "counter".
    pub name: &'static str,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub access_log: bool,
    /// Where to record requests and parser rejections (the public
    /// listener's; other listeners record nothing).
    pub metrics: Option<&'static Metrics>,
    /// HTTPS: every connection starts with a TLS handshake, which must
    /// finish within the header-read timeout along with the first head.
    pub tls: Option<&'static ServerTls>,
    /// HTTP/2 beside HTTP/1.1, within these limits: chosen by ALPN over
    /// TLS, by the client preface (prior knowledge) on a plain listener.
    pub http2: Option<Http2Limits>,
}

/// What one HTTP/2 connection may hold (`server.http2_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams: u32,
    /// Request body a client may send ahead on one stream.
    pub stream_window: u32,
    /// Request body a client may send ahead on the connection.
    pub connection_window: u32,
}

/// Serves `listener` until `stop` is set, then drains: lets every
/// connection finish the request it has, closes idle ones, and completes
/// when none is left or the stop's deadline has passed.
///
/// `services` gives the service of each worker connections are handed to:
/// one, or one per worker when each worker has a scheduler of its own
/// (the same service may be given for several). Connections are handed
/// to those workers in turn. One acceptor hands them out, rather than
/// each worker accepting on a copy of the socket, because the kernel
/// wakes the acceptor that began waiting last: an idle gateway would give
/// one worker every new connection.
pub fn serve<R: Runtime, S: Service>(
    listener: R::Listener,
    services: impl IntoIterator<Item = &'static S>,
    settings: &'static ServerSettings,
    connections: &'static Connections,
    stop: &'static Stop,
) -> impl Future<Output = ()> + Send + 'static {
    let builder: &'static http1::Builder = forever(http1_builder::<R>(settings));
    let workers: &'static [Listening<S>] = services
        .into_iter()
        .map(|service| Listening {
            service,
            settings,
            builder,
            stop: stop.latch(),
        })
        .collect::<Vec<_>>()
        .leak();
    let listener = Listener::<R, S> {
        socket: listener,
        workers,
        settings,
        connections,
        stop,
    };
    async move {
        listener.run().await;
        drain::drain::<R>(settings, connections, stop).await;
    }
}

/// How hyper serves each connection of a listener with `settings`.
fn http1_builder<R: Runtime>(settings: &ServerSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(R::timer())
        // The phases do the header-read timeout; see the `phase` module's doc.
        .header_read_timeout(None)
        .keep_alive(true)
        // A client may shut down its sending side once its request is out
        // (`nc -N`, some HTTP/1.0 clients): the request is still answered,
        // and the connection closes after the answer. `WatchedIo` does
        // that, so that hyper can still notice a client that reset its
        // connection mid-visit (the `phase` module says how).
        .half_close(false)
        .max_buf_size(settings.max_header_bytes)
        // Every answer is a small head and a small body: copying the body
        // behind the head and writing one buffer takes fewer instructions
        // than hyper's queue of buffers for `writev` (`bench/instructions.py`
        // compares them), and it is still one syscall.
        .writev(false);
    builder
}

/// Runs `future` on its own task and reports when it has finished.
pub fn spawn_with_latch<R: Runtime>(
    future: impl Future<Output = ()> + Send + 'static,
    done: &'static Latch,
) {
    R::spawn(async move {
        future.await;
        done.set();
    });
}
