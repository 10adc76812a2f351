//! HTTP/2 for visitors: hyper's HTTP/2 server, on the connection's own
//! worker, with the timeouts, the drain and the abuse limits the gateway
//! keeps itself.
//!
//! hyper's HTTP/2 connection cannot be taken apart and built again, so an
//! idle one is not parked: it keeps h2's buffers and tables while it
//! idles (docs/http2.md, "What it costs"). Its timeouts:
//! - the preface and the first request within the header-read timeout of
//!   the accept (with TLS, of the handshake's start), or the connection
//!   closes;
//! - with no stream open for the idle timeout (hyper has no idle timeout
//!   of its own), the connection says GOAWAY and has the header-read
//!   timeout to finish what it has (an answer a client will not take,
//!   with its window closed, never finishes), then closes;
//! - on shutdown it says GOAWAY at once, and open streams finish within
//!   the drain's deadline; with none open, it has the header-read
//!   timeout to finish (or its first request's deadline, if none came).

mod frames;
pub(super) mod preface;
mod streams;

use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use backends::Runtime;
use futures_lite::future::poll_fn;
use hyper::server::conn::http2;

use self::frames::FrameWatch;
use self::streams::{OnThisWorker, Streams};
use super::connection::{Ended, Offered, Watch};
use super::drain::Open;
use super::phase::{Phase, WatchedIo};
use super::{Http2Limits, ServerSettings, wrapper};
use crate::service::Service;

pub(super) use self::frames::Abuse;

/// Serves `io` with HTTP/2 until the connection ends, if the listener
/// offered it and the client chose it (`None` else: the connection is HTTP/1.1's, and
/// what was read of it is read again).
pub(super) async fn serve_if_chosen<R, S, I>(
    watch: &mut Watch<R, S>,
    io: &mut WatchedIo<I>,
    open: &Open,
) -> Option<Ended>
where
    R: Runtime,
    S: Service,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let chosen = match watch.offered {
        Offered::Http1 => Ok(false),
        Offered::Http2 => Ok(true),
        Offered::Either => preface::read(watch, io).await,
    };
    match chosen {
        Ok(false) => None,
        Ok(true) => {
            let _counted = open.speaks_http2();
            Some(serve(watch, io).await)
        }
        Err(ended) => Some(ended),
    }
}

/// Serves `io` with HTTP/2 until the connection ends. `io` is read
/// through as it is: what its driver read ahead (the preface, for prior
/// knowledge) is read again first, and the [`Activity`] it reports to
/// stays where it began, since HTTP/2's phases are its [`Streams`].
///
/// [`Activity`]: super::phase::Activity
async fn serve<R, S, I>(watch: &mut Watch<R, S>, io: &mut WatchedIo<I>) -> Ended
where
    R: Runtime,
    S: Service,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let listening = watch.listening;
    let settings = listening.settings;
    // Offered only where the listener has limits.
    let Some(limits) = settings.http2 else {
        return Ended::Closed(Ok(()));
    };
    let streams = Arc::new(Streams::new(watch.activity.since()));
    let service = wrapper::wrap(
        listening.service,
        settings,
        streams.clone(),
        watch.peer,
        watch.security,
    );
    let io = FrameWatch::new(io, streams.clone());
    let mut connection = pin!(builder::<R>(settings, limits).serve_connection(io, service));
    let mut going_away = GoingAway::No;
    poll_fn(|cx| poll_serving(watch, connection.as_mut(), &streams, &mut going_away, cx)).await
}

/// Whether the connection has been told to go away, and by when it must
/// be gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GoingAway {
    No,
    /// On shutdown, since then: by the drain's deadline while a stream is
    /// open; otherwise as a connection that went idle then.
    Draining(Instant),
    /// After the idle timeout: by this.
    IdleBy(Instant),
}

type Connection<'io, I, Svc, R> =
    http2::Connection<FrameWatch<&'io mut WatchedIo<I>>, Svc, OnThisWorker<R>>;

/// Polls hyper's connection once: ready with how it ended.
fn poll_serving<R, S, I, Svc>(
    watch: &mut Watch<R, S>,
    mut connection: std::pin::Pin<&mut Connection<'_, I, Svc, R>>,
    streams: &Streams,
    going_away: &mut GoingAway,
    cx: &mut Context<'_>,
) -> Poll<Ended>
where
    R: Runtime,
    S: Service,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::service::Body>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Svc::Future: Send + 'static,
{
    let settings = watch.listening.settings;
    loop {
        if *going_away == GoingAway::No && watch.stopping(cx) {
            connection.as_mut().graceful_shutdown();
            *going_away = GoingAway::Draining(Instant::now());
        }
        // Before the phase is read below: a stream closing after that
        // wakes this task to arm the deadline it then has.
        streams.wake_when_none_open(cx.waker());
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            return Poll::Ready(match streams.cut_for() {
                Some(abuse) => Ended::Cut(abuse),
                None => Ended::Closed(result),
            });
        }
        let deadline = match *going_away {
            GoingAway::No => streams.deadline(settings),
            // After GOAWAY a client needs no more than the header-read
            // timeout to finish (its PING's answer, a stream's last
            // frames); one yet to send its first request keeps its
            // header-read deadline.
            GoingAway::Draining(at) => match streams.phase() {
                Phase::Head => streams.deadline(settings),
                Phase::Busy => None,
                Phase::Idle => Some(at.max(streams.since()) + settings.header_read_timeout),
            },
            GoingAway::IdleBy(by) => Some(by),
        };
        ready!(watch.wait_for(cx, [deadline, None]));
        let phase = streams.phase();
        match *going_away {
            // Idle: tell the client, and poll again to say it.
            GoingAway::No if phase == Phase::Idle => {
                connection.as_mut().graceful_shutdown();
                *going_away = GoingAway::IdleBy(Instant::now() + settings.header_read_timeout);
            }
            // No request in time, or not gone in time after GOAWAY.
            _ => return Poll::Ready(Ended::TimedOut(phase)),
        }
    }
}

/// How hyper serves each HTTP/2 connection of a listener.
fn builder<R: Runtime>(
    settings: &ServerSettings,
    limits: Http2Limits,
) -> http2::Builder<OnThisWorker<R>> {
    let mut builder = http2::Builder::new(OnThisWorker::<R>::new());
    builder
        .timer(R::timer())
        .max_concurrent_streams(limits.max_streams)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    builder
}
