//! The two adapters between hyper's IO traits, which the backends' streams
//! and the gateway's HTTP code speak, and futures-io's, which
//! futures-rustls speaks: a backend's stream goes into rustls as
//! [`FuturesIo`], and the TLS stream comes back out as [`HyperIo`]. They
//! are what lets TLS be written once for both runtimes.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_lite::io::{AsyncRead, AsyncWrite};
use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};

/// The first byte of every TLS record that starts a handshake.
const HANDSHAKE_RECORD: u8 = 0x16;

/// A TLS record's header: type, version, length.
const RECORD_HEADER: usize = 5;

/// A stream in hyper's IO vocabulary, seen through futures-io's.
pub struct FuturesIo<S> {
    inner: S,
    /// For a server: whether the first byte read is still to be checked
    /// to be a handshake record's.
    check_first_byte: bool,
    /// The first byte was not a handshake record's: a client speaking
    /// something other than TLS (plain HTTP, most likely).
    not_tls: bool,
    /// Whether any byte has been read.
    read_any: bool,
    /// For a client: where the bytes read so far end in the server's
    /// records, for [`FuturesIo::at_record_boundary`] (a server never
    /// asks, and does not track them).
    records: Option<RecordBoundary>,
}

/// Where a stream of TLS records has got to: within a header (how much
/// of it, and the length bytes seen), or within a record's body.
#[derive(Debug, Default)]
struct RecordBoundary {
    header_seen: usize,
    length: [u8; 2],
    body_left: usize,
}

impl RecordBoundary {
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let taken = self.body_left.min(bytes.len());
                self.body_left -= taken;
                bytes = &bytes[taken..];
                continue;
            }
            // The length is the header's last two bytes.
            if self.header_seen >= RECORD_HEADER - 2 {
                self.length[self.header_seen - (RECORD_HEADER - 2)] = bytes[0];
            }
            self.header_seen += 1;
            bytes = &bytes[1..];
            if self.header_seen == RECORD_HEADER {
                self.header_seen = 0;
                self.body_left = usize::from(u16::from_be_bytes(self.length));
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_seen == 0 && self.body_left == 0
    }
}

impl<S> FuturesIo<S> {
    /// A client's stream: everything read goes to rustls.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            check_first_byte: false,
            not_tls: false,
            read_any: false,
            records: Some(RecordBoundary::default()),
        }
    }

    /// A server's stream: a first byte that cannot start a TLS handshake
    /// fails the read, before rustls sees it (so it answers no alert) and
    /// [`FuturesIo::not_tls`] tells the server why.
    pub fn expecting_tls(inner: S) -> Self {
        Self {
            check_first_byte: true,
            records: None,
            ..Self::new(inner)
        }
    }

    pub fn not_tls(&self) -> bool {
        self.not_tls
    }

    /// Whether the peer has sent anything at all.
    pub fn read_any(&self) -> bool {
        self.read_any
    }

    /// Whether everything read so far ends at the end of a TLS record: if
    /// not, rustls holds the start of a record it cannot decrypt yet, which
    /// neither it nor the socket shows as unread data.
    pub fn at_record_boundary(&self) -> bool {
        self.records
            .as_ref()
            .is_none_or(RecordBoundary::at_boundary)
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Read + Unpin> AsyncRead for FuturesIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::new(buf);
        ready!(Pin::new(&mut self.inner).poll_read(cx, read.unfilled()))?;
        let filled = read.filled();
        let this = &mut *self;
        this.read_any |= !filled.is_empty();
        if let Some(records) = &mut this.records {
            records.advance(filled);
        }
        if self.check_first_byte {
            if let Some(&first) = filled.first() {
                self.check_first_byte = false;
                if first != HANDSHAKE_RECORD {
                    self.not_tls = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the client does not speak TLS",
                    )));
                }
            }
        }
        Poll::Ready(Ok(filled.len()))
    }
}

impl<S: Write + Unpin> AsyncWrite for FuturesIo<S> {
    backends::pass_through!(
        self.inner => poll_write, poll_write_vectored, poll_flush, poll_close = poll_shutdown
    );
}

thread_local! {
    /// Where decrypted bytes pass on their way into hyper's buffer: hyper
    /// hands out its buffer as possibly uninitialised memory, which safe
    /// code can only fill by copying into it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; 16 * 1024].into_boxed_slice());
}

/// A futures-io stream (a TLS stream) in hyper's IO vocabulary.
pub struct HyperIo<T> {
    inner: T,
}

impl<T> HyperIo<T> {
    pub fn new(inner: T) -> Self {
        Self { inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead + Unpin> Read for HyperIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let read = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let len = buf.remaining().min(scratch.len());
            let read = ready!(Pin::new(&mut self.inner).poll_read(cx, &mut scratch[..len]));
            Poll::Ready(read.map(|n| buf.put_slice(&scratch[..n])))
        });
        match ready!(read) {
            // A peer that closes the connection without TLS's close_notify
            // has ended the stream as a plain TCP peer does with its FIN:
            // browsers do so with idle keep-alive connections, and every
            // message the gateway reads is framed by HTTP, which catches
            // a truncated one.
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

/// Shutting down sends TLS's close_notify, then shuts the stream's
/// sending side.
impl<T: AsyncWrite + Unpin> Write for HyperIo<T> {
    backends::pass_through!(
        self.inner => poll_write, poll_write_vectored, poll_flush, poll_shutdown = poll_close
    );
}

#[cfg(test)]
mod tests {
    use super::RecordBoundary;

    #[test]
    fn record_boundaries_are_followed_across_any_split() {
        // Two records, bodies of 3 and 0 bytes, then half a header.
        let stream = [22, 3, 3, 0, 3, 1, 2, 3, 23, 3, 3, 0, 0, 23, 3];
        let boundaries = [8, 13];
        for split in 0..=stream.len() {
            for second in split..=stream.len() {
                let mut records = RecordBoundary::default();
                records.advance(&stream[..split]);
                assert_eq!(
                    records.at_boundary(),
                    split == 0 || boundaries.contains(&split),
                    "after {split} bytes"
                );
                records.advance(&stream[split..second]);
                assert_eq!(
                    records.at_boundary(),
                    second == 0 || boundaries.contains(&second),
                    "after {split} then {second} bytes"
                );
            }
        }
        // A record of 0x0102 bytes: the length is big-endian.
        let mut records = RecordBoundary::default();
        records.advance(&[23, 3, 3, 1, 2]);
        records.advance(&[0; 0x0102 - 1]);
        assert!(!records.at_boundary());
        records.advance(&[0]);
        assert!(records.at_boundary());
    }
}
