//! The upstream's connection pool: idle connections, the cap on open ones,
//! and the queue of visits waiting at the cap.
//!
//! A visit takes the most recently used idle connection (the least likely
//! to have been closed by the upstream), else a slot under the cap to dial
//! a new one with (the cap counts those being dialled), else queues for
//! either. The queue is first come, first served: a connection coming
//! back, or a slot freed, is handed to the visit that has waited longest.
//!
//! The handoff is what makes it fair: a waiter that was merely woken would
//! race for the freed connection with every visit arriving meanwhile,
//! among them the one whose answer had just freed it (its client's next
//! request, on the same task), and mostly lose, so that with more clients
//! than the cap a few visits would wait far longer than the rest.
//!
//! Generic over what a connection is, so that these rules are tested with
//! plain values; the upstream pools [`super::exchange::Connection`]s.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::shutdown::wait_until;

/// Idle connections, the visits queued for one, and the count under the cap.
pub(super) struct Pool<C: 'static> {
    max_connections: usize,
    idle_timeout: Duration,
    state: Mutex<State<C>>,
    /// Connections open or being dialled; never above the cap. Changed
    /// under the `state` lock, read without it.
    open: AtomicUsize,
}

/// What the pool's lock guards.
struct State<C: 'static> {
    /// Idle connections, most recently used last (reused first).
    idle: Vec<Idle<C>>,
    /// Visits waiting for a connection, longest first. Never non-empty
    /// while `idle` is, or while a slot is free.
    queue: VecDeque<Arc<Waiter<C>>>,
}

/// An open connection and its slot under the cap: dropped, the connection
/// closes and the slot goes to the next in line.
pub(super) struct Conn<C: 'static> {
    pub(super) connection: C,
    slot: Slot<C>,
}

impl<C> Conn<C> {
    pub(super) fn new(connection: C, slot: Slot<C>) -> Self {
        Self { connection, slot }
    }

    /// Closes the connection, keeping its place under the cap.
    pub(super) fn into_slot(self) -> Slot<C> {
        self.slot
    }
}

/// An idle connection and when it went idle.
struct Idle<C: 'static> {
    conn: Conn<C>,
    since: Instant,
}

/// What a visit found: a pooled connection, a slot to dial one with, or a
/// place in the queue.
pub(super) enum Found<C: 'static> {
    Pooled(Conn<C>),
    Slot(Slot<C>),
    Queued(Queued<C>),
}

/// What a queued visit is handed.
pub(super) enum Handoff<C: 'static> {
    /// A connection that just finished an exchange.
    Pooled(Conn<C>),
    /// A slot under the cap, to dial a new connection with.
    Slot(Slot<C>),
}

/// A queued visit's mailbox: what it was handed, and the event that says so.
struct Waiter<C: 'static> {
    handoff: Mutex<Option<Handoff<C>>>,
    handed: Event,
}

impl<C> Waiter<C> {
    fn give(&self, handoff: Handoff<C>) {
        *lock(&self.handoff) = Some(handoff);
        self.handed.notify(1);
    }

    fn take(&self) -> Option<Handoff<C>> {
        lock(&self.handoff).take()
    }

    async fn handed(&self) {
        wait_until(&self.handed, || lock(&self.handoff).is_some().then_some(())).await
    }
}

/// A visit in the pool's queue. Dropped before it took what it was handed
/// (its deadline passed, or its connection was closed at the shutdown
/// deadline), it leaves the queue, and passes on what it was handed.
pub(super) struct Queued<C: 'static> {
    pool: &'static Pool<C>,
    waiter: Arc<Waiter<C>>,
    /// Handed something and took it: already out of the queue, so
    /// dropping has nothing to search for.
    served: bool,
}

impl<C> Queued<C> {
    /// What this visit is handed, once it is; out of the queue then.
    pub(super) async fn handed(&mut self) -> Option<Handoff<C>> {
        self.waiter.handed().await;
        self.served = true;
        self.waiter.take()
    }
}

impl<C> Drop for Queued<C> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let still_queued = {
            let mut state = self.pool.state();
            let at = state
                .queue
                .iter()
                .position(|w| Arc::ptr_eq(w, &self.waiter));
            at.and_then(|at| state.queue.remove(at)).is_some()
        };
        if still_queued {
            return;
        }
        // Dequeued by a hand-off: pass on what it brought. (One still on
        // its way lands in the dropped waiter: a connection is closed, a
        // slot goes to the next in line.)
        match self.waiter.take() {
            Some(Handoff::Pooled(conn)) => self.pool.check_in(conn, Instant::now()),
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

/// One place under the cap; on drop, handed to the longest-waiting visit,
/// or given back.
pub(super) struct Slot<C: 'static> {
    pool: &'static Pool<C>,
}

impl<C> Drop for Slot<C> {
    fn drop(&mut self) {
        let pool = self.pool;
        let mut state = pool.state();
        match state.queue.pop_front() {
            Some(waiter) => {
                drop(state);
                waiter.give(Handoff::Slot(Slot { pool }));
            }
            None => {
                pool.open.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl<C> Pool<C> {
    pub(super) fn new(max_connections: usize, idle_timeout: Duration) -> Self {
        Self {
            max_connections,
            idle_timeout,
            state: Mutex::new(State {
                idle: Vec::new(),
                queue: VecDeque::new(),
            }),
            open: AtomicUsize::new(0),
        }
    }

    /// Connections open now (idle or busy) or being dialled.
    pub(super) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub(super) fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    fn state(&self) -> MutexGuard<'_, State<C>> {
        lock(&self.state)
    }

    /// An idle connection, else a slot if the cap allows, else a place at
    /// the back of the queue. Every idle connection is closed first if the
    /// freshest has outlived the idle timeout at `now` (then all have).
    /// (Whether the upstream closed one is for the caller to check before
    /// use.)
    pub(super) fn checkout(&'static self, now: Instant) -> Found<C> {
        let (found, expired) = {
            let mut state = self.state();
            let expired = match state.idle.last() {
                Some(fresh) if now.saturating_duration_since(fresh.since) >= self.idle_timeout => {
                    std::mem::take(&mut state.idle)
                }
                _ => Vec::new(),
            };
            let found = if let Some(idle) = state.idle.pop() {
                Found::Pooled(idle.conn)
            } else if let Some(slot) = self.take_slot() {
                Found::Slot(slot)
            } else {
                Found::Queued(self.enqueue(&mut state))
            };
            (found, expired)
        };
        // Closed outside the lock; their slots go to the queue.
        drop(expired);
        found
    }

    /// A slot to dial a fresh connection with, for a retry: a free one,
    /// else the least recently used idle connection's (closed for it),
    /// else a place in the queue, whose first hand-off gives one (a
    /// connection handed over is closed for its slot).
    pub(super) fn slot_for_retry(&'static self) -> Result<Slot<C>, Queued<C>> {
        let found = {
            let mut state = self.state();
            if let Some(slot) = self.take_slot() {
                Found::Slot(slot)
            } else if !state.idle.is_empty() {
                Found::Pooled(state.idle.remove(0).conn)
            } else {
                Found::Queued(self.enqueue(&mut state))
            }
        };
        match found {
            Found::Slot(slot) => Ok(slot),
            // Closed outside the lock.
            Found::Pooled(conn) => Ok(conn.into_slot()),
            Found::Queued(queued) => Err(queued),
        }
    }

    /// Takes back a connection that just finished an exchange cleanly: for
    /// the longest-waiting visit, else idle from `now`.
    pub(super) fn check_in(&self, conn: Conn<C>, now: Instant) {
        let mut state = self.state();
        if let Some(waiter) = state.queue.pop_front() {
            drop(state);
            waiter.give(Handoff::Pooled(conn));
            return;
        }
        state.idle.push(Idle { conn, since: now });
    }

    /// Closes the connections that have been idle for the idle timeout at
    /// `now`.
    pub(super) fn reap(&self, now: Instant) {
        let expired: Vec<Idle<C>> = {
            let mut state = self.state();
            let (kept, expired) = std::mem::take(&mut state.idle)
                .into_iter()
                .partition(|i| now.saturating_duration_since(i.since) < self.idle_timeout);
            state.idle = kept;
            expired
        };
        // Closed outside the lock; each frees its slot.
        drop(expired);
    }

    /// A slot under the cap, if there is one. Called with the state locked.
    fn take_slot(&'static self) -> Option<Slot<C>> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max_connections).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot { pool: self })
    }

    /// Puts a new waiter at the back of the queue.
    fn enqueue(&'static self, state: &mut State<C>) -> Queued<C> {
        let waiter = Arc::new(Waiter {
            handoff: Mutex::new(None),
            handed: Event::new(),
        });
        state.queue.push_back(waiter.clone());
        Queued {
            pool: self,
            waiter,
            served: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures_lite::future::{block_on, poll_once};

    use super::{Conn, Found, Handoff, Pool, Queued};
    use crate::forever;

    const IDLE: Duration = Duration::from_secs(60);

    /// A pool of numbered connections, for the rest of the test process.
    fn pool(cap: usize) -> &'static Pool<u32> {
        forever(Pool::new(cap, IDLE))
    }

    /// What a checkout found, in a form tests compare.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Pooled(u32),
        Slot,
        Queued,
    }

    fn got(found: &Found<u32>) -> Got {
        match found {
            Found::Pooled(conn) => Got::Pooled(conn.connection),
            Found::Slot(_) => Got::Slot,
            Found::Queued(_) => Got::Queued,
        }
    }

    /// Connection `id`, dialled on a slot the pool must have free.
    fn dial(pool: &'static Pool<u32>, id: u32) -> Conn<u32> {
        match pool.checkout(Instant::now()) {
            Found::Slot(slot) => Conn::new(id, slot),
            other => panic!("expected a free slot, found {:?}", got(&other)),
        }
    }

    fn queue(pool: &'static Pool<u32>) -> Queued<u32> {
        match pool.checkout(Instant::now()) {
            Found::Queued(queued) => queued,
            other => panic!("expected to queue, found {:?}", got(&other)),
        }
    }

    /// What `queued` has been handed so far, without waiting.
    fn handed(queued: &mut Queued<u32>) -> Option<Got> {
        match block_on(poll_once(queued.handed())).flatten()? {
            Handoff::Pooled(conn) => Some(Got::Pooled(conn.connection)),
            Handoff::Slot(_) => Some(Got::Slot),
        }
    }

    #[test]
    fn the_most_recently_used_idle_connection_is_reused_first() {
        let pool = pool(3);
        let now = Instant::now();
        let conns: Vec<_> = (1..=3).map(|id| dial(pool, id)).collect();
        for conn in conns {
            pool.check_in(conn, now);
        }
        for id in [3, 2, 1] {
            assert_eq!(got(&pool.checkout(now)), Got::Pooled(id));
        }
        // Each was dropped again just now: the slots are back.
        assert_eq!(pool.open(), 0);
    }

    #[test]
    fn at_the_cap_a_visit_queues_and_a_returned_connection_goes_to_the_longest_waiting() {
        let pool = pool(1);
        let conn = dial(pool, 1);
        let mut first = queue(pool);
        let mut second = queue(pool);
        assert_eq!(handed(&mut first), None);
        pool.check_in(conn, Instant::now());
        assert_eq!(handed(&mut second), None);
        assert_eq!(handed(&mut first), Some(Got::Pooled(1)));
        // Taken, and dropped with the test's `Got`: its slot goes to the
        // next in line, and then (dropped likewise) back.
        assert_eq!(handed(&mut second), Some(Got::Slot));
        assert_eq!(pool.open(), 0);
    }

    #[test]
    fn a_closed_connection_hands_its_slot_to_the_longest_waiting_or_gives_it_back() {
        let pool = pool(1);
        let conn = dial(pool, 1);
        let mut waiting = queue(pool);
        drop(conn);
        assert_eq!(pool.open(), 1, "the slot went to the queue, not back");
        assert_eq!(handed(&mut waiting), Some(Got::Slot));
        assert_eq!(
            pool.open(),
            0,
            "with nobody waiting, the slot is given back"
        );
        drop(dial(pool, 2));
        assert_eq!(pool.open(), 0);
    }

    #[test]
    fn a_visit_that_gives_up_leaves_the_queue() {
        let pool = pool(1);
        let conn = dial(pool, 1);
        let gave_up = queue(pool);
        let mut next = queue(pool);
        drop(gave_up);
        pool.check_in(conn, Instant::now());
        assert_eq!(handed(&mut next), Some(Got::Pooled(1)));
    }

    #[test]
    fn a_connection_handed_to_a_visit_that_gave_up_is_passed_on() {
        let pool = pool(1);
        let now = Instant::now();
        let conn = dial(pool, 1);
        let gave_up = queue(pool);
        let mut next = queue(pool);
        pool.check_in(conn, now);
        drop(gave_up);
        assert_eq!(handed(&mut next), Some(Got::Pooled(1)));

        // With nobody else waiting, it goes idle, still open.
        let conn = dial(pool, 2);
        let gave_up = queue(pool);
        pool.check_in(conn, now);
        drop(gave_up);
        assert_eq!(pool.open(), 1);
        assert_eq!(got(&pool.checkout(now)), Got::Pooled(2));
    }

    #[test]
    fn a_slot_handed_to_a_visit_that_gave_up_is_passed_on() {
        let pool = pool(1);
        let conn = dial(pool, 1);
        let gave_up = queue(pool);
        let mut next = queue(pool);
        drop(conn);
        drop(gave_up);
        assert_eq!(pool.open(), 1);
        assert_eq!(handed(&mut next), Some(Got::Slot));
        assert_eq!(pool.open(), 0);

        let conn = dial(pool, 2);
        let gave_up = queue(pool);
        drop(conn);
        drop(gave_up);
        assert_eq!(
            pool.open(),
            0,
            "nobody left waiting: the slot is given back"
        );
    }

    #[test]
    fn idle_connections_expire_together_when_the_freshest_has_outlived_the_timeout() {
        let pool = pool(2);
        let start = Instant::now();
        let (first, second) = (dial(pool, 1), dial(pool, 2));
        pool.check_in(first, start);
        pool.check_in(second, start + Duration::from_secs(1));
        // The older one is past the timeout, the fresher one is not: both
        // stay (the reaper is what closes the older).
        let found = pool.checkout(start + IDLE);
        assert_eq!(got(&found), Got::Pooled(2));
        pool.check_in(unwrap_pooled(found), start + Duration::from_secs(1));
        // Both past it: both closed, and the visit dials on a slot. They
        // are closed once the lock is released, with the visit already
        // queued at the cap: the first slot freed is handed to it.
        let found = pool.checkout(start + Duration::from_secs(1) + IDLE);
        let Found::Queued(mut queued) = found else {
            panic!("expected to queue, found {:?}", got(&found));
        };
        assert_eq!(pool.open(), 1);
        assert_eq!(handed(&mut queued), Some(Got::Slot));
    }

    #[test]
    fn the_reaper_closes_only_connections_idle_past_the_timeout() {
        let pool = pool(2);
        let start = Instant::now();
        let (first, second) = (dial(pool, 1), dial(pool, 2));
        pool.check_in(first, start);
        pool.check_in(second, start + Duration::from_secs(1));
        pool.reap(start + IDLE);
        assert_eq!(pool.open(), 1);
        assert_eq!(got(&pool.checkout(start + IDLE)), Got::Pooled(2));
    }

    #[test]
    fn a_retry_takes_a_free_slot_else_the_least_recently_used_idle_connections() {
        let pool = pool(3);
        let now = Instant::now();
        let (first, second) = (dial(pool, 1), dial(pool, 2));
        pool.check_in(first, now);
        pool.check_in(second, now);
        let free = pool.slot_for_retry().ok().expect("a free slot");
        assert_eq!(pool.open(), 3);
        // At the cap: connection 1, the least recently used, is closed
        // for its slot.
        let taken = pool
            .slot_for_retry()
            .ok()
            .expect("an idle connection's slot");
        assert_eq!(pool.open(), 3);
        assert_eq!(got(&pool.checkout(now)), Got::Pooled(2));
        drop((free, taken));
        assert_eq!(pool.open(), 0);
    }

    #[test]
    fn a_retry_at_the_cap_with_nothing_idle_queues() {
        let pool = pool(1);
        let conn = dial(pool, 1);
        let Err(mut queued) = pool.slot_for_retry() else {
            panic!("a slot past the cap");
        };
        assert_eq!(handed(&mut queued), None);
        pool.check_in(conn, Instant::now());
        assert_eq!(handed(&mut queued), Some(Got::Pooled(1)));
    }

    fn unwrap_pooled(found: Found<u32>) -> Conn<u32> {
        match found {
            Found::Pooled(conn) => conn,
            other => panic!("expected a pooled connection, found {:?}", got(&other)),
        }
    }
}
