//! One HTTP/1.1 client connection, plain or over TLS: connecting (with
//! its handshake), one request's exchange, and the probe that says what a
//! server's TLS negotiated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How one client connection reaches the server.
pub(super) struct Client {
    pub(super) target: SocketAddr,
    pub(super) tls: Option<TlsConnector>,
    pub(super) new_connections: bool,
}

/// A connection to the server, plain or TLS; the TLS state is boxed, as it
/// is far larger than a socket.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Client {
    /// A TCP connection, and over TLS its handshake, verified against the
    /// bench's CA for the address connected to (the certificate names
    /// `127.0.0.1` as well as `localhost`).
    pub(super) async fn connect(&self) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(self.target)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let Some(connector) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let tls = connector
            .connect(ServerName::from(self.target.ip()), tcp)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// One TLS handshake with `target`, to say what it negotiated (protocol,
/// cipher suite, key exchange, ALPN, full or resumed), and to fail early,
/// with rustls's reason, where the server does not present the bench's
/// certificate.
pub fn tls_probe(target: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client {
        target,
        tls: Some(TlsConnector::from(config)),
        new_connections: true,
    };
    let stream = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), client.connect())
            .await
            .map_err(|_| std::io::Error::other("TLS handshake: no answer within 5s"))?
    })?;
    let Stream::Tls(stream) = stream else {
        return Err(std::io::Error::other("not a TLS connection"));
    };
    let (_, session) = stream.get_ref();
    let show = |value: Option<String>| value.unwrap_or_else(|| "none".to_owned());
    Ok(format!(
        "{}, {}, {}, ALPN {}, {} handshake",
        show(session.protocol_version().map(|v| format!("{v:?}"))),
        show(
            session
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
        ),
        show(
            session
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
        ),
        show(
            session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        ),
        show(session.handshake_kind().map(|k| format!("{k:?}"))).to_lowercase(),
    ))
}

pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) keep_alive: bool,
}

/// Writes one request and reads its answer whole.
pub(super) async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    buffer: &mut Vec<u8>,
) -> std::io::Result<Answer> {
    stream.write_all(request).await?;
    // A TLS stream may hold the record it sealed until flushed; a socket's
    // flush does nothing.
    stream.flush().await?;
    buffer.clear();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buffer) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or(0);
                let mut content_length = 0usize;
                let mut chunked = false;
                let mut keep_alive = response.version == Some(1);
                for header in response.headers.iter() {
                    if header.name.eq_ignore_ascii_case("content-length") {
                        content_length = std::str::from_utf8(header.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| std::io::Error::other("bad content-length"))?;
                    } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = true;
                    } else if header.name.eq_ignore_ascii_case("connection") {
                        keep_alive = !header.value.eq_ignore_ascii_case(b"close");
                    }
                }
                read_body(stream, buffer, head_len, content_length, chunked).await?;
                return Ok(Answer { status, keep_alive });
            }
            Ok(httparse::Status::Partial) => read_more(stream, buffer).await?,
            Err(error) => return Err(std::io::Error::other(error)),
        }
    }
}

async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
    head_len: usize,
    content_length: usize,
    chunked: bool,
) -> std::io::Result<()> {
    if chunked {
        // The servers measured here send at most a small chunked body:
        // read until its terminating zero-length chunk.
        while !buffer[head_len..].ends_with(b"0\r\n\r\n") {
            read_more(stream, buffer).await?;
        }
        return Ok(());
    }
    while buffer.len() < head_len + content_length {
        read_more(stream, buffer).await?;
    }
    Ok(())
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
) -> std::io::Result<()> {
    let len = buffer.len();
    buffer.resize(len + 4096, 0);
    let n = stream.read(&mut buffer[len..]).await;
    match n {
        Ok(0) => {
            buffer.truncate(len);
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
        Ok(n) => {
            buffer.truncate(len + n);
            Ok(())
        }
        Err(error) => {
            buffer.truncate(len);
            Err(error)
        }
    }
}
