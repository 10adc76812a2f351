//! The start of an HTTPS connection: the TLS handshake, within the
//! header-read timeout, before the connection driver takes over with the
//! HTTP that ALPN chose.

use backends::Runtime;

use super::connection::{Accepted, Offered, adopt, serve_connection};
use crate::service::Service;
use crate::time::timeout_at;
use crate::tls::{self, HandshakeFailure, ServerTls};

/// Completes the client's TLS handshake, then serves HTTP over it. A
/// client that spoke plain HTTP is answered 400 and closed; one that
/// fails the handshake, or is not through it when the header-read timeout
/// passes, is closed. Each of those is counted.
pub(super) async fn serve_tls<R: Runtime, S: Service>(
    tls: &'static ServerTls,
    stream: std::net::TcpStream,
    mut connection: Accepted<S>,
) {
    let settings = connection.listening.settings;
    let peer = connection.peer;
    let deadline = connection.at + settings.header_read_timeout;
    let Some(stream) = adopt::<R>(stream, peer) else {
        return;
    };
    let failure = match tls.accept::<R, _>(stream, deadline).await {
        Ok(stream) => {
            let security = tls::negotiated(&stream);
            connection.offered = match tls::chose_http2(&stream) {
                true => Offered::Http2,
                false => Offered::Http1,
            };
            let open_stream = move |_| Some(stream);
            return serve_connection::<R, S, _>(
                open_stream,
                security,
                Box::new(connection),
                tls::poll_readable,
            )
            .await;
        }
        Err(failure) => failure,
    };
    // A client that left without a byte (a health check's connect) failed
    // no handshake.
    if let (Some(metrics), false) = (
        settings.metrics,
        matches!(failure, HandshakeFailure::Silent),
    ) {
        metrics.record_tls_handshake_failure();
    }
    match failure {
        HandshakeFailure::Silent => tracing::debug!(%peer, "closed before a TLS handshake"),
        HandshakeFailure::NotTls(stream) => {
            tracing::debug!(%peer, "plain HTTP on the TLS listener; answered 400");
            let _ = timeout_at::<R, _>(deadline, tls::refuse_plain_http(stream)).await;
        }
        HandshakeFailure::TimedOut => tracing::debug!(%peer, "TLS handshake timed out"),
        HandshakeFailure::Failed(error) => tracing::debug!(%peer, %error, "TLS handshake failed"),
    }
}
