//! The request rules of RFC 9112 that hyper's parser leaves to the
//! application: a request breaking one is answered 400 and its connection
//! closed, before any service sees it.

use http::header::{HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Request, Version};
use hyper::body::Body;

/// Why a request is refused, for the debug log. On every request, so it
/// allocates nothing and looks at `transfer-encoding` only when hyper
/// found a chunked body.
pub fn violation<B: Body>(request: &Request<B>) -> Option<&'static str> {
    let headers = request.headers();
    host_violation(request.version(), headers).or_else(|| {
        // §6.1: "A sender MUST NOT apply the chunked transfer coding more
        // than once to a message body". hyper reads the body as chunked
        // once when the last coding is chunked, whatever came before; a
        // body it reads as chunked has no exact size.
        let chunked = request.body().size_hint().exact().is_none();
        (chunked && chunked_twice(headers)).then_some("chunked applied twice")
    })
}

/// RFC 9112 §3.2: `host` is required in HTTP/1.1, and never twice or
/// invalid in any version.
fn host_violation(version: Version, headers: &HeaderMap) -> Option<&'static str> {
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => Some("no host"),
        (Some(_), Some(_)) => Some("more than one host"),
        (Some(host), None) if !is_valid_host(host.as_bytes()) => Some("an invalid host"),
        _ => None,
    }
}

fn chunked_twice(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        .count()
        > 1
}

/// `Host = uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2), or
/// empty (allowed when the target has no authority). Checked by hand:
/// `http::uri::Authority` copies the value to parse it, and takes userinfo
/// and any text as a port, which a `host` never carries.
fn is_valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    let (host_is_valid, port) = if let Some(literal) = value.strip_prefix(b"[") {
        // IP-literal: an IPv6 address in brackets.
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let address = std::str::from_utf8(&literal[..end]).ok();
        let valid = address.is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        (valid, &literal[end + 1..])
    } else {
        // reg-name (which covers IPv4address): no colon in it, so the last
        // colon, if any, starts the port.
        let (name, port) = match value.iter().rposition(|&b| b == b':') {
            Some(at) => value.split_at(at),
            None => (value, &[][..]),
        };
        (!name.is_empty() && is_reg_name(name), port)
    };
    host_is_valid
        && match port {
            [] | [b':'] => true,
            // `port = *DIGIT`, and one that fits.
            [b':', digits @ ..] => {
                digits.iter().all(u8::is_ascii_digit)
                    && std::str::from_utf8(digits).is_ok_and(|d| d.parse::<u16>().is_ok())
            }
            _ => false,
        }
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )`.
fn is_reg_name(name: &[u8]) -> bool {
    let mut bytes = name.iter();
    while let Some(&b) = bytes.next() {
        let allowed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b);
        if b == b'%' {
            let hex = (bytes.next(), bytes.next());
            if !matches!(hex, (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit())
            {
                return false;
            }
        } else if !allowed {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(*name, http::HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn host_must_be_there_once_and_valid() {
        let check = |lines: &[(&'static str, &'static str)]| {
            host_violation(Version::HTTP_11, &headers(lines))
        };
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:3000",
            "[::1]:80",
            "[2001:db8::1]",
            "a:",
            "xn--bcher-kva.example",
            "a%41b",
            "",
        ] {
            assert_eq!(check(&[("host", good)]), None, "{good}");
        }
        assert_eq!(check(&[]), Some("no host"));
        assert_eq!(
            check(&[("host", "a"), ("host", "b")]),
            Some("more than one host")
        );
        assert_eq!(
            check(&[("host", "a"), ("host", "a")]),
            Some("more than one host")
        );
        for bad in [
            "a b",
            "user@a",
            "a:port",
            "a/b",
            "[::1",
            "[::1]x",
            "[nope]",
            ":80",
            "a:99999999999",
            "a:+1",
            "a:1:2",
            "a%4",
            "a%zz",
            "a\tb",
        ] {
            assert_eq!(check(&[("host", bad)]), Some("an invalid host"), "{bad}");
        }
        // HTTP/1.0 may leave it out, but not send two.
        assert_eq!(host_violation(Version::HTTP_10, &headers(&[])), None);
        let two = headers(&[("host", "a"), ("host", "b")]);
        assert_eq!(
            host_violation(Version::HTTP_10, &two),
            Some("more than one host")
        );
    }

    #[test]
    fn chunked_is_applied_at_most_once() {
        let twice = |values: &[&'static str]| {
            let lines: Vec<_> = values.iter().map(|v| ("transfer-encoding", *v)).collect();
            chunked_twice(&headers(&lines))
        };
        assert!(!twice(&["chunked"]));
        assert!(!twice(&["gzip, chunked"]));
        assert!(twice(&["chunked", "chunked"]));
        assert!(twice(&["chunked, Chunked"]));
    }
}
