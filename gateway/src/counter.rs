//! The built-in counter: the reference upstream for demos, tests and
//! benchmarks. `POST /counter` counts a visit; `GET /counter` reads the
//! tally. With a durable store ([`crate::store`]) a POST is answered 200
//! only once its increment is durable, 503 when it was not made so, and
//! 504 when that is not known (a database lost during the commit); a GET
//! reads the durable total (from the database, with PostgreSQL).

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use backends::Runtime;

use http::header::{CONNECTION, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::batch_protocol::{MAX_COUNT_BODY, parse_visits};
use crate::config::{CounterConfig, StoreKind};
use crate::service::{Body, Service, method_not_allowed, status_only, text, text_owned};
use crate::stats::ShardedCounter;
use crate::store::file::FileStore;
use crate::store::postgres::PostgresStore;
use crate::store::{NotCounted, Store};

/// The path the counter serves.
pub const PATH: &str = "/counter";

/// Counts visits, serving on the runtime `R`.
pub struct Counter<R> {
    count: Count,
    /// How long a POST's body may take to arrive once its head has.
    body_timeout: Duration,
    runtime: PhantomData<fn() -> R>,
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

impl<R: Runtime> Counter<R> {
    /// The counter `config` describes, its store opened (a relative state
    /// file taken from `state_base`): an error names the file and why. A
    /// POST's body must arrive within `body_timeout` of its head.
    pub fn open(
        config: &CounterConfig,
        state_base: &Path,
        body_timeout: Duration,
    ) -> std::io::Result<Self> {
        let count = Self::open_count(config, state_base)?;
        Ok(Self {
            count,
            body_timeout,
            runtime: PhantomData,
        })
    }

    fn open_count(config: &CounterConfig, state_base: &Path) -> std::io::Result<Count> {
        match config.store {
            StoreKind::Memory => Ok(Count::Memory(ShardedCounter::default())),
            StoreKind::File => {
                let path = config.state_path(state_base);
                let file = FileStore::open(&path)?;
                let total = file.total();
                tracing::info!(path = ?path, count = total, "counter state file open");
                Ok(Count::Durable(Store::start(file, total)?))
            }
            StoreKind::Postgres => {
                let url = config.postgres_url.as_deref().unwrap_or_default();
                let (database, total) = PostgresStore::open(url)?;
                tracing::info!(
                    database = crate::store::Durable::describe(&database),
                    count = total,
                    "counter database open"
                );
                Ok(Count::Durable(Store::start(database, total)?))
            }
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

    /// Counts `visits` at once (with a durable store, in one commit).
    async fn add(&self, visits: u64) -> Response<Body> {
        match &self.count {
            Count::Memory(count) => count.add(visits),
            Count::Durable(store) => {
                if let Err(not_counted) = store.add(visits).await {
                    return failure(not_counted);
                }
            }
        }
        text(StatusCode::OK, "", true)
    }
}

/// The visits a POST carries: one when it has no body; else its body, the
/// decimal number of visits (1 to [`MAX_VISITS_PER_POST`], digits only),
/// read by `deadline`. `None` for any other body, or one that is late: a
/// 400, nothing counted.
async fn visits<R: Runtime>(body: Incoming, deadline: Instant) -> Option<u64> {
    use http_body_util::BodyExt;
    if hyper::body::Body::is_end_stream(&body) {
        return Some(1);
    }
    let read = http_body_util::Limited::new(body, MAX_COUNT_BODY).collect();
    let bytes = crate::time::timeout_at::<R, _>(deadline, read)
        .await
        .ok()?
        .ok()?
        .to_bytes();
    parse_visits(&bytes)
}

/// A POST whose body is not a count (or did not arrive in time): nothing
/// counted, and the connection closes (the rest of a body too long to
/// read is never taken for a request).
fn bad_count() -> Response<Body> {
    let mut response = text(
        StatusCode::BAD_REQUEST,
        "the body must be the number of visits, 1 to 1048576, in decimal digits\n",
        true,
    );
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
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

impl<R: Runtime> Service for Counter<R> {
    /// Not an `async fn`: the request's head is read and dropped before
    /// the increment waits, so the future hyper keeps holds the counter
    /// and, for a POST, its body.
    fn call(
        &'static self,
        request: Request<Incoming>,
        _peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let answered = if request.uri().path() != PATH {
            Err(status_only(StatusCode::NOT_FOUND))
        } else {
            match *request.method() {
                Method::POST => Ok(Some((
                    request.into_body(),
                    Instant::now() + self.body_timeout,
                ))),
                Method::GET => Ok(None),
                _ => Err(method_not_allowed("GET, POST")),
            }
        };
        async move {
            match answered {
                Err(response) => response,
                Ok(Some((body, deadline))) => match visits::<R>(body, deadline).await {
                    Some(visits) => self.add(visits).await,
                    None => bad_count(),
                },
                Ok(None) => self.read().await,
            }
        }
    }

    fn reads_bodies(&self) -> bool {
        true
    }
}
