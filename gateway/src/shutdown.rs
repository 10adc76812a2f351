//! One-way signals between the parts of the daemon: "stop accepting",
//! "drained". A [`Latch`] is set once and stays set; any number of tasks
//! can wait for it.

use std::sync::atomic::{AtomicBool, Ordering};

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
