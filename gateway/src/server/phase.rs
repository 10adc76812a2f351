//! Where a connection is in its request cycle, which decides its timeout.
//!
//! The server keeps the timeouts rather than hyper because hyper (since
//! 1.6) starts its header-read timer as soon as a keep-alive connection
//! goes idle, which would close idle connections after
//! `header_read_timeout_ms` instead of `idle_timeout_ms`. Each connection
//! instead tracks its [`Phase`]: reading a head (from its first byte, or
//! from the accept), busy in the service, or idle between requests.
//! [`WatchedIo`] sees the bytes that start a head; the connection task
//! moves to busy and idle, and arms its timer for [`Activity::deadline`].
//! An idle connection whose answer is flushed is parked after
//! [`PARK_AFTER`] ([`Activity::park_at`]): [`WatchedIo`] also sees the
//! flush.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};

use super::ServerSettings;

/// How long a keep-alive connection stays idle, its answer out, before it
/// is parked. Long against the gap between a busy client's requests, so
/// that a busy connection never pays for taking hyper's connection apart
/// and building it again; short against how long idle ones stay.
pub(super) const PARK_AFTER: Duration = Duration::from_millis(200);

/// Where a connection is in its request cycle; decides which timeout runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    /// Reading a request head: `header_read_timeout` from its first byte
    /// (or from the accept, for a connection's first request).
    Head = 0,
    /// The service is answering: no timeout here (the service has its own).
    Busy = 1,
    /// Between requests on a keep-alive connection: `idle_timeout`.
    Idle = 2,
}

impl Phase {
    /// When this phase, begun at `since`, times out: reading a head after
    /// the header-read timeout, idle after the idle timeout, busy never
    /// (the service has its own).
    pub(super) fn deadline(self, since: Instant, settings: &ServerSettings) -> Option<Instant> {
        match self {
            Phase::Head => Some(since + settings.header_read_timeout),
            Phase::Busy => None,
            Phase::Idle => Some(since + settings.idle_timeout),
        }
    }
}

/// A connection's phase and when it began, shared between the IO wrapper,
/// the service wrapper and the connection task (all on the same task; the
/// atomics are only there to make it `Sync`).
pub(super) struct Activity {
    phase: AtomicU8,
    /// Nanoseconds since [`epoch`].
    since: AtomicU64,
    /// The client's end of stream was read while busy and is held back
    /// until the answer is out (see [`WatchedIo`]).
    eof_held: AtomicBool,
    /// Bytes of a next request arrived while busy (pipelined): after the
    /// answer the connection is reading a head, not idle.
    head_begun: AtomicBool,
    /// An answer was given to hyper and has not been flushed yet: the
    /// connection is not parked while hyper holds its bytes.
    unflushed: AtomicBool,
    /// hyper is ending the connection (it has begun to shut the stream
    /// down: over TLS its close_notify may wait for room on the socket):
    /// it is never parked, which would let a new hyper connection read on.
    closing: AtomicBool,
}

pub(super) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(super) fn nanos_since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_nanos() as u64
}

impl Activity {
    pub(super) fn new(phase: Phase, at: Instant) -> Self {
        Self {
            phase: AtomicU8::new(phase as u8),
            since: AtomicU64::new(nanos_since_epoch(at)),
            eof_held: AtomicBool::new(false),
            head_begun: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }
    }

    pub(super) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Head,
            1 => Phase::Busy,
            _ => Phase::Idle,
        }
    }

    pub(super) fn enter(&self, phase: Phase, at: Instant) {
        self.since.store(nanos_since_epoch(at), Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The service has answered, `at`: hyper writes the answer next.
    ///
    /// hyper writes a whole answer (a head and a `Full` body, copied into
    /// one buffer: `writev(false)`) in the poll that takes it, and flushes
    /// its stream only once that buffer is written out: so the first flush
    /// after this covers the whole answer. A body streamed in parts would
    /// break that.
    pub(super) fn answered(&self, at: Instant) {
        self.unflushed.store(true, Ordering::Relaxed);
        self.enter(self.after_answer(), at);
    }

    /// The phase after an answer: reading a head if bytes of the next
    /// request came while busy (its header-read timeout runs from now),
    /// else idle.
    fn after_answer(&self) -> Phase {
        // A load first: the swap is a locked instruction, and nearly every
        // answer finds nothing begun.
        if self.head_begun.load(Ordering::Relaxed) {
            self.head_begun.store(false, Ordering::Relaxed);
            Phase::Head
        } else {
            Phase::Idle
        }
    }

    /// Whether an end of stream is held back: then the connection task
    /// must be woken once the answer is out, for hyper to read it (the
    /// held read registered no waker).
    pub(super) fn eof_held(&self) -> bool {
        self.eof_held.load(Ordering::Relaxed)
    }

    /// Bytes arrived: an idle connection starts reading a head.
    fn on_read(&self) {
        if self.phase() == Phase::Idle {
            self.enter(Phase::Head, Instant::now());
        }
    }

    /// When an idle connection whose answer is out is to be parked.
    pub(super) fn park_at(&self) -> Option<Instant> {
        let idle = self.phase() == Phase::Idle
            && !self.unflushed.load(Ordering::Relaxed)
            && !self.closing.load(Ordering::Relaxed);
        idle.then(|| self.since() + PARK_AFTER)
    }

    /// When the current phase began.
    pub(super) fn since(&self) -> Instant {
        epoch() + Duration::from_nanos(self.since.load(Ordering::Relaxed))
    }

    /// When the current phase times out, if it can.
    pub(super) fn deadline(&self, settings: &ServerSettings) -> Option<Instant> {
        self.phase().deadline(self.since(), settings)
    }
}

/// An HTTP/1 connection's requests come one at a time: each moves it to
/// busy, and its answer to idle (or to reading the next head).
impl super::wrapper::RequestCycle for Activity {
    fn began(&self, at: Instant) {
        self.enter(Phase::Busy, at);
    }

    fn answered(&self, at: Instant) -> bool {
        Activity::answered(self, at);
        self.eof_held()
    }

    /// Only when the connection itself is ending.
    fn abandoned(&self) {}
}

/// The client stream, reporting reads to the connection's [`Activity`].
///
/// It also keeps a half-close apart from a departure while the service is
/// busy. hyper reads a busy connection only to notice a client that left,
/// and takes the end of the stream for one; but a client may shut down its
/// sending side once its request is out (`nc -N`, some HTTP/1.0 clients)
/// and still wait for its answer. So an end of stream read while busy is
/// held back until the answer is out; a reset or another error is passed
/// on, and hyper ends the connection, dropping the visit's future (a visit
/// waiting for a batch then leaves it). hyper's own `half_close` would not
/// read a busy connection at all, and a client that reset it would stay
/// in its batch.
///
/// After a parked connection wakes, the bytes its last hyper connection had
/// read and not parsed are read again first (`replay`).
pub(super) struct WatchedIo<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Boxed: bytes to replay are rare (a request arriving as its
    /// connection parks), and a parked connection's task keeps room for
    /// this field.
    replay: Option<Box<Bytes>>,
}

impl<S> WatchedIo<S> {
    pub(super) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            replay: None,
        }
    }

    pub(super) fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Reads `bytes` before anything the stream has. Only a connection
    /// whose replayed bytes were all read is taken apart again, so none
    /// are ever replaced.
    pub(super) fn replay(&mut self, bytes: Bytes) {
        debug_assert!(self.replay.is_none());
        self.replay = Some(Box::new(bytes));
    }
}

impl<S: Read + Unpin> Read for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(replay) = &mut self.replay {
            let n = replay.len().min(buf.remaining());
            buf.put_slice(&replay[..n]);
            replay.advance(n);
            if replay.is_empty() {
                // Emptied, it would still hold hyper's whole read buffer.
                self.replay = None;
            }
            self.activity.on_read();
            return Poll::Ready(Ok(()));
        }
        let busy = self.activity.phase() == Phase::Busy;
        if self.activity.eof_held() {
            // Nothing more can arrive; the end is reported once the answer
            // is out, and until then there is nothing to wait for here.
            return if busy {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            };
        }
        if busy {
            return self.poll_read_while_busy(cx, buf);
        }
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        // Ready(Ok) is either bytes or end of stream; at end of stream
        // hyper closes the connection, so both count as activity.
        if let Poll::Ready(Ok(())) = polled {
            self.activity.on_read();
        }
        polled
    }
}

impl<S: Read + Unpin> WatchedIo<S> {
    /// A read while the service is busy, through a small buffer of its own
    /// so that an end of stream can be told from bytes and held back.
    /// (hyper reads a busy connection only when its own buffer is empty,
    /// and such reads are rare: pipelined requests, a close, a reset.)
    fn poll_read_while_busy(
        &mut self,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let mut local = [std::mem::MaybeUninit::<u8>::uninit(); 512];
        let room = buf.remaining().min(local.len());
        let mut read = ReadBuf::uninit(&mut local[..room]);
        let polled = Pin::new(&mut self.inner).poll_read(cx, read.unfilled());
        if let Poll::Ready(Ok(())) = polled {
            if read.filled().is_empty() && room > 0 {
                self.activity.eof_held.store(true, Ordering::Relaxed);
                return Poll::Pending;
            }
            if !read.filled().is_empty() {
                self.activity.head_begun.store(true, Ordering::Relaxed);
            }
            buf.put_slice(read.filled());
        }
        polled
    }
}

impl<S: Write + Unpin> Write for WatchedIo<S> {
    backends::pass_through!(
        self.inner => poll_write, is_write_vectored, poll_write_vectored
    );

    /// hyper flushes its stream once its buffer is written out: an answer
    /// given to it is then all on its way.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        flushed
    }

    /// hyper shuts the stream down only to end the connection (after an
    /// answer that closes it, a client's close, HTTP/1.0 without
    /// keep-alive, a drain): from then on it is never parked.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.activity.closing.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When a connection is parked, after each turn of its cycle.
    #[test]
    fn only_an_idle_connection_whose_answer_is_out_and_that_stays_open_is_parked() {
        let start = Instant::now();
        let activity = Activity::new(Phase::Head, start);
        assert_eq!(activity.park_at(), None, "reading its first head");
        activity.enter(Phase::Busy, start);
        assert_eq!(activity.park_at(), None, "busy");
        let answered = start + Duration::from_millis(5);
        activity.answered(answered);
        assert_eq!(activity.phase(), Phase::Idle);
        assert_eq!(activity.park_at(), None, "its answer not flushed yet");
        activity.unflushed.store(false, Ordering::Relaxed);
        assert_eq!(activity.park_at(), Some(answered + PARK_AFTER));
        activity.on_read();
        assert_eq!(activity.phase(), Phase::Head);
        assert_eq!(activity.park_at(), None, "a head begun");

        // Bytes of the next request while busy: reading a head after it.
        activity.enter(Phase::Busy, answered);
        activity.head_begun.store(true, Ordering::Relaxed);
        activity.answered(answered);
        activity.unflushed.store(false, Ordering::Relaxed);
        assert_eq!(activity.phase(), Phase::Head);
        assert_eq!(activity.park_at(), None);

        // hyper ending the connection after an answer.
        activity.enter(Phase::Busy, answered);
        activity.answered(answered);
        activity.unflushed.store(false, Ordering::Relaxed);
        activity.closing.store(true, Ordering::Relaxed);
        assert_eq!(activity.phase(), Phase::Idle);
        assert_eq!(activity.park_at(), None, "closing");
    }
}
