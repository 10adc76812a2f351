//! Visit batching (`upstream.batch_max` above 1): the visits that arrive
//! while a worker's POSTs are all in flight wait for the next POST, which
//! carries their number, and each is answered from that POST's one
//! outcome.
//!
//! This is group commit, as in the durable store: no timer. A visit that
//! finds fewer than [`Batcher::posts_in_flight`] POSTs in flight is sent at
//! once, alone, as the very request it would be without batching. Others
//! join the waiting batch; whenever a POST ends, the task that sent it
//! takes the waiting batch and sends it, and a batch that fills up goes
//! at once on a POST of its own. So a waiting visit waits for at most one
//! POST to come back before its own leaves, and throughput is not capped
//! by the POSTs in flight (an upstream far away gets more of them).
//!
//! The POSTs are sent by tasks of their own, not by a visitor's: a visitor
//! may disconnect or reach its deadline at any time. One that does before
//! its batch is sent leaves it (and is not counted); once sent, its visit
//! is in the POST's count whatever happens to the visitor.
//!
//! [`Batcher`] is generic over what a batch's first visit brings (its own
//! request), so that these rules are tested with plain values; the
//! client's side of them (joining, and the tasks that send) comes after it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use backends::Runtime;
use event_listener::Event;

use super::Upstream;
use crate::outcome::Outcome;
use crate::time::timeout_at;

/// The waiting batches and how many POSTs are in flight.
pub(super) struct Batcher<T> {
    batch_max: usize,
    posts_in_flight: usize,
    state: Mutex<State<T>>,
}

struct State<T> {
    in_flight: usize,
    /// Oldest first; not empty only while `in_flight` is at least
    /// `posts_in_flight`. Only the newest can have room (a full batch is
    /// sent at once), so there is at most one unless `batch_max` changed.
    waiting: VecDeque<Waiting<T>>,
    next_id: u64,
}

/// A batch not yet sent, and the id its visits' tickets know it by.
struct Waiting<T> {
    id: u64,
    batch: Batch<T>,
}

/// A batch: while it waits, the visits in it; once sealed (taken out of
/// the waiting ones to be sent), the visits its POST carries, every one
/// still waiting for the outcome or gone after the seal.
pub(super) struct Batch<T> {
    pub(super) visits: usize,
    /// When its first (oldest) visit arrived: the POST's deadline runs
    /// from here, so that it ends no later than any of its visits'.
    pub(super) started: Instant,
    /// The first visit's own request while it is the batch's only visit:
    /// a batch of one goes out as the request it would be unbatched.
    pub(super) alone: Option<T>,
    pub(super) reply: Arc<Reply>,
}

/// A visit's place in a batch, until it has its answer or leaves.
pub(super) struct Ticket<'a, T> {
    batcher: &'a Batcher<T>,
    id: u64,
    /// Only a batch's first visit can have brought its request.
    first: bool,
    reply: Arc<Reply>,
    /// Answered, left, or sent: nothing to undo when dropped.
    settled: bool,
}

/// What a visit got from [`Batcher::join`].
pub(super) enum Joined<'a, T> {
    /// A POST leaves at once: send this batch (this one visit, or the
    /// batch this visit filled), then the ones [`Batcher::next`] gives.
    Send(Batch<T>, Ticket<'a, T>),
    /// Wait for the batch's outcome; a task already in flight sends it.
    Wait(Ticket<'a, T>),
}

/// The outcome of one batch's POST, for every visit in it.
#[derive(Default)]
pub(super) struct Reply {
    outcome: OnceLock<Outcome>,
    ready: Event,
}

impl Reply {
    /// Gives every visit in the batch `outcome` (the first one set stands).
    pub(super) fn set(&self, outcome: Outcome) {
        let _ = self.outcome.set(outcome);
        self.ready.notify(usize::MAX);
    }

    fn get(&self) -> Option<Outcome> {
        self.outcome.get().copied()
    }

    /// The outcome, once there is one.
    async fn wait(&self) -> Outcome {
        loop {
            if let Some(outcome) = self.get() {
                return outcome;
            }
            let listener = self.ready.listen();
            if let Some(outcome) = self.get() {
                return outcome;
            }
            listener.await;
        }
    }
}

impl<T> Batcher<T> {
    /// Batches of up to `batch_max` visits, up to `posts_in_flight` POSTs
    /// at once (both at least 1).
    pub(super) fn new(batch_max: usize, posts_in_flight: usize) -> Self {
        Self {
            batch_max: batch_max.max(1),
            posts_in_flight: posts_in_flight.max(1),
            state: Mutex::new(State {
                in_flight: 0,
                waiting: VecDeque::new(),
                next_id: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic under this lock leaves counts that are still consistent
        // (every change is one assignment); carry on with them.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Places a visit that arrived at `started`, whose unbatched request
    /// is `request`.
    pub(super) fn join(&self, request: T, started: Instant) -> Joined<'_, T> {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        if state.in_flight < self.posts_in_flight {
            state.in_flight += 1;
            drop(state);
            let reply = Arc::new(Reply::default());
            let sealed = Batch {
                visits: 1,
                started,
                alone: Some(request),
                reply: reply.clone(),
            };
            return Joined::Send(sealed, self.ticket(id, false, reply));
        }
        let batch_max = self.batch_max;
        let with_room = state
            .waiting
            .back_mut()
            .filter(|w| w.batch.visits < batch_max);
        let (id, first, reply) = match with_room {
            Some(newest) => {
                newest.batch.visits += 1;
                newest.batch.alone = None;
                (newest.id, false, newest.batch.reply.clone())
            }
            None => {
                let reply = Arc::new(Reply::default());
                let batch = Batch {
                    visits: 1,
                    started,
                    alone: Some(request),
                    reply: reply.clone(),
                };
                state.waiting.push_back(Waiting { id, batch });
                (id, true, reply)
            }
        };
        // A batch this visit filled goes now, on a POST of its own.
        let full = state
            .waiting
            .back()
            .is_some_and(|w| w.batch.visits >= batch_max);
        let sealed = if full { state.waiting.pop_back() } else { None };
        if sealed.is_some() {
            state.in_flight += 1;
        }
        drop(state);
        let ticket = self.ticket(id, first, reply);
        match sealed {
            Some(waiting) => Joined::Send(waiting.batch, ticket),
            None => Joined::Wait(ticket),
        }
    }

    fn ticket(&self, id: u64, first: bool, reply: Arc<Reply>) -> Ticket<'_, T> {
        Ticket {
            batcher: self,
            id,
            first,
            reply,
            settled: false,
        }
    }

    /// Called by a sender whose POST has ended: the oldest waiting batch,
    /// sealed, for it to send next; or `None`, and it is no longer in
    /// flight.
    pub(super) fn next(&self) -> Option<Batch<T>> {
        let mut state = self.lock();
        match state.waiting.pop_front() {
            Some(waiting) => Some(waiting.batch),
            None => {
                state.in_flight -= 1;
                None
            }
        }
    }

    /// Takes a visit out of its batch if that has not been sent: true if
    /// it left.
    fn leave(&self, id: u64, first: bool) -> bool {
        let mut state = self.lock();
        let Some(index) = state.waiting.iter().rposition(|w| w.id == id) else {
            return false;
        };
        let batch = &mut state.waiting[index].batch;
        batch.visits -= 1;
        if first {
            batch.alone = None;
        }
        if batch.visits == 0 {
            state.waiting.remove(index);
        }
        true
    }

    /// POSTs being sent now.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    #[cfg(test)]
    fn waiting(&self) -> Vec<usize> {
        self.lock().waiting.iter().map(|w| w.batch.visits).collect()
    }
}

impl<T> Ticket<'_, T> {
    /// The batch's outcome, once its POST has ended.
    pub(super) async fn outcome(&mut self) -> Outcome {
        let outcome = self.reply.wait().await;
        self.settled = true;
        outcome
    }

    /// The visit's deadline passed: it leaves its batch if that was not
    /// sent (503: nothing counted), and is `None` then. A batch already
    /// sealed keeps it: its POST's deadline is no later than this visit's,
    /// so its outcome is due now, and is the answer.
    pub(super) fn leave_unsent(&mut self) -> Option<Outcome> {
        if self.reply.get().is_none() && self.batcher.leave(self.id, self.first) {
            self.settled = true;
            return Some(Outcome::Overloaded);
        }
        None
    }
}

impl<T> Drop for Ticket<'_, T> {
    /// A visitor gone before its answer leaves its batch if it is unsent.
    fn drop(&mut self) {
        if !self.settled && self.reply.get().is_none() {
            self.batcher.leave(self.id, self.first);
        }
    }
}

/// A batch's POST under way. Should its sender stop before the POST ends
/// (a panic, a task dropped), the batch's visitors are answered 504 (it
/// may have left) and the waiting batch goes on a new sender, so no visit
/// waits for an outcome that never comes and no slot in flight is lost.
struct Sending<R: Runtime> {
    upstream: &'static Upstream<R>,
    batcher: &'static Batcher<Vec<u8>>,
    /// Taken once the outcome is given; still here, it is owed.
    reply: Option<Arc<Reply>>,
}

impl<R: Runtime> Drop for Sending<R> {
    fn drop(&mut self) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        tracing::warn!(
            "a batch's sender stopped before its POST ended; its visits are answered 504"
        );
        reply.set(Outcome::TimedOut);
        if let Some(next) = self.batcher.next() {
            R::spawn(self.upstream.send_batches(self.batcher, next));
        }
    }
}

impl<R: Runtime> Upstream<R> {
    /// A visit's way through the batcher: sent at once in a batch of its
    /// own, or waiting for a POST in flight to end and its batch to go.
    pub(super) async fn register_in_batch(
        &'static self,
        batcher: &'static Batcher<Vec<u8>>,
        request: Vec<u8>,
        started: Instant,
    ) -> Outcome {
        let deadline = started + self.request_timeout;
        let mut ticket = match batcher.join(request, started) {
            Joined::Send(batch, ticket) => {
                R::spawn(self.send_batches(batcher, batch));
                ticket
            }
            Joined::Wait(ticket) => ticket,
        };
        if let Ok(outcome) = timeout_at::<R, _>(deadline, ticket.outcome()).await {
            return outcome;
        }
        // Unsent, it leaves (503). Sent, its POST's deadline (from the
        // batch's oldest visit) is no later than this one's: the outcome
        // is due now, and its sender gives one even if it fails.
        match ticket.leave_unsent() {
            Some(outcome) => outcome,
            None => ticket.outcome().await,
        }
    }

    /// Sends `batch`, then every batch that is waiting when a POST ends,
    /// until none is.
    pub(super) async fn send_batches(
        &'static self,
        batcher: &'static Batcher<Vec<u8>>,
        mut batch: Batch<Vec<u8>>,
    ) {
        loop {
            let request = match batch.alone.take() {
                Some(request) if batch.visits == 1 => request,
                _ => self.requests.batch(batch.visits),
            };
            let mut sending = Sending {
                upstream: self,
                batcher,
                reply: Some(batch.reply),
            };
            let outcome = self.post(request, batch.visits as u64, batch.started).await;
            if let Some(reply) = sending.reply.take() {
                reply.set(outcome);
            }
            match batcher.next() {
                Some(next) => batch = next,
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent<T>(joined: Joined<'_, T>) -> (Batch<T>, Ticket<'_, T>) {
        match joined {
            Joined::Send(sealed, ticket) => (sealed, ticket),
            Joined::Wait(_) => panic!("expected to be sent at once"),
        }
    }

    fn waits<T>(joined: Joined<'_, T>) -> Ticket<'_, T> {
        match joined {
            Joined::Wait(ticket) => ticket,
            Joined::Send(..) => panic!("expected to wait"),
        }
    }

    fn join<T>(batcher: &Batcher<T>, request: T) -> Joined<'_, T> {
        batcher.join(request, Instant::now())
    }

    #[test]
    fn a_visit_with_room_in_flight_is_sent_at_once_alone() {
        let batcher = Batcher::new(4, 2);
        let (first, _a) = sent(join(&batcher, "a"));
        let (second, _b) = sent(join(&batcher, "b"));
        assert_eq!((first.visits, first.alone), (1, Some("a")));
        assert_eq!((second.visits, second.alone), (1, Some("b")));
        let _c = waits(join(&batcher, "c"));
        assert_eq!(batcher.waiting(), [1]);
    }

    #[test]
    fn a_batch_that_fills_up_goes_at_once_on_a_post_of_its_own() {
        let batcher = Batcher::new(3, 1);
        let _sending = sent(join(&batcher, 0));
        let _one = waits(join(&batcher, 1));
        let _two = waits(join(&batcher, 2));
        let (full, _three) = sent(join(&batcher, 3));
        assert_eq!((full.visits, full.alone), (3, None));
        assert_eq!(batcher.in_flight(), 2, "past the usual two in flight");
        assert!(batcher.waiting().is_empty());
        let _four = waits(join(&batcher, 4));
        let next = batcher.next().expect("the waiting batch");
        assert_eq!((next.visits, next.alone), (1, Some(4)));
        assert!(batcher.next().is_none(), "nothing waits: out of flight");
        assert!(batcher.next().is_none());
        assert_eq!(batcher.in_flight(), 0);
        // Room again: the next visit goes at once.
        let _again = sent(join(&batcher, 5));
    }

    #[test]
    fn a_batch_carries_when_its_oldest_visit_came() {
        let batcher = Batcher::new(8, 1);
        let _sending = sent(join(&batcher, 0));
        let oldest = Instant::now();
        let _a = waits(batcher.join(1, oldest));
        let _b = waits(batcher.join(2, oldest + std::time::Duration::from_secs(1)));
        assert_eq!(batcher.next().expect("the batch").started, oldest);
    }

    #[test]
    fn a_visit_that_leaves_before_the_send_is_not_in_the_count() {
        let batcher = Batcher::new(8, 1);
        let _sending = sent(join(&batcher, "x"));
        let first = waits(join(&batcher, "first"));
        let mut second = waits(join(&batcher, "second"));
        let third = waits(join(&batcher, "third"));
        assert_eq!(second.leave_unsent(), Some(Outcome::Overloaded));
        drop(first);
        assert_eq!(batcher.waiting(), [1]);
        let next = batcher.next().expect("the batch");
        // One visit left, but not the first: not sent as the first's request.
        assert_eq!((next.visits, next.alone), (1, None));
        drop(third);
        assert!(batcher.next().is_none());
    }

    #[test]
    fn a_batch_everyone_left_is_not_sent() {
        let batcher = Batcher::new(8, 1);
        let _sending = sent(join(&batcher, ()));
        let tickets: Vec<_> = (0..3).map(|_| waits(join(&batcher, ()))).collect();
        drop(tickets);
        assert!(batcher.waiting().is_empty());
        assert!(batcher.next().is_none());
    }

    #[test]
    fn once_sent_a_visit_is_counted_in_the_outcome_whatever_it_does() {
        let batcher = Batcher::new(8, 1);
        let (first, _a) = sent(join(&batcher, 1));
        let mut late = waits(join(&batcher, 2));
        let gone = waits(join(&batcher, 3));
        let batch = batcher.next().expect("the batch");
        assert_eq!(batch.visits, 2);
        drop(gone);
        assert_eq!(batch.visits, 2, "sealed: the count stands");
        assert_eq!(late.leave_unsent(), None, "sent: it stays for the outcome");
        first.reply.set(Outcome::Counted);
        batch.reply.set(Outcome::Failed);
        assert_eq!(batch.reply.get(), Some(Outcome::Failed));
    }

    #[test]
    fn every_visit_in_a_batch_gets_its_outcome() {
        let batcher = Batcher::new(8, 1);
        let _sending = sent(join(&batcher, 0));
        let mut tickets: Vec<_> = (1..=5).map(|i| waits(join(&batcher, i))).collect();
        let batch = batcher.next().expect("the batch");
        batch.reply.set(Outcome::TimedOut);
        for ticket in &mut tickets {
            let outcome = futures_lite::future::block_on(ticket.outcome());
            assert_eq!(outcome, Outcome::TimedOut);
        }
    }
}
