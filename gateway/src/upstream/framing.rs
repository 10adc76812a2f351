//! How an upstream answer is framed, from its bytes: the head (parsed
//! with `httparse`), where its body ends (RFC 9112 §6.3), chunk-size lines
//! and the trailer section. No IO here: [`super::exchange`] reads the bytes
//! and asks these functions what they mean.
//!
//! Anything two readers could frame differently is an error, never a
//! guess: the exchange fails (502) and the connection is closed.

use std::io;

/// Most bytes an answer's head may take (the counter's is ~40), and
/// likewise one chunk-size line or the trailer section: the read buffer
/// never grows past this.
pub const MAX_HEAD: usize = 16 * 1024;

/// Headers an answer head is parsed with on the common path; a head with
/// more is parsed again with room for as many as [`MAX_HEAD`] can hold.
const USUAL_HEADERS: usize = 32;

/// The length of a complete trailer section at the start of `bytes`, or
/// `None` while it is partial. Its lines end in CRLF: httparse also takes
/// a bare LF there and other readers (hyper's) do not, so one is an error.
pub(super) fn trailer_section(bytes: &[u8]) -> io::Result<Option<usize>> {
    let parsed = with_header_room(bytes, |headers| {
        Ok(match httparse::parse_headers(bytes, headers)? {
            httparse::Status::Complete((len, _)) => Some(len),
            httparse::Status::Partial => None,
        })
    });
    let bare_lf = || invalid("a bare LF in the upstream's trailers");
    match parsed {
        Ok(Some(len)) if has_bare_lf(&bytes[..len]) => Err(bare_lf()),
        Ok(None) if has_bare_lf(bytes) => Err(bare_lf()),
        Ok(found) => Ok(found),
        Err(error) => Err(invalid(&format!(
            "bad trailers in the upstream's answer: {error}"
        ))),
    }
}

/// Whether a line feed in `bytes` has no carriage return before it.
fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(at, &b)| b == b'\n' && (at == 0 || bytes[at - 1] != b'\r'))
}

/// The size of a chunk from its size line (CRLF included): hex digits,
/// then optionally whitespace and `;` extensions, which are ignored.
/// httparse parses the number; what it is lenient about (no digits at all,
/// bare line ends inside an extension) is refused before it gets there.
pub(super) fn chunk_size(line: &[u8]) -> io::Result<u64> {
    if !line.first().is_some_and(u8::is_ascii_hexdigit) {
        return Err(invalid(
            "a chunk-size line without a size in the upstream's answer",
        ));
    }
    match httparse::parse_chunk_size(line) {
        Ok(httparse::Status::Complete((used, size))) if used == line.len() => Ok(size),
        _ => Err(invalid("bad chunk size in the upstream's answer")),
    }
}

/// How an answer's body is delimited (RFC 9112 §6.3).
pub(super) enum Body {
    Length(u64),
    Chunked,
    UntilClose,
    /// A 101: the connection now speaks something else.
    Switched,
}

/// What the exchange needs from an answer's head.
pub(super) struct Head {
    pub(super) status: u16,
    pub(super) head_len: usize,
    pub(super) body: Body,
    pub(super) keep_alive: bool,
}

/// Parses a complete head, or `None` while it is partial (and shorter than
/// [`MAX_HEAD`]). A function of its own rather than inline in
/// `read_answer`'s loop: compiled outside the async state machine, the
/// parse takes fewer instructions a visit (`bench/instructions.py`).
pub(super) fn parse_head(bytes: &[u8]) -> io::Result<Option<Head>> {
    let parsed = with_header_room(bytes, |headers| {
        let mut response = httparse::Response::new(headers);
        Ok(match response.parse(bytes)? {
            httparse::Status::Complete(head_len) => Some(head(&response, head_len)),
            httparse::Status::Partial => None,
        })
    });
    match parsed {
        Ok(Some(head)) => head.map(Some),
        Ok(None) if bytes.len() >= MAX_HEAD => {
            Err(invalid("the upstream's answer head is too large"))
        }
        Ok(None) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            Err(invalid("the upstream's answer head is too large"))
        }
        Err(error) => Err(invalid(&format!("bad upstream answer: {error}"))),
    }
}

/// Runs `parse` (a head's or the trailers') with room for the usual number
/// of headers, and again with more when that is too few. The count is not
/// what a counter behind a framework or CDN respects, the size is
/// ([`MAX_HEAD`]): the second try has room for one header a line received.
fn with_header_room<'b, T>(
    bytes: &'b [u8],
    parse: impl Fn(&mut [httparse::Header<'b>]) -> Result<T, httparse::Error>,
) -> Result<T, httparse::Error> {
    match parse(&mut [httparse::EMPTY_HEADER; USUAL_HEADERS]) {
        Err(httparse::Error::TooManyHeaders) => {
            let lines = bytes.iter().filter(|&&b| b == b'\n').count();
            parse(&mut vec![httparse::EMPTY_HEADER; lines])
        }
        parsed => parsed,
    }
}

/// What the exchange needs from a complete head.
fn head(response: &httparse::Response<'_, '_>, head_len: usize) -> io::Result<Head> {
    let status = response.code.unwrap_or(0);
    if !(100..600).contains(&status) {
        return Err(invalid("a status outside 100-599 in the upstream's answer"));
    }
    let (body, keep_alive) = framing(response)?;
    Ok(Head {
        status,
        head_len,
        body,
        keep_alive,
    })
}

/// The body framing and keep-alive of an answer head (RFC 9112 §6.3).
/// Anything two readers could frame differently is an error: the exchange
/// fails (502) and the connection is closed.
fn framing(response: &httparse::Response<'_, '_>) -> io::Result<(Body, bool)> {
    let status = response.code.unwrap_or(0);
    let http11 = response.version == Some(1);
    let mut keep_alive = http11;
    let mut length = None;
    // Transfer codings over every transfer-encoding header, in order.
    let mut codings = 0;
    let mut chunked_at = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = content_length(header.value)?;
            if length.is_some_and(|l| l != value) {
                return Err(invalid(
                    "differing content-lengths in the upstream's answer",
                ));
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if header
                .value
                .split(|&b| b == b',')
                .all(|c| c.trim_ascii().is_empty())
            {
                // No coding at all: whether it frames the body is anyone's guess.
                return Err(invalid(
                    "an empty transfer-encoding in the upstream's answer",
                ));
            }
            for coding in header.value.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    if chunked_at.is_some() {
                        // RFC 9112 §6.1: chunked is never applied twice.
                        return Err(invalid("chunked twice in the upstream's answer"));
                    }
                    chunked_at = Some(codings);
                }
                codings += 1;
            }
        } else if header.name.eq_ignore_ascii_case("connection") {
            let close = header
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
            keep_alive &= !close;
        }
    }
    if status == 101 {
        return Ok((Body::Switched, false));
    }
    if (100..200).contains(&status) {
        return Ok((Body::Length(0), keep_alive));
    }
    if codings > 0 && length.is_some() {
        // RFC 9112 §6.3: "ought to be handled as an error" (smuggling).
        return Err(invalid(
            "both transfer-encoding and content-length in the upstream's answer",
        ));
    }
    if status == 204 || status == 304 {
        // No body by definition; one announced anyway (204 with a length,
        // any transfer coding) means the upstream frames differently.
        let announced = codings > 0 || (status == 204 && length.is_some_and(|l| l > 0));
        return Ok((Body::Length(0), keep_alive && !announced));
    }
    let body = match (chunked_at, length) {
        // Chunked last (RFC 9112 §6.1); an HTTP/1.0 answer cannot be
        // chunked, so one that says so is read to the close instead.
        (Some(at), _) if at + 1 == codings && http11 => Body::Chunked,
        (Some(at), _) if at + 1 != codings => {
            return Err(invalid(
                "chunked is not the last coding in the upstream's answer",
            ));
        }
        // Encoded but not chunked (or chunked in HTTP/1.0): to the close.
        _ if codings > 0 => Body::UntilClose,
        (_, Some(length)) => Body::Length(length),
        (_, None) => Body::UntilClose,
    };
    Ok((body, keep_alive))
}

/// A `content-length` value: decimal digits only (RFC 9110 §8.6; `u64`'s
/// parser would take a leading `+`), within `u64`. Folded by hand: one pass
/// over a few bytes, on every visit.
fn content_length(value: &[u8]) -> io::Result<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return Err(invalid("an empty content-length in the upstream's answer"));
    }
    digits
        .iter()
        .try_fold(0u64, |length, &digit| {
            let digit = digit.is_ascii_digit().then(|| u64::from(digit - b'0'))?;
            length.checked_mul(10)?.checked_add(digit)
        })
        .ok_or_else(|| invalid("a content-length that is not a number in the upstream's answer"))
}

pub(super) fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}
