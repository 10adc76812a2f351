//! One-way signals between the parts of the daemon: "stop accepting",
//! "drained", "committed". A [`Latch`] is set once and stays set; any
//! number of tasks can wait for it. A [`Stop`] is the latch that tells a listener to stop
//! accepting, with the deadline its connections must be gone by.

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
        loop {
            if self.is_set() {
                return;
            }
            let listener = self.listener();
            if self.is_set() {
                return;
            }
            listener.await;
        }
    }

    /// A listener to poll by hand; check [`Latch::is_set`] after making it.
    pub fn listener(&self) -> EventListener {
        self.event.listen()
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
