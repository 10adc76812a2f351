//! The graceful drain: what happens to a listener's connections once its
//! [`Stop`] is set.
//!
//! Like hyper-util's `GracefulShutdown`, every open connection is counted
//! ([`Connections`], [`Open`]) and told to finish, and the listener waits
//! for the count to reach zero. Unlike it, the drain knows each
//! connection's [`Phase`]: one still reading a head is left to finish it
//! (or to time out), so a request already sent is served rather than cut
//! ([`may_finish_now`]); and the wait ends at the stop's deadline, open
//! connections or not ([`drain`]). A connection notices the stop through
//! its [`StopWatch`], without locking the latch's shared list on every
//! poll.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Waker};
use std::time::Instant;

use async_lock::{Semaphore, SemaphoreGuardArc};
use backends::Runtime;
use event_listener::{Event, EventListener};

use super::ServerSettings;
use super::phase::{Activity, Phase};
use crate::metrics::Protocol;
use crate::shutdown::{Latch, Stop, wait_until};

/// The connections of one listener: the cap, and the count to drain.
pub struct Connections {
    /// `max_connections` permits; a connection holds one while open, and
    /// at the cap the accept loop waits (new clients queue in the backlog).
    pub(super) limit: Arc<Semaphore>,
    open: AtomicUsize,
    /// Of those open, the ones speaking HTTP/2.
    open_http2: AtomicUsize,
    /// Notified when a connection closes, for the drain.
    closed: Event,
}

impl Connections {
    pub fn new(max_connections: usize) -> Self {
        Self {
            limit: Arc::new(Semaphore::new(max_connections)),
            open: AtomicUsize::new(0),
            open_http2: AtomicUsize::new(0),
            closed: Event::new(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now by protocol, as [`Protocol::ALL`] orders
    /// them: one counts as HTTP/1.1 until it has chosen HTTP/2.
    pub fn open_by_protocol(&self) -> [usize; Protocol::ALL.len()] {
        let http2 = self.open_http2.load(Ordering::Acquire);
        [self.open().saturating_sub(http2), http2]
    }

    async fn wait_until_none_open(&self) {
        wait_until(&self.closed, || (self.open() == 0).then_some(())).await
    }
}

/// An open connection's claim on its listener's [`Connections`]: counted
/// from its accept until it is dropped with the connection.
pub(super) struct Open {
    connections: &'static Connections,
    _permit: SemaphoreGuardArc,
}

impl Open {
    /// Counts a connection just accepted under `permit`.
    pub(super) fn new(connections: &'static Connections, permit: SemaphoreGuardArc) -> Self {
        connections.open.fetch_add(1, Ordering::AcqRel);
        Self {
            connections,
            _permit: permit,
        }
    }

    /// The connection has chosen HTTP/2: counted as such until the guard
    /// is dropped (with its connection's HTTP/2 driver).
    pub(super) fn speaks_http2(&self) -> SpeaksHttp2 {
        self.connections.open_http2.fetch_add(1, Ordering::AcqRel);
        SpeaksHttp2(self.connections)
    }
}

/// An open connection counted as HTTP/2 ([`Open::speaks_http2`]).
pub(super) struct SpeaksHttp2(&'static Connections);

impl Drop for SpeaksHttp2 {
    fn drop(&mut self) {
        self.0.open_http2.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
        self.connections.closed.notify(usize::MAX);
    }
}

/// Waits, once the listener has stopped accepting, until its connections
/// are all closed or the stop's deadline has passed, and logs which.
pub(super) async fn drain<R: Runtime>(
    settings: &ServerSettings,
    connections: &Connections,
    stop: &Stop,
) {
    let open = connections.open();
    tracing::info!(
        listener = settings.name,
        open,
        "stopped accepting; draining"
    );
    // Set with the stop; "now" would only be reached if it were not.
    let deadline = stop.deadline().unwrap_or_else(Instant::now);
    let drained =
        crate::time::timeout_at::<R, _>(deadline, connections.wait_until_none_open()).await;
    if drained.is_err() {
        tracing::warn!(
            listener = settings.name,
            open = connections.open(),
            "shutdown timeout passed; closing the connections left"
        );
    } else {
        tracing::info!(listener = settings.name, "drained");
    }
}

/// Whether a connection may be told to finish now that the stop is set:
/// between requests it closes at once and busy it closes after its
/// answer, but one reading a head is let finish it.
pub(super) fn may_finish_now(activity: &Activity) -> bool {
    activity.phase() != Phase::Head
}

/// How one connection notices its listener's stop.
pub(super) struct StopWatch {
    /// `None` once the stop has been seen.
    listener: Option<EventListener>,
    /// The waker the listener holds. Polling the listener locks the
    /// latch's list, which every connection shares and contends on with
    /// many connections, so it is only polled again when the task's waker
    /// changes; the latch's flag itself is checked on every poll.
    waker: Option<Waker>,
}

impl StopWatch {
    pub(super) fn new(stop: &Latch) -> Self {
        Self {
            listener: Some(stop.listener()),
            waker: None,
        }
    }

    /// Whether `stop` (the latch this watch was made on) is set: the
    /// listener is then spent.
    pub(super) fn stopping(&mut self, stop: &Latch, cx: &mut Context<'_>) -> bool {
        if let Some(listener) = &mut self.listener {
            let registered = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if stop.is_set() || (!registered && Pin::new(listener).poll(cx).is_ready()) {
                self.listener = None;
            } else if !registered {
                self.waker = Some(cx.waker().clone());
            }
        }
        self.listener.is_none()
    }
}
