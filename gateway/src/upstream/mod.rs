//! The upstream client: a pool of kept-alive HTTP/1.1 connections to the
//! counter, written once over the runtime trait.
//!
//! A visit takes the most recently used idle connection, else dials a new
//! one if the cap (`upstream.max_connections`, counting those being
//! dialled) allows, else queues for either until its deadline and is then
//! answered 503 without touching the upstream. The queue is first come,
//! first served: a connection coming back, or a slot freed, is handed to
//! the visit that has waited longest. The exchange itself runs in
//! the visitor's own task ([`exchange`]); a connection is just a
//! stream, its buffer, and its slot under the cap.
//!
//! The never-send-twice rule ("What it answers" in the README): a POST is retried only when no
//! byte of it can have left — the pooled connection was found closed
//! before writing, or the very first write failed — and only once, on a
//! fresh connection.

pub mod exchange;

use std::collections::VecDeque;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use backends::Runtime;
use event_listener::Event;

use crate::config::{UpstreamConfig, UpstreamTarget, ms};
use self::exchange::{Connection, Exchange};
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

/// An open upstream connection and its slot under the cap.
struct Conn<R: Runtime> {
    connection: Connection<R::Stream>,
    slot: Slot<R>,
}

impl<R: Runtime> Conn<R> {
    /// Closes the connection, keeping its place under the cap.
    fn into_slot(self) -> Slot<R> {
        self.slot
    }
}

/// An idle connection and when it went idle.
struct Idle<R: Runtime> {
    conn: Conn<R>,
    since: Instant,
}

/// The upstream client and its connection pool; one per process, or one
/// per worker with `runtime.threading = "per-core"`.
pub struct Upstream<R: Runtime> {
    target: UpstreamTarget,
    /// `POST … HTTP/1.1`, `host`, `content-length: 0` and the
    /// `x-forwarded-for: ` name: every visit's request up to its one
    /// varying value.
    request_head: Vec<u8>,
    connect_timeout: Duration,
    request_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
    /// Idle connections and the visits queued for one.
    pool: Mutex<Pool<R>>,
    /// Connections open or being dialled; never above the cap. Changed
    /// under the `pool` lock, read without it.
    open: AtomicUsize,
    /// The resolved upstream addresses; replaced by a re-resolution after
    /// a failed connect.
    addrs: RwLock<Arc<[SocketAddr]>>,
    /// Round-robin index into `addrs`.
    next_addr: AtomicUsize,
    resolving: AtomicBool,
}

/// What the pool's lock guards.
struct Pool<R: Runtime> {
    /// Idle connections, most recently used last (reused first: the least
    /// likely to have been closed by the upstream).
    idle: Vec<Idle<R>>,
    /// Visits waiting for a connection, longest first. Never non-empty
    /// while `idle` is, or while a slot is free.
    queue: VecDeque<Arc<Waiter<R>>>,
}

impl<R: Runtime> Pool<R> {
    /// Puts a new waiter at the back of the queue.
    fn enqueue(&mut self) -> Arc<Waiter<R>> {
        let waiter = Arc::new(Waiter {
            handoff: Mutex::new(None),
            handed: Event::new(),
        });
        self.queue.push_back(waiter.clone());
        waiter
    }
}

/// A queued visit: what it was handed, and the event that says so.
struct Waiter<R: Runtime> {
    handoff: Mutex<Option<Handoff<R>>>,
    handed: Event,
}

/// What [`Upstream::checkout`] found under the lock.
enum Found<R: Runtime> {
    Pooled(Conn<R>),
    Slot(Slot<R>),
    Queued(Arc<Waiter<R>>),
}

/// What a queued visit is handed.
enum Handoff<R: Runtime> {
    /// A connection that just finished an exchange.
    Pooled(Conn<R>),
    /// A slot under the cap, to dial a new connection with.
    Slot(Slot<R>),
}

impl<R: Runtime> Waiter<R> {
    fn give(&self, handoff: Handoff<R>) {
        *lock(&self.handoff) = Some(handoff);
        self.handed.notify(1);
    }

    fn take(&self) -> Option<Handoff<R>> {
        lock(&self.handoff).take()
    }

    async fn handed(&self) {
        loop {
            let listener = self.handed.listen();
            if lock(&self.handoff).is_some() {
                return;
            }
            listener.await;
        }
    }
}

/// A visit in the pool's queue. Dropped (its deadline passed, or its
/// connection was closed at the shutdown deadline), it leaves the queue, and
/// passes on what it was handed and did not take.
struct Queued<R: Runtime> {
    upstream: &'static Upstream<R>,
    waiter: Arc<Waiter<R>>,
    /// Handed something and took it: already out of the queue, so
    /// dropping has nothing to search for.
    served: bool,
}

impl<R: Runtime> Drop for Queued<R> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let still_queued = {
            let mut pool = self.upstream.pool();
            let at = pool.queue.iter().position(|w| Arc::ptr_eq(w, &self.waiter));
            at.and_then(|at| pool.queue.remove(at)).is_some()
        };
        if still_queued {
            return;
        }
        // Dequeued by a hand-off: pass on what it brought. (One still on
        // its way lands in the dropped waiter: a connection is closed, a
        // slot goes to the next in line.)
        match self.waiter.take() {
            Some(Handoff::Pooled(conn)) => self.upstream.check_in(conn),
            Some(Handoff::Slot(slot)) => drop(slot),
            None => {}
        }
    }
}

/// Every critical section in this module is a push, pop, take or filter:
/// a panic elsewhere cannot leave what a lock guards inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One slot of the cap; on drop, handed to the longest-waiting visit, or
/// given back.
struct Slot<R: Runtime> {
    upstream: &'static Upstream<R>,
}

impl<R: Runtime> Drop for Slot<R> {
    fn drop(&mut self) {
        let upstream = self.upstream;
        let mut pool = upstream.pool();
        match pool.queue.pop_front() {
            Some(waiter) => {
                drop(pool);
                waiter.give(Handoff::Slot(Slot { upstream }));
            }
            None => {
                upstream.open.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// The result of one attempt on one connection.
enum Attempt<R: Runtime> {
    Done(Outcome, Option<Conn<R>>),
    /// Not a byte left: the request may go out on another connection.
    Unsent(Vec<u8>),
}

impl<R: Runtime> Upstream<R> {
    /// Builds the client and resolves the upstream's name.
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        let target = UpstreamTarget::parse(&config.url)?;
        let addrs = resolve(&target)
            .map_err(|e| format!("cannot resolve upstream {}: {e}", target.authority))?;
        let request_head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-length: 0\r\nx-forwarded-for: ",
            target.path_and_query, target.authority
        )
        .into_bytes();
        Ok(Self {
            target,
            request_head,
            connect_timeout: ms(config.connect_timeout_ms),
            request_timeout: ms(config.request_timeout_ms),
            idle_timeout: ms(config.pool_idle_timeout_ms),
            max_connections: config.max_connections,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                queue: VecDeque::new(),
            }),
            open: AtomicUsize::new(0),
            addrs: RwLock::new(addrs.into()),
            next_addr: AtomicUsize::new(0),
            resolving: AtomicBool::new(false),
        })
    }

    /// Connections open now (idle or busy).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn pool(&self) -> MutexGuard<'_, Pool<R>> {
        lock(&self.pool)
    }

    /// The POST that registers a visit, whose `x-forwarded-for` value
    /// `forwarded_for` writes; for [`Upstream::register_visit`].
    pub fn visit_request(&self, forwarded_for: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut request = Vec::with_capacity(self.request_head.len() + 64);
        request.extend_from_slice(&self.request_head);
        forwarded_for(&mut request);
        request.extend_from_slice(b"\r\n\r\n");
        request
    }

    /// Registers one visit, which began at `started`, by sending `request`
    /// (from [`Upstream::visit_request`]), unless the pool is saturated.
    pub async fn register_visit(&'static self, mut request: Vec<u8>, started: Instant) -> Outcome {
        let deadline = started + self.request_timeout;
        let (mut conn, mut from_pool) = match self.checkout(deadline, started).await {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        loop {
            // Boxed so that, past the deadline, the attempt can move to a
            // task of its own and finish there (see `finish_late`).
            let mut attempt = Box::pin(self.attempt(conn, request, from_pool));
            match timeout_at::<R, _>(deadline, attempt.as_mut()).await {
                Err(Elapsed) => {
                    self.finish_late(attempt);
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
    fn finish_late(&'static self, attempt: impl Future<Output = Attempt<R>> + Send + 'static) {
        R::spawn(async move {
            let grace = Instant::now() + self.request_timeout;
            if let Ok(Attempt::Done(_, Some(conn))) = timeout_at::<R, _>(grace, attempt).await {
                self.check_in(conn);
            }
        });
    }

    /// An idle pooled connection, else a new one if the cap allows, else
    /// queues for either until `deadline`. The flag is true for a pooled
    /// one.
    ///
    /// The queue is what makes waiting fair. Before it, a woken waiter
    /// raced for the freed connection with every visit arriving meanwhile,
    /// among them the one whose answer had just freed it (its client's
    /// next request, on the same task), and mostly lost: with 1,024
    /// clients and a cap of 256, p50 9 ms and p99 1.5 s on smol.
    async fn checkout(
        &'static self,
        deadline: Instant,
        now: Instant,
    ) -> Result<(Conn<R>, bool), Outcome> {
        let (found, expired) = {
            let mut pool = self.pool();
            let expired = self.take_expired(&mut pool, now);
            let found = if let Some(idle) = pool.idle.pop() {
                Found::Pooled(idle.conn)
            } else if let Some(slot) = self.take_slot() {
                Found::Slot(slot)
            } else {
                Found::Queued(pool.enqueue())
            };
            (found, expired)
        };
        // Closed outside the lock; their slots go to the queue.
        drop(expired);
        match found {
            Found::Pooled(conn) => Ok((conn, true)),
            Found::Slot(slot) => self.connect(slot, deadline).await.map(|c| (c, false)),
            Found::Queued(waiter) => match self.wait_in_queue(waiter, deadline).await {
                Some(Handoff::Pooled(conn)) => Ok((conn, true)),
                Some(Handoff::Slot(slot)) => self.connect(slot, deadline).await.map(|c| (c, false)),
                None => Err(Outcome::Overloaded),
            },
        }
    }

    /// What `waiter`, queued, is handed by `deadline`; out of the queue
    /// either way, and out of it too if this is dropped while waiting.
    ///
    /// Boxed, like [`Upstream::connect`]: only visits that find the pool
    /// at its cap wait, and the others should not carry the room.
    fn wait_in_queue(
        &'static self,
        waiter: Arc<Waiter<R>>,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Option<Handoff<R>>> + Send>> {
        Box::pin(self.wait_in_queue_unboxed(waiter, deadline))
    }

    async fn wait_in_queue_unboxed(
        &'static self,
        waiter: Arc<Waiter<R>>,
        deadline: Instant,
    ) -> Option<Handoff<R>> {
        let mut queued = Queued {
            upstream: self,
            waiter,
            served: false,
        };
        timeout_at::<R, _>(deadline, queued.waiter.handed())
            .await
            .ok()?;
        queued.served = true;
        queued.waiter.take()
    }

    /// A new connection, for a retry: on a free slot, else on the slot of
    /// the least recently used idle connection (closed for it), else on
    /// the first slot or connection handed over in the queue (the
    /// connection closed for it).
    async fn dial(&'static self, deadline: Instant) -> Result<Conn<R>, Outcome> {
        let found = {
            let mut pool = self.pool();
            if let Some(slot) = self.take_slot() {
                Found::Slot(slot)
            } else if !pool.idle.is_empty() {
                Found::Pooled(pool.idle.remove(0).conn)
            } else {
                Found::Queued(pool.enqueue())
            }
        };
        let slot = match found {
            Found::Slot(slot) => slot,
            Found::Pooled(conn) => conn.into_slot(),
            Found::Queued(waiter) => match self.wait_in_queue(waiter, deadline).await {
                Some(Handoff::Slot(slot)) => slot,
                Some(Handoff::Pooled(conn)) => conn.into_slot(),
                None => return Err(Outcome::Overloaded),
            },
        };
        self.connect(slot, deadline).await
    }

    /// Takes every idle connection out of the pool if the freshest has
    /// outlived `pool_idle_timeout_ms` (then all have), for the caller to
    /// close once the lock is released. (Whether the upstream closed one
    /// is checked just before use.)
    fn take_expired(&self, pool: &mut Pool<R>, now: Instant) -> Vec<Idle<R>> {
        match pool.idle.last() {
            Some(fresh) if now.saturating_duration_since(fresh.since) >= self.idle_timeout => {
                std::mem::take(&mut pool.idle)
            }
            _ => Vec::new(),
        }
    }

    /// A slot under the cap, if there is one. Called with the pool locked.
    fn take_slot(&'static self) -> Option<Slot<R>> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max_connections).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot { upstream: self })
    }

    /// Dials the upstream within the connect timeout and the deadline.
    ///
    /// Boxed: a connect future (the runtime's, with its timeout) is about
    /// as large as the rest of a visit's, and a visit's future reserves
    /// room for it even on the common path, which takes a pooled
    /// connection. hyper moves each request's future into the client
    /// connection's own memory, so every visit would copy that room: with
    /// 1,024 connections taking turns, some 30 cache lines written cold
    /// (callgrind's cache model). A connect is rare; its allocation is not.
    fn connect(
        &'static self,
        slot: Slot<R>,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Conn<R>, Outcome>> + Send>> {
        Box::pin(self.connect_unboxed(slot, deadline))
    }

    async fn connect_unboxed(
        &'static self,
        slot: Slot<R>,
        deadline: Instant,
    ) -> Result<Conn<R>, Outcome> {
        let connect_deadline = deadline.min(Instant::now() + self.connect_timeout);
        let addrs = self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone();
        let first = self.next_addr.fetch_add(1, Ordering::Relaxed);
        match connect_any::<R>(&addrs, first, connect_deadline).await {
            Ok(stream) => Ok(Conn {
                connection: Connection::new(stream),
                slot,
            }),
            Err(outcome) => {
                self.re_resolve();
                Err(outcome)
            }
        }
    }

    /// Returns a connection that just finished an exchange cleanly: to the
    /// longest-waiting visit, else to the pool.
    fn check_in(&self, mut conn: Conn<R>) {
        // Armed before taking the lock (on smol it is a syscall). A visit
        // handed the connection replaces the watch with its own read.
        conn.connection.watch_while_idle();
        let mut pool = self.pool();
        if let Some(waiter) = pool.queue.pop_front() {
            drop(pool);
            waiter.give(Handoff::Pooled(conn));
            return;
        }
        pool.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
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
                        tracing::warn!(host = ?self.target.host, %error, "upstream re-resolution failed");
                    }
                }
                self.resolving.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.resolving.store(false, Ordering::Release);
        }
    }

    /// Closes connections idle longer than `pool_idle_timeout_ms`, or
    /// closed by the upstream; runs for the life of the process.
    pub async fn reap_idle(&'static self) {
        let period = (self.idle_timeout / 2).max(Duration::from_millis(100));
        loop {
            R::sleep_until(Instant::now() + period).await;
            let expired: Vec<Idle<R>> = {
                let mut pool = self.pool();
                let now = Instant::now();
                let (kept, expired) = std::mem::take(&mut pool.idle)
                    .into_iter()
                    .partition(|i| now.saturating_duration_since(i.since) < self.idle_timeout);
                pool.idle = kept;
                expired
            };
            // Closed outside the lock; each frees its slot.
            drop(expired);
        }
    }
}

/// Connects to the first of `addrs`, taken in turn from `first`, that
/// accepts before `deadline`. A name can resolve to addresses the upstream
/// does not listen on (`localhost` to `::1` and `127.0.0.1`, with a counter
/// on one of them); a visit must not fail while another address would
/// do. A refusal moves on at once; an address that does not answer takes
/// what is left of the deadline.
async fn connect_any<R: Runtime>(
    addrs: &[SocketAddr],
    first: usize,
    deadline: Instant,
) -> Result<R::Stream, Outcome> {
    for i in 0..addrs.len() {
        let addr = addrs[first.wrapping_add(i) % addrs.len()];
        match timeout_at::<R, _>(deadline, R::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(error)) => tracing::debug!(%addr, %error, "upstream connect failed"),
            Err(Elapsed) => {
                tracing::debug!(%addr, "upstream connect timed out");
                return Err(Outcome::TimedOut);
            }
        }
    }
    Err(Outcome::Failed)
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

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};
    use std::time::{Duration, Instant};

    use backends::{Runtime, Threading};

    use super::{Outcome, connect_any};
    use crate::config::Backend;
    use crate::daemon::{OnRuntime, on_backend};

    /// An address nothing listens on (bound, then let go).
    fn refusing() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    }

    struct ConnectPastARefusal;

    impl OnRuntime for ConnectPastARefusal {
        type Output = ();
        fn run<R: Runtime>(self) {
            let listening = TcpListener::bind("127.0.0.1:0").unwrap();
            let open = listening.local_addr().unwrap();
            let closed = refusing();
            let (past, none) = R::block_on(1, Threading::Shared, async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                let past = connect_any::<R>(&[closed, open], 0, deadline).await;
                let none = connect_any::<R>(&[closed, closed], 1, deadline).await;
                (past.map(drop), none.map(drop))
            })
            .unwrap();
            assert_eq!(past, Ok(()), "{}", R::NAME);
            assert_eq!(none, Err(Outcome::Failed), "{}", R::NAME);
            // The connection made is the listener's.
            listening.set_nonblocking(true).unwrap();
            assert!(listening.accept().is_ok(), "{}", R::NAME);
        }
    }

    #[test]
    fn a_connect_moves_past_an_address_that_refuses() {
        for backend in [Backend::Tokio, Backend::Smol] {
            on_backend(backend, ConnectPastARefusal);
        }
    }
}
