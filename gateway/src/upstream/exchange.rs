//! One HTTP/1.1 exchange on a kept-alive upstream connection, written over
//! hyper's runtime-neutral IO traits: the request goes out as fixed bytes
//! in one write, the answer's head is parsed with `httparse`, and its body
//! is skipped to the end (by `content-length` or chunk by chunk) so the
//! connection can carry the next visit.
//!
//! This replaces hyper's client for the upstream because a visit needs
//! very little of it — one request shape, one status — and hyper's client
//! runs each connection as a separate task fed through channels, which
//! cost more than the whole exchange here (profiled with callgrind).
//! What it must keep is the never-send-twice rule: [`Exchange::Unsent`]
//! is only returned when no byte of the request can have left.
//!
//! Where an answer's parts begin and end is `framing`'s to say; this
//! module does the reads. [`InMemory`] lets the same reads run on bytes
//! in memory, for tests and the fuzzer.

use std::io;
use std::pin::Pin;

use futures_lite::future::poll_fn;
use hyper::rt::ReadBuf;

pub use self::in_memory::InMemory;
pub use super::framing::MAX_HEAD;
use super::framing::{Body, Head, chunk_size, invalid, parse_head, trailer_section};

mod in_memory;

/// Most bytes an answer's body may take, chunk framing and trailers
/// included; the counter's body is empty or a few digits. A longer one is
/// not skipped (it would hold the connection for nothing): the exchange
/// fails and the connection is closed.
pub const MAX_BODY: u64 = 1024 * 1024;

/// A connection's first read buffer: room for a usual answer head (the
/// counter's is about 100 bytes; a web server's, with its date, server and
/// content type, a few hundred). A longer head grows the buffer, once for
/// the connection's life, up to [`MAX_HEAD`]. Kept small because the pool
/// keeps up to `upstream.max_connections` of them while idle.
const FIRST_BUFFER: usize = 512;

/// An upstream connection and its read buffer.
pub struct Connection<S> {
    stream: S,
    /// Bytes read and not yet consumed are `buffer[start..end]`.
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

/// How an exchange ended.
#[derive(Debug)]
pub enum Exchange {
    /// A complete answer; `reusable` when the connection can carry another.
    Answered { status: u16, reusable: bool },
    /// Nothing of the request left: it may be sent elsewhere.
    Unsent(io::Error),
    /// The request may have reached the upstream, the answer did not come
    /// back whole: the outcome is lost.
    Failed(io::Error),
}

impl<S: backends::Stream> Connection<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buffer: vec![0; FIRST_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Whether an idle connection can still be used: nothing is left
    /// unread, and the upstream has not closed it or sent anything unasked.
    /// Never waits.
    pub fn is_usable(&mut self) -> bool {
        self.start == self.end && self.stream.is_reusable()
    }

    /// The connection goes back to the pool; see [`backends::Stream::watch_while_idle`].
    pub fn watch_while_idle(&mut self) {
        self.stream.watch_while_idle();
    }

    /// Sends `request` (one complete message) and reads the answer.
    pub async fn exchange(&mut self, request: &[u8]) -> Exchange {
        let mut written = 0;
        while written < request.len() {
            match poll_fn(|cx| Pin::new(&mut self.stream).poll_write(cx, &request[written..])).await
            {
                Ok(0) => {
                    let error = io::ErrorKind::WriteZero.into();
                    return if written == 0 {
                        Exchange::Unsent(error)
                    } else {
                        Exchange::Failed(error)
                    };
                }
                Ok(n) => written += n,
                Err(error) if written == 0 => return Exchange::Unsent(error),
                Err(error) => return Exchange::Failed(error),
            }
        }
        // A TLS stream may hold the last record back until flushed (a
        // plain one has nothing to flush). Some of the request is out.
        if let Err(error) = poll_fn(|cx| Pin::new(&mut self.stream).poll_flush(cx)).await {
            return Exchange::Failed(error);
        }
        match self.read_answer().await {
            Ok((status, reusable)) => Exchange::Answered { status, reusable },
            Err(error) => Exchange::Failed(error),
        }
    }

    /// Reads one final answer (skipping 1xx) and its body; returns the
    /// status and whether the connection may be reused.
    ///
    /// Reusable only after a complete, well-framed final answer with nothing
    /// after it: a connection whose framing is in any doubt would have the
    /// next visit's answer read out of this one's leftovers, or this one's
    /// out of the next (a 200 for a visit that was never counted).
    async fn read_answer(&mut self) -> io::Result<(u16, bool)> {
        loop {
            let Head {
                status,
                head_len,
                body,
                keep_alive,
            } = loop {
                if let Some(head) = parse_head(&self.buffer[self.start..self.end])? {
                    break head;
                }
                self.fill().await?;
            };
            self.start += head_len;
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let reusable = match body {
                Body::Length(length) => {
                    self.skip(length).await?;
                    keep_alive
                }
                Body::Chunked => {
                    self.skip_chunked().await?;
                    keep_alive
                }
                // Delimited by the end of the connection: the status is
                // all we need, and the connection cannot be reused.
                Body::UntilClose => false,
                // 101: what follows is another protocol.
                Body::Switched => false,
            };
            // Bytes after the answer were never asked for.
            return Ok((status, reusable && self.start == self.end));
        }
    }

    /// Reads more bytes into the buffer; end of stream is an error here, and
    /// so is a buffer full of unconsumed bytes at [`MAX_HEAD`] (a head, a
    /// chunk-size line or a trailer section that long).
    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buffer.len() {
            if self.start > 0 {
                self.buffer.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buffer.len() >= MAX_HEAD {
                return Err(invalid(
                    "the upstream's answer head, a chunk-size line or its trailers are too large",
                ));
            } else {
                let mut bigger = vec![0; (self.buffer.len() * 2).min(MAX_HEAD)];
                bigger[..self.end].copy_from_slice(&self.buffer[..self.end]);
                self.buffer = bigger.into_boxed_slice();
            }
        }
        let mut buf = ReadBuf::new(&mut self.buffer[self.end..]);
        poll_fn(|cx| Pin::new(&mut self.stream).poll_read(cx, buf.unfilled())).await?;
        let n = buf.filled().len();
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// Consumes `length` body bytes without keeping them; more than
    /// [`MAX_BODY`] is refused before any is read.
    async fn skip(&mut self, mut length: u64) -> io::Result<()> {
        if length > MAX_BODY {
            return Err(invalid("the upstream's answer body is too large"));
        }
        loop {
            let available = (self.end - self.start) as u64;
            if available >= length {
                self.start += length as usize;
                return Ok(());
            }
            length -= available;
            self.start = self.end;
            self.fill().await?;
        }
    }

    /// Reads one line ending in CRLF and consumes it; returns where it lies
    /// in the buffer, CRLF included (valid until the next read). A bare CR
    /// or LF, or any other control byte but tab, is an error: framing that
    /// two parsers could split differently.
    async fn line(&mut self) -> io::Result<std::ops::Range<usize>> {
        loop {
            let pending = &self.buffer[self.start..self.end];
            if let Some(at) = pending.iter().position(|&b| b == b'\n') {
                let Some((&b'\r', text)) = pending[..at].split_last() else {
                    return Err(invalid("a bare LF in the upstream's chunked body"));
                };
                if text.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
                    return Err(invalid("a control byte in the upstream's chunked body"));
                }
                let line = self.start..self.start + at + 1;
                self.start = line.end;
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    /// Consumes a chunked body (and any trailers) without keeping it: the
    /// whole of it, framing included, at most [`MAX_BODY`] bytes.
    async fn skip_chunked(&mut self) -> io::Result<()> {
        let mut budget = MAX_BODY;
        let mut spend = |bytes: u64| {
            budget = budget
                .checked_sub(bytes)
                .ok_or_else(|| invalid("the upstream's chunked answer body is too large"))?;
            Ok::<_, io::Error>(())
        };
        loop {
            let line = self.line().await?;
            spend(line.len() as u64)?;
            let size = chunk_size(&self.buffer[line])?;
            if size == 0 {
                let trailers = self.trailers().await?;
                return spend(trailers as u64);
            }
            // `size` is below MAX_BODY here, so `size + 2` cannot wrap.
            spend(size)?;
            spend(2)?;
            self.skip(size).await?;
            if self.line().await?.len() != 2 {
                return Err(invalid(
                    "a chunk longer than its size in the upstream's answer",
                ));
            }
        }
    }

    /// Consumes the trailer section after the last chunk: header field
    /// lines, as httparse reads a head's, up to an empty line; returns its
    /// length. Anything else in it is an error, not skipped: a reader that
    /// only looked for the empty line would take malformed bytes as
    /// trailers that another reader would not.
    async fn trailers(&mut self) -> io::Result<usize> {
        loop {
            if let Some(len) = trailer_section(&self.buffer[self.start..self.end])? {
                self.start += len;
                return Ok(len);
            }
            self.fill().await?;
        }
    }
}

#[cfg(test)]
mod tests;
