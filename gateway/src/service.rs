//! The seam between the HTTP server loop and what answers requests.
//!
//! A [`Service`] takes an `http::Request` and the client's address and
//! returns an `http::Response` with a fixed body. It knows nothing of the
//! runtime or of connections; the server loop ([`crate::server`]) drives it
//! from hyper on either backend.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

/// The body of every response the gateway writes: known length, in memory.
pub type Body = Full<Bytes>;

/// Answers one request.
pub trait Service: Send + Sync + 'static {
    /// Answers `request`, which arrived from `peer`.
    fn call(
        &'static self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send + 'static;

    /// Whether this service reads request bodies. One that does not is
    /// never sent a body's bytes: the server answers and closes the
    /// connection after a request that has one (see the server loop).
    fn reads_bodies(&self) -> bool {
        false
    }
}

static TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// A `text/plain` response with `content-length` set. For `HEAD`, pass
/// `with_body = false`: the length still describes the body a `GET` gets.
pub fn text(status: StatusCode, body: &'static str, with_body: bool) -> Response<Body> {
    let bytes = if with_body {
        Bytes::from_static(body.as_bytes())
    } else {
        Bytes::new()
    };
    plain(status, bytes, body.len())
}

/// A `text/plain` response whose body is built at run time.
pub fn text_owned(status: StatusCode, body: String) -> Response<Body> {
    let length = body.len();
    plain(status, Bytes::from(body), length)
}

fn plain(status: StatusCode, body: Bytes, content_length: usize) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, TEXT_PLAIN.clone());
    headers.insert(CONTENT_LENGTH, HeaderValue::from(content_length));
    response
}

/// Whether a read-only resource answers `method` with a body: `Some(true)`
/// for `GET`, `Some(false)` for `HEAD`, `None` for anything else (405).
pub fn get_or_head(method: &Method) -> Option<bool> {
    match *method {
        Method::GET => Some(true),
        Method::HEAD => Some(false),
        _ => None,
    }
}

/// `405` with the `allow` header listing what is.
pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = status_only(StatusCode::METHOD_NOT_ALLOWED);
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// The reason phrase of a status as its body, e.g. "Not Found".
pub fn status_only(status: StatusCode) -> Response<Body> {
    text(status, status.canonical_reason().unwrap_or(""), true)
}
