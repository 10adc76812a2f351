//! The built-in counter (SPEC §6): the reference upstream for demos, tests
//! and benchmarks. `POST /counter` counts a visit; `GET /counter` reads
//! the tally.

use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::service::{Body, Service, method_not_allowed, status_only, text, text_owned};
use crate::stats::ShardedCounter;

/// The path the counter serves.
pub const PATH: &str = "/counter";

/// Counts visits: in a slot per worker thread, so that workers on many
/// cores do not take turns at one cache line; a read sums the slots.
#[derive(Debug, Default)]
pub struct Counter {
    count: ShardedCounter,
}

impl Counter {
    pub fn count(&self) -> u64 {
        self.count.get()
    }
}

impl Service for Counter {
    async fn call(&'static self, request: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        if request.uri().path() != PATH {
            return status_only(StatusCode::NOT_FOUND);
        }
        match *request.method() {
            Method::POST => {
                self.count.increment();
                text(StatusCode::OK, "", true)
            }
            Method::GET => text_owned(StatusCode::OK, format!("{}\n", self.count())),
            _ => method_not_allowed("GET, POST"),
        }
    }
}
