//! A batched visit POST on the wire (`upstream.batch_max` above 1): the
//! gateway's [`upstream`](crate::upstream) writes it and the built-in
//! [`counter`](crate::counter) reads it. Its body is the decimal number of
//! visits it carries, up to [`MAX_VISITS_PER_POST`]; a POST with no body
//! carries one.

use std::io::Write as _;

/// The most visits one POST may carry: the counter refuses more, and the
/// configuration refuses a `batch_max` above it.
pub const MAX_VISITS_PER_POST: u64 = 1 << 20;

/// The longest body a count can have: the digits of
/// [`MAX_VISITS_PER_POST`].
pub const MAX_COUNT_BODY: usize = MAX_VISITS_PER_POST.ilog10() as usize + 1;

/// The visits a batch's body carries: decimal digits, no leading zero, 1
/// to [`MAX_VISITS_PER_POST`]; `None` for anything else.
pub fn parse_visits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) || bytes[0] == b'0' {
        return None;
    }
    let visits: u64 = std::str::from_utf8(bytes).ok()?.parse().ok()?;
    (visits <= MAX_VISITS_PER_POST).then_some(visits)
}

/// Ends a batch's request, written up to its `content-length: ` name, with
/// the length and the body that carry `visits`.
pub fn finish_batch_request(request: &mut Vec<u8>, visits: usize) {
    let count = visits.to_string();
    // Writing into a Vec cannot fail.
    let _ = write!(request, "{}\r\n\r\n{count}", count.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_digits_from_1_to_the_limit() {
        assert_eq!(MAX_COUNT_BODY, MAX_VISITS_PER_POST.to_string().len());
        for (body, visits) in [
            (&b"1"[..], Some(1)),
            (b"37", Some(37)),
            (b"1048576", Some(1 << 20)),
        ] {
            assert_eq!(parse_visits(body), visits, "{body:?}");
        }
        for body in [
            &b""[..],
            b"0",
            b"007",
            b"-1",
            b"+1",
            b"1e3",
            b" 1",
            b"1\n",
            b"1048577",
            b"9999999",
            b"x",
        ] {
            assert_eq!(parse_visits(body), None, "{body:?}");
        }
    }
}
