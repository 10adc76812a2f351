//! One-way signals between the parts of the daemon: "stop accepting",
//! "drained", "committed". A [`Latch`] is set once and stays set; any
//! number of tasks can wait for it. A [`Stop`] is the latch that tells a listener to stop
//! accepting, with the deadline its connections must be gone by.
//! [`wait_until`] is the one way anything here waits on an [`Event`]: the
//! latch, a listener's drain, a visit queued in the upstream pool.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use event_listener::{Event, EventListener};

/// A flag that tasks can await.
#[derive(Debug, Default)]
pub struct Latch {
    set: AtomicBool,
    event: Event,
}

impl Latch {
    pub const fn new() -> Self {
        Self {
            set: AtomicBool::new(false),
            event: Event::new(),
        }
    }

    /// Sets the latch and wakes every waiter.
    pub fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Completes once the latch is set.
    pub async fn wait(&self) {
        wait_until(&self.event, || self.is_set().then_some(())).await
    }

    /// A listener to poll by hand; check [`Latch::is_set`] after making it.
    pub fn listener(&self) -> EventListener {
        self.event.listen()
    }
}

/// Waits until `ready` gives a value, asking it again each time `event`
/// is notified. The listener is made before `ready` is asked a second
/// time, so a notification between a first miss and the wait is not lost.
pub async fn wait_until<T>(event: &Event, mut ready: impl FnMut() -> Option<T>) -> T {
    loop {
        if let Some(value) = ready() {
            return value;
        }
        let listener = event.listen();
        if let Some(value) = ready() {
            return value;
        }
        listener.await;
    }
}

/// "Stop accepting, and close what is left at `deadline`." The daemon
/// gives every listener the same deadline, taken when the signal came, so
/// that draining them one after another still ends within one
/// `server.shutdown_timeout_ms`.
#[derive(Debug, Default)]
pub struct Stop {
    latch: Latch,
    deadline: OnceLock<Instant>,
}

impl Stop {
    pub const fn new() -> Self {
        Self {
            latch: Latch::new(),
            deadline: OnceLock::new(),
        }
    }

    /// Stops the listener; the first deadline given is the one that holds.
    pub fn set(&self, deadline: Instant) {
        let _ = self.deadline.set(deadline);
        self.latch.set();
    }

    /// Set once the listener is to stop accepting.
    pub fn latch(&self) -> &Latch {
        &self.latch
    }

    /// When the connections still open must be closed; `None` until set.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }
}
