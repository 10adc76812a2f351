//! Reading the PEM files the configuration names: the public listener's
//! certificate chain and key, checked to belong together, and the CA
//! certificates an https upstream is verified against. Errors say which
//! file and why, for the configuration error that names the key.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::provider;
use crate::config::Escaped;

/// The most a PEM file may hold: far more than any chain or CA bundle
/// (the system's is about 200 KiB), and a bound on a file that is not one.
const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// Reads a file for its PEM sections; only a regular file is read, so a
/// FIFO or `/dev/zero` named by mistake cannot stall or fill memory.
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let shown = Escaped(path.display());
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !metadata.is_file() {
        return Err(format!("cannot read {shown}: not a regular file"));
    }
    if metadata.len() > MAX_PEM_BYTES {
        return Err(format!(
            "cannot read {shown}: larger than {MAX_PEM_BYTES} bytes"
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))
}

/// Every certificate in the PEM file at `path`, in order; none is an error.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let shown = Escaped(path.display());
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown}: not a valid PEM certificate file ({e})"))?;
    if certificates.is_empty() {
        return Err(format!(
            "{shown}: no certificate in it (expected \"-----BEGIN CERTIFICATE-----\")"
        ));
    }
    Ok(certificates)
}

/// Where a problem with the certificate and key lies: the configuration
/// key to name in the error, and the message.
pub type KeyedError = (&'static str, String);

/// The certificate chain at `cert_path` (leaf first) with the private key
/// at `key_path` (PKCS#8, SEC1 or PKCS#1), checked to match.
pub fn certified_key(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, KeyedError> {
    let chain = certificates(cert_path).map_err(|e| ("server.tls_cert", e))?;
    let pem = read_pem(key_path).map_err(|e| ("server.tls_key", e))?;
    let shown = Escaped(key_path.display());
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        (
            "server.tls_key",
            format!("{shown}: no usable private key in it ({e})"),
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        (
            "server.tls_key",
            format!(
                "{shown} does not go with the certificate in {} ({e})",
                Escaped(cert_path.display())
            ),
        )
    })?;
    Ok(Arc::new(certified))
}

/// The roots an https upstream is verified against: the CA certificates in
/// `ca_path`, or the system's trusted roots.
pub fn roots(ca_path: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_path {
        Some(path) => {
            for certificate in certificates(path)? {
                roots.add(certificate).map_err(|e| {
                    format!(
                        "{}: a certificate in it is not a usable CA ({e})",
                        Escaped(path.display())
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(format!(
                    "no trusted root certificate on this system to verify the upstream with ({why}); install ca-certificates or set upstream.tls_ca"
                ));
            }
        }
    }
    Ok(roots)
}
