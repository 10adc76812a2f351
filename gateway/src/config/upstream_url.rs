//! `upstream.url`, parsed and checked once at load: [`UpstreamTarget`],
//! the scheme, host, port, `host` header and request path a connection
//! needs, and the name resolved to the addresses to dial.

use std::net::{SocketAddr, ToSocketAddrs};

use super::Escaped;

/// Why `upstream.url` was refused; the message shows the URL escaped.
#[derive(Debug, thiserror::Error)]
#[error("`{}`{why}", Escaped(&self.url))]
pub struct UrlRefused {
    pub url: String,
    pub why: Why,
}

/// What is wrong with a refused URL.
#[derive(Debug, thiserror::Error)]
pub enum Why {
    #[error(" is not a valid URL ({0})")]
    Unparsable(url::ParseError),
    #[error(": expected an http:// or https:// URL")]
    Scheme,
    #[error(": credentials in the URL are not supported")]
    Credentials,
    #[error(": a fragment (#...) is never sent to a server; remove it")]
    Fragment,
    #[error(": {0}; write the URL as it is to be sent (percent-encode spaces and the like)")]
    Repaired(url::SyntaxViolation),
    #[error(": the URL has no host")]
    NoHost,
    #[error(": port 0 cannot be connected to")]
    PortZero,
}

/// The upstream URL, split into what a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `host[:port]` for the `host` header, as the URL parser normalises
    /// it: lowercase, an international name in punycode, no `:80`.
    pub authority: String,
    /// The host to resolve or connect to: an IPv6 address without its
    /// brackets.
    pub host: String,
    pub port: u16,
    /// Path and query, for the request line.
    pub path_and_query: String,
    /// `https://`: the connection speaks TLS, verified for `host`.
    pub tls: bool,
}

impl UpstreamTarget {
    /// Parses an `http://` or `https://` URL (WHATWG rules, servo's `url` crate).
    ///
    /// Refused: another scheme, an empty host, a port past 65535 or 0,
    /// credentials, a fragment, and anything the parser would have had to
    /// repair (a tab or newline it would drop, a space it would encode,
    /// `http:/host`): the URL the gateway uses is the one written.
    pub fn parse(text: &str) -> Result<Self, UrlRefused> {
        let refused = |why| UrlRefused {
            url: text.to_owned(),
            why,
        };
        let repaired = std::cell::Cell::new(None);
        let record = |violation| {
            if repaired.get().is_none() {
                repaired.set(Some(violation));
            }
        };
        let url = url::Url::options()
            .syntax_violation_callback(Some(&record))
            .parse(text)
            .map_err(|e| refused(Why::Unparsable(e)))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(refused(Why::Scheme)),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refused(Why::Credentials));
        }
        if url.fragment().is_some() {
            return Err(refused(Why::Fragment));
        }
        if let Some(violation) = repaired.get() {
            return Err(refused(Why::Repaired(violation)));
        }
        let (Some(host), Some(name)) = (url.host(), url.host_str()) else {
            return Err(refused(Why::NoHost));
        };
        let port = url.port_or_known_default().unwrap_or(80);
        if port == 0 {
            return Err(refused(Why::PortZero));
        }
        let host = match host {
            url::Host::Ipv6(address) => address.to_string(),
            _ => name.to_owned(),
        };
        let authority = match url.port() {
            Some(port) => format!("{name}:{port}"),
            None => name.to_owned(),
        };
        let path_and_query = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        Ok(Self {
            authority,
            host,
            port,
            path_and_query,
            tls,
        })
    }

    /// The addresses `host` names (itself, for an address): at least one.
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(std::io::Error::other("the name resolved to no address"));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_target() {
        let t = UpstreamTarget::parse("http://localhost:8080/count?x=1").unwrap();
        assert_eq!(t.authority, "localhost:8080");
        assert_eq!(t.host, "localhost");
        assert_eq!(t.port, 8080);
        assert_eq!(t.path_and_query, "/count?x=1");
        let t = UpstreamTarget::parse("http://[::1]/").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.authority, "[::1]");
        assert_eq!(t.port, 80);
        // The host header gets the normalised name: no default port,
        // lowercase, punycode; an empty path is `/`.
        let t = UpstreamTarget::parse("http://Bücher.Example:80?q=1").unwrap();
        assert_eq!(t.authority, "xn--bcher-kva.example");
        assert_eq!(t.host, "xn--bcher-kva.example");
        assert_eq!(t.port, 80);
        assert_eq!(t.path_and_query, "/?q=1");
        let t = UpstreamTarget::parse("http://[::1]:3001/counter").unwrap();
        assert_eq!((t.authority.as_str(), t.port), ("[::1]:3001", 3001));
        assert!(!t.tls);
        // https: port 443 unless given, and no `:443` in the host header.
        let t = UpstreamTarget::parse("https://Counter.Example/c").unwrap();
        assert_eq!((t.authority.as_str(), t.port), ("counter.example", 443));
        assert!(t.tls);
        let t = UpstreamTarget::parse("https://127.0.0.1:8443/c").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("127.0.0.1", 8443, true));
    }

    #[test]
    fn upstream_urls_that_cannot_be_used_are_refused() {
        for (url, why) in [
            ("http://127.0.0.1:99999/counter", "invalid port number"),
            ("http://127.0.0.1:65536/", "invalid port number"),
            ("http://h:0/", "port 0"),
            ("http://:80/", "empty host"),
            ("http:///counter", "expected //"),
            ("http:/h/counter", "expected //"),
            ("http://user:secret@h/", "credentials"),
            ("http://user@h/", "credentials"),
            ("http://h/counter#top", "fragment"),
            ("https://h:0/", "port 0"),
            ("ftp://h/", "expected an http:// or https:// URL"),
            ("h:3001/counter", "expected an http:// or https:// URL"),
            ("/counter", "not a valid URL"),
            ("http://h/a b", "non-URL code point"),
            ("http://h/a\\b", "backslash"),
            ("http://h/a\tb", "tabs or newlines"),
            (" http://h/", "leading or trailing"),
        ] {
            let err = UpstreamTarget::parse(url).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
    }
}
