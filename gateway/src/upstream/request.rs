//! The POSTs the client sends, written once per pool up to what varies:
//! a visit's, whose one varying value is its `x-forwarded-for`, and a
//! batch's, whose length and body carry its count
//! ([`batch_protocol`](crate::batch_protocol)).

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

use crate::batch_protocol::finish_batch_request;
use crate::config::UpstreamTarget;

/// The name of the header a visit's POST passes the client's address in.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// The heads of the requests to one upstream.
pub(super) struct Requests {
    /// `POST … HTTP/1.1`, `host`, `content-length: 0` and the
    /// `x-forwarded-for: ` name: every visit's request up to its one
    /// varying value.
    visit_head: Vec<u8>,
    /// `POST … HTTP/1.1`, `host`, `content-type` and the `content-length: `
    /// name: a batch's request up to its length and its count.
    batch_head: Vec<u8>,
}

impl Requests {
    pub(super) fn new(target: &UpstreamTarget) -> Self {
        let visit_head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-length: 0\r\n{FORWARDED_FOR}: ",
            target.path_and_query, target.authority
        )
        .into_bytes();
        let batch_head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: text/plain\r\ncontent-length: ",
            target.path_and_query, target.authority
        )
        .into_bytes();
        Self {
            visit_head,
            batch_head,
        }
    }

    /// The POST that registers the visit of the client at `peer`, whose
    /// request carried `received`.
    #[inline]
    pub(super) fn visit(&self, received: &HeaderMap, peer: SocketAddr) -> Vec<u8> {
        let mut request = Vec::with_capacity(self.visit_head.len() + 64);
        request.extend_from_slice(&self.visit_head);
        write_forwarded_for(&mut request, received, peer);
        request.extend_from_slice(b"\r\n\r\n");
        request
    }

    /// The POST that carries `visits` visits at once.
    pub(super) fn batch(&self, visits: usize) -> Vec<u8> {
        let mut request = Vec::with_capacity(self.batch_head.len() + 16);
        request.extend_from_slice(&self.batch_head);
        finish_batch_request(&mut request, visits);
        request
    }
}

/// `x-forwarded-for`: what the client sent (all such headers, in order,
/// byte for byte, as nginx passes them) with the client's address
/// appended; IPv4-mapped IPv6 written as IPv4. hyper's parser accepts
/// only tab, space, visible ASCII and bytes above 0x7f in a value (no CR,
/// LF, NUL or other control byte), so the result is safe to write into a
/// request head.
fn write_forwarded_for(out: &mut Vec<u8>, received: &HeaderMap, peer: SocketAddr) {
    for value in received.get_all(FORWARDED_FOR) {
        let value = value.as_bytes().trim_ascii();
        if !value.is_empty() {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    }
    write_ip(out, peer.ip().to_canonical());
}

/// Writes an address as text; IPv4 by hand, as `fmt` costs more than the
/// rest of building the visit's request.
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn forwarded_for<B>(request: &Request<B>, peer: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        write_forwarded_for(&mut out, request.headers(), peer);
        out
    }

    #[test]
    fn forwarded_for_appends_canonical_client() {
        let peer: SocketAddr = "[::ffff:10.0.0.7]:4000".parse().unwrap();
        let request = Request::builder()
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-for", "5.6.7.8, 9.9.9.9")
            .body(())
            .unwrap();
        assert_eq!(
            forwarded_for(&request, peer),
            b"1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.7"
        );
        let bare = Request::new(());
        assert_eq!(forwarded_for(&bare, "[::1]:1".parse().unwrap()), b"::1");
        for (ip, text) in [("0.0.0.0", "0.0.0.0"), ("255.10.9.100", "255.10.9.100")] {
            let peer = SocketAddr::new(ip.parse().unwrap(), 1);
            assert_eq!(forwarded_for(&bare, peer), text.as_bytes());
        }
    }

    #[test]
    fn a_visit_and_a_batch_are_whole_requests() {
        let target = UpstreamTarget::parse("http://counter:8080/hit?x=1").unwrap();
        let requests = Requests::new(&target);
        let mut received = HeaderMap::new();
        received.insert(FORWARDED_FOR, "1.2.3.4".parse().unwrap());
        let visit = requests.visit(&received, "10.0.0.7:1".parse().unwrap());
        assert_eq!(
            String::from_utf8(visit).unwrap(),
            "POST /hit?x=1 HTTP/1.1\r\nhost: counter:8080\r\ncontent-length: 0\r\nx-forwarded-for: 1.2.3.4, 10.0.0.7\r\n\r\n"
        );
        assert_eq!(
            String::from_utf8(requests.batch(12)).unwrap(),
            "POST /hit?x=1 HTTP/1.1\r\nhost: counter:8080\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n12"
        );
    }
}
