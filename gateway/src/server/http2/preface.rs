//! Prior knowledge (h2c): on a plain listener, a client that starts with
//! HTTP/2's connection preface speaks HTTP/2; any other first bytes are
//! HTTP/1.1. (The `Upgrade: h2c` path is deprecated by RFC 9113 and not
//! offered.)

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use backends::Runtime;
use bytes::Bytes;
use futures_lite::future::poll_fn;
use hyper::rt::{Read, ReadBuf};

use super::super::connection::{Ended, Watch};
use super::super::phase::{Phase, WatchedIo};
use crate::service::Service;

/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
pub(in crate::server) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a plain connection's first bytes until they are the preface
/// (`true`) or cannot be (`false`), within the header-read timeout. What
/// was read is read again by whichever HTTP serves the connection.
pub(in crate::server) async fn read<R, S, I>(
    watch: &mut Watch<R, S>,
    io: &mut WatchedIo<I>,
) -> Result<bool, Ended>
where
    R: Runtime,
    S: Service,
    I: Read + Unpin,
{
    let mut first = [0u8; PREFACE.len()];
    let mut len = 0;
    let http2 = poll_fn(|cx| poll_first_bytes(watch, io, &mut first, &mut len, cx)).await;
    if len > 0 {
        io.replay(Bytes::copy_from_slice(&first[..len]));
    }
    http2
}

/// Reads into `first` until it is the preface, or differs from it, or the
/// stream ends (HTTP/1.1 then: hyper sees the end).
fn poll_first_bytes<R, S, I>(
    watch: &mut Watch<R, S>,
    io: &mut WatchedIo<I>,
    first: &mut [u8; PREFACE.len()],
    len: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<Result<bool, Ended>>
where
    R: Runtime,
    S: Service,
    I: Read + Unpin,
{
    loop {
        let mut read = ReadBuf::new(&mut first[*len..]);
        match Pin::new(io.inner_mut()).poll_read(cx, read.unfilled()) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                *len += n;
                if n == 0 || first[..*len] != PREFACE[..*len] {
                    return Poll::Ready(Ok(false));
                }
                if *len == PREFACE.len() {
                    return Poll::Ready(Ok(true));
                }
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(Ended::Unreadable(error))),
            Poll::Pending => {
                let deadline = watch.activity.deadline(watch.listening.settings);
                ready!(watch.wait_for(cx, [deadline, None]));
                return Poll::Ready(Err(Ended::TimedOut(Phase::Head)));
            }
        }
    }
}
