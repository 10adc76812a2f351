//! TLS to PostgreSQL, as libpq's `sslmode`s check the server: not at all
//! (`prefer`, `require`), its chain only (`verify-ca`), or its chain and
//! its name (`verify-full`). The PostgreSQL client drives the handshake;
//! this is the rustls configuration it is given, and the one place where
//! a certificate that did not verify is remembered for the error that
//! stops the start, which names it.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::{VERSIONS, provider};

/// What is checked of the database server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatabaseVerification {
    /// Nothing: encrypted, but open to whoever answers on the way.
    None,
    /// That a root trusted here signed it, whatever name it is for.
    Chain,
    /// That, and that it is for the host connected to.
    ChainAndName,
}

/// A rustls client configuration for PostgreSQL connections, and the
/// certificate its last failed verification was shown.
#[derive(Clone)]
pub struct DatabaseTls {
    config: Arc<ClientConfig>,
    rejected: Arc<Mutex<Option<String>>>,
}

/// libpq's application protocol name: PostgreSQL 17 insists on it where
/// a client names one, and earlier servers ignore it.
const POSTGRESQL: &[u8] = b"postgresql";

impl DatabaseTls {
    /// Checks servers as `verification` says, against `roots` (needed
    /// for any verification).
    pub fn new(
        verification: DatabaseVerification,
        roots: Option<RootCertStore>,
    ) -> Result<Self, rustls::Error> {
        let provider = Arc::new(provider());
        let chain = match (verification, roots) {
            (DatabaseVerification::None, _) => None,
            (_, Some(roots)) => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|error| rustls::Error::General(error.to_string()))?,
            ),
            (_, None) => {
                return Err(rustls::Error::General(
                    "certificate verification needs roots to verify against".to_owned(),
                ));
            }
        };
        let rejected = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            chain,
            check_name: verification == DatabaseVerification::ChainAndName,
            provider: provider.clone(),
            rejected: rejected.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![POSTGRESQL.to_vec()];
        Ok(Self {
            config: Arc::new(config),
            rejected,
        })
    }

    /// The configuration to hand the PostgreSQL client.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The last certificate that did not verify (its subject and issuer),
    /// taken: to name it in the error the failed handshake gives.
    pub fn take_rejected(&self) -> Option<String> {
        self.rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

#[derive(Debug)]
struct Verifier {
    /// The chain's verifier; none where nothing is checked.
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
    rejected: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // webpki checks the chain before the name: a name error
            // means the chain verified.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            Err(error) => {
                *self.rejected.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(describe(end_entity));
                Err(error)
            }
            verified => verified,
        }
    }

    // The handshake's signatures are checked in every mode, so that
    // even an unverified certificate's key is the one the server holds.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A certificate as an operator finds it: its subject and its issuer.
fn describe(certificate: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(certificate) {
        Ok((_, parsed)) => format!(
            "subject \"{}\", issuer \"{}\"",
            parsed.subject(),
            parsed.issuer()
        ),
        Err(_) => "a certificate that does not parse".to_owned(),
    }
}
