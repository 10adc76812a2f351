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

pub use super::framing::MAX_HEAD;
use super::framing::{Body, Head, chunk_size, invalid, parse_head, trailer_section};

/// Most bytes an answer's body may take, chunk framing and trailers
/// included; the counter's body is empty or a few digits. A longer one is
/// not skipped (it would hold the connection for nothing): the exchange
/// fails and the connection is closed.
pub const MAX_BODY: u64 = 1024 * 1024;

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
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use backends::{Runtime, Threading};

    use super::{Connection, Exchange, MAX_BODY, MAX_HEAD};
    use crate::config::Backend;
    use crate::daemon::{OnRuntime, on_backend};
    use crate::time::timeout_at;

    /// What an exchange should end in: `Some((status, reusable))` for an
    /// answer, `None` for a failure.
    type Expected = Option<(u16, bool)>;

    /// Answers the upstream may send, and what each must give.
    fn cases() -> Vec<(&'static str, Vec<u8>, Expected)> {
        let ok = |extra: &str| format!("HTTP/1.1 200 OK\r\n{extra}\r\n").into_bytes();
        let forty_headers: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
        let many_headers: String = (0..2000).map(|i| format!("x{i}:\r\n")).collect();
        let huge_head = format!("x-big: {}\r\n", "a".repeat(MAX_HEAD));
        vec![
            ("plain", ok("content-length: 0\r\n"), Some((200, true))),
            (
                "with a body",
                [ok("content-length: 3\r\n"), b"abc".to_vec()].concat(),
                Some((200, true)),
            ),
            (
                "chunked with trailers",
                [
                    ok("transfer-encoding: chunked\r\n"),
                    b"3;ext=1\r\nabc\r\n0\r\nx-t: 1\r\n\r\n".to_vec(),
                ]
                .concat(),
                Some((200, true)),
            ),
            (
                "chunk size that wraps",
                [
                    ok("transfer-encoding: chunked\r\n"),
                    b"fffffffffffffffe\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
                None,
            ),
            (
                "chunk larger than the body limit",
                [
                    ok("transfer-encoding: chunked\r\n"),
                    format!("{:x}\r\n", MAX_BODY).into_bytes(),
                ]
                .concat(),
                None,
            ),
            (
                "chunk longer than its size",
                [
                    ok("transfer-encoding: chunked\r\n"),
                    b"1\r\nabc\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
                None,
            ),
            (
                "chunk-size line without digits",
                [ok("transfer-encoding: chunked\r\n"), b"\r\n\r\n".to_vec()].concat(),
                None,
            ),
            (
                "bare LF in a chunk extension",
                [
                    ok("transfer-encoding: chunked\r\n"),
                    b"0;a\nb\r\n\r\n".to_vec(),
                ]
                .concat(),
                None,
            ),
            (
                "101 to a POST",
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\n"
                    .to_vec(),
                Some((101, false)),
            ),
            (
                "100 then 200",
                [
                    b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
                    ok("content-length: 0\r\n"),
                ]
                .concat(),
                Some((200, true)),
            ),
            (
                "40 headers",
                ok(&format!("{forty_headers}content-length: 0\r\n")),
                Some((200, true)),
            ),
            (
                "2,000 headers",
                ok(&format!("{many_headers}content-length: 0\r\n")),
                Some((200, true)),
            ),
            ("head over the limit", ok(&huge_head), None),
            (
                "content-length with a sign",
                ok("content-length: +0\r\n"),
                None,
            ),
            (
                "content-length past u64",
                ok("content-length: 18446744073709551616\r\n"),
                None,
            ),
            (
                "content-length over the body limit",
                ok(&format!("content-length: {}\r\n", MAX_BODY + 1)),
                None,
            ),
            (
                "differing content-lengths",
                ok("content-length: 0\r\ncontent-length: 1\r\n"),
                None,
            ),
            (
                "transfer-encoding and content-length",
                [
                    ok("transfer-encoding: chunked\r\ncontent-length: 5\r\n"),
                    b"0\r\n\r\n".to_vec(),
                ]
                .concat(),
                None,
            ),
            (
                "chunked twice",
                [
                    ok("transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n"),
                    b"0\r\n\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
                None,
            ),
            (
                "chunked, then another coding",
                ok("transfer-encoding: chunked, gzip\r\n"),
                None,
            ),
            (
                "another coding, then chunked",
                [
                    ok("transfer-encoding: gzip, chunked\r\n"),
                    b"0\r\n\r\n".to_vec(),
                ]
                .concat(),
                Some((200, true)),
            ),
            (
                "a coding but not chunked",
                ok("transfer-encoding: gzip\r\n"),
                Some((200, false)),
            ),
            ("no length: to the close", ok(""), Some((200, false))),
            (
                "connection: close",
                ok("content-length: 0\r\nconnection: close\r\n"),
                Some((200, false)),
            ),
            (
                "HTTP/1.0",
                b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
                Some((200, false)),
            ),
            (
                "204 announcing a body",
                b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n".to_vec(),
                Some((204, false)),
            ),
            (
                "204",
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                Some((204, true)),
            ),
            (
                "bytes after the answer",
                [ok("content-length: 0\r\n"), b"HTTP/1.1 200 OK\r\n".to_vec()].concat(),
                Some((200, false)),
            ),
            (
                "chunk-size line over the head limit",
                [ok("transfer-encoding: chunked\r\n"), format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_HEAD)).into_bytes()].concat(),
                None,
            ),
            (
                "trailers over the head limit",
                [ok("transfer-encoding: chunked\r\n"), format!("0\r\nx-t: {}\r\n\r\n", "t".repeat(MAX_HEAD)).into_bytes()].concat(),
                None,
            ),
            (
                "a trailer line ending in a bare LF",
                [ok("transfer-encoding: chunked\r\n"), b"0\r\nx-t: 1\n\r\n".to_vec()].concat(),
                None,
            ),
            (
                "a trailer that is not a header line",
                [ok("transfer-encoding: chunked\r\n"), b"0\r\nhell/\r\n10\r\n\r\n".to_vec()].concat(),
                None,
            ),
            (
                "control byte in a chunk extension",
                [ok("transfer-encoding: chunked\r\n"), b"0;a\x01b\r\n\r\n".to_vec()].concat(),
                None,
            ),
            (
                "chunks adding up past the body limit",
                [
                    ok("transfer-encoding: chunked\r\n"),
                    format!("10000\r\n{}\r\n", "b".repeat(0x10000)).repeat(17).into_bytes(),
                    b"0\r\n\r\n".to_vec(),
                ]
                .concat(),
                None,
            ),
            ("content-length as a list", ok("content-length: 1,1\r\n"), None),
            ("an empty transfer-encoding", ok("transfer-encoding: ,\r\ncontent-length: 0\r\n"), None),
            ("304 with a transfer coding", b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(), Some((304, false))),
            (
                "102 and 103 before the answer",
                [
                    b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n".to_vec(),
                    ok("content-length: 0\r\n"),
                ]
                .concat(),
                Some((200, true)),
            ),
            (
                "status 099",
                b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
                None,
            ),
            (
                "status 600",
                b"HTTP/1.1 600 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
                None,
            ),
            ("not HTTP", b"\x00\x01garbage\r\n\r\n".to_vec(), None),
        ]
    }

    /// Sends one request over a real TCP connection to a thread that
    /// answers `answer` and holds the connection open; returns the outcome.
    /// `split`: the answer goes out in up to 64 writes a little apart, so
    /// that lines and heads begin and end in different reads.
    async fn exchange_with<R: Runtime>(answer: Vec<u8>, split: bool) -> Expected {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = socket.read(&mut buf).unwrap();
                assert!(n > 0, "the request was cut short");
                request.extend_from_slice(&buf[..n]);
            }
            let piece = if split {
                answer.len().div_ceil(64).max(1)
            } else {
                answer.len().max(1)
            };
            let _ = socket.set_nodelay(true);
            for bytes in answer.chunks(piece) {
                let _ = socket.write_all(bytes);
                if split {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            // Held open until the exchange is over (or has given up).
            let _ = socket.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = socket.read(&mut buf);
        });
        let mut connection = Connection::new(R::connect(addr).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        let request = b"POST /counter HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n";
        let outcome = timeout_at::<R, _>(deadline, connection.exchange(request))
            .await
            .expect("the exchange ended within 5 s");
        drop(connection);
        upstream.join().unwrap();
        match outcome {
            Exchange::Answered { status, reusable } => Some((status, reusable)),
            Exchange::Failed(_) => None,
            Exchange::Unsent(error) => panic!("the request was not sent: {error}"),
        }
    }

    struct HostileAnswers;

    impl OnRuntime for HostileAnswers {
        type Output = ();
        fn run<R: Runtime>(self) {
            let failures = R::block_on(1, Threading::Shared, async {
                let mut failures = Vec::new();
                for (name, answer, expected) in cases() {
                    let got = exchange_with::<R>(answer.clone(), false).await;
                    if got != expected {
                        failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
                    }
                    // Bytes after the answer may come in a read of their
                    // own there, after it was parsed: the pool's check
                    // before reuse is what sees them then.
                    if name == "bytes after the answer" {
                        continue;
                    }
                    let got = exchange_with::<R>(answer, true).await;
                    if got != expected {
                        failures.push(format!("{name}, split: expected {expected:?}, got {got:?}"));
                    }
                }
                failures
            })
            .unwrap();
            assert!(failures.is_empty(), "{}: {failures:#?}", R::NAME);
        }
    }

    #[test]
    fn every_answer_is_framed_exactly_or_the_connection_is_not_reused() {
        for backend in [Backend::Tokio, Backend::Smol] {
            on_backend(backend, HostileAnswers);
        }
    }
}
