//! What an HTTP/2 connection's task knows of its streams: how many the
//! service has open, since when none, and whether the client was cut off;
//! and the executor hyper spawns each stream's task with.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::Waker;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use backends::Runtime;

use super::super::ServerSettings;
use super::super::phase::{Phase, epoch, nanos_since_epoch};
use super::super::wrapper::RequestCycle;
use super::frames::Abuse;

/// One HTTP/2 connection's streams, as the service sees them: shared by
/// the connection's task, its streams' tasks (the atomics make it `Sync`)
/// and its [`FrameWatch`](super::frames::FrameWatch).
pub(in crate::server) struct Streams {
    /// Requests the service has taken and not answered.
    open: AtomicU32,
    /// Whether any request has come: until then the header-read timeout
    /// runs, from the accept.
    begun: AtomicBool,
    /// Nanoseconds since [`epoch`] of the accept, or of the last answer.
    since: AtomicU64,
    cut: OnceLock<Abuse>,
    /// The connection's task, woken when its last open stream closes: a
    /// stream's task may close it after the connection last looked (with
    /// shared threading, on another worker at the same time), and a
    /// connection with none open has a deadline to arm.
    connection: AtomicWaker,
}

impl Streams {
    /// A connection accepted at `accepted`.
    pub(super) fn new(accepted: Instant) -> Self {
        Self {
            open: AtomicU32::new(0),
            begun: AtomicBool::new(false),
            since: AtomicU64::new(nanos_since_epoch(accepted)),
            cut: OnceLock::new(),
            connection: AtomicWaker::new(),
        }
    }

    /// Where the connection is: reading its first request, busy with
    /// some, or idle with none open.
    pub(super) fn phase(&self) -> Phase {
        if self.open.load(Ordering::Relaxed) > 0 {
            Phase::Busy
        } else if self.begun.load(Ordering::Relaxed) {
            Phase::Idle
        } else {
            Phase::Head
        }
    }

    /// Wakes `waker` when the last open stream closes.
    pub(super) fn wake_when_none_open(&self, waker: &Waker) {
        self.connection.register(waker);
    }

    /// When the connection's phase times out: the preface and the first
    /// request within the header-read timeout of the accept, and no
    /// stream open for longer than the idle timeout. A busy connection
    /// has none (the service has its own).
    pub(super) fn deadline(&self, settings: &ServerSettings) -> Option<Instant> {
        self.phase().deadline(self.since(), settings)
    }

    /// The accept, or the last answer.
    pub(super) fn since(&self) -> Instant {
        epoch() + Duration::from_nanos(self.since.load(Ordering::Relaxed))
    }

    /// The client is cut off for `abuse`; the first reason found stays.
    pub(super) fn cut(&self, abuse: Abuse) {
        let _ = self.cut.set(abuse);
    }

    /// Why the client was cut off, if it was.
    pub(super) fn cut_for(&self) -> Option<Abuse> {
        self.cut.get().copied()
    }

    fn closed_one(&self, at: Instant) {
        // Stored before the count drops: a connection seeing none open
        // then reads this answer's time, not an older one.
        self.since.store(nanos_since_epoch(at), Ordering::Relaxed);
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.connection.wake();
        }
    }
}

impl RequestCycle for Streams {
    fn began(&self, _at: Instant) {
        self.begun.store(true, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    fn answered(&self, at: Instant) -> bool {
        self.closed_one(at);
        false
    }

    fn abandoned(&self) {
        self.closed_one(Instant::now());
    }
}

/// hyper's executor for a connection's streams: each stream's task is
/// spawned with [`Runtime::spawn`], so per core it runs on the worker of
/// the connection that spawns it.
pub(super) struct OnThisWorker<R>(PhantomData<fn() -> R>);

impl<R> OnThisWorker<R> {
    pub(super) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<R> Clone for OnThisWorker<R> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<R: Runtime, F> hyper::rt::Executor<F> for OnThisWorker<R>
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        R::spawn(task);
    }
}
