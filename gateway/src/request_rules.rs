//! The request rules of RFC 9112 that hyper's parser leaves to the
//! application: a request breaking one is answered 400 and its connection
//! closed, before any service sees it.

use http::header::{HOST, TRANSFER_ENCODING};
use http::uri::Authority;
use http::{Request, Version};

/// Why a request is refused, for the debug log.
pub fn violation<B>(request: &Request<B>) -> Option<&'static str> {
    let headers = request.headers();
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        // §3.2: an HTTP/1.1 request without `host`.
        (None, _) if request.version() == Version::HTTP_11 => return Some("no host"),
        // §3.2: more than one `host` line...
        (Some(_), Some(_)) => return Some("more than one host"),
        // ...or an invalid value.
        (Some(host), None) if !is_valid_host(host.as_bytes()) => return Some("an invalid host"),
        _ => {}
    }
    // §6.1: "A sender MUST NOT apply the chunked transfer coding more than
    // once to a message body". hyper reads the body as chunked once when
    // the last coding is chunked, whatever came before.
    let chunked = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        .count();
    if chunked > 1 {
        return Some("chunked applied twice");
    }
    None
}

/// `Host = uri-host [ ":" port ]` (RFC 9110 §7.2), or empty (allowed when
/// the target has no authority). `Authority` takes the host's syntax, but
/// also userinfo, which a `host` never carries, and any text as a port.
fn is_valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    let Ok(authority) = Authority::try_from(value) else {
        return false;
    };
    if value.contains(&b'@') {
        return false;
    }
    match authority.as_str()[authority.host().len()..].strip_prefix(':') {
        None => authority.as_str().len() == authority.host().len(),
        // `port = *DIGIT`: empty, or a number that fits.
        Some("") => true,
        Some(port) => port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().version(version).uri("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn host_must_be_there_once_and_valid() {
        let ok = |headers: &[(&str, &str)]| violation(&request(Version::HTTP_11, headers));
        assert_eq!(ok(&[("host", "example.com")]), None);
        assert_eq!(ok(&[("host", "example.com:8080")]), None);
        assert_eq!(ok(&[("host", "[::1]:80")]), None);
        assert_eq!(ok(&[("host", "")]), None);
        assert_eq!(ok(&[]), Some("no host"));
        assert_eq!(
            ok(&[("host", "a"), ("host", "b")]),
            Some("more than one host")
        );
        assert_eq!(
            ok(&[("host", "a"), ("host", "a")]),
            Some("more than one host")
        );
        assert_eq!(ok(&[("host", "a:")]), None);
        for bad in [
            "a b",
            "user@a",
            "a:port",
            "a/b",
            "[::1",
            "a:99999999999",
            "a:+1",
            "a:1:2",
        ] {
            assert_eq!(ok(&[("host", bad)]), Some("an invalid host"), "{bad}");
        }
        // HTTP/1.0 may leave it out, but not send two.
        assert_eq!(violation(&request(Version::HTTP_10, &[])), None);
        let two = request(Version::HTTP_10, &[("host", "a"), ("host", "b")]);
        assert_eq!(violation(&two), Some("more than one host"));
    }

    #[test]
    fn chunked_is_applied_at_most_once() {
        let with = |te: &[&str]| {
            let mut headers = vec![("host", "h")];
            headers.extend(te.iter().map(|v| ("transfer-encoding", *v)));
            violation(&request(Version::HTTP_11, &headers))
        };
        assert_eq!(with(&["chunked"]), None);
        assert_eq!(with(&["gzip, chunked"]), None);
        assert_eq!(with(&["chunked", "chunked"]), Some("chunked applied twice"));
        assert_eq!(with(&["chunked, Chunked"]), Some("chunked applied twice"));
    }
}
