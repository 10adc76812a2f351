//! `--tls`: the certificate every server the bench starts presents, and
//! the one client configuration its load generator trusts it with.
//!
//! At start the bench makes a CA of its own and, signed by it, an ECDSA
//! P-256 leaf for `localhost` and `127.0.0.1`, and writes them as PEM into
//! `--out/tls/`: `chain.pem` (the leaf, then the CA, as a deployed server
//! sends its leaf and an intermediate), `key.pem` (the leaf's key, PKCS#8)
//! and `ca.pem`. The gateway and nginx serve the same two files, so their
//! handshakes cost the same bytes and the same signature; the client
//! trusts the CA alone, so a server that answered with anything else fails
//! the run instead of being measured.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::Resumption;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// The PEM files the servers are configured with.
pub struct Certificates {
    /// The leaf first, then the CA.
    pub chain: PathBuf,
    /// The leaf's private key, PKCS#8.
    pub key: PathBuf,
    /// The CA alone, for `curl --cacert`.
    pub ca: PathBuf,
    ca_der: CertificateDer<'static>,
}

/// Makes a fresh CA and leaf and writes them into `out/tls/`.
pub fn generate(out: &Path) -> Result<Certificates, String> {
    let failed = |what: &str, e: rcgen::Error| format!("generating the {what}: {e}");
    let ca_key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| failed("CA's key", e))?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gateway bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| failed("CA certificate", e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| failed("leaf's key", e))?;
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| failed("leaf's names", e))?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &issuer)
        .map_err(|e| failed("leaf certificate", e))?;

    let dir = out.join("tls");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let certificates = Certificates {
        chain: dir.join("chain.pem"),
        key: dir.join("key.pem"),
        ca: dir.join("ca.pem"),
        ca_der: ca_cert.der().clone(),
    };
    write(
        &certificates.chain,
        &format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        0o644,
    )?;
    write(&certificates.key, &leaf_key.serialize_pem(), 0o600)?;
    write(&certificates.ca, &ca_cert.pem(), 0o644)?;
    Ok(certificates)
}

/// Replaces `path` with `text`, created with `mode` (a key left readable
/// by others would outlive the run in `--out`).
fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)
}

impl Certificates {
    /// The client side: TLS 1.3 only, ALPN `http/1.1`, trusting the
    /// bench's CA alone. Without `resumption`, every connection makes a
    /// full handshake (a new key exchange and a signature checked), which
    /// is what a connection per request is meant to measure; with it, a
    /// keep-alive connection that the server closed comes back on a
    /// resumed session, as a browser's would.
    pub fn client_config(&self, resumption: bool) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(|e| format!("the bench's CA is not usable as a root: {e}"))?;
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| format!("TLS client: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if !resumption {
            config.resumption = Resumption::disabled();
        }
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{PrivateKeyDer, ServerName, UnixTime};

    #[test]
    fn the_leaf_is_p256_for_both_names_and_verifies_against_the_ca() {
        let dir = std::env::temp_dir().join(format!("bench-tls-test-{}", std::process::id()));
        let certificates = generate(&dir).unwrap();
        let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(&certificates.chain)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf, then CA");
        assert_eq!(chain[1], certificates.ca_der);
        let key = std::fs::read_to_string(&certificates.key).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let signer = provider.key_provider.load_private_key(key).unwrap();
        assert_eq!(signer.algorithm(), rustls::SignatureAlgorithm::ECDSA);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&certificates.key).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);

        let config = certificates.client_config(false).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let roots = {
            let mut roots = RootCertStore::empty();
            roots.add(certificates.ca_der.clone()).unwrap();
            Arc::new(roots)
        };
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        for name in ["localhost", "127.0.0.1"] {
            let name = ServerName::try_from(name).unwrap();
            webpki
                .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
                .unwrap();
        }
        let other = ServerName::try_from("example.com").unwrap();
        assert!(
            webpki
                .verify_server_cert(&chain[0], &chain[1..], &other, &[], UnixTime::now())
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
