//! The service wrapper: what the server does around every request, whatever
//! [`Service`] answers it. It tells the connection's [`RequestCycle`] when
//! a request begins and ends (an HTTP/1.1 connection's phase, an HTTP/2
//! connection's open streams), refuses what the request rules refuse,
//! closes an HTTP/1 connection after a request whose body the service
//! will not read (or when the service asks to), and records the metrics
//! and the access log.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use futures_lite::future::poll_fn;
use http::header::{CONNECTION, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};

use super::ServerSettings;
use crate::metrics::Protocol;
use crate::request_rules;
use crate::service::{Body, Service, status_only};
use crate::tls::Security;

/// What a connection tracks of its requests, told by the wrapper.
pub(super) trait RequestCycle: Send + Sync + 'static {
    /// A request's head is in, `at`; the service takes it.
    fn began(&self, at: Instant);

    /// The service answered, `at`. True when the connection's task must
    /// be woken once the answer is out (see [`Activity::eof_held`]).
    ///
    /// [`Activity::eof_held`]: super::phase::Activity::eof_held
    fn answered(&self, at: Instant) -> bool;

    /// A request that began will never be answered: its future was
    /// dropped (its client left, or reset its stream).
    fn abandoned(&self);
}

/// A request between [`RequestCycle::began`] and its answer: if it is
/// dropped before, the cycle hears it was abandoned.
struct InFlight<C: RequestCycle> {
    cycle: Arc<C>,
    answered: bool,
}

impl<C: RequestCycle> InFlight<C> {
    fn answered(&mut self, at: Instant) -> bool {
        self.answered = true;
        self.cycle.answered(at)
    }
}

impl<C: RequestCycle> Drop for InFlight<C> {
    fn drop(&mut self) {
        if !self.answered {
            self.cycle.abandoned();
        }
    }
}

/// The hyper service for one connection: `service` with the request rules,
/// the connection's request cycle, the metrics and the access log around
/// it.
pub(super) fn wrap<S: Service, C: RequestCycle>(
    service: &'static S,
    settings: &'static ServerSettings,
    cycle: Arc<C>,
    peer: SocketAddr,
    security: Security,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Send
+ Unpin
+ 'static {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        answer(service, settings, cycle.clone(), peer, security, request)
    })
}

/// Answers one request with `service`, and does around it what every
/// request gets (see the module's doc).
fn answer<S: Service, C: RequestCycle>(
    service: &'static S,
    settings: &'static ServerSettings,
    cycle: Arc<C>,
    peer: SocketAddr,
    security: Security,
    request: Request<Incoming>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
    let head_complete = Instant::now();
    cycle.began(head_complete);
    let mut in_flight = InFlight {
        cycle,
        answered: false,
    };
    let version = request.version();
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
    // reads it: the answer goes out at once, and an HTTP/1 connection
    // closes after it, so nothing behind a body is ever taken for a
    // request (whether a body that already arrived would be skipped
    // depends on hyper's buffering, and bodies on GET are a desync
    // vector). One that reads them (the counter, for a batch's
    // count) reads each whole or closes the connection itself. HTTP/2
    // frames each body, so its stream alone ends (hyper resets it).
    let http2 = version == Version::HTTP_2;
    let carries_body = !request.body().is_end_stream() && !service.reads_bodies() && !http2;
    let response = violation.is_none().then(|| service.call(request, peer));
    async move {
        let refused = response.is_none();
        let mut response = match response {
            Some(response) => response.await,
            None => status_only(StatusCode::BAD_REQUEST),
        };
        if !http2 && (refused || carries_body || asks_to_close(&response)) {
            close_after(&mut response, version);
        }
        let answered = Instant::now();
        if in_flight.answered(answered) {
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
            let protocol = if http2 {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
            if refused {
                metrics.record_bad_request();
            } else {
                metrics.record_request(protocol, response.status(), answered - head_complete);
            }
        }
        if let Some((method, path)) = logged {
            tracing::info!(
                target: "access",
                listener = settings.name,
                %peer,
                %method,
                path = ?path,
                ?version,
                tls = security.name(),
                status = response.status().as_u16(),
                micros = (answered - head_complete).as_micros() as u64,
            );
        }
        Ok::<_, Infallible>(response)
    }
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
