//! A batched visit POST on the wire (`upstream.batch_max` above 1): the
//! gateway's [`upstream`](crate::upstream) writes it and the built-in
//! [`counter`](crate::counter) reads it. Its body is the decimal number of
//! visits it carries, up to [`MAX_VISITS_PER_POST`]; a POST with no body
//! carries one.

use std::io::Write as _;

/// The most visits one POST may carry: the counter refuses more, and the
/// configuration refuses a `batch_max` above it.
pub const MAX_VISITS_PER_POST: u64 = 1 << 20;

/// Ends a batch's request, written up to its `content-length: ` name, with
/// the length and the body that carry `visits`.
pub fn finish_batch_request(request: &mut Vec<u8>, visits: usize) {
    let count = visits.to_string();
    // Writing into a Vec cannot fail.
    let _ = write!(request, "{}\r\n\r\n{count}", count.len());
}
