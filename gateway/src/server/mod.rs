//! The HTTP/1.1 server loop, written once over the runtime trait: accept
//! connections up to the process-wide cap, serve each with hyper on its
//! own task, enforce the header-read and idle timeouts, and drain on
//! shutdown.
//!
//! The timeouts are kept here rather than by hyper: each connection tracks
//! its [`Phase`], and one resettable timer per connection, re-armed lazily,
//! enforces the phase's deadline (the `phase` module says why).
//!
//! A keep-alive connection left idle is parked: hyper's connection, with
//! its buffers, is taken apart, and the task waits on the socket alone
//! until the next bytes come, when a new one takes over (see
//! [`serve_connection`]). Most of a public gateway's connections are idle;
//! parked, each costs the socket's registration, its timer, its stop
//! listener and a small task.

mod phase;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use async_lock::{Semaphore, SemaphoreGuardArc};
use backends::Runtime;
use event_listener::{Event, EventListener};
use futures_lite::future::{self, poll_fn};
use hyper::body::Body as _;
use hyper::rt::Timer;
use hyper::server::conn::http1;

use self::phase::{Activity, Phase, WatchedIo};
use crate::forever;
use crate::metrics::Metrics;
use crate::request_rules;
use crate::service::{Body, Service, status_only};
use crate::shutdown::{Latch, Stop, wait_until};
use crate::time::timeout_at;
use crate::tls::{self, HandshakeFailure, Security, ServerTls};
use http::header::{CONNECTION, HeaderValue};
use http::{Response, StatusCode, Version};

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
}

/// The connections of one listener: the cap, and the count to drain.
pub struct Connections {
    /// `max_connections` permits; a connection holds one while open, and
    /// at the cap the accept loop waits (new clients queue in the backlog).
    limit: Arc<Semaphore>,
    open: AtomicUsize,
    /// Notified when a connection closes, for the drain.
    closed: Event,
}

impl Connections {
    pub fn new(max_connections: usize) -> Self {
        Self {
            limit: Arc::new(Semaphore::new(max_connections)),
            open: AtomicUsize::new(0),
            closed: Event::new(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    async fn wait_until_none_open(&self) {
        wait_until(&self.closed, || (self.open() == 0).then_some(())).await
    }
}

/// An open connection's claim on its listener's [`Connections`].
struct Open {
    connections: &'static Connections,
    _permit: SemaphoreGuardArc,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
        self.connections.closed.notify(usize::MAX);
    }
}

/// Serves `listener` until `stop` is set, then drains: lets every
/// connection finish the request it has, closes idle ones, and returns
/// when none is left or the stop's deadline has passed.
///
/// `services` holds one service, or one per worker when each worker has a
/// scheduler of its own: then connections are handed to the workers in
/// turn, each served there with that worker's service. (Workers each
/// accepting on a copy of the socket were tried first: the kernel wakes
/// the last one to wait first, and an idle gateway gave it every new
/// connection.)
pub async fn serve<R: Runtime, S: Service>(
    listener: R::Listener,
    services: &'static [&'static S],
    settings: &'static ServerSettings,
    connections: &'static Connections,
    stop: &'static Stop,
) {
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
        // behind the head and writing one buffer costs fewer instructions
        // than hyper's queue of buffers for `writev` (`bench/instructions.py`),
        // and it is still one syscall.
        .writev(false);
    let builder: &'static http1::Builder = forever(builder);
    let listenings: &'static [Listening<S>] = services
        .iter()
        .map(|&service| Listening {
            service,
            settings,
            builder,
            stop: stop.latch(),
        })
        .collect::<Vec<_>>()
        .leak();

    let mut stopped = pin!(stop.latch().wait());
    let mut next_worker = 0;
    loop {
        // `or` polls its first future first: an accept that always finds a
        // connection waiting would never let `stopped` be polled, and a
        // flood would keep coming in past the signal and the deadline.
        if stop.latch().is_set() {
            break;
        }
        let permit = future::or(
            async { Some(connections.limit.acquire_arc().await) },
            async {
                stopped.as_mut().await;
                None
            },
        );
        let Some(permit) = permit.await else { break };
        let accepted = future::or(async { Some(R::accept(&listener).await) }, async {
            stopped.as_mut().await;
            None
        });
        match accepted.await {
            None => break,
            Some(Ok((stream, peer))) => {
                let accepted = Instant::now();
                connections.open.fetch_add(1, Ordering::AcqRel);
                let open = Open {
                    connections,
                    _permit: permit,
                };
                // With one service every connection goes to worker 0, which
                // per core is the acceptor's own, and shared is any worker.
                let worker = next_worker;
                next_worker = (next_worker + 1) % services.len();
                let connection = Accepted {
                    peer,
                    at: accepted,
                    listening: &listenings[worker],
                    open,
                };
                // The accepted socket is in no reactor yet: the task that
                // serves it registers it with its own worker's, once. Each
                // kind of connection is a task of its own type, so that a
                // plain one's is no larger than it needs.
                match settings.tls {
                    None => R::spawn_on(
                        worker,
                        serve_connection::<R, S, _>(
                            move |peer| adopt::<R>(stream, peer),
                            Security::Plain,
                            Box::new(connection),
                            backends::Stream::poll_readable,
                        ),
                    ),
                    Some(tls) => R::spawn_on(worker, serve_tls::<R, S>(tls, stream, connection)),
                }
            }
            Some(Err(error)) => {
                drop(permit);
                if is_resource_exhaustion(&error) {
                    // Out of file descriptors or memory: accepting again at
                    // once would spin. Back off; closing connections frees
                    // what is needed.
                    tracing::warn!(listener = settings.name, %error, "accept failed, backing off 100ms");
                    R::sleep_until(Instant::now() + Duration::from_millis(100)).await;
                } else {
                    tracing::debug!(listener = settings.name, %error, "accept failed");
                }
            }
        }
    }
    drop(listener);
    let open = connections.open();
    tracing::info!(
        listener = settings.name,
        open,
        "stopped accepting; draining"
    );
    // Set with the stop; "now" would only be reached if it were not.
    let deadline = stop.deadline().unwrap_or_else(Instant::now);
    let drained =
        crate::time::timeout_at::<R, _>(deadline, connections.wait_until_none_open()).await;
    if drained.is_err() {
        tracing::warn!(
            listener = settings.name,
            open = connections.open(),
            "shutdown timeout passed; closing the connections left"
        );
    } else {
        tracing::info!(listener = settings.name, "drained");
    }
}

/// Out of file descriptors (the process's or the system's), socket
/// buffers or memory: an accept that fails so fails again at once.
fn is_resource_exhaustion(error: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(error),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
    )
}

/// How a connection ended, for the debug log.
enum Ended {
    Closed(Result<(), hyper::Error>),
    TimedOut(Phase),
    /// Waiting for a parked connection to be readable failed.
    Unreadable(io::Error),
}

/// What serves a listener's connections on one worker: referred to by
/// each connection, which then keeps one reference instead of four.
struct Listening<S: 'static> {
    service: &'static S,
    settings: &'static ServerSettings,
    builder: &'static http1::Builder,
    stop: &'static Latch,
}

/// An accepted connection and what serves it.
struct Accepted<S: 'static> {
    peer: SocketAddr,
    /// When it was accepted: its first head (and, with TLS, its handshake
    /// before that) must be in within the header-read timeout from here.
    at: Instant,
    listening: &'static Listening<S>,
    open: Open,
}

/// Completes the client's TLS handshake, then serves HTTP over it. A
/// client that spoke plain HTTP is answered 400 and closed; one that
/// fails the handshake, or is not through it when the header-read timeout
/// passes, is closed. Each of those is counted.
async fn serve_tls<R: Runtime, S: Service>(
    tls: &'static ServerTls,
    stream: std::net::TcpStream,
    connection: Accepted<S>,
) {
    let settings = connection.listening.settings;
    let peer = connection.peer;
    let deadline = connection.at + settings.header_read_timeout;
    let Some(stream) = adopt::<R>(stream, peer) else {
        return;
    };
    let failure = match tls.accept::<R, _>(stream, deadline).await {
        Ok(stream) => {
            let security = tls::negotiated(&stream);
            let open_stream = move |_| Some(stream);
            return serve_connection::<R, S, _>(
                open_stream,
                security,
                Box::new(connection),
                tls::poll_readable,
            )
            .await;
        }
        Err(failure) => failure,
    };
    // A client that left without a byte (a health check's connect) failed
    // no handshake.
    if let (Some(metrics), false) = (
        settings.metrics,
        matches!(failure, HandshakeFailure::Silent),
    ) {
        metrics.record_tls_handshake_failure();
    }
    match failure {
        HandshakeFailure::Silent => tracing::debug!(%peer, "closed before a TLS handshake"),
        HandshakeFailure::NotTls(stream) => {
            tracing::debug!(%peer, "plain HTTP on the TLS listener; answered 400");
            let _ = timeout_at::<R, _>(deadline, tls::refuse_plain_http(stream)).await;
        }
        HandshakeFailure::TimedOut => tracing::debug!(%peer, "TLS handshake timed out"),
        HandshakeFailure::Failed(error) => tracing::debug!(%peer, %error, "TLS handshake failed"),
    }
}

/// How a connection's stream is waited on while it is parked: ready once
/// something may be read, with no buffer (for TLS, what rustls holds
/// counts). A function item, so that the task keeps no pointer to it.
trait Readable<I>: Fn(&mut I, &mut Context<'_>) -> Poll<io::Result<()>> + Send + 'static {}

impl<I, F> Readable<I> for F where
    F: Fn(&mut I, &mut Context<'_>) -> Poll<io::Result<()>> + Send + 'static
{
}

/// What a connection keeps from its accept to its close, whether hyper
/// serves it or it is parked: kept small, since a parked connection is
/// little more than this.
struct Watch<R: Runtime, S: 'static> {
    peer: SocketAddr,
    security: Security,
    listening: &'static Listening<S>,
    activity: Arc<Activity>,
    /// One timer for every deadline of the connection, re-armed lazily.
    timer: R::Timer,
    sleep: Pin<Box<dyn hyper::rt::Sleep>>,
    /// When the sleep fires; `None` once it has fired (a fired sleep may
    /// never fire again until it is reset).
    armed: Option<Instant>,
    stop_listener: Option<EventListener>,
    /// The waker the stop listener holds. Polling the listener locks the
    /// latch's list, which every connection shares (it showed in profiles
    /// with many connections), so it is only polled again when the task's
    /// waker changes; the flag itself is checked on every poll.
    stop_waker: Option<Waker>,
}

impl<R: Runtime, S: Service> Watch<R, S> {
    /// Whether shutdown has come: the stop listener is then spent.
    fn stopping(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(listener) = &mut self.stop_listener {
            let registered = self
                .stop_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()));
            if self.listening.stop.is_set()
                || (!registered && Pin::new(listener).poll(cx).is_ready())
            {
                self.stop_listener = None;
            } else if !registered {
                self.stop_waker = Some(cx.waker().clone());
            }
        }
        self.stop_listener.is_none()
    }

    /// Waits for the earliest of `deadlines`: ready with the index of the
    /// first one passed.
    fn wait_for(&mut self, cx: &mut Context<'_>, deadlines: [Option<Instant>; 2]) -> Poll<usize> {
        loop {
            let Some(next) = deadlines.iter().flatten().min().copied() else {
                return Poll::Pending;
            };
            if self.armed.is_none_or(|armed| next < armed) {
                self.timer.reset(&mut self.sleep, next);
                self.armed = Some(next);
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    self.armed = None;
                    let now = Instant::now();
                    if let Some(passed) = deadlines.iter().position(|d| d.is_some_and(|d| now >= d))
                    {
                        return Poll::Ready(passed);
                    }
                    // Fired for an earlier phase; wait for this one's deadline.
                }
            }
        }
    }

    /// When the phase the connection is in times out.
    fn deadline(&self) -> Option<Instant> {
        self.activity.deadline(self.listening.settings)
    }
}

/// Registers an accepted socket with the calling worker's reactor; `None`
/// (logged) if it cannot be.
fn adopt<R: Runtime>(stream: std::net::TcpStream, peer: SocketAddr) -> Option<R::Stream> {
    R::adopt_stream(stream)
        .inspect_err(|error| tracing::debug!(%peer, %error, "cannot register the connection"))
        .ok()
}

/// Serves HTTP/1.1 over the stream `open_stream` gives (a TCP stream, or
/// TLS over one, as `security` says) until it closes or times out.
///
/// A keep-alive connection that stays idle, its answer flushed, for
/// [`phase::PARK_AFTER`] is parked, waiting with `readable`: hyper's connection
/// is taken apart (its read and write buffers, its cached headers and
/// its service slot freed) and only the stream, the timer and the stop
/// listener wait for the next bytes; then a new hyper connection takes
/// over. A busy connection is never parked, so it never pays for building
/// one again. What is kept meanwhile is a [`Watch`]; the steps are
/// functions of their own, so that what only one of them needs is not
/// kept by the task while it is parked.
async fn serve_connection<R, S, I>(
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
    // in scope at a wait: what only the start needs stays in this block
    // (and the accepted connection comes boxed).
    let (mut watch, mut io, open) = {
        // Moved in here, so that its box is freed with the block.
        let connection = connection;
        let Accepted {
            peer,
            at,
            listening,
            open,
        } = *connection;
        let settings = listening.settings;
        let Some(stream) = open_stream(peer) else {
            return;
        };
        let activity = Arc::new(Activity::new(Phase::Head, at));
        let io = WatchedIo::new(stream, activity.clone());
        let timer = R::timer();
        let first_deadline = activity
            .deadline(settings)
            .unwrap_or_else(|| Instant::now() + settings.header_read_timeout);
        let sleep = timer.sleep_until(first_deadline);
        let watch = Watch::<R, S> {
            peer,
            security,
            listening,
            activity,
            timer,
            sleep,
            armed: Some(first_deadline),
            stop_listener: Some(listening.stop.listener()),
            stop_waker: None,
        };
        (watch, io, open)
    };
    let ended = loop {
        // Boxed, so that a parked connection's task does not keep room
        // for what serving takes.
        match Box::pin(serve_until_parked(&mut watch, io)).await {
            Ok(taken) => io = taken,
            Err(ended) => break ended,
        }
        if let Some(ended) = wait_parked(&mut watch, &mut io, &readable).await {
            break ended;
        }
    };
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
        Ended::Unreadable(error) => tracing::debug!(%peer, %error, "parked connection failed"),
        Ended::TimedOut(phase) => tracing::debug!(%peer, ?phase, "connection timed out"),
    }
    drop(open);
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
            hyper_service(
                listening.service,
                listening.settings,
                &watch.activity,
                watch.peer,
                watch.security,
            ),
        ));
        let mut draining = false;
        poll_fn(|cx| {
            // On shutdown, a connection between requests is closed at once
            // and a busy one after its answer; one still reading a head is
            // left to finish it (or to time out), so a request already sent
            // is served.
            let stopped = watch.stopping(cx);
            loop {
                if stopped && !draining && watch.activity.phase() != Phase::Head {
                    Pin::new(&mut *connection).graceful_shutdown();
                    draining = true;
                }
                if let Poll::Ready(result) = Pin::new(&mut *connection).poll(cx) {
                    return Poll::Ready(Err(Ended::Closed(result)));
                }
                // Polling may have moved the connection out of `Head`; if
                // it is now due for draining, poll it once more to act on
                // that.
                if stopped && !draining && watch.activity.phase() != Phase::Head {
                    continue;
                }
                break;
            }
            let park_at = watch.activity.park_at().filter(|_| !draining);
            match ready!(watch.wait_for(cx, [watch.deadline(), park_at])) {
                0 => Poll::Ready(Err(Ended::TimedOut(watch.activity.phase()))),
                _ => Poll::Ready(Ok(())),
            }
        })
        .await?;
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

/// Waits, with no buffer, until the parked `io` may be read (`None`), or
/// until it is to close: shutdown, the idle timeout, an error.
async fn wait_parked<R: Runtime, S: Service, I>(
    watch: &mut Watch<R, S>,
    io: &mut WatchedIo<I>,
    readable: &impl Readable<I>,
) -> Option<Ended> {
    poll_fn(|cx| {
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
    })
    .await
}

/// The hyper service for one connection: `service` with the request rules,
/// the connection's phases, the metrics and the access log around it.
fn hyper_service<S: Service>(
    service: &'static S,
    settings: &'static ServerSettings,
    activity: &Arc<Activity>,
    peer: SocketAddr,
    security: Security,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Send
+ Unpin
+ 'static {
    let service_activity = activity.clone();
    hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let head_complete = Instant::now();
        service_activity.enter(Phase::Busy, head_complete);
        let version = request.version();
        let activity = service_activity.clone();
        let logged = settings
            .access_log
            .then(|| (request.method().clone(), request.uri().path().to_owned()));
        // What hyper lets through and RFC 9112 does not (no service should
        // see it): 400, and the connection closes. Logged here, so that
        // the future hyper keeps for the request holds no more than it
        // needs (see `Forward::call`).
        let violation = request_rules::violation(&request);
        if let Some(violation) = violation {
            tracing::debug!(%peer, violation, "request refused");
        }
        // A service that does not read bodies never waits for one or
        // reads it: the answer goes out at once, and the connection
        // closes after it, so nothing behind a body is ever taken for a
        // request (whether a body that already arrived would be skipped
        // depends on hyper's buffering, and bodies on GET are a desync
        // vector). One that reads them (the counter, for a batch's
        // count) reads each whole or closes the connection itself.
        let carries_body = !request.body().is_end_stream() && !service.reads_bodies();
        let response = violation.is_none().then(|| service.call(request, peer));
        async move {
            let refused = response.is_none();
            let mut response = match response {
                Some(response) => response.await,
                None => status_only(StatusCode::BAD_REQUEST),
            };
            if refused || carries_body || asks_to_close(&response) {
                close_after(&mut response, version);
            }
            let answered = Instant::now();
            activity.answered(answered);
            if activity.eof_held() {
                // The client half-closed while this request was busy:
                // wake the connection (this task) to read that end
                // once the answer is out, and close.
                poll_fn(|cx| {
                    cx.waker().wake_by_ref();
                    Poll::Ready(())
                })
                .await;
            }
            if let Some(metrics) = settings.metrics {
                if refused {
                    metrics.record_bad_request();
                } else {
                    metrics.record_request(response.status(), answered - head_complete);
                }
            }
            if let Some((method, path)) = logged {
                tracing::info!(
                    target: "access",
                    listener = settings.name,
                    %peer,
                    %method,
                    path = ?path,
                    tls = security.name(),
                    status = response.status().as_u16(),
                    micros = (answered - head_complete).as_micros() as u64,
                );
            }
            Ok::<_, Infallible>(response)
        }
    })
}

/// Whether a service asked for its connection to close after `response`
/// (the counter does, after a body it could not read whole).
fn asks_to_close(response: &Response<Body>) -> bool {
    response
        .headers()
        .get_all(CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Makes `response` the last on its connection, and says so with
/// `connection: close` and nothing else.
///
/// To a client that sent HTTP/1.0 with `connection: keep-alive`, hyper
/// adds `keep-alive` to any response whose own version is 1.1 (as every
/// `http::Response` starts) without looking for a `close` already there,
/// then closes for that `close` all the same: the client would be told
/// both. A response versioned 1.0 lacking `keep-alive` makes hyper end the
/// keep-alive instead; its status line says HTTP/1.0 to such a client
/// either way.
fn close_after(response: &mut Response<Body>, request_version: Version) {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    if request_version == Version::HTTP_10 {
        *response.version_mut() = Version::HTTP_10;
    }
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

#[cfg(test)]
mod tests {
    use std::io;

    use super::is_resource_exhaustion;

    #[test]
    fn running_out_of_descriptors_buffers_or_memory_is_resource_exhaustion() {
        // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux; then ECONNABORTED.
        for errno in [24, 23, 105, 12] {
            assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(103)));
        assert!(!is_resource_exhaustion(&io::ErrorKind::WouldBlock.into()));
    }
}
