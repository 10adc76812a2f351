//! The gateway's service: every visit to `/` is registered with the
//! upstream counter, and the answer says whether that worked ("What it answers" in the README).

use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use backends::Runtime;
use http::HeaderMap;
use http::header::{HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::ResponsesConfig;
use crate::service::{Body, Service, get_or_head, method_not_allowed, status_only, text};
use crate::upstream::{Outcome, Upstream};

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
        match outcome {
            Outcome::Counted => text(StatusCode::OK, self.welcome, with_body),
            Outcome::Failed => text(StatusCode::BAD_GATEWAY, self.error, with_body),
            Outcome::TimedOut => text(StatusCode::GATEWAY_TIMEOUT, self.error, with_body),
            Outcome::Overloaded => {
                let mut response = text(StatusCode::SERVICE_UNAVAILABLE, self.error, with_body);
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }
}

impl<R: Runtime> Service for Forward<R> {
    /// Not an `async fn`: all it needs of the request (248 bytes, which an
    /// `async fn` would keep twice in its future) is read before the first
    /// wait, so the future holds only the upstream request's bytes. hyper
    /// moves each request's future into the connection's own memory, cold
    /// when a thousand connections take turns; a smaller one is cheaper
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
            // The header is written straight into the upstream request.
            let upstream_request = self
                .upstream
                .visit_request(|out| write_forwarded_for(out, request.headers(), peer));
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

/// `x-forwarded-for`: what the client sent (all such headers, in order,
/// byte for byte, as nginx passes them) with the client's address
/// appended; IPv4-mapped IPv6 written as IPv4. hyper's parser accepts
/// only tab, space, visible ASCII and bytes above 0x7f in a value (no CR,
/// LF, NUL or other control byte), so the result is safe to write into a
/// request head.
fn write_forwarded_for(out: &mut Vec<u8>, headers: &HeaderMap, peer: SocketAddr) {
    for received in headers.get_all("x-forwarded-for") {
        let received = received.as_bytes().trim_ascii();
        if !received.is_empty() {
            out.extend_from_slice(received);
            out.extend_from_slice(b", ");
        }
    }
    write_ip(out, peer.ip().to_canonical());
}

/// Writes an address as text; IPv4 by hand, as `fmt` costs more than the
/// rest of building the visit's request.
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded_for<B>(request: &Request<B>, peer: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        write_forwarded_for(&mut out, request.headers(), peer);
        out
    }

    #[test]
    fn forwarded_for_appends_canonical_client() {
        let peer: SocketAddr = "[::ffff:10.0.0.7]:4000".parse().unwrap();
        let request = Request::builder()
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-for", "5.6.7.8, 9.9.9.9")
            .body(())
            .unwrap();
        assert_eq!(
            forwarded_for(&request, peer),
            b"1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.7"
        );
        let bare = Request::new(());
        assert_eq!(forwarded_for(&bare, "[::1]:1".parse().unwrap()), b"::1");
        for (ip, text) in [("0.0.0.0", "0.0.0.0"), ("255.10.9.100", "255.10.9.100")] {
            let peer = SocketAddr::new(ip.parse().unwrap(), 1);
            assert_eq!(forwarded_for(&bare, peer), text.as_bytes());
        }
    }
}
