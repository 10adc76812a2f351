//! The built-in counter: the reference upstream for demos, tests and
//! benchmarks. `POST /counter` counts a visit; `GET /counter` reads the
//! tally. With a durable store ([`crate::store`]) a POST is answered 200
//! only once its increment is durable, 503 when it was not made so, and
//! 504 when that is not known (a database lost during the commit); a GET
//! reads the durable total (from the database, with PostgreSQL).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::{CounterConfig, StoreKind};
use crate::service::{Body, Service, method_not_allowed, status_only, text, text_owned};
use crate::stats::ShardedCounter;
use crate::store::file::FileStore;
use crate::store::postgres::PostgresStore;
use crate::store::{NotCounted, Store};

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
                let file = FileStore::open(&path)?;
                let total = file.total();
                tracing::info!(path = ?path, count = total, "counter state file open");
                Ok(Self::durable(Store::start(file, total)?))
            }
            StoreKind::Postgres => {
                let url = config.postgres_url.as_deref().unwrap_or_default();
                let (database, total) = PostgresStore::open(url)?;
                tracing::info!(
                    database = crate::store::Durable::describe(&database),
                    count = total,
                    "counter database open"
                );
                Ok(Self::durable(Store::start(database, total)?))
            }
        }
    }

    fn durable(store: Store) -> Self {
        Self {
            count: Count::Durable(store),
        }
    }

    /// Visits counted, as this process last knew (with a durable store,
    /// made durable): for the status line.
    pub fn count(&self) -> u64 {
        match &self.count {
            Count::Memory(count) => count.get(),
            Count::Durable(store) => store.last_total(),
        }
    }

    async fn read(&self) -> Response<Body> {
        let total = match &self.count {
            Count::Memory(count) => Ok(count.get()),
            Count::Durable(store) => store.total().await,
        };
        match total {
            Ok(total) => text_owned(StatusCode::OK, format!("{total}\n")),
            Err(not_counted) => failure(not_counted),
        }
    }

    async fn increment(&self) -> Response<Body> {
        match &self.count {
            Count::Memory(count) => count.increment(),
            Count::Durable(store) => {
                if let Err(not_counted) = store.increment().await {
                    return failure(not_counted);
                }
            }
        }
        text(StatusCode::OK, "", true)
    }
}

/// The answer to a visit the store did not confirm: 503 (try again soon)
/// when it was not counted, 504 when it may have been.
fn failure(not_counted: NotCounted) -> Response<Body> {
    match not_counted {
        NotCounted::Refused => {
            let mut response = status_only(StatusCode::SERVICE_UNAVAILABLE);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        NotCounted::Unknown => status_only(StatusCode::GATEWAY_TIMEOUT),
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
            Err(status_only(StatusCode::NOT_FOUND))
        } else {
            match *request.method() {
                Method::POST => Ok(true),
                Method::GET => Ok(false),
                _ => Err(method_not_allowed("GET, POST")),
            }
        };
        drop(request);
        async move {
            match answered {
                Err(response) => response,
                Ok(true) => self.increment().await,
                Ok(false) => self.read().await,
            }
        }
    }
}
