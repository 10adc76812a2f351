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

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Read, ReadBufCursor, Write};

use super::ServerSettings;

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

/// A connection's phase and when it began, shared between the IO wrapper,
/// the service wrapper and the connection task (all on the same task; the
/// atomics are only there to make it `Sync`).
pub(super) struct Activity {
    phase: AtomicU8,
    /// Nanoseconds since [`epoch`].
    since: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_nanos() as u64
}

impl Activity {
    pub(super) fn new(phase: Phase, at: Instant) -> Self {
        Self {
            phase: AtomicU8::new(phase as u8),
            since: AtomicU64::new(nanos_since_epoch(at)),
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

    /// Bytes arrived: an idle connection starts reading a head.
    fn on_read(&self) {
        if self.phase() == Phase::Idle {
            self.enter(Phase::Head, Instant::now());
        }
    }

    /// When the current phase times out, if it can.
    pub(super) fn deadline(&self, settings: &ServerSettings) -> Option<Instant> {
        let since = epoch() + Duration::from_nanos(self.since.load(Ordering::Relaxed));
        match self.phase() {
            Phase::Head => Some(since + settings.header_read_timeout),
            Phase::Busy => None,
            Phase::Idle => Some(since + settings.idle_timeout),
        }
    }
}

/// The client stream, reporting reads to the connection's [`Activity`].
pub(super) struct WatchedIo<S> {
    pub(super) inner: S,
    pub(super) activity: Arc<Activity>,
}

impl<S: Read + Unpin> Read for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        // Ready(Ok) is either bytes or end of stream; at end of stream
        // hyper closes the connection, so both count as activity.
        if let Poll::Ready(Ok(())) = polled {
            self.activity.on_read();
        }
        polled
    }
}

impl<S: Write + Unpin> Write for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}
