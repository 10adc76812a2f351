//! TLS on both sides, written once over the backends' streams: the public
//! listener's HTTPS ([`ServerTls`], whose certificate a reload replaces in
//! place) and https upstreams ([`ClientTls`], [`UpstreamStream`]); and the
//! configuration the PostgreSQL store's client is given ([`DatabaseTls`]).
//!
//! rustls does the protocol, on the ring provider; futures-rustls drives
//! it over futures-io, and the `io` module's two adapters put it between
//! a backend's stream and hyper, so tokio and smol serve the same TLS.

mod database;
mod files;
mod io;
mod upstream;

use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use backends::Runtime;
use futures_lite::io::AsyncWriteExt;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ProtocolVersion, ServerConfig};

pub use self::database::{DatabaseTls, DatabaseVerification};
pub use self::files::{KeyedError, OutOfDate, certified_key, out_of_date, roots};
pub use self::io::{FuturesIo, HyperIo};
pub use self::upstream::{ClientTls, ClientTlsError, UpstreamStream};
use crate::time::{Elapsed, timeout_at};

/// The one crypto provider both sides use.
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The versions both sides speak.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The only application protocol either side speaks.
const HTTP_1_1: &[u8] = b"http/1.1";
const H2: &[u8] = b"h2";

/// The public listener's TLS: its settings, and the certificate it
/// presents, which [`ServerTls::replace_certificate`] swaps for the
/// connections that come after.
pub struct ServerTls {
    acceptor: futures_rustls::TlsAcceptor,
    certificate: Arc<CurrentCertificate>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// The certificate and key every handshake presents, read at each
/// ClientHello: a reload swaps it without touching open connections.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A TLS stream the public listener serves HTTP over.
pub type ServerStream<S> = HyperIo<futures_rustls::server::TlsStream<FuturesIo<S>>>;

/// [`backends::Stream::poll_readable`] through TLS, for a parked
/// connection: what rustls holds decrypted is readable already; otherwise
/// the socket decides (the rest of a record it holds the start of comes
/// there too).
pub fn poll_readable<S: backends::Stream>(
    stream: &mut ServerStream<S>,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    let (io, connection) = stream.get_mut().get_mut();
    if connection.wants_read() {
        io.get_mut().poll_readable(cx)
    } else {
        Poll::Ready(Ok(()))
    }
}

/// Why a client's handshake did not complete.
pub enum HandshakeFailure<S> {
    /// The client spoke something else (plain HTTP): its stream, to answer.
    NotTls(S),
    /// The client closed the connection without sending a byte (a
    /// health check's TCP connect, a browser's unused preconnect): not a
    /// failed handshake.
    Silent,
    /// Not complete by the deadline.
    TimedOut,
    /// The handshake failed: a protocol error, an alert, or the peer left.
    Failed(std::io::Error),
}

impl ServerTls {
    /// TLS 1.2 and 1.3 with ALPN `http/1.1` (and first `h2` when
    /// `http2`), presenting `certificate`; stateless session tickets for
    /// resumption, as nginx's default.
    pub fn new(certificate: Arc<CertifiedKey>, http2: bool) -> Result<Self, rustls::Error> {
        let current = Arc::new(CurrentCertificate(RwLock::new(certificate)));
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // The server's order decides: HTTP/2 for a client offering both.
        config.alpn_protocols = match http2 {
            true => vec![H2.to_vec(), HTTP_1_1.to_vec()],
            false => vec![HTTP_1_1.to_vec()],
        };
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Self {
            acceptor: futures_rustls::TlsAcceptor::from(Arc::new(config)),
            certificate: current,
        })
    }

    /// Presents `certificate` to every handshake from now on; connections
    /// already open keep theirs.
    pub fn replace_certificate(&self, certificate: Arc<CertifiedKey>) {
        *self
            .certificate
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = certificate;
    }

    /// Completes a client's handshake by `deadline`.
    pub async fn accept<R: Runtime, S: backends::Stream>(
        &self,
        stream: S,
        deadline: Instant,
    ) -> Result<ServerStream<S>, HandshakeFailure<S>> {
        let handshake = self
            .acceptor
            .accept(FuturesIo::expecting_tls(stream))
            .into_fallible();
        match timeout_at::<R, _>(deadline, handshake).await {
            Ok(Ok(tls)) => Ok(HyperIo::new(tls)),
            Ok(Err((_, io))) if io.not_tls() => Err(HandshakeFailure::NotTls(io.into_inner())),
            Ok(Err((_, io))) if !io.read_any() => Err(HandshakeFailure::Silent),
            Ok(Err((error, _))) => Err(HandshakeFailure::Failed(error)),
            Err(Elapsed) => Err(HandshakeFailure::TimedOut),
        }
    }
}

/// What a served connection speaks under HTTP, as the access log names
/// it: a byte, since a parked connection keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    Tls12,
    Tls13,
    /// TLS of a version rustls did not report.
    Tls,
}

impl Security {
    pub fn name(self) -> &'static str {
        match self {
            Security::Plain => "none",
            Security::Tls12 => "TLSv1.2",
            Security::Tls13 => "TLSv1.3",
            Security::Tls => "TLS",
        }
    }
}

/// The TLS version a served connection negotiated.
pub fn negotiated<S>(stream: &ServerStream<S>) -> Security {
    match stream.get_ref().get_ref().1.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => Security::Tls13,
        Some(ProtocolVersion::TLSv1_2) => Security::Tls12,
        _ => Security::Tls,
    }
}

/// Whether ALPN chose HTTP/2 for a served connection. A client that
/// offered no ALPN speaks HTTP/1.1.
pub fn chose_http2<S>(stream: &ServerStream<S>) -> bool {
    stream.get_ref().get_ref().1.alpn_protocol() == Some(H2)
}

/// Answers a client that spoke plain HTTP to the TLS listener, and closes:
/// nothing it sent is served.
pub async fn refuse_plain_http<S: backends::Stream>(stream: S) {
    const ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
        content-type: text/plain\r\n\
        content-length: 35\r\n\
        connection: close\r\n\r\n\
        This port speaks HTTPS, not HTTP.\r\n";
    let mut io = FuturesIo::new(stream);
    // The client may be gone already; there is nobody to tell then.
    if io.write_all(ANSWER).await.is_ok() {
        let _ = io.close().await;
    }
}

/// A client configuration verifying servers against `roots`, speaking
/// `http/1.1`, and resuming sessions with the servers it has met.
fn client_config(roots: rustls::RootCertStore) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![HTTP_1_1.to_vec()];
    Ok(config)
}
