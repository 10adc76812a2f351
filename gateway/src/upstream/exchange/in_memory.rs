//! An upstream made of bytes in memory, so that answers are read by the
//! real exchange without a socket or a runtime: the unit tests, and the
//! `response` fuzz target, which runs thousands of answers a second
//! through it (the `exchange` target goes through TCP and a runtime).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use hyper::rt::{Read, ReadBufCursor, Write};

use super::{Connection, Exchange};

/// The upstream's side of a connection, as pieces of bytes: each read
/// returns as much of the next piece as the reader has room for (as a
/// socket returns what one write sent, at most). Writes are taken whole
/// and dropped.
///
/// After the last piece, the upstream either closes the connection
/// (reads find the end of the stream) or holds it open and sends nothing
/// more (a read never completes, and nothing wakes it).
#[derive(Debug)]
pub struct InMemory {
    pieces: VecDeque<Vec<u8>>,
    closes: bool,
    /// Bytes the reads have returned.
    delivered: usize,
}

impl InMemory {
    /// An upstream that answers `pieces`, one read each, then closes the
    /// connection if `closes`, else holds it open. (An empty piece is no
    /// read at all: a socket returns none for an empty write.)
    pub fn new<'a>(pieces: impl IntoIterator<Item = &'a [u8]>, closes: bool) -> Self {
        let mut upstream = Self {
            pieces: VecDeque::new(),
            closes,
            delivered: 0,
        };
        upstream.send(pieces);
        upstream
    }

    /// Queues more pieces behind those not read yet: the answer to a
    /// request sent next, say.
    pub fn send<'a>(&mut self, pieces: impl IntoIterator<Item = &'a [u8]>) {
        let pieces = pieces.into_iter().filter(|p| !p.is_empty());
        self.pieces.extend(pieces.map(<[u8]>::to_vec));
    }
}

impl Read for InMemory {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(piece) = self.pieces.front_mut() else {
            return if self.closes {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        };
        let n = piece.len().min(buf.remaining());
        buf.put_slice(&piece[..n]);
        if n == piece.len() {
            self.pieces.pop_front();
        } else {
            piece.drain(..n);
        }
        self.delivered += n;
        Poll::Ready(Ok(()))
    }
}

impl Write for InMemory {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl backends::Stream for InMemory {
    /// Reusable while open with nothing unread.
    fn is_reusable(&mut self) -> bool {
        self.pieces.is_empty() && !self.closes
    }

    /// Ready while something is left to read; otherwise nothing will come,
    /// and no waker is kept (every poll here is a `noop` one).
    fn poll_readable(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pieces.is_empty() && !self.closes {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

impl Connection<InMemory> {
    /// [`Connection::exchange`], run until it ends, or until it waits for
    /// bytes the upstream holds back: `None` then (a visit's deadline
    /// would end it).
    pub fn exchange_now(&mut self, request: &[u8]) -> Option<Exchange> {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(self.exchange(request)).poll(&mut cx) {
            Poll::Ready(exchange) => Some(exchange),
            Poll::Pending => None,
        }
    }

    /// Bytes of the upstream's answers consumed so far: read, and not
    /// left in the buffer.
    pub fn consumed(&self) -> usize {
        self.stream.delivered - (self.end - self.start)
    }

    /// The upstream, to send more with.
    pub fn upstream(&mut self) -> &mut InMemory {
        &mut self.stream
    }
}
