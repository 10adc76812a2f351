//! Why an upstream client could not be built at start.

/// Why [`Upstream::new`](super::Upstream::new) failed; the message names
/// the upstream as configured (the daemon escapes it). A plan always
/// brings TLS settings for an https upstream, so the daemon never meets
/// this: it guards other callers of `Upstream::new`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An `https://` upstream, and no TLS client settings to reach it with.
    #[error("upstream {authority} is https, and no TLS settings were given for it")]
    NoTls { authority: String },
}
