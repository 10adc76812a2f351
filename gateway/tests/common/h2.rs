//! HTTP/2 for tests: frames written out byte by byte, as an abusive
//! client sends them, and read back as the server sends them; and hyper's
//! HTTP/2 client, for clients that behave.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What an HTTP/2 client sends first.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_INITIAL_WINDOW_SIZE.
pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;

/// GOAWAY's and RST_STREAM's codes.
pub const NO_ERROR: u32 = 0x0;
pub const CANCEL: u32 = 0x8;

/// One frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap();
    let mut bytes = length.to_be_bytes()[1..].to_vec();
    bytes.extend([kind, flags]);
    bytes.extend(stream.to_be_bytes());
    bytes.extend(payload);
    bytes
}

pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = pairs
        .iter()
        .flat_map(|&(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn ping(payload: u64) -> Vec<u8> {
    frame(PING, 0, 0, &payload.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// An HPACK integer with an `prefix`-bit prefix, its first byte or-ed
/// with `first`.
fn hpack_integer(value: usize, prefix: u8, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header block of literal fields, never indexed and never Huffman
/// coded: what the server decodes is what the test wrote.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        // Literal without indexing, new name.
        block.push(0x00);
        hpack_integer(name.len(), 7, 0, &mut block);
        block.extend(name.as_bytes());
        hpack_integer(value.len(), 7, 0, &mut block);
        block.extend(value.as_bytes());
    }
    block
}

/// The fields of `GET /` on `http://test`, plus `extra`.
pub fn get_fields<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut fields = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "test"),
        (":path", "/"),
    ];
    fields.extend_from_slice(extra);
    fields
}

/// HEADERS for `GET /` on `stream`, complete, ending the stream when
/// `end_stream`.
pub fn get(stream: u32, end_stream: bool) -> Vec<u8> {
    let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
    frame(HEADERS, flags, stream, &header_block(&get_fields(&[])))
}

/// A frame read from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's error code.
    pub fn goaway_code(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8)
            .then(|| u32::from_be_bytes(self.payload[4..8].try_into().unwrap()))
    }

    /// A SETTINGS frame's value for `id`.
    pub fn setting(&self, id: u16) -> Option<u32> {
        (self.kind == SETTINGS && self.flags & ACK == 0)
            .then(|| {
                self.payload.chunks_exact(6).find_map(|pair| {
                    (u16::from_be_bytes([pair[0], pair[1]]) == id)
                        .then(|| u32::from_be_bytes(pair[2..6].try_into().unwrap()))
                })
            })
            .flatten()
    }
}

/// How a connection ended, seen from the client.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum End {
    /// The server closed it (FIN).
    Closed,
    /// The server reset it (RST), or a write found it gone.
    Reset,
    /// Still open when the test stopped waiting.
    Open,
}

/// What the server sent on a connection until it ended.
pub struct Seen {
    pub frames: Vec<Frame>,
    pub end: End,
    /// When the end came, from when reading began.
    pub after: Duration,
}

/// A summary: the frames by type, not each.
impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds = std::collections::BTreeMap::<u8, usize>::new();
        for frame in &self.frames {
            *kinds.entry(frame.kind).or_default() += 1;
        }
        f.debug_struct("Seen")
            .field("end", &self.end)
            .field("after", &self.after)
            .field("goaways", &self.goaways())
            .field("frames_by_type", &kinds)
            .finish()
    }
}

impl Seen {
    /// The GOAWAY codes the server sent.
    pub fn goaways(&self) -> Vec<u32> {
        self.frames.iter().filter_map(Frame::goaway_code).collect()
    }

    /// Whether the server answered `stream` with HEADERS.
    pub fn answered(&self, stream: u32) -> bool {
        self.frames
            .iter()
            .any(|f| f.kind == HEADERS && f.stream == stream)
    }

    /// Whether the connection ended: closed or reset.
    pub fn ended(&self) -> bool {
        self.end != End::Open
    }
}

/// Splits frames off `buffer`.
fn split_frames(buffer: &mut Vec<u8>, frames: &mut Vec<Frame>) {
    while buffer.len() >= 9 {
        let length = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
        if buffer.len() < 9 + length {
            break;
        }
        frames.push(Frame {
            kind: buffer[3],
            flags: buffer[4],
            stream: u32::from_be_bytes(buffer[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload: buffer[9..9 + length].to_vec(),
        });
        buffer.drain(..9 + length);
    }
}

/// Reads frames from `reader` until the connection ends or `limit` passes.
pub async fn read_frames(mut reader: impl tokio::io::AsyncRead + Unpin, limit: Duration) -> Seen {
    let start = Instant::now();
    let mut buffer = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let end = loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, reader.read(&mut chunk)).await {
            Err(_) => break End::Open,
            Ok(Ok(0)) => break End::Closed,
            Ok(Ok(n)) => {
                buffer.extend_from_slice(&chunk[..n]);
                split_frames(&mut buffer, &mut frames);
            }
            Ok(Err(_)) => break End::Reset,
        }
    };
    Seen {
        frames,
        end,
        after: start.elapsed(),
    }
}

/// Opens an HTTP/2 connection with prior knowledge: the preface and
/// `settings` are sent.
pub async fn connect(addr: SocketAddr, settings_sent: &[(u16, u32)]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(settings(settings_sent));
    stream.write_all(&hello).await.unwrap();
    stream
}

/// Sends `bytes` on `stream` while reading what the server sends, until
/// the connection ends or `limit` passes. A write the server cut short
/// is no failure: it is what the test wants to see.
pub async fn send_and_watch(stream: TcpStream, bytes: Vec<u8>, limit: Duration) -> Seen {
    send_paced_and_watch(stream, vec![bytes], Duration::ZERO, limit).await
}

/// As [`send_and_watch`], writing `chunks` one at a time with `pause`
/// between them, so that the server reads each before the next comes.
pub async fn send_paced_and_watch(
    stream: TcpStream,
    chunks: Vec<Vec<u8>>,
    pause: Duration,
    limit: Duration,
) -> Seen {
    let (reader, mut writer) = stream.into_split();
    let reading = tokio::spawn(read_frames(reader, limit));
    let mut write_failed = false;
    for chunk in chunks {
        if writer.write_all(&chunk).await.is_err() {
            write_failed = true;
            break;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    let mut seen = reading.await.unwrap();
    if write_failed && seen.end == End::Open {
        seen.end = End::Reset;
    }
    // Keep the writing half open until reading is over: dropping it
    // would send FIN, and the server would close for that instead.
    drop(writer);
    seen
}

/// hyper's HTTP/2 client on a plain connection (prior knowledge).
pub async fn client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    handshake(hyper_util::rt::TokioIo::new(stream)).await
}

/// hyper's HTTP/2 client over `io`.
pub async fn handshake<I>(io: I) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// `GET /` on an HTTP/2 client: its status and body, or the error.
pub async fn get_over(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
) -> Result<super::Answer, hyper::Error> {
    let request = http::Request::get("http://test/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await?;
    assert_eq!(response.version(), http::Version::HTTP_2);
    super::read_answer(response).await
}
