//! The built-in counter: the reference upstream for demos, tests and
//! benchmarks. `POST /counter` counts a visit; `GET /counter` reads the
//! tally. With a durable store ([`crate::store`]) a POST is answered 200
//! only once its increment is durable, and 503 when it could not be made
//! so; a GET reads the durable total.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::{CounterConfig, StoreKind};
use crate::service::{Body, Service, method_not_allowed, status_only, text, text_owned};
use crate::stats::ShardedCounter;
use crate::store::Store;
use crate::store::file::FileStore;

/// The path the counter serves.
pub const PATH: &str = "/counter";

/// Counts visits.
pub struct Counter {
    count: Count,
}

// The counter lives for the process (leaked once at start) and is never
// moved, so the memory variant's slots stay inline, one pointer closer.
#[allow(clippy::large_enum_variant)]
enum Count {
    /// In a slot per worker thread, so that workers on many cores do not
    /// take turns at one cache line; a read sums the slots.
    Memory(ShardedCounter),
    Durable(Store),
}

impl Counter {
    /// A counter kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            count: Count::Memory(ShardedCounter::default()),
        }
    }

    /// The counter `config` describes, its store opened (a relative state
    /// file taken from `state_base`): an error names the file and why.
    pub fn open(config: &CounterConfig, state_base: &Path) -> std::io::Result<Self> {
        match config.store {
            StoreKind::Memory => Ok(Self::in_memory()),
            StoreKind::File => {
                let path = config.state_path(state_base);
                let (file, total) = FileStore::open(&path)?;
                tracing::info!(path = ?path, count = total, "counter state file open");
                let store = Store::start(file, total)?;
                Ok(Self {
                    count: Count::Durable(store),
                })
            }
        }
    }

    /// Visits counted (with a durable store, made durable).
    pub fn count(&self) -> u64 {
        match &self.count {
            Count::Memory(count) => count.get(),
            Count::Durable(store) => store.total(),
        }
    }

    async fn increment(&self) -> Response<Body> {
        match &self.count {
            Count::Memory(count) => count.increment(),
            Count::Durable(store) => {
                if store.increment().await.is_err() {
                    let mut response = status_only(StatusCode::SERVICE_UNAVAILABLE);
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                    return response;
                }
            }
        }
        text(StatusCode::OK, "", true)
    }
}

impl Service for Counter {
    /// Not an `async fn`: the request is read and dropped before the
    /// increment waits, so the future hyper keeps holds only the counter.
    fn call(
        &'static self,
        request: Request<Incoming>,
        _peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let answered = if request.uri().path() != PATH {
            Some(status_only(StatusCode::NOT_FOUND))
        } else {
            match *request.method() {
                Method::POST => None,
                Method::GET => Some(text_owned(StatusCode::OK, format!("{}\n", self.count()))),
                _ => Some(method_not_allowed("GET, POST")),
            }
        };
        drop(request);
        async move {
            match answered {
                Some(response) => response,
                None => self.increment().await,
            }
        }
    }
}
