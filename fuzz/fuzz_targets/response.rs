//! Upstream answers straight into the exchange's reader, in memory: no
//! socket, no runtime, so thousands of answers a second where the
//! `exchange` target, which goes through TCP, manages tens. An input is a
//! byte that picks a read size, then the answer the upstream sends to one
//! POST (the `exchange` target's seeds read the same way).
//!
//! Each answer is read several times on fresh connections: whole, a line
//! a read, in reads of the picked size, byte by byte (short answers), and
//! whole with the upstream closing after it. Checked:
//! - no panic;
//! - every delivery ends alike: the same status and the same reuse, or a
//!   failure of the same kind, or waiting for more: how the bytes were
//!   cut must not change what they mean;
//! - with the upstream closing after it, an answer that was complete reads
//!   the same but is not reused, and one it waited on fails at the end;
//! - an answer is a final one (200-599, or 101) and is the final head
//!   httparse finds in the input, and it is reused only if it is 2xx-5xx;
//! - the reads never took more than `MAX_BODY` past that head (plus one
//!   chunk-size line or trailer section, on a failure), and a reused
//!   connection took exactly the whole answer and reads the next answer
//!   as itself: a reader fooled about where an answer ends would hand a
//!   later visit this answer's leftovers.
//!
//! `cargo +nightly fuzz run response seeds/response -- -max_total_time=60`
#![no_main]

use std::io;

use gateway::upstream::exchange::{Connection, Exchange, InMemory, MAX_BODY, MAX_HEAD};
use libfuzzer_sys::fuzz_target;

const REQUEST: &[u8] = b"POST /counter HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n";

/// What the upstream answers the next request on a reused connection.
const NEXT: &[u8] = b"HTTP/1.1 299 Next\r\ncontent-length: 0\r\n\r\n";

/// Answers at most this long are also read byte by byte (each read
/// parses the head again).
const BYTE_BY_BYTE: usize = 512;

/// How one reading ended, as the deliveries compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Answered { status: u16, reused: bool },
    Failed(io::ErrorKind),
    Waiting,
}

/// Reads `answer` cut into `pieces`, then checks what it consumed; with
/// `closes`, the upstream closes after it.
fn read(
    answer: &[u8],
    pieces: Vec<&[u8]>,
    closes: bool,
    final_head: Option<(u16, usize)>,
) -> Ended {
    let mut connection = Connection::new(InMemory::new(pieces, closes));
    let ended = match connection.exchange_now(REQUEST) {
        None => Ended::Waiting,
        Some(Exchange::Answered { status, reusable }) => Ended::Answered {
            status,
            reused: reusable && connection.is_usable(),
        },
        Some(Exchange::Failed(error)) => Ended::Failed(error.kind()),
        Some(Exchange::Unsent(error)) => panic!("an in-memory write failed: {error}"),
    };
    let consumed = connection.consumed();
    assert!(consumed <= answer.len());
    if let Ended::Answered { status, reused } = ended {
        assert!(
            (200..600).contains(&status) || status == 101,
            "answered with {status}"
        );
        assert!(!reused || status >= 200, "reused after {status}");
        let Some((found, head_end)) = final_head else {
            panic!("answered {status}; httparse finds no final head");
        };
        assert_eq!(status, found, "a different final head than httparse's");
        assert!(consumed >= head_end);
        assert!(
            (consumed - head_end) as u64 <= MAX_BODY,
            "{} body bytes taken",
            consumed - head_end
        );
        if reused {
            assert_eq!(consumed, answer.len(), "reused with bytes left over");
            connection.upstream().send([NEXT]);
            match connection.exchange_now(REQUEST) {
                Some(Exchange::Answered {
                    status: 299,
                    reusable: true,
                }) => {}
                other => panic!("the next answer on the reused connection was read as {other:?}"),
            }
        }
    } else if let (Ended::Failed(_), Some((_, head_end))) = (ended, final_head) {
        let body = consumed.saturating_sub(head_end) as u64;
        assert!(
            body <= MAX_BODY + MAX_HEAD as u64,
            "{body} body bytes taken"
        );
    }
    ended
}

/// The status and end of the final head in `answer` as httparse reads it,
/// past any 1xx but 101; `None` if there is none, or one is malformed.
fn final_head(answer: &[u8]) -> Option<(u16, usize)> {
    let mut at = 0;
    loop {
        let rest = &answer[at..];
        let lines = rest.iter().filter(|&&b| b == b'\n').count();
        let mut headers = vec![httparse::EMPTY_HEADER; lines + 1];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = response.parse(rest).ok()? else {
            return None;
        };
        let status = response.code?;
        at += len;
        if !(100..200).contains(&status) || status == 101 {
            return Some((status, at));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&size, answer)) = data.split_first() else {
        return;
    };
    let final_head = final_head(answer);
    let whole = read(answer, vec![answer], false, final_head);
    let mut cut = vec![
        ("lines", answer.split_inclusive(|&b| b == b'\n').collect()),
        ("sized", answer.chunks(usize::from(size % 32) + 1).collect()),
    ];
    if answer.len() <= BYTE_BY_BYTE {
        cut.push(("bytes", answer.chunks(1).collect()));
    }
    for (name, pieces) in cut {
        let ended = read(answer, pieces, false, final_head);
        assert_eq!(whole, ended, "delivered whole, then {name}");
    }
    let closing = read(answer, vec![answer], true, final_head);
    match (whole, closing) {
        (
            Ended::Answered { status: a, .. },
            Ended::Answered {
                status: b,
                reused: false,
            },
        ) if a == b => {}
        (Ended::Failed(a), Ended::Failed(b)) if a == b => {}
        (Ended::Waiting, Ended::Failed(io::ErrorKind::UnexpectedEof)) => {}
        (whole, closing) => panic!("held open: {whole:?}; closed after: {closing:?}"),
    }
});
