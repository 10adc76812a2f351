//! The per-connection driver: serves one accepted connection with hyper
//! from its first byte to its close, enforcing its phase's timeout, parking
//! it while it idles, and draining it on shutdown.
//!
//! A keep-alive connection that stays idle, its answer flushed, for
//! [`PARK_AFTER`](super::phase::PARK_AFTER) is parked: hyper's connection
//! is taken apart (its read and write buffers, its cached headers and its
//! service slot freed) and only the stream, the timer and the stop
//! listener wait for the next bytes; then a new hyper connection takes
//! over. A busy connection is never parked, so it never pays for building
//! one again. What is kept meanwhile is a [`Watch`]; the steps are
//! functions of their own, so that what only one of them needs is not kept
//! by the task while it is parked.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use backends::Runtime;
use futures_lite::future::poll_fn;
use hyper::body::Incoming;
use hyper::server::conn::http1;

use super::ServerSettings;
use super::alarm::Alarm;
use super::drain::{Open, StopWatch, may_finish_now};
use super::http2::{self, Abuse};
use super::phase::{Activity, Phase, WatchedIo};
use super::wrapper;
use crate::service::{Body, Service};
use crate::shutdown::Latch;
use crate::tls::Security;

/// What serves a listener's connections on one worker: referred to by
/// each connection, which then keeps one reference instead of four.
pub(super) struct Listening<S: 'static> {
    pub(super) service: &'static S,
    pub(super) settings: &'static ServerSettings,
    pub(super) builder: &'static http1::Builder,
    pub(super) stop: &'static Latch,
}

/// An accepted connection and what serves it.
pub(super) struct Accepted<S: 'static> {
    pub(super) peer: SocketAddr,
    /// When it was accepted: its first head (and, with TLS, its handshake
    /// before that) must be in within the header-read timeout from here.
    pub(super) at: Instant,
    pub(super) listening: &'static Listening<S>,
    pub(super) open: Open,
    pub(super) offered: Offered,
}

/// How a connection ended, for the debug log.
pub(super) enum Ended {
    Closed(Result<(), hyper::Error>),
    TimedOut(Phase),
    /// Waiting for a parked connection to be readable failed, or reading
    /// its first bytes did.
    Unreadable(io::Error),
    /// An HTTP/2 client was cut off for abusing the protocol.
    Cut(Abuse),
}

/// How a connection's stream is waited on while it is parked: ready once
/// something may be read, with no buffer (for TLS, what rustls holds
/// counts). A function item, so that the task keeps no pointer to it.
pub(super) trait Readable<I>:
    Fn(&mut I, &mut Context<'_>) -> Poll<io::Result<()>> + Send + 'static
{
}

impl<I, F> Readable<I> for F where
    F: Fn(&mut I, &mut Context<'_>) -> Poll<io::Result<()>> + Send + 'static
{
}

/// What a connection keeps from its accept to its close, whether hyper
/// serves it or it is parked: kept small, since a parked connection is
/// little more than this.
pub(super) struct Watch<R: Runtime, S: 'static> {
    pub(super) peer: SocketAddr,
    pub(super) security: Security,
    pub(super) offered: Offered,
    pub(super) listening: &'static Listening<S>,
    pub(super) activity: Arc<Activity>,
    pub(super) alarm: Alarm<R>,
    stop: StopWatch,
}

impl<R: Runtime, S: Service> Watch<R, S> {
    /// Whether shutdown has come.
    pub(super) fn stopping(&mut self, cx: &mut Context<'_>) -> bool {
        self.stop.stopping(self.listening.stop, cx)
    }

    /// Waits for the earliest of `deadlines`: ready with the index of the
    /// first one passed.
    pub(super) fn wait_for(
        &mut self,
        cx: &mut Context<'_>,
        deadlines: [Option<Instant>; 2],
    ) -> Poll<usize> {
        self.alarm.wait_for(cx, deadlines)
    }

    /// When the phase the connection is in times out.
    fn deadline(&self) -> Option<Instant> {
        self.activity.deadline(self.listening.settings)
    }
}

/// Registers an accepted socket with the calling worker's reactor; `None`
/// (logged) if it cannot be.
pub(super) fn adopt<R: Runtime>(
    stream: std::net::TcpStream,
    peer: SocketAddr,
) -> Option<R::Stream> {
    R::adopt_stream(stream)
        .inspect_err(|error| tracing::debug!(%peer, %error, "cannot register the connection"))
        .ok()
}

/// Which HTTP a connection may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Offered {
    Http1,
    /// Chosen before the first byte (by ALPN).
    Http2,
    /// HTTP/2 if the client's first bytes are its preface (prior
    /// knowledge), else HTTP/1.1.
    Either,
}

/// Serves HTTP over the stream `open_stream` gives (a TCP stream, or TLS
/// over one, as `security` says) until it closes or times out: HTTP/1.1,
/// parked with `readable` while it idles (see the module's doc), or
/// HTTP/2 where the connection offered it and the client chose it.
pub(super) async fn serve_connection<R, S, I>(
    open_stream: impl FnOnce(SocketAddr) -> Option<I> + Send + 'static,
    security: Security,
    connection: Box<Accepted<S>>,
    readable: impl Readable<I>,
) where
    R: Runtime,
    S: Service,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // A task keeps room for every variable of its function that is still
    // in scope at a wait: what only the start needs is in `start`, and
    // what it gives back is never held in a variable of its own (the
    // accepted connection comes boxed; moved into the block, its box is
    // freed there).
    let Some((mut watch, mut io, open)) = start::<R, S, I>(open_stream, security, {
        let connection = connection;
        *connection
    }) else {
        return;
    };
    // Boxed, like every step below, so that a parked connection's task
    // does not keep room for a step it is not in.
    if watch.offered != Offered::Http1 {
        let served = Box::pin(http2::serve_if_chosen(&mut watch, &mut io, &open));
        if let Some(ended) = served.await {
            log_end(&watch, ended);
            return;
        }
    }
    let ended = loop {
        match Box::pin(serve_until_parked(&mut watch, io)).await {
            Ok(taken) => io = taken,
            Err(ended) => break ended,
        }
        if let Some(ended) = wait_parked(&mut watch, &mut io, &readable).await {
            break ended;
        }
    };
    log_end(&watch, ended);
    drop(open);
}

/// Opens the accepted connection's stream and sets up what watches it;
/// `None` if the stream cannot be opened.
fn start<R, S, I>(
    open_stream: impl FnOnce(SocketAddr) -> Option<I>,
    security: Security,
    connection: Accepted<S>,
) -> Option<(Watch<R, S>, WatchedIo<I>, Open)>
where
    R: Runtime,
    S: Service,
{
    let Accepted {
        peer,
        at,
        listening,
        open,
        offered,
    } = connection;
    let settings = listening.settings;
    let stream = open_stream(peer)?;
    let activity = Arc::new(Activity::new(Phase::Head, at));
    let io = WatchedIo::new(stream, activity.clone());
    let first_deadline = activity
        .deadline(settings)
        .unwrap_or_else(|| Instant::now() + settings.header_read_timeout);
    let watch = Watch::<R, S> {
        peer,
        security,
        offered,
        listening,
        activity,
        alarm: Alarm::new(first_deadline),
        stop: StopWatch::new(listening.stop),
    };
    Some((watch, io, open))
}

/// Logs how a connection ended, and counts a request hyper could not parse.
fn log_end<R: Runtime, S>(watch: &Watch<R, S>, ended: Ended) {
    let peer = watch.peer;
    match ended {
        Ended::Closed(Ok(())) => {}
        Ended::Closed(Err(error)) => {
            if error.is_parse() {
                if let Some(metrics) = watch.listening.settings.metrics {
                    metrics.record_bad_request();
                }
            }
            tracing::debug!(%peer, %error, "connection closed with an error")
        }
        Ended::Unreadable(error) => tracing::debug!(%peer, %error, "connection unreadable"),
        Ended::TimedOut(phase) => tracing::debug!(%peer, ?phase, "connection timed out"),
        Ended::Cut(abuse) => tracing::info!(%peer, %abuse, "HTTP/2 client cut off"),
    }
}

/// Serves `io` with hyper until the connection ends, or is to be parked:
/// then hyper's connection is taken apart and `io` handed back.
async fn serve_until_parked<R, S, I>(
    watch: &mut Watch<R, S>,
    mut io: WatchedIo<I>,
) -> Result<WatchedIo<I>, Ended>
where
    R: Runtime,
    S: Service,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    loop {
        // Boxed, so that a parked connection's task no longer holds it.
        let listening = watch.listening;
        let mut connection = Box::new(listening.builder.serve_connection(
            io,
            wrapper::wrap(
                listening.service,
                listening.settings,
                watch.activity.clone(),
                watch.peer,
                watch.security,
            ),
        ));
        let mut draining = false;
        poll_fn(|cx| poll_serving(watch, &mut connection, &mut draining, cx)).await?;
        let http1::Parts {
            io: taken,
            read_buf,
            ..
        } = connection.into_parts();
        io = taken;
        if read_buf.is_empty() {
            return Ok(io);
        }
        // Bytes of a next request, read but not yet parsed: no wait.
        io.replay(read_buf);
    }
}

/// Polls hyper's `connection` once: ready with its end, with its phase's
/// timeout, or (`Ok`) when it is to be parked. On shutdown it is told to
/// finish as soon as [`may_finish_now`] allows (`draining` then), and is
/// never parked after.
fn poll_serving<R, S, I, H>(
    watch: &mut Watch<R, S>,
    connection: &mut http1::Connection<WatchedIo<I>, H>,
    draining: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Ended>>
where
    R: Runtime,
    S: Service,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    H: hyper::service::HttpService<Incoming, ResBody = Body>,
    H::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stopped = watch.stopping(cx);
    loop {
        if stopped && !*draining && may_finish_now(&watch.activity) {
            Pin::new(&mut *connection).graceful_shutdown();
            *draining = true;
        }
        if let Poll::Ready(result) = Pin::new(&mut *connection).poll(cx) {
            return Poll::Ready(Err(Ended::Closed(result)));
        }
        // Polling may have moved the connection out of `Head`; if it is
        // now due for draining, poll it once more to act on that.
        if stopped && !*draining && may_finish_now(&watch.activity) {
            continue;
        }
        break;
    }
    let park_at = watch.activity.park_at().filter(|_| !*draining);
    match ready!(watch.wait_for(cx, [watch.deadline(), park_at])) {
        0 => Poll::Ready(Err(Ended::TimedOut(watch.activity.phase()))),
        _ => Poll::Ready(Ok(())),
    }
}

/// Waits, with no buffer, until the parked `io` may be read (`None`), or
/// until it is to close: shutdown, the idle timeout, an error.
async fn wait_parked<R: Runtime, S: Service, I>(
    watch: &mut Watch<R, S>,
    io: &mut WatchedIo<I>,
    readable: &impl Readable<I>,
) -> Option<Ended> {
    poll_fn(|cx| poll_parked(watch, io, readable, cx)).await
}

/// Polls a parked connection once: see [`wait_parked`].
fn poll_parked<R: Runtime, S: Service, I>(
    watch: &mut Watch<R, S>,
    io: &mut WatchedIo<I>,
    readable: &impl Readable<I>,
    cx: &mut Context<'_>,
) -> Poll<Option<Ended>> {
    if watch.stopping(cx) {
        return Poll::Ready(Some(Ended::Closed(Ok(()))));
    }
    match readable(io.inner_mut(), cx) {
        Poll::Ready(Ok(())) => return Poll::Ready(None),
        Poll::Ready(Err(error)) => return Poll::Ready(Some(Ended::Unreadable(error))),
        Poll::Pending => {}
    }
    ready!(watch.wait_for(cx, [watch.deadline(), None]));
    Poll::Ready(Some(Ended::TimedOut(watch.activity.phase())))
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use http::{Request, Response, StatusCode};

    use super::*;
    use crate::forever;
    use crate::server::Connections;
    use crate::service::status_only;

    /// Every byte of the connection future is a byte of each parked
    /// connection's task (`tests/idle_memory.rs` measures the whole), and
    /// a variable kept across a wait by mistake grows it unseen.
    const CONNECTION_FUTURE_MAX_BYTES: usize = 256;

    /// A service for a connection that is never served.
    struct Unserved;

    impl Service for Unserved {
        fn call(
            &'static self,
            _: Request<Incoming>,
            _: SocketAddr,
        ) -> impl Future<Output = Response<Body>> + Send + 'static {
            std::future::ready(status_only(StatusCode::NOT_FOUND))
        }
    }

    /// The size of a plain connection's future on `R`, made as the
    /// listener makes it and dropped unpolled.
    fn connection_future_size<R: Runtime>() -> usize {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        let settings = forever(ServerSettings {
            name: "test",
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
            access_log: false,
            metrics: None,
            tls: None,
            http2: None,
        });
        let connections = forever(Connections::new(1));
        let permit = connections.limit.try_acquire_arc().unwrap();
        let listening = forever(Listening {
            service: forever(Unserved),
            settings,
            builder: forever(http1::Builder::new()),
            stop: forever(Latch::new()),
        });
        let accepted = Accepted {
            peer,
            at: Instant::now(),
            listening,
            open: Open::new(connections, permit),
            offered: Offered::Either,
        };
        let future = serve_connection::<R, Unserved, _>(
            move |peer| adopt::<R>(stream, peer),
            Security::Plain,
            Box::new(accepted),
            backends::Stream::poll_readable,
        );
        std::mem::size_of_val(&future)
    }

    macro_rules! sizes_on_every_backend {
        (; $([$runtime:ty, $backend:expr, $name:ident])*) => {
            [$((<$runtime as Runtime>::NAME, connection_future_size::<$runtime>())),*]
        };
    }

    #[test]
    fn a_connection_future_does_not_grow() {
        for (backend, size) in backends::for_every_backend!(sizes_on_every_backend!()) {
            assert!(
                size <= CONNECTION_FUTURE_MAX_BYTES,
                "{backend}: the connection future is {size} bytes, over {CONNECTION_FUTURE_MAX_BYTES}"
            );
        }
    }
}
