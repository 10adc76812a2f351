//! What an HTTP/2 client sends, counted frame by frame as it is read, to
//! cut off a client that abuses the protocol before hyper and h2 do its
//! bidding for long.
//!
//! h2 already ends a connection with GOAWAY for CONTINUATION floods, for
//! header lists far over the limit, for floods of empty DATA, and for
//! streams reset before they are accepted; it answers an over-large
//! header list 431. What it does not bound is work that each frame asks
//! for and that costs the client nothing:
//! - **rapid reset**: a stream opened, then RST_STREAM, over and over.
//!   Each stream is accepted and its visit begun before the reset
//!   arrives, so the client makes the gateway start visits it never
//!   waits for;
//! - **floods** of SETTINGS (each acknowledged), PING (each answered),
//!   WINDOW_UPDATE, PRIORITY, and frames of unknown types: work and
//!   writes without a request.
//!
//! [`FrameWatch`] reads the frame headers in the bytes hyper reads, and
//! fails the read once a [`Tally`] finds the client over its allowance:
//! the connection ends there (the abuse is kept in [`Streams`] for the
//! log).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};

use super::preface::PREFACE;
use super::streams::Streams;

/// Frames with no request behind them a connection may send before any
/// request: enough for a client's SETTINGS, its acknowledgements, window
/// updates and pings over a long life.
const CONTROL_FRAMES_ALLOWED: u64 = 1000;

/// More of those frames each request allows: a browser sends a few per
/// request at most (a window update, a priority).
const CONTROL_FRAMES_PER_REQUEST: u64 = 2;

/// Streams a connection may reset before the ratio below is looked at.
const RESETS_ALLOWED: u64 = 100;

/// Why a client was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abuse {
    /// More than [`RESETS_ALLOWED`] streams reset, and more than half of
    /// the streams it opened.
    RapidReset,
    /// More frames that ask for work without a request than its requests
    /// allow.
    ControlFlood,
}

impl std::fmt::Display for Abuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Abuse::RapidReset => "rapid reset: most of its streams reset as soon as opened",
            Abuse::ControlFlood => {
                "flood: SETTINGS, PING, WINDOW_UPDATE or PRIORITY frames far beyond its requests"
            }
        })
    }
}

impl std::error::Error for Abuse {}

/// Frame types (RFC 9113, section 6) the tally tells apart.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const CONTINUATION: u8 = 0x9;

/// What one connection's client has sent.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    /// Streams opened: HEADERS on a stream above every one before (a
    /// trailer's HEADERS, on a stream already open, opens none).
    requests: u64,
    highest_stream: u32,
    resets: u64,
    /// Frames that ask for work and carry no request or body.
    control: u64,
}

impl Tally {
    /// Counts a frame of `kind` on `stream`; an error once the client is
    /// over its allowance. DATA and CONTINUATION carry a body or a header
    /// block, which h2 bounds.
    pub(super) fn count(&mut self, kind: u8, stream: u32) -> Result<(), Abuse> {
        match kind {
            HEADERS if stream > self.highest_stream => {
                self.highest_stream = stream;
                self.requests += 1;
            }
            HEADERS | DATA | CONTINUATION => {}
            RST_STREAM => self.resets += 1,
            _ => self.control += 1,
        }
        if self.resets > RESETS_ALLOWED && self.resets * 2 > self.requests {
            return Err(Abuse::RapidReset);
        }
        if self.control > CONTROL_FRAMES_ALLOWED + CONTROL_FRAMES_PER_REQUEST * self.requests {
            return Err(Abuse::ControlFlood);
        }
        Ok(())
    }
}

/// Where the reader is in the client's bytes.
#[derive(Debug)]
struct Scan {
    /// Bytes of the connection preface not yet passed.
    preface_left: usize,
    /// The frame header being read, and how much of it is in.
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame not yet passed.
    skip: usize,
    tally: Tally,
}

impl Scan {
    fn new() -> Self {
        Self {
            preface_left: PREFACE.len(),
            head: [0; 9],
            head_len: 0,
            skip: 0,
            tally: Tally::default(),
        }
    }

    /// Passes over `bytes`, the next the client sent, counting each frame
    /// whose header is complete.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Abuse> {
        let preface = self.preface_left.min(bytes.len());
        self.preface_left -= preface;
        bytes = &bytes[preface..];
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (self.head.len() - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len == self.head.len() {
                self.head_len = 0;
                let [l0, l1, l2, kind, _flags, s0, s1, s2, s3] = self.head;
                self.skip = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                let stream = u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]);
                self.tally.count(kind, stream)?;
            }
        }
        Ok(())
    }
}

/// An HTTP/2 connection's stream, counting the client's frames as hyper
/// reads them (see the module's doc).
pub(super) struct FrameWatch<I> {
    inner: I,
    scan: Scan,
    streams: Arc<Streams>,
}

impl<I> FrameWatch<I> {
    pub(super) fn new(inner: I, streams: Arc<Streams>) -> Self {
        Self {
            inner,
            scan: Scan::new(),
            streams,
        }
    }
}

/// How much one read takes: h2 reads into a buffer of this size or less.
const READ_CHUNK: usize = 8192;

impl<I: Read + Unpin> Read for FrameWatch<I> {
    /// Reads through a buffer of its own: hyper's cursor does not show
    /// what an inner read put into it.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let mut local = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let room = buf.remaining().min(READ_CHUNK);
        let mut read = ReadBuf::uninit(&mut local[..room]);
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, read.unfilled());
        if let Poll::Ready(Ok(())) = polled {
            if let Err(abuse) = this.scan.feed(read.filled()) {
                this.streams.cut(abuse);
                return Poll::Ready(Err(io::Error::other(abuse)));
            }
            buf.put_slice(read.filled());
        }
        polled
    }
}

impl<I: Write + Unpin> Write for FrameWatch<I> {
    backends::pass_through!(
        self.inner => poll_write, is_write_vectored, poll_write_vectored, poll_flush, poll_shutdown
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header: `kind`, `flags`, `stream`, and a payload of
    /// `length` zero bytes.
    fn frame(kind: u8, flags: u8, stream: u32, length: u32) -> Vec<u8> {
        let mut bytes = length.to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream.to_be_bytes());
        bytes.extend(std::iter::repeat_n(0, length as usize));
        bytes
    }

    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const WINDOW_UPDATE: u8 = 0x8;
    const PRIORITY: u8 = 0x2;

    #[test]
    fn the_preface_and_frames_split_anywhere_are_counted_once() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, 6));
        bytes.extend(frame(HEADERS, 0x4, 1, 20));
        bytes.extend(frame(DATA, 0x1, 1, 3));
        bytes.extend(frame(HEADERS, 0x4, 3, 20));
        for split in 0..bytes.len() {
            let mut scan = Scan::new();
            scan.feed(&bytes[..split]).unwrap();
            scan.feed(&bytes[split..]).unwrap();
            assert_eq!(scan.tally.requests, 2, "split at {split}");
            assert_eq!(scan.tally.highest_stream, 3, "split at {split}");
            assert_eq!(scan.tally.control, 1, "split at {split}");
            assert_eq!((scan.head_len, scan.skip), (0, 0));
        }
    }

    #[test]
    fn streams_reset_as_soon_as_opened_are_cut_off_past_the_allowance() {
        let mut tally = Tally::default();
        let pairs = (0..)
            .find(|i| {
                let stream = 2 * i + 1;
                tally.count(HEADERS, stream).is_err() || tally.count(RST_STREAM, stream).is_err()
            })
            .unwrap();
        assert_eq!(u64::from(pairs), RESETS_ALLOWED);
        assert_eq!(
            tally.count(RST_STREAM, 1),
            Err(Abuse::RapidReset),
            "stays cut"
        );
    }

    /// A trailer's HEADERS is no new stream: sending one before each reset
    /// does not double the streams the resets are weighed against.
    #[test]
    fn trailers_do_not_hide_a_rapid_reset() {
        let mut tally = Tally::default();
        let streams = (0..)
            .find(|i| {
                let stream = 2 * i + 1;
                tally.count(HEADERS, stream).is_err()
                    || tally.count(HEADERS, stream).is_err()
                    || tally.count(RST_STREAM, stream).is_err()
            })
            .unwrap();
        assert_eq!(u64::from(streams), RESETS_ALLOWED);
    }

    #[test]
    fn a_client_resetting_a_few_of_many_streams_is_served() {
        let mut tally = Tally::default();
        for request in 0..10_000 {
            let stream = 2 * request + 1;
            tally.count(HEADERS, stream).unwrap();
            if request % 3 == 0 {
                tally.count(RST_STREAM, stream).unwrap();
            }
        }
    }

    #[test]
    fn control_frames_beyond_the_requests_allowance_are_a_flood() {
        for kind in [SETTINGS, PING, WINDOW_UPDATE, PRIORITY, 0xfa] {
            let mut tally = Tally::default();
            let allowed = (0..).find(|_| tally.count(kind, 0).is_err()).unwrap();
            assert_eq!(allowed, CONTROL_FRAMES_ALLOWED, "kind {kind}");
        }
        // Requests with bodies, trailers and a window update each are no
        // flood; DATA and CONTINUATION are h2's to bound.
        let mut tally = Tally::default();
        for request in 0..10_000 {
            let stream = 2 * request + 1;
            tally.count(HEADERS, stream).unwrap();
            tally.count(CONTINUATION, stream).unwrap();
            tally.count(DATA, stream).unwrap();
            tally.count(HEADERS, stream).unwrap();
            tally.count(WINDOW_UPDATE, stream).unwrap();
        }
    }
}
