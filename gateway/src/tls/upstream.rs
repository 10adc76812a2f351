//! https upstreams: the client side's TLS settings, one per upstream so
//! that reconnects resume their sessions, and the stream a pooled upstream
//! connection is, plain or TLS.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_rustls::TlsConnector;
use hyper::rt::{Read, Write};
use rustls::pki_types::ServerName;

use super::{FuturesIo, HyperIo, client_config};

/// Why the TLS settings for an https upstream could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// The URL's host is neither a DNS name nor an IP address.
    #[error("`{host}` cannot be checked against a certificate ({source})")]
    ServerName {
        host: String,
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// rustls refused the client configuration.
    #[error(transparent)]
    Config(#[from] rustls::Error),
}

/// How the gateway opens TLS to its upstream.
pub struct ClientTls {
    connector: TlsConnector,
    /// The name the certificate must be for, and the SNI sent: the URL's host.
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// TLS to `host` (a DNS name or an IP address), verified against `roots`.
    pub fn new(host: &str, roots: rustls::RootCertStore) -> Result<Self, ClientTlsError> {
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|source| ClientTlsError::ServerName {
                host: host.to_owned(),
                source,
            })?;
        let config = client_config(roots)?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The handshake over a connected `stream`. A certificate that does not
    /// verify is an error like any other failed connect: nothing is sent.
    pub async fn connect<S: backends::Stream>(&self, stream: S) -> io::Result<UpstreamStream<S>> {
        let tls = self
            .connector
            .connect(self.server_name.clone(), FuturesIo::new(stream))
            .await?;
        Ok(UpstreamStream::Tls(Box::new(HyperIo::new(tls))))
    }
}

type ClientStream<S> = HyperIo<futures_rustls::client::TlsStream<FuturesIo<S>>>;

/// A connection to the upstream: the backend's stream, or TLS over it
/// (boxed: rustls's state is large, and most upstreams are plain).
pub enum UpstreamStream<S> {
    Plain(S),
    Tls(Box<ClientStream<S>>),
}

impl<S: backends::Stream> Read for UpstreamStream<S> {
    backends::pass_through!(match Plain | Tls => poll_read);
}

impl<S: backends::Stream> Write for UpstreamStream<S> {
    backends::pass_through!(match Plain | Tls => poll_write, poll_flush, poll_shutdown);
}

impl<S: backends::Stream> backends::Stream for UpstreamStream<S> {
    fn watch_while_idle(&mut self) {
        match self {
            Self::Plain(stream) => stream.watch_while_idle(),
            Self::Tls(stream) => stream.get_mut().get_mut().0.get_mut().watch_while_idle(),
        }
    }

    /// For TLS, nothing may be left over from the last answer: no
    /// plaintext or close_notify in rustls, no part of a record read and
    /// not yet decrypted (the start of an answer to a request not yet
    /// sent), and, as for a plain stream, nothing on the socket: any
    /// record arriving unasked on an idle connection makes it unusable, as
    /// any byte does on a plain one.
    fn is_reusable(&mut self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_reusable(),
            Self::Tls(stream) => {
                let (io, connection) = stream.get_mut().get_mut();
                connection.wants_read() && io.at_record_boundary() && io.get_mut().is_reusable()
            }
        }
    }

    /// For TLS, what rustls holds decrypted is readable already; otherwise
    /// the socket decides (the rest of a record it holds the start of
    /// comes there too), as for the server's streams.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(stream) => stream.poll_readable(cx),
            Self::Tls(stream) => {
                let (io, connection) = stream.get_mut().get_mut();
                if connection.wants_read() {
                    io.get_mut().poll_readable(cx)
                } else {
                    Poll::Ready(Ok(()))
                }
            }
        }
    }
}
