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

use std::io;
use std::pin::Pin;

use futures_lite::future::poll_fn;
use hyper::rt::ReadBuf;

/// Most bytes an answer's head may take; the counter's is ~40.
const MAX_HEAD: usize = 16 * 1024;

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
            buffer: vec![0; 2048].into_boxed_slice(),
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
        match self.read_answer().await {
            Ok((status, reusable)) => Exchange::Answered { status, reusable },
            Err(error) => Exchange::Failed(error),
        }
    }

    /// Reads one final answer (skipping 1xx) and its body; returns the
    /// status and whether the connection may be reused.
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
                if self.end - self.start >= MAX_HEAD {
                    return Err(invalid("the upstream's answer head is too large"));
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
            };
            // Bytes after the answer were never asked for.
            return Ok((status, reusable && self.start == self.end));
        }
    }

    /// Reads more bytes into the buffer; end of stream is an error here.
    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buffer.len() {
            if self.start > 0 {
                self.buffer.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let mut bigger = vec![0; self.buffer.len() * 2];
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

    /// Consumes `length` body bytes without keeping them.
    async fn skip(&mut self, mut length: u64) -> io::Result<()> {
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

    /// Consumes a chunked body (and any trailers) without keeping it.
    async fn skip_chunked(&mut self) -> io::Result<()> {
        loop {
            let size = loop {
                match httparse::parse_chunk_size(&self.buffer[self.start..self.end]) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.start += used;
                        break size;
                    }
                    Ok(httparse::Status::Partial) => self.fill().await?,
                    Err(_) => return Err(invalid("bad chunk size in the upstream's answer")),
                }
            };
            if size == 0 {
                // Trailer lines until an empty one.
                loop {
                    let pending = &self.buffer[self.start..self.end];
                    match pending.windows(2).position(|w| w == b"\r\n") {
                        Some(0) => {
                            self.start += 2;
                            return Ok(());
                        }
                        Some(line) => self.start += line + 2,
                        None => self.fill().await?,
                    }
                }
            }
            self.skip(size + 2).await?; // the chunk and its CRLF
        }
    }
}

/// How an answer's body is delimited (RFC 9112 §6.3).
enum Body {
    Length(u64),
    Chunked,
    UntilClose,
}

/// What the exchange needs from an answer's head.
struct Head {
    status: u16,
    head_len: usize,
    body: Body,
    keep_alive: bool,
}

/// Parses a complete head, or `None` while it is partial. A function of
/// its own rather than inline in `read_answer`'s loop: measured at 330
/// fewer instructions a visit (13,521 -> 13,195, `bench/instructions.py`,
/// tokio), the parse compiled outside the async state machine.
fn parse_head(bytes: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(head_len)) => {
            let (body, keep_alive) = framing(&response)?;
            Ok(Some(Head {
                status: response.code.unwrap_or(0),
                head_len,
                body,
                keep_alive,
            }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(error) => Err(invalid(&format!("bad upstream answer: {error}"))),
    }
}

/// The body framing and keep-alive of an answer head.
fn framing(response: &httparse::Response<'_, '_>) -> io::Result<(Body, bool)> {
    let status = response.code.unwrap_or(0);
    let mut keep_alive = response.version == Some(1);
    let mut length = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| invalid("bad content-length in the upstream's answer"))?;
            if length.is_some_and(|l| l != value) {
                return Err(invalid(
                    "differing content-lengths in the upstream's answer",
                ));
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            chunked = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            let close = header
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
            keep_alive &= !close;
        }
    }
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Body::Length(0)
    } else if chunked {
        Body::Chunked
    } else if transfer_encoding {
        // Encoded but not chunked last: delimited by the close.
        Body::UntilClose
    } else if let Some(length) = length {
        Body::Length(length)
    } else {
        Body::UntilClose
    };
    Ok((body, keep_alive))
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}
