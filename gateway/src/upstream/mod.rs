//! The upstream client: a pool of kept-alive HTTP/1.1 connections to the
//! counter, written once over the runtime trait.
//!
//! A visit takes a pooled connection, else dials a new one if the cap
//! (`upstream.max_connections`) allows, else queues for either until its
//! deadline and is then answered 503 without touching the upstream
//! ([`pool`] has the rules). The exchange itself runs in the visitor's own
//! task ([`exchange`], which reads the answer as [`framing`] says); a
//! connection is just a stream, its buffer, and its slot under the cap.
//! [`dial`] connects to the addresses the plan resolved, and looks the
//! name up again after a failed connect. [`request`] writes the POSTs: a
//! visit's, with its `x-forwarded-for`, and a batch's. With
//! `upstream.batch_max` above 1, [`batch`] gathers the visits that arrive
//! while POSTs are in flight into one POST that carries their number, and
//! sends it. [`metrics`] is what the client records for `/metrics`.
//!
//! The never-send-twice rule ("What it answers" in the README): a POST is retried only when no
//! byte of it can have left — the pooled connection was found closed
//! before writing, or the very first write failed — and only once, on a
//! fresh connection.

mod batch;
mod dial;
mod error;
pub mod exchange;
mod framing;
mod metrics;
mod pool;
mod request;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use backends::Runtime;
use http::HeaderMap;

use self::batch::Batcher;
use self::dial::Dialer;
pub use self::error::UpstreamError;
use self::exchange::{Connection, Exchange};
pub use self::metrics::UpstreamMetrics;
use self::pool::{Found, Handoff, Pool, Queued, Slot};
use self::request::Requests;
use crate::config::{UpstreamConfig, UpstreamTarget, ms};
use crate::outcome::Outcome;
use crate::time::{Elapsed, timeout_at};
use crate::tls::{ClientTls, UpstreamStream};

/// What the pool holds: an upstream connection on the runtime's stream.
type Pooled<R> = Connection<UpstreamStream<<R as Runtime>::Stream>>;
/// An open upstream connection and its slot under the cap.
type Conn<R> = pool::Conn<Pooled<R>>;
/// A future kept off the visit's own (see [`Upstream::connect`]).
type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How many POSTs each worker's batches keep in flight. One would leave
/// the upstream idle while a POST's answer travels back and the next batch
/// goes out; two keep it busy, and a waiting visit still waits for at most
/// one POST to come back before its own is sent.
const POSTS_IN_FLIGHT_PER_WORKER: usize = 2;

/// An attempt in flight: finished in the background (see
/// [`Upstream::finish_late`]) if it is dropped before it ends, and then
/// recorded there, as the POST it is (carrying `visits`, begun at
/// `started`).
struct Unfinished<R: Runtime, F: Future<Output = Attempt<R>> + Send + 'static> {
    upstream: &'static Upstream<R>,
    attempt: Option<Pin<Box<F>>>,
    visits: u64,
    started: Instant,
}

impl<R: Runtime, F: Future<Output = Attempt<R>> + Send + 'static> Drop for Unfinished<R, F> {
    fn drop(&mut self) {
        if let Some(attempt) = self.attempt.take() {
            let record = Some((self.visits, self.started));
            self.upstream.finish_late(attempt, record);
        }
    }
}

/// The upstream client and its connection pool; one per process, or one
/// per worker with `runtime.threading = "per-core"`.
pub struct Upstream<R: Runtime> {
    /// The visit's and the batch's request heads.
    requests: Requests,
    request_timeout: Duration,
    pool: Pool<Pooled<R>>,
    dialer: Dialer,
    /// `None` when `batch_max` is 1: every visit is its own POST.
    batcher: Option<Batcher<Vec<u8>>>,
    metrics: &'static UpstreamMetrics,
}

/// The result of one attempt on one connection.
enum Attempt<R: Runtime> {
    Done(Outcome, Option<Conn<R>>),
    /// Not a byte left: the request may go out on another connection.
    Unsent(Vec<u8>),
}

impl<R: Runtime> Upstream<R> {
    /// Builds the client for `workers` worker threads, to `target` (the
    /// parsed `config.url`) at the addresses its name resolved to.
    pub fn new(
        config: &UpstreamConfig,
        target: &UpstreamTarget,
        addrs: &[SocketAddr],
        workers: usize,
        tls: Option<&'static ClientTls>,
        metrics: &'static UpstreamMetrics,
    ) -> Result<Self, UpstreamError> {
        let requests = Requests::new(target);
        let batcher = (config.batch_max > 1).then(|| {
            Batcher::new(
                config.batch_max,
                POSTS_IN_FLIGHT_PER_WORKER * workers.max(1),
            )
        });
        Ok(Self {
            requests,
            request_timeout: ms(config.request_timeout_ms),
            pool: Pool::new(config.max_connections, ms(config.pool_idle_timeout_ms)),
            dialer: Dialer::new(
                target.clone(),
                addrs,
                ms(config.connect_timeout_ms),
                tls,
                metrics,
            )?,
            batcher,
            metrics,
        })
    }

    /// Connections open now (idle or busy).
    pub fn open_connections(&self) -> usize {
        self.pool.open()
    }

    /// The POST that registers the visit of the client at `peer`, whose
    /// request carried the headers `received` (it passes their
    /// `x-forwarded-for` on); for [`Upstream::register_visit`].
    #[inline]
    pub fn visit_request(&self, received: &HeaderMap, peer: SocketAddr) -> Vec<u8> {
        self.requests.visit(received, peer)
    }

    /// Registers one visit, which began at `started`: `request` (from
    /// [`Upstream::visit_request`]) is its own POST, or, with batching, it
    /// joins a batch. Either way it is answered by its deadline.
    pub async fn register_visit(&'static self, request: Vec<u8>, started: Instant) -> Outcome {
        match &self.batcher {
            None => self.post(request, 1, started).await,
            Some(batcher) => self.register_in_batch(batcher, request, started).await,
        }
    }

    /// Sends `request`, which carries `visits`, started at `started`,
    /// unless the pool is saturated; records it.
    async fn post(&'static self, request: Vec<u8>, visits: u64, started: Instant) -> Outcome {
        let outcome = self.exchange(request, visits, started).await;
        self.metrics.record(outcome, visits, started.elapsed());
        outcome
    }

    async fn exchange(
        &'static self,
        mut request: Vec<u8>,
        visits: u64,
        started: Instant,
    ) -> Outcome {
        let deadline = started + self.request_timeout;
        let (mut conn, mut from_pool) = match self.checkout(deadline, started).await {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        loop {
            // Boxed so that, past the deadline, the attempt can move to a
            // task of its own and finish there (see `finish_late`); so it
            // does if this visit is dropped meanwhile (its client reset
            // the connection), as a POST that has left is not abandoned.
            let mut attempt = Unfinished {
                upstream: self,
                attempt: Some(Box::pin(self.attempt(conn, request, from_pool))),
                visits,
                started,
            };
            let answered = match attempt.attempt.as_mut() {
                Some(running) => timeout_at::<R, _>(deadline, running.as_mut()).await,
                None => Err(Elapsed),
            };
            let attempt = attempt.attempt.take();
            match answered {
                Err(Elapsed) => {
                    if let Some(attempt) = attempt {
                        self.finish_late(attempt, None);
                    }
                    return Outcome::TimedOut;
                }
                Ok(Attempt::Done(outcome, reusable)) => {
                    if let Some(conn) = reusable {
                        self.check_in(conn);
                    }
                    return outcome;
                }
                Ok(Attempt::Unsent(returned)) if from_pool => {
                    // The pooled connection was dead before a byte of this
                    // request left: replace it, once.
                    request = returned;
                    from_pool = false;
                    conn = match self.dial(deadline).await {
                        Ok(conn) => conn,
                        Err(outcome) => return outcome,
                    };
                }
                Ok(Attempt::Unsent(_)) => return Outcome::Failed,
            }
        }
    }

    /// One request and answer on `conn`.
    async fn attempt(&self, mut conn: Conn<R>, request: Vec<u8>, from_pool: bool) -> Attempt<R> {
        if from_pool && !conn.connection.is_usable() {
            return Attempt::Unsent(request);
        }
        match conn.connection.exchange(&request).await {
            Exchange::Answered { status, reusable } => {
                let outcome = if (200..300).contains(&status) {
                    Outcome::Counted
                } else {
                    tracing::debug!(status, "upstream answered non-2xx");
                    Outcome::Failed
                };
                Attempt::Done(outcome, reusable.then_some(conn))
            }
            Exchange::Unsent(error) => {
                tracing::debug!(%error, "upstream connection failed before the request left");
                Attempt::Unsent(request)
            }
            Exchange::Failed(error) => {
                tracing::debug!(%error, "upstream exchange failed");
                Attempt::Done(Outcome::Failed, None)
            }
        }
    }

    /// Lets an attempt whose visit was already answered 504 run on for
    /// another `request_timeout`. Dropping it would close the connection
    /// and free its slot at once, and the next waiter would send another
    /// POST to an upstream that is already too slow; finishing it keeps
    /// the slot busy for as long as the upstream really is (so waiters at
    /// the cap get 503 without adding load) and keeps the connection.
    /// An attempt whose visit is gone (dropped, not answered) ends the
    /// same way, and is recorded when it does: `record` is its POST's
    /// visits and start.
    fn finish_late(
        &'static self,
        attempt: impl Future<Output = Attempt<R>> + Send + 'static,
        record: Option<(u64, Instant)>,
    ) {
        R::spawn(async move {
            let grace = Instant::now() + self.request_timeout;
            let outcome = match timeout_at::<R, _>(grace, attempt).await {
                Ok(Attempt::Done(outcome, reusable)) => {
                    if let Some(conn) = reusable {
                        self.check_in(conn);
                    }
                    outcome
                }
                Ok(Attempt::Unsent(_)) => Outcome::Failed,
                Err(Elapsed) => Outcome::TimedOut,
            };
            if let Some((visits, started)) = record {
                self.metrics.record(outcome, visits, started.elapsed());
            }
        });
    }

    /// An idle pooled connection, else a new one if the cap allows, else
    /// queues for either until `deadline`. The flag is true for a pooled
    /// one.
    async fn checkout(
        &'static self,
        deadline: Instant,
        now: Instant,
    ) -> Result<(Conn<R>, bool), Outcome> {
        match self.pool.checkout(now) {
            Found::Pooled(conn) => Ok((conn, true)),
            Found::Slot(slot) => self.connect(slot, deadline).await.map(|c| (c, false)),
            Found::Queued(queued) => match self.wait_in_queue(queued, deadline).await {
                Some(Handoff::Pooled(conn)) => Ok((conn, true)),
                Some(Handoff::Slot(slot)) => self.connect(slot, deadline).await.map(|c| (c, false)),
                None => Err(Outcome::Overloaded),
            },
        }
    }

    /// What `queued` is handed by `deadline`; out of the queue either way,
    /// and out of it too if this is dropped while waiting.
    ///
    /// Boxed, like [`Upstream::connect`]: only visits that find the pool
    /// at its cap wait, and the others should not carry the room.
    fn wait_in_queue(
        &'static self,
        mut queued: Queued<Pooled<R>>,
        deadline: Instant,
    ) -> Boxed<Option<Handoff<Pooled<R>>>> {
        Box::pin(async move {
            timeout_at::<R, _>(deadline, queued.handed())
                .await
                .ok()
                .flatten()
        })
    }

    /// A new connection, for a retry (see [`Pool::slot_for_retry`]).
    async fn dial(&'static self, deadline: Instant) -> Result<Conn<R>, Outcome> {
        let slot = match self.pool.slot_for_retry() {
            Ok(slot) => slot,
            Err(queued) => match self.wait_in_queue(queued, deadline).await {
                Some(Handoff::Slot(slot)) => slot,
                Some(Handoff::Pooled(conn)) => conn.into_slot(),
                None => return Err(Outcome::Overloaded),
            },
        };
        self.connect(slot, deadline).await
    }

    /// Dials the upstream within the connect timeout and the deadline.
    ///
    /// Boxed: a connect future (the runtime's, with its timeout) is about
    /// as large as the rest of a visit's, and a visit's future reserves
    /// room for it even on the common path, which takes a pooled
    /// connection. hyper moves each request's future into the client
    /// connection's own memory, so every visit would copy that room, and
    /// with many connections taking turns it is written cold. A connect is
    /// rare; its allocation is not.
    fn connect(
        &'static self,
        slot: Slot<Pooled<R>>,
        deadline: Instant,
    ) -> Boxed<Result<Conn<R>, Outcome>> {
        Box::pin(async move {
            let stream = self.dialer.connect::<R>(deadline).await?;
            Ok(Conn::<R>::new(Connection::new(stream), slot))
        })
    }

    /// Returns a connection that just finished an exchange cleanly: to the
    /// longest-waiting visit, else to the pool.
    fn check_in(&self, mut conn: Conn<R>) {
        // Armed before taking the lock (on smol it is a syscall). A visit
        // handed the connection replaces the watch with its own read.
        conn.connection.watch_while_idle();
        self.pool.check_in(conn, Instant::now());
    }

    /// Closes connections idle longer than `pool_idle_timeout_ms`; runs
    /// for the life of the process. (Whether the upstream closed one is
    /// checked just before use.)
    pub async fn reap_idle(&'static self) {
        let period = (self.pool.idle_timeout() / 2).max(Duration::from_millis(100));
        loop {
            R::sleep_until(Instant::now() + period).await;
            self.pool.reap(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
