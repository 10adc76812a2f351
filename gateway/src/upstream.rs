//! The upstream client: a pool of kept-alive HTTP/1.1 connections to the
//! counter, written once over the runtime trait.
//!
//! Each pooled connection is a hyper `SendRequest` whose connection future
//! runs as its own task. The pool caps the connections open at once
//! (`upstream.max_connections`, counting those being dialled); a visit that
//! finds none idle and the cap reached waits for one to come back until its
//! deadline, then is answered 503 without touching the upstream.
//!
//! The never-send-twice rule (SPEC §4): a POST is retried only when hyper
//! hands it back unsent (`try_send_request` → `into_request`), and only
//! once, on a fresh connection. Connections found closed while idle are
//! dropped before anything is written to them.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use backends::Runtime;
use bytes::Bytes;
use event_listener::Event;
use http::header::{CONTENT_LENGTH, HOST, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};

use crate::config::{UpstreamConfig, UpstreamTarget, ms};
use crate::time::{Elapsed, timeout_at};

/// How a visit's upstream exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered 2xx and its body was read to the end.
    Counted,
    /// Refused, reset, non-2xx or garbage: answer 502.
    Failed,
    /// The deadline passed while connecting or awaiting the answer: 504.
    TimedOut,
    /// The deadline passed waiting for a connection at the cap: 503.
    Overloaded,
}

type Sender = SendRequest<Empty<Bytes>>;

/// An idle connection and when it went idle.
struct Idle {
    sender: Sender,
    since: Instant,
}

struct PoolState {
    /// Idle connections, most recently used last (reused first: it is the
    /// least likely to have been closed by the upstream).
    idle: Vec<Idle>,
    /// Connections open or being dialled; never above the cap.
    open: usize,
}

/// The upstream client and its connection pool; one per process.
pub struct Upstream<R: Runtime> {
    target: UpstreamTarget,
    host_header: HeaderValue,
    path: http::Uri,
    connect_timeout: Duration,
    request_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
    state: Mutex<PoolState>,
    /// Signalled when a connection goes idle or a slot frees up.
    available: Event,
    /// The resolved upstream addresses; replaced by a re-resolution after
    /// a failed connect.
    addrs: RwLock<Arc<[SocketAddr]>>,
    /// Round-robin index into `addrs`.
    next_addr: AtomicUsize,
    resolving: AtomicBool,
    _runtime: std::marker::PhantomData<fn() -> R>,
}

/// Holds one slot of the cap; gives it back, and wakes a waiter, on drop.
struct Slot<R: Runtime> {
    upstream: &'static Upstream<R>,
}

impl<R: Runtime> Drop for Slot<R> {
    fn drop(&mut self) {
        self.upstream.lock().open -= 1;
        self.upstream.available.notify(1);
    }
}

impl<R: Runtime> Upstream<R> {
    /// Builds the client and resolves the upstream's name.
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        let target = UpstreamTarget::parse(&config.url)?;
        let addrs = resolve(&target)
            .map_err(|e| format!("cannot resolve upstream {}: {e}", target.authority))?;
        let host_header = HeaderValue::from_str(&target.authority)
            .map_err(|e| format!("upstream host `{}`: {e}", target.authority))?;
        let path = target
            .path_and_query
            .parse()
            .map_err(|e| format!("upstream path `{}`: {e}", target.path_and_query))?;
        Ok(Self {
            target,
            host_header,
            path,
            connect_timeout: ms(config.connect_timeout_ms),
            request_timeout: ms(config.request_timeout_ms),
            idle_timeout: ms(config.pool_idle_timeout_ms),
            max_connections: config.max_connections,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            available: Event::new(),
            addrs: RwLock::new(addrs.into()),
            next_addr: AtomicUsize::new(0),
            resolving: AtomicBool::new(false),
            _runtime: std::marker::PhantomData,
        })
    }

    /// Connections open now (idle or busy).
    pub fn open_connections(&self) -> usize {
        self.lock().open
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic elsewhere while holding the lock leaves the state intact
        // (every critical section is a push, pop or counter update).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers one visit: one POST, unless the pool is saturated.
    /// `forwarded_for` is the complete `x-forwarded-for` value to send.
    pub async fn register_visit(&'static self, forwarded_for: HeaderValue) -> Outcome {
        let deadline = Instant::now() + self.request_timeout;
        let mut request = self.visit_request(forwarded_for);
        let (mut sender, mut from_pool) = match self.checkout(deadline).await {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        loop {
            // Boxed so that, past the deadline, the exchange can be moved
            // to a task of its own and finish there (see `finish_late`).
            let mut exchange = Box::pin(self.exchange(sender, request));
            match timeout_at::<R, _>(deadline, exchange.as_mut()).await {
                Err(Elapsed) => {
                    self.finish_late(exchange);
                    return Outcome::TimedOut;
                }
                Ok((sender, Exchange::Done(outcome))) => {
                    self.check_in(sender);
                    return outcome;
                }
                Ok((_dead, Exchange::Unsent(returned))) if from_pool => {
                    // The pooled connection died before a byte of this
                    // request was written: replace it, once.
                    request = returned;
                    from_pool = false;
                    sender = match self.dial(deadline).await {
                        Ok(sender) => sender,
                        Err(outcome) => return outcome,
                    };
                }
                Ok((_dead, Exchange::Unsent(_))) => return Outcome::Failed,
            }
        }
    }

    /// Lets an exchange whose visit was already answered 504 run on for
    /// another `request_timeout`. Dropping it would close the connection
    /// and free its slot at once, and the next waiter would send another
    /// POST to an upstream that is already too slow; finishing it keeps
    /// the slot busy for as long as the upstream really is (so waiters at
    /// the cap get 503 without adding load) and keeps the connection.
    fn finish_late(
        &'static self,
        exchange: impl Future<Output = (Sender, Exchange)> + Send + 'static,
    ) {
        R::spawn(async move {
            let grace = Instant::now() + self.request_timeout;
            if let Ok((sender, Exchange::Done(_))) = timeout_at::<R, _>(grace, exchange).await {
                self.check_in(sender);
            }
        });
    }

    fn visit_request(&self, forwarded_for: HeaderValue) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.path.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host_header.clone());
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        headers.insert("x-forwarded-for", forwarded_for);
        request
    }

    /// Sends the request and reads the answer to its end; gives the
    /// connection back for reuse.
    async fn exchange(
        &self,
        mut sender: Sender,
        request: Request<Empty<Bytes>>,
    ) -> (Sender, Exchange) {
        if sender.ready().await.is_err() {
            return (sender, Exchange::Unsent(request));
        }
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut error) => {
                let exchange = match error.take_message() {
                    Some(request) => Exchange::Unsent(request),
                    None => {
                        tracing::debug!(error = %error.error(), "upstream request failed");
                        Exchange::Done(Outcome::Failed)
                    }
                };
                return (sender, exchange);
            }
        };
        let status = response.status();
        // Read the body to its end so the connection can carry the next
        // visit; the bytes themselves are not needed.
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Err(error) = frame {
                tracing::debug!(%error, "upstream answer cut short");
                return (sender, Exchange::Done(Outcome::Failed));
            }
        }
        if status.is_success() {
            (sender, Exchange::Done(Outcome::Counted))
        } else {
            tracing::debug!(%status, "upstream answered non-2xx");
            (sender, Exchange::Done(Outcome::Failed))
        }
    }

    /// An idle pooled connection, else a new one if the cap allows, else
    /// waits for either until `deadline`. The flag is true for a pooled one.
    async fn checkout(&'static self, deadline: Instant) -> Result<(Sender, bool), Outcome> {
        loop {
            if let Some(sender) = self.take_idle() {
                return Ok((sender, true));
            }
            match self.take_slot() {
                Ok(slot) => return self.connect(slot, deadline).await.map(|s| (s, false)),
                Err(listener) => {
                    // Woken when a connection goes idle or a slot frees up.
                    if timeout_at::<R, _>(deadline, listener).await.is_err() {
                        return Err(Outcome::Overloaded);
                    }
                }
            }
        }
    }

    /// A new connection, for a retry: waits for a free slot first.
    async fn dial(&'static self, deadline: Instant) -> Result<Sender, Outcome> {
        loop {
            match self.take_slot() {
                Ok(slot) => return self.connect(slot, deadline).await,
                Err(listener) => {
                    if timeout_at::<R, _>(deadline, listener).await.is_err() {
                        return Err(Outcome::Overloaded);
                    }
                }
            }
        }
    }

    /// The most recently used idle connection that is still usable.
    fn take_idle(&self) -> Option<Sender> {
        let mut state = self.lock();
        let now = Instant::now();
        while let Some(idle) = state.idle.pop() {
            if !idle.sender.is_closed() && now.duration_since(idle.since) < self.idle_timeout {
                return Some(idle.sender);
            }
            // Dropping the sender ends its connection task, which frees
            // the slot.
        }
        None
    }

    /// A slot under the cap, or a listener that fires when one may be free.
    fn take_slot(&'static self) -> Result<Slot<R>, event_listener::EventListener> {
        let mut state = self.lock();
        if state.open < self.max_connections {
            state.open += 1;
            return Ok(Slot { upstream: self });
        }
        Err(self.available.listen())
    }

    /// Dials the upstream within the connect timeout and the deadline, and
    /// starts the connection's task, which then owns `slot`.
    async fn connect(&'static self, slot: Slot<R>, deadline: Instant) -> Result<Sender, Outcome> {
        let connect_deadline = deadline.min(Instant::now() + self.connect_timeout);
        let addr = self.pick_addr();
        let stream = match timeout_at::<R, _>(connect_deadline, R::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%addr, %error, "upstream connect failed");
                self.re_resolve();
                return Err(Outcome::Failed);
            }
            Err(Elapsed) => {
                tracing::debug!(%addr, "upstream connect timed out");
                self.re_resolve();
                return Err(Outcome::TimedOut);
            }
        };
        // The handshake only sets up hyper's state; it does no IO.
        let (sender, connection) = match http1::handshake(stream).await {
            Ok(parts) => parts,
            Err(error) => {
                tracing::debug!(%error, "upstream handshake failed");
                return Err(Outcome::Failed);
            }
        };
        R::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection closed with an error");
            }
            drop(slot);
        });
        Ok(sender)
    }

    /// Returns a connection that just finished a visit cleanly.
    fn check_in(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        self.lock().idle.push(Idle {
            sender,
            since: Instant::now(),
        });
        self.available.notify(1);
    }

    fn pick_addr(&self) -> SocketAddr {
        let addrs = self.addrs.read().unwrap_or_else(|e| e.into_inner());
        addrs[self.next_addr.fetch_add(1, Ordering::Relaxed) % addrs.len()]
    }

    /// Looks the upstream's name up again after a failed connect, on a
    /// plain thread (the resolver blocks), one lookup at a time. An IP
    /// literal needs none.
    fn re_resolve(&'static self) {
        if self.target.host.parse::<std::net::IpAddr>().is_ok()
            || self.resolving.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("gateway-resolve".to_owned())
            .spawn(move || {
                match resolve(&self.target) {
                    Ok(addrs) => {
                        *self.addrs.write().unwrap_or_else(|e| e.into_inner()) = addrs.into();
                    }
                    Err(error) => {
                        tracing::warn!(host = %self.target.host, %error, "upstream re-resolution failed");
                    }
                }
                self.resolving.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.resolving.store(false, Ordering::Release);
        }
    }

    /// Closes connections idle longer than `pool_idle_timeout_ms`; runs
    /// for the life of the process.
    pub async fn reap_idle(&'static self) {
        let period = (self.idle_timeout / 2).max(Duration::from_millis(100));
        loop {
            R::sleep_until(Instant::now() + period).await;
            let expired: Vec<Idle> = {
                let mut state = self.lock();
                let now = Instant::now();
                let keep = |idle: &Idle| {
                    !idle.sender.is_closed() && now.duration_since(idle.since) < self.idle_timeout
                };
                let (kept, expired) = std::mem::take(&mut state.idle).into_iter().partition(keep);
                state.idle = kept;
                expired
            };
            // Dropped outside the lock: each drop ends a connection task.
            drop(expired);
        }
    }
}

/// The result of one attempt on one connection. The unsent request comes
/// back by value (boxing it would cost an allocation on every visit).
#[allow(clippy::large_enum_variant)]
enum Exchange {
    Done(Outcome),
    Unsent(Request<Empty<Bytes>>),
}

fn resolve(target: &UpstreamTarget) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()?
        .collect();
    if addrs.is_empty() {
        return Err(std::io::Error::other("the name resolved to no address"));
    }
    Ok(addrs)
}
