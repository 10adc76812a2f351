//! The HTTP/1.1 server loop, written once over the runtime trait: accept
//! connections up to the process-wide cap, serve each with hyper on its
//! own task, enforce the header-read and idle timeouts, and drain on
//! shutdown.
//!
//! The timeouts are kept here rather than by hyper: each connection tracks
//! its [`Phase`], and one resettable timer per connection, re-armed lazily,
//! enforces the phase's deadline (the `phase` module says why).

mod phase;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use async_lock::{Semaphore, SemaphoreGuardArc};
use backends::Runtime;
use event_listener::Event;
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
use crate::tls::{self, HandshakeFailure, ServerTls};
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
                // The accepted socket is in no reactor yet: the task that
                // serves it registers it with its own worker's, once.
                let connection = async move {
                    let stream = match R::adopt_stream(stream) {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::debug!(%peer, %error, "cannot register the connection");
                            return;
                        }
                    };
                    let connection = Accepted {
                        peer,
                        at: accepted,
                        service: services[worker],
                        settings,
                        builder,
                        stop: stop.latch(),
                        open,
                    };
                    match settings.tls {
                        None => serve_connection::<R, S, _>(stream, "none", connection).await,
                        Some(tls) => serve_tls::<R, S>(tls, stream, connection).await,
                    }
                };
                R::spawn_on(worker, connection);
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
}

/// An accepted connection and what serves it.
struct Accepted<S: 'static> {
    peer: SocketAddr,
    /// When it was accepted: its first head (and, with TLS, its handshake
    /// before that) must be in within the header-read timeout from here.
    at: Instant,
    service: &'static S,
    settings: &'static ServerSettings,
    builder: &'static http1::Builder,
    stop: &'static Latch,
    open: Open,
}

/// Completes the client's TLS handshake, then serves HTTP over it. A
/// client that spoke plain HTTP is answered 400 and closed; one that
/// fails the handshake, or is not through it when the header-read timeout
/// passes, is closed. Each of those is counted.
async fn serve_tls<R: Runtime, S: Service>(
    tls: &'static ServerTls,
    stream: R::Stream,
    connection: Accepted<S>,
) {
    let settings = connection.settings;
    let peer = connection.peer;
    let deadline = connection.at + settings.header_read_timeout;
    let failure = match tls.accept::<R, _>(stream, deadline).await {
        Ok(stream) => {
            let version = tls::version_name(&stream);
            return serve_connection::<R, S, _>(stream, version, connection).await;
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

/// Serves HTTP/1.1 over `stream` (a TCP stream, or TLS over one, whose
/// version `tls` names for the access log) until it closes or times out.
async fn serve_connection<R, S, I>(stream: I, tls: &'static str, connection: Accepted<S>)
where
    R: Runtime,
    S: Service,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let Accepted {
        peer,
        at,
        service,
        settings,
        builder,
        stop,
        open,
    } = connection;
    let activity = Arc::new(Activity::new(Phase::Head, at));
    let io = WatchedIo {
        inner: stream,
        activity: activity.clone(),
    };
    let service_activity = activity.clone();
    let hyper_service =
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
                activity.enter(activity.after_answer(), answered);
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
                        tls,
                        status = response.status().as_u16(),
                        micros = (answered - head_complete).as_micros() as u64,
                    );
                }
                Ok::<_, Infallible>(response)
            }
        });
    let mut connection = pin!(builder.serve_connection(io, hyper_service));

    let timer = R::timer();
    let first_deadline = activity
        .deadline(settings)
        .unwrap_or_else(|| Instant::now() + settings.header_read_timeout);
    let mut sleep = timer.sleep_until(first_deadline);
    let mut armed = first_deadline;
    let mut stop_listener = Some(stop.listener());
    // The waker the stop listener holds. Polling the listener locks the
    // latch's list, which every connection shares (it showed in profiles
    // with many connections), so it is only polled again when the task's
    // waker changes; the flag itself is checked on every poll.
    let mut stop_waker: Option<Waker> = None;
    let mut draining = false;

    let ended = poll_fn(|cx| {
        // On shutdown, a connection between requests is closed at once and
        // a busy one after its answer; one still reading a head is left to
        // finish it (or to time out), so a request already sent is served.
        if let Some(listener) = &mut stop_listener {
            let registered = stop_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if stop.is_set() || (!registered && Pin::new(listener).poll(cx).is_ready()) {
                stop_listener = None;
            } else if !registered {
                stop_waker = Some(cx.waker().clone());
            }
        }
        loop {
            if stop_listener.is_none() && !draining && activity.phase() != Phase::Head {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(Ended::Closed(result));
            }
            // Polling may have moved the connection out of `Head`; if it
            // is now due for draining, poll it once more to act on that.
            if stop_listener.is_none() && !draining && activity.phase() != Phase::Head {
                continue;
            }
            break;
        }
        loop {
            let Some(deadline) = activity.deadline(settings) else {
                return Poll::Pending;
            };
            if deadline < armed {
                timer.reset(&mut sleep, deadline);
                armed = deadline;
            }
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline => {
                    return Poll::Ready(Ended::TimedOut(activity.phase()));
                }
                Poll::Ready(()) => {
                    // Fired for an earlier phase; wait for this one's deadline.
                    timer.reset(&mut sleep, deadline);
                    armed = deadline;
                }
            }
        }
    })
    .await;
    match ended {
        Ended::Closed(Ok(())) => {}
        Ended::Closed(Err(error)) => {
            if error.is_parse() {
                if let Some(metrics) = settings.metrics {
                    metrics.record_bad_request();
                }
            }
            tracing::debug!(%peer, %error, "connection closed with an error")
        }
        Ended::TimedOut(phase) => tracing::debug!(%peer, ?phase, "connection timed out"),
    }
    drop(open);
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
