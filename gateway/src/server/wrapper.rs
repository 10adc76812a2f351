//! The service wrapper: what the server does around every request, whatever
//! [`Service`] answers it. It moves the connection's [`Phase`] to busy and
//! back, refuses what the request rules refuse, closes the connection after
//! a request whose body the service will not read (or when the service asks
//! to), and records the metrics and the access log.

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
use super::phase::{Activity, Phase};
use crate::request_rules;
use crate::service::{Body, Service, status_only};
use crate::tls::Security;

/// The hyper service for one connection: `service` with the request rules,
/// the connection's phases, the metrics and the access log around it.
pub(super) fn wrap<S: Service>(
    service: &'static S,
    settings: &'static ServerSettings,
    activity: &Arc<Activity>,
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
    let activity = activity.clone();
    hyper::service::service_fn(move |request: Request<Incoming>| {
        answer(service, settings, activity.clone(), peer, security, request)
    })
}

/// Answers one request with `service`, and does around it what every
/// request gets (see the module's doc).
fn answer<S: Service>(
    service: &'static S,
    settings: &'static ServerSettings,
    activity: Arc<Activity>,
    peer: SocketAddr,
    security: Security,
    request: Request<Incoming>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
    let head_complete = Instant::now();
    activity.enter(Phase::Busy, head_complete);
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
