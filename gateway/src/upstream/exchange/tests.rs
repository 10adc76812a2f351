//! Every framing rule and every malformed answer the exchange must refuse,
//! as one table, read two ways: in memory, delivered whole and cut every
//! which way, with the exact outcome and error; and over real TCP on both
//! backends.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use backends::{Backend, Named, OnRuntime, Runtime, Threading};

use super::{Connection, Exchange, InMemory, MAX_BODY, MAX_HEAD};
use crate::time::timeout_at;

const REQUEST: &[u8] = b"POST /counter HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n";

/// What reading an answer must come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Answered with this status; `reused` when the connection goes back
    /// to the pool (the exchange calls it reusable, and the pool's check
    /// before reuse agrees).
    Answered { status: u16, reused: bool },
    /// Failed, with an error that says this.
    Fails(&'static str),
    /// Still waiting for the rest when the upstream sends no more: the
    /// visit's deadline ends it.
    Waits,
}

fn reused(status: u16) -> Want {
    Want::Answered {
        status,
        reused: true,
    }
}

fn closed(status: u16) -> Want {
    Want::Answered {
        status,
        reused: false,
    }
}

/// One answer from the upstream, and what it must come to.
struct Case {
    name: &'static str,
    answer: Vec<u8>,
    /// The upstream closes the connection after the answer; otherwise it
    /// holds it open and sends nothing more.
    closes: bool,
    want: Want,
}

fn case(name: &'static str, answer: impl Into<Vec<u8>>, want: Want) -> Case {
    Case {
        name,
        answer: answer.into(),
        closes: false,
        want,
    }
}

impl Case {
    fn then_closes(self) -> Self {
        Self {
            closes: true,
            ..self
        }
    }
}

/// `HTTP/1.1 200 OK`, the header lines `headers`, the empty line, `body`.
fn ok(headers: &str, body: &[u8]) -> Vec<u8> {
    [format!("HTTP/1.1 200 OK\r\n{headers}\r\n").as_bytes(), body].concat()
}

fn chunked(body: &[u8]) -> Vec<u8> {
    ok("transfer-encoding: chunked\r\n", body)
}

/// The error a head, a chunk-size line or trailers at the size limit get
/// when the reads fill the buffer with them.
const LINE_TOO_LARGE: &str = "a chunk-size line or its trailers are too large";

/// Every answer the table checks, by how it is framed.
fn cases() -> Vec<Case> {
    [
        framed_by_content_length(),
        chunked_answers(),
        delimited_by_the_close(),
        interim_and_bodiless(),
        heads_at_and_over_the_limits(),
        lengths_read_two_ways(),
        chunks_that_do_not_add_up(),
        cut_short(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Framed by content-length.
fn framed_by_content_length() -> Vec<Case> {
    vec![
        case("plain", ok("content-length: 0\r\n", b""), reused(200)),
        case(
            "with a body",
            ok("content-length: 3\r\n", b"abc"),
            reused(200),
        ),
        case(
            "the same content-length twice",
            ok("content-length: 3\r\ncontent-length: 3\r\n", b"abc"),
            reused(200),
        ),
        case(
            "header names in any case, values padded",
            ok("Content-Length:  3 \r\nCONNECTION: Keep-Alive\r\n", b"abc"),
            reused(200),
        ),
        case(
            "a non-2xx answer is framed like any other",
            b"HTTP/1.1 500 Oops\r\ncontent-length: 4\r\n\r\noops".to_vec(),
            reused(500),
        ),
        case(
            "a body as long as the limit",
            ok(
                &format!("content-length: {MAX_BODY}\r\n"),
                &vec![b'b'; MAX_BODY as usize],
            ),
            reused(200),
        ),
    ]
}

/// Chunked.
fn chunked_answers() -> Vec<Case> {
    let many_trailers: String = (0..100).map(|i| format!("x-t{i}: v\r\n")).collect();
    vec![
        case(
            "chunked with an extension and trailers",
            chunked(b"3;ext=1\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"),
            reused(200),
        ),
        case(
            "chunked, several chunks, sizes in either case",
            chunked(b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n"),
            reused(200),
        ),
        case(
            "chunked, whitespace before an extension",
            chunked(b"1 ;a=b\r\nx\r\n0\r\n\r\n"),
            reused(200),
        ),
        case(
            "chunked, more trailers than the usual header room",
            chunked(format!("0\r\n{many_trailers}\r\n").as_bytes()),
            reused(200),
        ),
        case(
            "another coding, then chunked",
            ok("transfer-encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
            reused(200),
        ),
        case(
            "codings over two headers, chunked last",
            ok(
                "transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
                b"0\r\n\r\n",
            ),
            reused(200),
        ),
    ]
}

/// Delimited by the close, or not reusable for another reason.
fn delimited_by_the_close() -> Vec<Case> {
    vec![
        case("no length: to the close", ok("", b""), closed(200)),
        case(
            "no length: the body is not waited for",
            ok("", b"whatever comes"),
            closed(200),
        ),
        case(
            "a coding but not chunked",
            ok("transfer-encoding: gzip\r\n", b""),
            closed(200),
        ),
        case(
            "connection: close",
            ok("content-length: 0\r\nconnection: close\r\n", b""),
            closed(200),
        ),
        case(
            "close among other connection options",
            ok(
                "content-length: 0\r\nconnection: keep-alive, Close\r\n",
                b"",
            ),
            closed(200),
        ),
        case(
            "HTTP/1.0",
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
            closed(200),
        ),
        case(
            "HTTP/1.0 asking for keep-alive",
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n".to_vec(),
            closed(200),
        ),
        case(
            "HTTP/1.0 claiming chunked: to the close",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            closed(200),
        ),
        case(
            "bytes after the answer",
            ok("content-length: 0\r\n", b"HTTP/1.1 200 OK\r\n"),
            closed(200),
        ),
        case(
            "the upstream closes after a whole answer",
            ok("content-length: 1\r\n", b"x"),
            closed(200),
        )
        .then_closes(),
    ]
}

/// Interim and bodiless answers.
fn interim_and_bodiless() -> Vec<Case> {
    vec![
        case(
            "100 then 200",
            [
                b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
                ok("content-length: 0\r\n", b""),
            ]
            .concat(),
            reused(200),
        ),
        case(
            "102 and 103 before the answer",
            [
                b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                    .to_vec(),
                ok("content-length: 0\r\n", b""),
            ]
            .concat(),
            reused(200),
        ),
        case(
            "a 100 announcing a body has none",
            [
                b"HTTP/1.1 100 Continue\r\ncontent-length: 5\r\n\r\n".to_vec(),
                ok("content-length: 0\r\n", b""),
            ]
            .concat(),
            reused(200),
        ),
        case(
            "101 to a POST",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\nfoo"
                .to_vec(),
            closed(101),
        ),
        case(
            "204",
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            reused(204),
        ),
        case(
            "204 with a zero content-length",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n".to_vec(),
            reused(204),
        ),
        case(
            "204 announcing a body",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n".to_vec(),
            closed(204),
        ),
        case(
            "304 with the length it would have",
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n".to_vec(),
            reused(304),
        ),
        case(
            "304 with a transfer coding",
            b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            closed(304),
        ),
    ]
}

/// Heads at and over the limits.
fn heads_at_and_over_the_limits() -> Vec<Case> {
    use Want::Fails;
    let forty_headers: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many_headers: String = (0..2000).map(|i| format!("x{i}:\r\n")).collect();
    vec![
        case(
            "40 headers",
            ok(&format!("{forty_headers}content-length: 0\r\n"), b""),
            reused(200),
        ),
        case(
            "2,000 headers",
            ok(&format!("{many_headers}content-length: 0\r\n"), b""),
            reused(200),
        ),
        case(
            "a head as long as the limit",
            {
                let fixed = ok("content-length: 0\r\nx-pad: \r\n", b"").len();
                let pad = "p".repeat(MAX_HEAD - fixed);
                ok(&format!("content-length: 0\r\nx-pad: {pad}\r\n"), b"")
            },
            reused(200),
        ),
        case(
            "head over the limit",
            ok(&format!("x-big: {}\r\n", "a".repeat(MAX_HEAD)), b""),
            Fails("answer head is too large"),
        ),
        case(
            "status 099",
            b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
            Fails("status outside 100-599"),
        ),
        case(
            "status 600",
            b"HTTP/1.1 600 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
            Fails("status outside 100-599"),
        ),
        case(
            "not HTTP",
            b"\x00\x01garbage\r\n\r\n".to_vec(),
            Fails("bad upstream answer"),
        ),
        case(
            "a folded header line",
            ok("content-length: 0\r\nx-a: b\r\n c\r\n", b""),
            Fails("bad upstream answer"),
        ),
    ]
}

/// Lengths that two readers could take differently.
fn lengths_read_two_ways() -> Vec<Case> {
    use Want::Fails;
    vec![
        case(
            "content-length with a sign",
            ok("content-length: +0\r\n", b""),
            Fails("not a number"),
        ),
        case(
            "content-length as a list",
            ok("content-length: 1,1\r\n", b"x"),
            Fails("not a number"),
        ),
        case(
            "an empty content-length",
            ok("content-length: \r\n", b""),
            Fails("an empty content-length"),
        ),
        case(
            "content-length past u64",
            ok("content-length: 18446744073709551616\r\n", b""),
            Fails("not a number"),
        ),
        case(
            "content-length over the body limit",
            ok(&format!("content-length: {}\r\n", MAX_BODY + 1), b""),
            Fails("body is too large"),
        ),
        case(
            "differing content-lengths",
            ok("content-length: 0\r\ncontent-length: 1\r\n", b"x"),
            Fails("differing content-lengths"),
        ),
        case(
            "transfer-encoding and content-length",
            ok(
                "transfer-encoding: chunked\r\ncontent-length: 5\r\n",
                b"0\r\n\r\n",
            ),
            Fails("both transfer-encoding and content-length"),
        ),
        case(
            "chunked twice",
            ok(
                "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
                b"0\r\n\r\n0\r\n\r\n",
            ),
            Fails("chunked twice"),
        ),
        case(
            "chunked twice in one header",
            ok(
                "transfer-encoding: chunked, chunked\r\n",
                b"0\r\n\r\n0\r\n\r\n",
            ),
            Fails("chunked twice"),
        ),
        case(
            "chunked, then another coding",
            ok("transfer-encoding: chunked, gzip\r\n", b""),
            Fails("chunked is not the last coding"),
        ),
        case(
            "an empty transfer-encoding",
            ok("transfer-encoding: ,\r\ncontent-length: 0\r\n", b""),
            Fails("an empty transfer-encoding"),
        ),
    ]
}

/// Chunks and trailers that do not add up.
fn chunks_that_do_not_add_up() -> Vec<Case> {
    use Want::Fails;
    vec![
        case(
            "chunk size that wraps",
            chunked(b"fffffffffffffffe\r\n0\r\n\r\n"),
            Fails("chunked answer body is too large"),
        ),
        case(
            "chunk size past u64",
            chunked(b"10000000000000000\r\n0\r\n\r\n"),
            Fails("bad chunk size"),
        ),
        case(
            "chunk larger than the body limit",
            chunked(format!("{MAX_BODY:x}\r\n").as_bytes()),
            Fails("chunked answer body is too large"),
        ),
        case(
            "chunks adding up past the body limit",
            chunked(
                &[
                    format!("10000\r\n{}\r\n", "b".repeat(0x10000))
                        .repeat(17)
                        .into_bytes(),
                    b"0\r\n\r\n".to_vec(),
                ]
                .concat(),
            ),
            Fails("chunked answer body is too large"),
        ),
        case(
            "chunk longer than its size",
            chunked(b"1\r\nabc\r\n0\r\n\r\n"),
            Fails("a chunk longer than its size"),
        ),
        case(
            "chunk-size line without digits",
            chunked(b"\r\n\r\n"),
            Fails("without a size"),
        ),
        case(
            "chunk size that is not hex",
            chunked(b"1g\r\nx\r\n0\r\n\r\n"),
            Fails("bad chunk size"),
        ),
        case(
            "bare LF after a chunk size",
            chunked(b"0\n\r\n"),
            Fails("a bare LF in the upstream's chunked body"),
        ),
        case(
            "bare LF in a chunk extension",
            chunked(b"0;a\nb\r\n\r\n"),
            Fails("a bare LF in the upstream's chunked body"),
        ),
        case(
            "bare LF after chunk data",
            chunked(b"1\r\nx\n0\r\n\r\n"),
            Fails("a bare LF in the upstream's chunked body"),
        ),
        case(
            "control byte in a chunk extension",
            chunked(b"0;a\x01b\r\n\r\n"),
            Fails("a control byte"),
        ),
        case(
            "chunk-size line over the head limit",
            chunked(format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_HEAD)).as_bytes()),
            Fails(LINE_TOO_LARGE),
        ),
        case(
            "trailers over the head limit",
            chunked(format!("0\r\nx-t: {}\r\n\r\n", "t".repeat(MAX_HEAD)).as_bytes()),
            Fails(LINE_TOO_LARGE),
        ),
        case(
            "a trailer line ending in a bare LF",
            chunked(b"0\r\nx-t: 1\n\r\n"),
            Fails("a bare LF in the upstream's trailers"),
        ),
        case(
            "a trailer that is not a header line",
            chunked(b"0\r\nhell/\r\n10\r\n\r\n"),
            Fails("bad trailers"),
        ),
    ]
}

/// Cut short.
fn cut_short() -> Vec<Case> {
    use Want::{Fails, Waits};
    vec![
        case(
            "a head cut short, then the close",
            b"HTTP/1.1 200 OK\r\ncontent-le".to_vec(),
            Fails("end of file"),
        )
        .then_closes(),
        case(
            "a body cut short, then the close",
            ok("content-length: 5\r\n", b"abc"),
            Fails("end of file"),
        )
        .then_closes(),
        case(
            "a chunked body cut short, then the close",
            chunked(b"5\r\nabc"),
            Fails("end of file"),
        )
        .then_closes(),
        case(
            "a 100, then the close",
            b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
            Fails("end of file"),
        )
        .then_closes(),
        case(
            "nothing at all, then the close",
            Vec::new(),
            Fails("end of file"),
        )
        .then_closes(),
        case(
            "a head cut short, held open",
            b"HTTP/1.1 200 OK\r\n".to_vec(),
            Waits,
        ),
        case(
            "a body cut short, held open",
            ok("content-length: 5\r\n", b"abc"),
            Waits,
        ),
        case(
            "trailers cut short, held open",
            chunked(b"0\r\nx-t: 1\r\n"),
            Waits,
        ),
    ]
}

/// How an answer is cut into reads.
#[derive(Debug, Clone, Copy)]
enum Delivery {
    Whole,
    /// One read a line.
    Lines,
    /// Reads of this many bytes.
    Pieces(usize),
}

impl Delivery {
    fn cut(self, answer: &[u8]) -> Vec<&[u8]> {
        match self {
            Delivery::Whole => vec![answer],
            Delivery::Lines => answer.split_inclusive(|&b| b == b'\n').collect(),
            Delivery::Pieces(size) => answer.chunks(size).collect(),
        }
    }
}

/// How an in-memory read went wrong in a way no [`Want`] describes.
#[derive(Debug)]
enum Misread {
    /// Failed with a message the case does not expect.
    Failed(String),
    /// Called the request unsent, on a connection that took it.
    Unsent(String),
    /// Called reused with part of the answer left unread.
    ReusedEarly { consumed: usize, answer: usize },
    /// The next answer on a connection called reusable was misread.
    NextAnswer(String),
}

impl std::fmt::Display for Misread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misread::Failed(error) => write!(f, "failed: {error}"),
            Misread::Unsent(error) => write!(f, "unsent: {error}"),
            Misread::ReusedEarly { consumed, answer } => {
                write!(f, "reused after consuming {consumed} of {answer} bytes")
            }
            Misread::NextAnswer(got) => write!(f, "the next answer on it was read as {got}"),
        }
    }
}

/// What the exchange made of `case`'s answer delivered as `delivery`, in
/// memory: the outcome, and then a second answer on a connection called
/// reused, which must be read as itself.
fn read_in_memory(case: &Case, delivery: Delivery) -> Result<Want, Misread> {
    let upstream = InMemory::new(delivery.cut(&case.answer), case.closes);
    let mut connection = Connection::new(upstream);
    let want = match connection.exchange_now(REQUEST) {
        None => Want::Waits,
        Some(Exchange::Answered { status, reusable }) => Want::Answered {
            status,
            reused: reusable && connection.is_usable(),
        },
        Some(Exchange::Failed(error)) => {
            let text = error.to_string();
            // The fragment of the message the case expects, if it is there.
            return Ok(match case.want {
                Want::Fails(fragment) if text.contains(fragment) => Want::Fails(fragment),
                _ => return Err(Misread::Failed(text)),
            });
        }
        Some(Exchange::Unsent(error)) => return Err(Misread::Unsent(error.to_string())),
    };
    if let Want::Answered { reused: true, .. } = want {
        if connection.consumed() != case.answer.len() {
            return Err(Misread::ReusedEarly {
                consumed: connection.consumed(),
                answer: case.answer.len(),
            });
        }
        let next = b"HTTP/1.1 299 Next\r\ncontent-length: 0\r\n\r\n";
        connection.upstream().send([&next[..]]);
        match connection.exchange_now(REQUEST) {
            Some(Exchange::Answered {
                status: 299,
                reusable: true,
            }) => {}
            other => return Err(Misread::NextAnswer(format!("{other:?}"))),
        }
    }
    Ok(want)
}

#[test]
fn every_answer_is_framed_exactly_whole_or_cut_in_memory() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let mut deliveries = vec![
            Delivery::Whole,
            Delivery::Lines,
            Delivery::Pieces(7),
            Delivery::Pieces(1000),
        ];
        // Byte by byte re-parses a head on every read: only for the
        // shorter answers.
        if case.answer.len() <= 4096 {
            deliveries.push(Delivery::Pieces(1));
        }
        for delivery in deliveries {
            match read_in_memory(case, delivery) {
                Ok(got) if got == case.want => {}
                Ok(got) => failures.push(format!(
                    "{} ({delivery:?}): expected {:?}, got {got:?}",
                    case.name, case.want
                )),
                Err(error) => failures.push(format!(
                    "{} ({delivery:?}): expected {:?}, {error}",
                    case.name, case.want
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// What an exchange over TCP should end in: `Some((status, reusable))`
/// for an answer, `None` for a failure.
type Expected = Option<(u16, bool)>;

/// Sends one request over a real TCP connection to a thread that answers
/// `answer` and holds the connection open; returns the outcome. `split`:
/// the answer goes out in up to 64 writes a little apart, so that lines
/// and heads begin and end in different reads.
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
    let outcome = timeout_at::<R, _>(deadline, connection.exchange(REQUEST))
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
            // The upstream here holds the connection open: answers that
            // wait for more, or that need the close, are for the in-memory
            // reading.
            for case in cases() {
                let expected = match case.want {
                    _ if case.closes => continue,
                    Want::Waits => continue,
                    Want::Answered { status, reused } => Some((status, reused)),
                    Want::Fails(_) => None,
                };
                let got = exchange_with::<R>(case.answer.clone(), false).await;
                if got != expected {
                    failures.push(format!("{}: expected {expected:?}, got {got:?}", case.name));
                }
                // Bytes after the answer may come in a read of their own
                // there, after it was parsed: the pool's check before reuse
                // is what sees them then.
                if case.name == "bytes after the answer" {
                    continue;
                }
                let got = exchange_with::<R>(case.answer, true).await;
                if got != expected {
                    failures.push(format!(
                        "{}, split: expected {expected:?}, got {got:?}",
                        case.name
                    ));
                }
            }
            failures
        })
        .unwrap();
        assert!(failures.is_empty(), "{}: {failures:#?}", R::NAME);
    }
}

#[test]
fn every_answer_is_framed_exactly_over_tcp_on_both_backends() {
    for backend in Backend::ALL {
        backend.run(HostileAnswers);
    }
}
