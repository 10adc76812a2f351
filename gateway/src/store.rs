//! Where the built-in counter keeps its count, and the group commit that
//! makes increments durable together.
//!
//! `POST /counter` is answered 200 only once its increment is durable (for
//! the file store, once the `fdatasync` that covers it has returned; for
//! PostgreSQL, once the `COMMIT` has). One commit thread per store takes
//! every increment that arrived while the previous commit was in flight
//! and makes them durable with one commit: batches form by themselves
//! under load, and a lone visit is committed at once, with no timer. The
//! async side only locks a mutex, adds one and waits on a [`Latch`], so it
//! works the same on every runtime. A store other processes add to too
//! (PostgreSQL) is also read on the commit thread, so that a read is the
//! store's total, not this process's last commit.

pub mod file;
pub mod postgres;

use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::shutdown::Latch;

/// How long an unsettled commit may take to settle before its visits are
/// answered as unknown (a database that is not back).
pub const SETTLE_FOR: Duration = Duration::from_secs(3);
/// How much nicer the commit thread is than the process's workers.
const COMMIT_NICE: i32 = 10;
/// How often settling is tried again meanwhile.
const SETTLE_EVERY: Duration = Duration::from_millis(50);

/// A place a count can be made durable in.
pub trait Durable: Send + 'static {
    /// Adds `increments` to the durable count and returns the durable
    /// total once it includes them; with 0 increments, only reads it.
    fn commit(&mut self, increments: u64) -> Result<u64, CommitError>;

    /// After a commit ended [`CommitError::Unsettled`]: whether it
    /// committed (the durable total if it did), or an error while that
    /// cannot be told yet.
    fn settle(&mut self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// Stops trying to settle the unsettled commit: its visits were
    /// answered as unknown.
    fn abandon(&mut self) {}

    /// Whether other processes add to the same count, so that a read must
    /// ask the store rather than take this process's last commit.
    fn shared(&self) -> bool;

    /// What the store is, for log lines ("file /var/lib/gateway/counter.state").
    fn describe(&self) -> String;
}

/// Why a commit did not happen, or may not have.
#[derive(Debug)]
pub enum CommitError {
    /// Nothing was made durable (a write refused: a full disk, the
    /// file-size limit; no connection to the database): the increments of
    /// this batch are answered as failures, and the next batch may succeed.
    Refused(io::Error),
    /// The increments may or may not have been made durable (a connection
    /// to the database lost during its `COMMIT`): [`Durable::settle`] tells
    /// once it can. Until then, or [`SETTLE_FOR`], new batches are refused;
    /// after that the visits are answered as unknown. Never committed again.
    Unsettled(io::Error),
    /// The outcome is unknown and a retry would not settle it (an
    /// `fdatasync` failed: the kernel may have dropped the data while
    /// reporting the error once). The process ends; under systemd it is
    /// restarted and reads the file again (where the kernel still caches
    /// the slot that was not synced, it may read that count: never one a
    /// 200 was sent for and lost, at worst visits counted that were not
    /// answered 200).
    Fatal(io::Error),
}

impl CommitError {
    /// What went wrong, whatever it means for the batch.
    pub fn into_io(self) -> io::Error {
        match self {
            Self::Refused(error) | Self::Unsettled(error) | Self::Fatal(error) => error,
        }
    }
}

/// Why an increment is not answered as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCounted {
    /// It was not made durable: not counted.
    Refused,
    /// Whether it was made durable is not known: maybe counted, once.
    Unknown,
}

/// A durable count, committed by a thread of its own.
pub struct Store {
    shared: Arc<Shared>,
    /// Whether reads go to the store (see [`Durable::shared`]).
    read_through: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the commit thread when a batch opens.
    work: Condvar,
}

struct State {
    /// The durable total as last committed or read.
    durable: u64,
    /// Increments waiting for the next commit, and the batch they (and the
    /// reads waiting for the store's total) wait in.
    pending: u64,
    batch: Option<Arc<Batch>>,
}

// A batch's outcome; 0 (its default) while it waits.
const COMMITTED: u8 = 1;
const REFUSED: u8 = 2;
const UNKNOWN: u8 = 3;

/// The increments one commit covers: how it ended, the total it left, and
/// the latch its visits wait on.
#[derive(Default)]
struct Batch {
    outcome: AtomicU8,
    total: AtomicU64,
    done: Latch,
}

impl Batch {
    fn finish(&self, outcome: u8, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.outcome.store(outcome, Ordering::Relaxed);
        // The latch's store is SeqCst: a waiter that sees it set sees these.
        self.done.set();
    }

    /// The durable total once the batch is committed.
    async fn wait(&self) -> Result<u64, NotCounted> {
        self.done.wait().await;
        match self.outcome.load(Ordering::Relaxed) {
            COMMITTED => Ok(self.total.load(Ordering::Relaxed)),
            UNKNOWN => Err(NotCounted::Unknown),
            _ => Err(NotCounted::Refused),
        }
    }
}

/// Every critical section here is a read, an add or a take: a panic
/// elsewhere cannot leave the state inconsistent.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Starts the commit thread for `durable`, whose durable total is
    /// `total` (as far as this process knows).
    pub fn start(durable: impl Durable, total: u64) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                durable: total,
                pending: 0,
                batch: None,
            }),
            work: Condvar::new(),
        });
        let read_through = durable.shared();
        let committing = shared.clone();
        std::thread::Builder::new()
            .name("gateway-commit".to_owned())
            .spawn(move || commit_forever(&committing, durable))?;
        Ok(Self {
            shared,
            read_through,
        })
    }

    /// Adds `visits` to the count (in the next commit, whole); returns
    /// once that is durable.
    pub async fn add(&self, visits: u64) -> Result<(), NotCounted> {
        self.join(visits).wait().await.map(drop)
    }

    /// The durable total: for a store other processes add to, read from
    /// the store (with the next commit).
    pub async fn total(&self) -> Result<u64, NotCounted> {
        if self.read_through {
            // A read shares its batch's fate, but an unknown commit says
            // nothing about the total read: it was not read.
            self.join(0).wait().await.map_err(|_| NotCounted::Refused)
        } else {
            Ok(self.last_total())
        }
    }

    /// The durable total as this process last committed or read it.
    pub fn last_total(&self) -> u64 {
        lock(&self.shared.state).durable
    }

    /// Adds `increments` to the open batch (opening one if none is) and
    /// returns it.
    fn join(&self, increments: u64) -> Arc<Batch> {
        let (batch, opened) = {
            let mut state = lock(&self.shared.state);
            state.pending += increments;
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
        batch
    }
}

/// The commit thread: one commit per batch, for as long as the process
/// runs. While a commit is unsettled, batches are refused (a new commit
/// would not tell whether the lost one committed) and settling is tried
/// every [`SETTLE_EVERY`].
fn commit_forever(shared: &Shared, mut durable: impl Durable) {
    // Below the workers that feed it: when a core is idle the commit runs
    // at once, and when the workers keep the CPU busy it waits for a gap,
    // while more visits join the batch. Fewer, larger commits then cost
    // the CPU less per visit, without a timer. (Raising one's own nice
    // value needs no privilege; if it fails, commits go on as they are.)
    let lowered = rustix::process::getpriority_process(None)
        .and_then(|nice| rustix::process::setpriority_process(None, (nice + COMMIT_NICE).min(19)));
    if let Err(error) = lowered {
        tracing::debug!(%error, "cannot lower the commit thread's priority");
    }
    let mut unsettled: Option<(Arc<Batch>, Instant)> = None;
    loop {
        let next = {
            let mut state = lock(&shared.state);
            while state.batch.is_none() {
                if unsettled.is_some() {
                    state = shared
                        .work
                        .wait_timeout(state, SETTLE_EVERY)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    break;
                }
                state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            let pending = std::mem::take(&mut state.pending);
            state.batch.take().map(|batch| (batch, pending))
        };
        if let Some((lost, give_up_at)) = unsettled.take() {
            match durable.settle() {
                Ok(Some(total)) => {
                    lock(&shared.state).durable = total;
                    lost.finish(COMMITTED, total);
                }
                Ok(None) => {
                    tracing::warn!(
                        store = durable.describe(),
                        "the commit whose connection was lost did not commit; its visits are answered 503"
                    );
                    lost.finish(REFUSED, 0);
                }
                Err(error) if Instant::now() >= give_up_at => {
                    tracing::error!(store = durable.describe(), %error, "cannot tell whether the lost commit committed; its visits are answered 504 and may be counted (once)");
                    durable.abandon();
                    lost.finish(UNKNOWN, 0);
                }
                Err(_) => unsettled = Some((lost, give_up_at)),
            }
        }
        let Some((batch, increments)) = next else {
            continue;
        };
        if unsettled.is_some() {
            batch.finish(REFUSED, 0);
            continue;
        }
        match durable.commit(increments) {
            Ok(total) => {
                lock(&shared.state).durable = total;
                batch.finish(COMMITTED, total);
            }
            Err(CommitError::Refused(error)) => {
                tracing::warn!(store = durable.describe(), increments, %error, "commit refused; those visits are answered 503");
                batch.finish(REFUSED, 0);
            }
            Err(CommitError::Unsettled(error)) => {
                tracing::warn!(store = durable.describe(), increments, %error, "settling the lost commit; meanwhile visits are answered 503");
                unsettled = Some((batch, Instant::now() + SETTLE_FOR));
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
