//! Reading the PEM files the configuration names: the public listener's
//! certificate chain and key, checked to belong together, and the CA
//! certificates an https upstream is verified against. Errors say which
//! file and why (for a key ring refuses, the reason rustls leaves out),
//! for the configuration error that names the key. Also whether the
//! listener's certificate is out of date, which rustls does not check.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore};

use super::provider;
use crate::escaped::Escaped;

/// The most a PEM file may hold: far more than any chain or CA bundle
/// (the system's is about 200 KiB), and a bound on a file that is not one.
const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// Why a PEM file gave no certificates (or CA roots) to use; each names
/// the file, as shown in a configuration error (escaped).
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    #[error("cannot read {file}: {source}")]
    Unreadable {
        file: String,
        source: std::io::Error,
    },
    /// A FIFO, a device or a folder.
    #[error("cannot read {file}: not a regular file")]
    NotAFile { file: String },
    #[error("cannot read {file}: larger than {max} bytes", max = MAX_PEM_BYTES)]
    TooLarge { file: String },
    #[error("{file}: not a valid PEM certificate file ({source})")]
    NotPem {
        file: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{file}: no certificate in it (expected \"-----BEGIN CERTIFICATE-----\")")]
    NoCertificate { file: String },
    #[error("{file}: a certificate in it is not a usable CA ({source})")]
    UnusableCa { file: String, source: rustls::Error },
    /// No `upstream.tls_ca`, and the system's store gave no root: `why`
    /// is the first reason it gave, or that it had none.
    #[error(
        "no trusted root certificate on this system to verify the upstream with ({why}); install ca-certificates or set upstream.tls_ca"
    )]
    NoSystemRoots { why: String },
}

/// `path` as a configuration error shows it.
fn shown(path: &Path) -> String {
    Escaped(path.display()).to_string()
}

/// Reads a file for its PEM sections; only a regular file is read, so a
/// FIFO or `/dev/zero` named by mistake cannot stall or fill memory.
fn read_pem(path: &Path) -> Result<Vec<u8>, PemFileError> {
    let unreadable = |source| PemFileError::Unreadable {
        file: shown(path),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(PemFileError::NotAFile { file: shown(path) });
    }
    if metadata.len() > MAX_PEM_BYTES {
        return Err(PemFileError::TooLarge { file: shown(path) });
    }
    std::fs::read(path).map_err(unreadable)
}

/// Every certificate in the PEM file at `path`, in order; none is an error.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let pem = read_pem(path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemFileError::NotPem {
            file: shown(path),
            source,
        })?;
    if certificates.is_empty() {
        return Err(PemFileError::NoCertificate { file: shown(path) });
    }
    Ok(certificates)
}

/// Where a problem with the certificate and key lies: the configuration
/// key to name in the error, and the message.
pub type KeyedError = (&'static str, String);

/// The certificate chain at `cert_path` (leaf first) with the private key
/// at `key_path` (PKCS#8, SEC1 or PKCS#1), checked to match.
pub fn certified_key(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, KeyedError> {
    let chain = certificates(cert_path).map_err(|e| ("server.tls_cert", e.to_string()))?;
    let pem = read_pem(key_path).map_err(|e| ("server.tls_key", e.to_string()))?;
    let shown = Escaped(key_path.display());
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        (
            "server.tls_key",
            format!("{shown}: no usable private key in it ({e})"),
        )
    })?;
    // What `CertifiedKey::from_der` does, in two steps: a key ring cannot
    // use fails the first, and rustls's error for it names no reason.
    let signing_key = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            (
                "server.tls_key",
                format!("{shown}: {}", unusable_key(&key, e)),
            )
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // A key whose public half rustls cannot work out is let through,
        // as `from_der` lets it.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err((
                "server.tls_key",
                format!(
                    "{shown} does not go with the certificate in {} ({e})",
                    Escaped(cert_path.display())
                ),
            ));
        }
    }
    Ok(Arc::new(certified))
}

/// A certificate outside its validity period. rustls serves it all the
/// same; every client that verifies it refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfDate {
    /// Past its notAfter; else before its notBefore.
    pub expired: bool,
    /// Its notBefore and notAfter, as `2001-01-01 00:00:00 UTC`.
    pub not_before: String,
    pub not_after: String,
}

/// Whether the certificate `certified` presents (its chain's first) is
/// outside its validity period at `now` (seconds since the Unix epoch).
/// `None` also for one that does not parse here: clients refuse it for
/// that, and there is no date to tell.
pub fn out_of_date(certified: &CertifiedKey, now: i64) -> Option<OutOfDate> {
    use x509_parser::time::ASN1Time;

    let leaf = certified.end_entity_cert().ok()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let validity = certificate.validity();
    let now = ASN1Time::from_timestamp(now).ok()?;
    if validity.is_valid_at(now) {
        return None;
    }
    let text = |time: ASN1Time| {
        let time = time.to_datetime();
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            time.year(),
            u8::from(time.month()),
            time.day(),
            time.hour(),
            time.minute(),
            time.second()
        )
    };
    Some(OutOfDate {
        expired: now > validity.not_after,
        not_before: text(validity.not_before),
        not_after: text(validity.not_after),
    })
}

/// Why ring cannot sign with `key`, which it refused with `error`. Its
/// reasons for an RSA key are lost in rustls's error, and the likeliest
/// one, the key's size, is told from the key itself.
fn unusable_key(key: &PrivateKeyDer<'_>, error: rustls::Error) -> String {
    const TAKEN: &str = "rustls (on ring) takes RSA keys of 2048, 3072 or 4096 bits, \
        ECDSA keys on P-256 or P-384, and Ed25519 keys";
    match rsa_key_bits(key) {
        // ring's bounds: a modulus of 2048 to 4096 bits whose primes are
        // each a multiple of 512 bits long.
        Some(bits) if !(2047..=4096).contains(&bits) || bits.div_ceil(2) % 512 != 0 => {
            format!("an RSA key of {bits} bits, which ring cannot sign with: {TAKEN}")
        }
        Some(bits) => {
            let why = rustls::crypto::ring::sign::RsaSigningKey::new(key).err();
            format!(
                "an RSA key of {bits} bits that ring refuses ({})",
                why.unwrap_or(error)
            )
        }
        None => format!("not a key ring can sign with ({error}): {TAKEN}"),
    }
}

/// The size in bits of an RSA private key's modulus; `None` for a key
/// that is not RSA (PKCS#1, or PKCS#8 marked rsaEncryption) or does not
/// parse.
fn rsa_key_bits(key: &PrivateKeyDer<'_>) -> Option<u64> {
    use x509_parser::der_parser::parse_der;
    use x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION;

    let wrapped;
    let pkcs1 = match key {
        PrivateKeyDer::Pkcs1(key) => key.secret_pkcs1_der(),
        PrivateKeyDer::Pkcs8(key) => {
            // PrivateKeyInfo: version, algorithm, privateKey (RSAPrivateKey).
            wrapped = parse_der(key.secret_pkcs8_der()).ok()?.1;
            let fields = wrapped.as_sequence().ok()?;
            let algorithm = fields.get(1)?.as_sequence().ok()?.first()?.as_oid().ok()?;
            if *algorithm != OID_PKCS1_RSAENCRYPTION {
                return None;
            }
            fields.get(2)?.as_slice().ok()?
        }
        _ => return None,
    };
    // RSAPrivateKey: version, modulus, …
    let (_, rsa) = parse_der(pkcs1).ok()?;
    let modulus = rsa.as_sequence().ok()?.get(1)?.as_slice().ok()?;
    let modulus = &modulus[modulus.iter().position(|&b| b != 0)?..];
    let leading = u64::from(modulus.first()?.leading_zeros());
    Some(modulus.len() as u64 * 8 - leading)
}

/// The roots an https upstream is verified against: the CA certificates in
/// `ca_path`, or the system's trusted roots.
pub fn roots(ca_path: Option<&Path>) -> Result<RootCertStore, PemFileError> {
    let mut roots = RootCertStore::empty();
    match ca_path {
        Some(path) => {
            for certificate in certificates(path)? {
                roots
                    .add(certificate)
                    .map_err(|source| PemFileError::UnusableCa {
                        file: shown(path),
                        source,
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
                return Err(PemFileError::NoSystemRoots { why });
            }
        }
    }
    Ok(roots)
}
