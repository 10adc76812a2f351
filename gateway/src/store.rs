//! Where the built-in counter keeps its count, and the group commit that
//! makes increments durable together.
//!
//! `POST /counter` is answered 200 only once its increment is durable (for
//! the file store, once the `fdatasync` that covers it has returned). One
//! commit thread per store takes every increment that arrived while the
//! previous commit was in flight and makes them durable with one commit:
//! batches form by themselves under load, and a lone visit is committed at
//! once, with no timer. The async side only locks a mutex, adds one and
//! waits on a [`Latch`], so it works the same on every runtime.

pub mod file;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::shutdown::Latch;

/// A place a total can be made durable in.
pub trait Durable: Send + 'static {
    /// Makes `total` the durable count, and returns once it is.
    fn commit(&mut self, total: u64) -> Result<(), CommitError>;

    /// What the store is, for log lines ("file /var/lib/gateway/counter.state").
    fn describe(&self) -> String;
}

/// Why a commit did not happen.
#[derive(Debug)]
pub enum CommitError {
    /// Nothing was made durable and nothing already durable was touched (a
    /// write refused: a full disk, the file-size limit): the increments of
    /// this batch are answered as failures, and the next batch may succeed.
    Refused(io::Error),
    /// The outcome is unknown and a retry would not settle it (an
    /// `fdatasync` failed: the kernel may have dropped the data while
    /// reporting the error once). The process ends; under systemd it is
    /// restarted and reads what really reached the disk.
    Fatal(io::Error),
}

/// The increment could not be made durable: answer the visit with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotDurable;

/// A durable count, committed by a thread of its own.
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the commit thread when a batch opens.
    work: Condvar,
}

struct State {
    /// The total as last made durable.
    durable: u64,
    /// Increments waiting for the next commit, and the batch they wait in.
    pending: u64,
    batch: Option<Arc<Batch>>,
}

/// The increments one commit covers: whether it was made, and the latch
/// its visits wait on.
#[derive(Default)]
struct Batch {
    committed: AtomicBool,
    done: Latch,
}

impl Batch {
    fn finish(&self, committed: bool) {
        self.committed.store(committed, Ordering::Relaxed);
        // The latch's store is SeqCst: a waiter that sees it set sees this.
        self.done.set();
    }

    async fn wait(&self) -> bool {
        self.done.wait().await;
        self.committed.load(Ordering::Relaxed)
    }
}

/// Every critical section here is a read, an add or a take: a panic
/// elsewhere cannot leave the state inconsistent.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Starts the commit thread for `durable`, whose durable total is
    /// `total`.
    pub fn start(durable: impl Durable, total: u64) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                durable: total,
                pending: 0,
                batch: None,
            }),
            work: Condvar::new(),
        });
        let committing = shared.clone();
        std::thread::Builder::new()
            .name("gateway-commit".to_owned())
            .spawn(move || commit_forever(&committing, durable))?;
        Ok(Self { shared })
    }

    /// Adds one to the count; returns once that is durable.
    pub async fn increment(&self) -> Result<(), NotDurable> {
        let (batch, opened) = {
            let mut state = lock(&self.shared.state);
            state.pending += 1;
            let opened = state.batch.is_none();
            (
                state.batch.get_or_insert_with(Default::default).clone(),
                opened,
            )
        };
        // The commit thread only waits while no batch is open; a batch that
        // was open already is taken by its next turn. (A notify is a system
        // call even with no one waiting: one per visit cost more CPU than
        // the rest of the counter's answer.)
        if opened {
            self.shared.work.notify_one();
        }
        if batch.wait().await {
            Ok(())
        } else {
            Err(NotDurable)
        }
    }

    /// The durable total.
    pub fn total(&self) -> u64 {
        lock(&self.shared.state).durable
    }
}

/// The commit thread: one commit per batch, for as long as the process runs.
fn commit_forever(shared: &Shared, mut durable: impl Durable) {
    loop {
        let (batch, total) = {
            let mut state = lock(&shared.state);
            let batch = loop {
                if let Some(batch) = state.batch.take() {
                    break batch;
                }
                state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
            };
            let total = state.durable + std::mem::take(&mut state.pending);
            (batch, total)
        };
        match durable.commit(total) {
            Ok(()) => {
                lock(&shared.state).durable = total;
                batch.finish(true);
            }
            Err(CommitError::Refused(error)) => {
                tracing::warn!(store = durable.describe(), %error, "commit refused; those visits are answered 503");
                batch.finish(false);
            }
            Err(CommitError::Fatal(error)) => {
                let message = format!(
                    "cannot make the count durable in {}: {error}; exiting without answering (a failed sync is never retried)",
                    durable.describe()
                );
                tracing::error!("{message}");
                eprintln!("gateway: {message}");
                std::process::exit(1);
            }
        }
    }
}
