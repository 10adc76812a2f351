//! The gateway's service: every visit to `/` is registered with the
//! upstream counter, and the answer says whether that worked ("What it answers" in the README).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use backends::Runtime;
use http::header::{HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::ResponsesConfig;
use crate::outcome::{AnswerBody, Outcome};
use crate::service::{Body, Service, get_or_head, method_not_allowed, status_only, text};
use crate::upstream::Upstream;

/// Forwards visits to the upstream counter.
pub struct Forward<R: Runtime> {
    upstream: &'static Upstream<R>,
    /// Response bodies, fixed for the life of the process: every response
    /// borrows them for free.
    welcome: &'static str,
    error: &'static str,
}

impl<R: Runtime> Forward<R> {
    pub fn new(upstream: &'static Upstream<R>, responses: &ResponsesConfig) -> Self {
        Self {
            upstream,
            welcome: responses.welcome.clone().leak(),
            error: responses.error.clone().leak(),
        }
    }

    /// The answer to a visit, from the outcome of registering it.
    fn answer(&self, outcome: Outcome, with_body: bool) -> Response<Body> {
        let body = match outcome.body() {
            AnswerBody::Welcome => self.welcome,
            AnswerBody::Error => self.error,
        };
        let mut response = text(outcome.status(), body, with_body);
        if let Some(seconds) = outcome.retry_after() {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}

impl<R: Runtime> Service for Forward<R> {
    /// Not an `async fn`: all it needs of the request is read before the
    /// first wait, so the future holds only the upstream request's bytes,
    /// not the request (which an `async fn` would keep, twice). hyper moves
    /// each request's future into the connection's own memory, which is
    /// cold when many connections take turns; a smaller future is cheaper
    /// to move and to fill.
    fn call(
        &'static self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let visit = if request.uri().path() != "/" {
            Err(status_only(StatusCode::NOT_FOUND))
        } else if let Some(with_body) = get_or_head(request.method()) {
            let started = Instant::now();
            let upstream_request = self.upstream.visit_request(request.headers(), peer);
            Ok((upstream_request, started, with_body))
        } else {
            Err(method_not_allowed("GET, HEAD"))
        };
        drop(request);
        async move {
            let (upstream_request, started, with_body) = match visit {
                Ok(visit) => visit,
                Err(response) => return response,
            };
            let outcome = self
                .upstream
                .register_visit(upstream_request, started)
                .await;
            self.answer(outcome, with_body)
        }
    }
}
