//! TLS for the tests: certificate authorities and server certificates
//! made at test time with rcgen (ECDSA P-256), written as PEM files for
//! the gateway's config; an HTTPS client (hyper over tokio-rustls) that
//! tells which certificate the server showed; and an HTTPS counter served
//! in the test process that tallies TCP connections, TLS handshakes and
//! the POSTs that reached its HTTP layer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{
    self, ClientConfig, ServerConfig, SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{Answer, read_answer};

/// The ring provider, named rather than left to the process default.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses),
    /// valid from 1975 to 4096.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, |_| {})
    }

    /// A server certificate for `names`, its parameters adjusted first.
    pub fn leaf_with(&self, names: &[&str], adjust: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = self.sign(names, adjust, &key);
        Leaf {
            pem: cert.pem(),
            der: cert.der().clone(),
            key,
            ca_pem: self.pem.clone(),
        }
    }

    /// A server certificate for `names` whose key is RSA of `bits` bits,
    /// made by `openssl genrsa` and written PKCS#1 (`RSA PRIVATE KEY`):
    /// the chain and the key as `folder/rsa-BITS.{crt,key}`, and the
    /// certificate. `None` when there is no `openssl` to make the key.
    pub fn rsa_leaf(
        &self,
        names: &[&str],
        folder: &Path,
        bits: u32,
    ) -> Option<(PathBuf, PathBuf, CertificateDer<'static>)> {
        let key = folder.join(format!("rsa-{bits}.key"));
        // OpenSSL 3 writes PKCS#8 unless told -traditional, which 1.1 lacks.
        let genrsa = |extra: &[&str]| {
            std::process::Command::new("openssl")
                .arg("genrsa")
                .args(extra)
                .arg("-out")
                .arg(&key)
                .arg(bits.to_string())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        };
        if !genrsa(&["-traditional"]) && !genrsa(&[]) {
            return None;
        }
        let pem = std::fs::read_to_string(&key).ok()?;
        if !pem.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
            return None;
        }
        let public = std::process::Command::new("openssl")
            .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
            .arg(&key)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        if !public.status.success() {
            return None;
        }
        let cert = self.sign(names, |_| {}, &RsaPublicKey(public.stdout));
        let cert_path = folder.join(format!("rsa-{bits}.crt"));
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), self.pem))
            .expect("write certificate");
        Some((cert_path, key, cert.der().clone()))
    }

    /// A server certificate for `names` and `key`, its parameters
    /// adjusted first.
    fn sign(
        &self,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
        key: &impl rcgen::PublicKeyData,
    ) -> rcgen::Certificate {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        adjust(&mut params);
        params.signed_by(key, &self.issuer).expect("signed leaf")
    }

    /// Writes the CA certificate as `folder/NAME`; its path.
    pub fn write(&self, folder: &Path, name: &str) -> PathBuf {
        let path = folder.join(name);
        std::fs::write(&path, &self.pem).expect("write CA");
        path
    }

    /// A client trusting this CA alone, offering ALPN `http/1.1`.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client_config_for(rustls::DEFAULT_VERSIONS)
    }

    /// As [`Self::client_config`], offering only `versions`.
    pub fn client_config_for(
        &self,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("a root");
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// An RSA public key, as PKCS#1 RSAPublicKey DER.
struct RsaPublicKey(Vec<u8>);

impl rcgen::PublicKeyData for RsaPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

/// A server certificate and its key.
pub struct Leaf {
    /// The certificate alone, PEM.
    pub pem: String,
    pub der: CertificateDer<'static>,
    key: KeyPair,
    ca_pem: String,
}

impl Leaf {
    /// The key, PKCS#8 PEM (`PRIVATE KEY`).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The key, SEC1 PEM (`EC PRIVATE KEY`), as `openssl ec` writes it.
    pub fn key_sec1_pem(&self) -> String {
        pem_encode("EC PRIVATE KEY", pkcs8_to_sec1(self.key.serialized_der()))
    }

    /// The chain the server shows: this certificate, then its CA's.
    pub fn chain_pem(&self) -> String {
        format!("{}{}", self.pem, self.ca_pem)
    }

    /// Writes the chain and the PKCS#8 key as `folder/NAME.crt` and
    /// `folder/NAME.key` (replacing what was there); their paths.
    pub fn write(&self, folder: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = folder.join(format!("{name}.crt"));
        let key = folder.join(format!("{name}.key"));
        std::fs::write(&cert, self.chain_pem()).expect("write certificate");
        std::fs::write(&key, self.key_pem()).expect("write key");
        (cert, key)
    }

    /// A rustls server config serving this certificate (for the test
    /// counter), with ALPN `http/1.1`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialized_der().to_vec()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], key)
            .expect("certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// The names the gateway's certificates carry: tests connect to
/// 127.0.0.1 and verify `localhost`, or the IP itself.
pub const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// The gateway's answer to a visit.
pub const WELCOME: &str = "Welcome to my site!";

/// Writes `leaf` (chain and key) as `folder/server.{crt,key}` and starts
/// the gateway of `config` serving it, its config file in `folder`.
pub fn serve_tls(config: super::GatewayConfig, leaf: &Leaf, folder: &Path) -> super::Process {
    let (cert, key) = leaf.write(folder, "server");
    config
        .server(&server_lines(&cert, &key))
        .in_folder(folder)
        .start()
}

/// A gateway serving HTTPS on a leaf of a test CA of its own, with an
/// admin listener, in front of a scripted upstream that answers 200.
pub struct TlsSite {
    _gateway: super::Process,
    pub upstream: super::TestUpstream,
    pub ca: TestCa,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    _folder: tempfile::TempDir,
}

impl TlsSite {
    pub async fn start(backend: super::Backend) -> Self {
        let folder = tempfile::tempdir().unwrap();
        let ca = TestCa::new("test CA");
        let upstream = super::TestUpstream::start(super::Behaviour::Ok).await;
        let gateway = serve_tls(
            super::GatewayConfig::new(backend, upstream.addr).with_admin(),
            &ca.leaf(SERVER_NAMES),
            folder.path(),
        );
        let (public, admin) = (gateway.addr("public"), gateway.addr("admin"));
        Self {
            _gateway: gateway,
            upstream,
            ca,
            public,
            admin,
            _folder: folder,
        }
    }
}

/// `[server]` lines serving `cert` and `key` over TLS.
pub fn server_lines(cert: &Path, key: &Path) -> String {
    format!("tls_cert = {:?}\ntls_key = {:?}", cert, key)
}

/// One DER element at `at`: (tag, start of its contents, end).
fn der_element(der: &[u8], at: usize) -> (u8, usize, usize) {
    let tag = der[at];
    let first = der[at + 1] as usize;
    let (length, start) = if first < 0x80 {
        (first, at + 2)
    } else {
        let bytes = first & 0x7f;
        let length = der[at + 2..at + 2 + bytes]
            .iter()
            .fold(0, |n, b| (n << 8) | *b as usize);
        (length, at + 2 + bytes)
    };
    (tag, start, start + length)
}

/// A DER element: `tag`, its length, `contents`.
fn der_encode(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = contents.len();
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes: Vec<u8> = length
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// The SEC1 ECPrivateKey in a P-256 key's PKCS#8 PrivateKeyInfo (the
/// contents of its privateKey OCTET STRING), with the curve named in it
/// as OpenSSL writes it (ring leaves the optional parameters out).
fn pkcs8_to_sec1(der: &[u8]) -> Vec<u8> {
    let (tag, body, _) = der_element(der, 0);
    assert_eq!(tag, 0x30, "PrivateKeyInfo is a SEQUENCE");
    let (tag, _, after_version) = der_element(der, body);
    assert_eq!(tag, 0x02, "version");
    let (tag, _, after_algorithm) = der_element(der, after_version);
    assert_eq!(tag, 0x30, "algorithm");
    let (tag, start, end) = der_element(der, after_algorithm);
    assert_eq!(tag, 0x04, "privateKey OCTET STRING");
    let sec1 = &der[start..end];
    // ECPrivateKey: version, privateKey, [0] parameters OPTIONAL,
    // [1] publicKey OPTIONAL.
    let (tag, body, _) = der_element(sec1, 0);
    assert_eq!(tag, 0x30, "ECPrivateKey is a SEQUENCE");
    let (_, _, after_version) = der_element(sec1, body);
    let (tag, _, after_key) = der_element(sec1, after_version);
    assert_eq!(tag, 0x04, "privateKey");
    if sec1.get(after_key) == Some(&0xa0) {
        return sec1.to_vec();
    }
    // prime256v1, 1.2.840.10045.3.1.7.
    let curve = der_encode(
        0xa0,
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
    );
    let mut contents = sec1[body..after_key].to_vec();
    contents.extend_from_slice(&curve);
    contents.extend_from_slice(&sec1[after_key..]);
    der_encode(0x30, &contents)
}

/// PEM: `label` around the base64 of `der`, 64 characters a line.
fn pem_encode(label: &str, der: Vec<u8>) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                text.push('=');
            }
        }
    }
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// Opens TCP to `addr` and makes a TLS handshake with `name` as SNI and
/// as the name the certificate must carry.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    let handshake = TlsConnector::from(config).connect(name, stream);
    tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .map_err(|_| std::io::Error::other("TLS handshake took over 5 s"))?
}

/// The certificate problem behind a failed handshake, if that is what failed it.
pub fn certificate_error(error: &std::io::Error) -> Option<&rustls::CertificateError> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(error) => Some(error),
        _ => None,
    }
}

/// A keep-alive HTTPS client connection (hyper over tokio-rustls).
pub struct TlsClient {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    /// The certificate the server showed (its chain's first).
    pub peer: CertificateDer<'static>,
    /// The negotiated protocol version and ALPN protocol.
    pub version: Option<rustls::ProtocolVersion>,
    pub alpn: Option<Vec<u8>>,
}

impl TlsClient {
    /// Connects to `addr` as `localhost`, trusting `ca`.
    pub async fn connect(addr: SocketAddr, ca: &TestCa) -> Self {
        Self::try_connect(addr, "localhost", ca.client_config())
            .await
            .expect("HTTPS connect")
    }

    pub async fn try_connect(
        addr: SocketAddr,
        name: &str,
        config: Arc<ClientConfig>,
    ) -> std::io::Result<Self> {
        let stream = tls_connect(addr, name, config).await?;
        let (_, connection) = stream.get_ref();
        let peer = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .expect("the server showed a certificate")
            .clone()
            .into_owned();
        let version = connection.protocol_version();
        let alpn = connection.alpn_protocol().map(<[u8]>::to_vec);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            peer,
            version,
            alpn,
        })
    }

    pub async fn try_get(&mut self, path: &str) -> Result<Answer, hyper::Error> {
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(super::request("GET", path))
            .await?;
        read_answer(response).await
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.try_get(path).await.expect("HTTPS GET")
    }
}

/// One HTTPS GET on a new connection, as `localhost`, trusting `ca`.
pub async fn https_get(addr: SocketAddr, ca: &TestCa, path: &str) -> Answer {
    TlsClient::connect(addr, ca).await.get(path).await
}

/// The sum of every `gateway_tls_handshake_failures_total` sample on the
/// admin listener's `/metrics`, whatever its labels.
pub async fn handshake_failures(admin: SocketAddr) -> f64 {
    super::scrape(admin)
        .await
        .iter()
        .filter(|(name, _)| name.starts_with("gateway_tls_handshake_failures_total"))
        .map(|(_, value)| value)
        .sum()
}

/// Waits (at most 5 s) until [`handshake_failures`] reaches `at_least`;
/// the last value seen.
pub async fn wait_for_handshake_failures(admin: SocketAddr, at_least: f64) -> f64 {
    super::eventually(
        &format!("at least {at_least} gateway_tls_handshake_failures_total"),
        Duration::from_secs(5),
        async || {
            let seen = handshake_failures(admin).await;
            if seen >= at_least {
                Ok(seen)
            } else {
                Err(seen)
            }
        },
    )
    .await
}

/// The first flight a TLS client sends: its ClientHello record.
pub fn client_hello(config: Arc<ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut connection = rustls::ClientConnection::new(config, name).expect("a client");
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).expect("the ClientHello");
    hello
}

/// A ClientHello made by hand offering only `version` (`[3, 1]` for TLS
/// 1.0, `[3, 2]` for 1.1, `[3, 3]` for 1.2) and no supported_versions
/// extension, as an old client sends; its suites are ECDHE with AES-128
/// (GCM, which TLS 1.2 servers take, and the CBC-SHA of older clients).
pub fn client_hello_offering(version: [u8; 2]) -> Vec<u8> {
    let mut body = version.to_vec();
    body.extend_from_slice(&[0x11; 32]); // random
    body.push(0); // no session id
    let suites = [0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x09, 0xc0, 0x13];
    body.extend_from_slice(&(suites.len() as u16).to_be_bytes());
    body.extend_from_slice(&suites);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let extensions = [
        // supported_groups: secp256r1.
        &[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17][..],
        // ec_point_formats: uncompressed.
        &[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00],
        // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pkcs1_sha256.
        &[0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01],
    ]
    .concat();
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[derive(Default)]
struct TlsUpstreamState {
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    /// Of `handshakes`, those that resumed an earlier session.
    resumed: AtomicUsize,
    /// Connections that have ended, whichever side closed them.
    closed: AtomicUsize,
    failed_handshakes: AtomicUsize,
    posts: AtomicU64,
    /// Why each failed handshake failed, as the server saw it.
    failures: Mutex<Vec<String>>,
    server_names: Mutex<Vec<Option<String>>>,
}

/// Accepts on `listener` until aborted: a TLS handshake, then HTTP/1.1,
/// every POST answered 200 and counted; its connections end with it.
async fn serve_tls_upstream(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    served: Arc<TlsUpstreamState>,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        served.connections.fetch_add(1, Ordering::SeqCst);
        let state = served.clone();
        let closed = served.clone();
        let closed = move || closed.closed.fetch_add(1, Ordering::SeqCst);
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    state.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                    state.failures.lock().unwrap().push(error.to_string());
                    closed();
                    return;
                }
            };
            state.handshakes.fetch_add(1, Ordering::SeqCst);
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                state.resumed.fetch_add(1, Ordering::SeqCst);
            }
            let name = stream.get_ref().1.server_name().map(str::to_owned);
            state.server_names.lock().unwrap().push(name);
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let is_post = request.method() == http::Method::POST;
                    let _ = request.into_body().collect().await;
                    let mut response = Response::new(Full::new(Bytes::new()));
                    if is_post {
                        state.posts.fetch_add(1, Ordering::SeqCst);
                    } else {
                        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            closed();
        });
        while connections.try_join_next().is_some() {}
    }
}

/// An HTTPS counter in the test process: hyper over tokio-rustls, showing
/// one certificate and answering every POST 200.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    state: Arc<TlsUpstreamState>,
    tasks: JoinSet<()>,
}

impl TlsUpstream {
    /// Serves `leaf` on 127.0.0.1 and, where it can, on the same port of
    /// ::1 (for a URL naming `localhost`, whichever it resolves to).
    pub async fn start(leaf: &Leaf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(TlsUpstreamState::default());
        let acceptor = TlsAcceptor::from(leaf.server_config());
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_tls_upstream(
            listener,
            acceptor.clone(),
            state.clone(),
        ));
        if let Ok(v6) = TcpListener::bind(("::1", addr.port())).await {
            tasks.spawn(serve_tls_upstream(v6, acceptor, state.clone()));
        }
        Self { addr, state, tasks }
    }

    /// The server name (SNI) each completed handshake asked for.
    pub fn server_names(&self) -> Vec<Option<String>> {
        self.state.server_names.lock().unwrap().clone()
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed.
    pub fn handshakes(&self) -> usize {
        self.state.handshakes.load(Ordering::SeqCst)
    }

    /// Connections that have ended.
    pub fn closed(&self) -> usize {
        self.state.closed.load(Ordering::SeqCst)
    }

    /// Of those, the ones that resumed an earlier session.
    pub fn resumed(&self) -> usize {
        self.state.resumed.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed, and why (as this server saw it).
    pub fn failed_handshakes(&self) -> (usize, Vec<String>) {
        (
            self.state.failed_handshakes.load(Ordering::SeqCst),
            self.state.failures.lock().unwrap().clone(),
        )
    }

    /// POSTs that reached the HTTP layer.
    pub fn posts(&self) -> u64 {
        self.state.posts.load(Ordering::SeqCst)
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}
