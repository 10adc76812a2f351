//! Why an upstream client could not be built, at start or on a reload.

/// Why [`Upstream::new`](super::Upstream::new) failed; the message names
/// the upstream as configured (the daemon escapes it).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An `https://` upstream, and no TLS client settings to reach it with.
    #[error("upstream {authority} is https, and no TLS settings were given for it")]
    NoTls { authority: String },
}
